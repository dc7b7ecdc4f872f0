import pytest
import torch

from fedssl.config import ConfigError, ModelConfig
from fedssl.models import ECGTransformer, ResNet1D, build_encoder

ENCODERS = ["st_mem", "resnet1d"]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_a_missing_lead_does_not_change_the_embedding(encoder):
    encoder = build_encoder(ModelConfig(encoder=encoder), 200).eval()
    x = torch.randn(3, 12, 200)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[:, [2, 9]] = False
    y = x.clone()
    y[:, [2, 9]] = torch.randn(3, 2, 200) * 100
    assert torch.allclose(encoder(x, mask), encoder(y, mask), atol=1e-5)
    mask[:, 2] = True  # once recorded, the lead does matter
    assert not torch.allclose(encoder(x, mask), encoder(y, mask), atol=1e-3)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_embedding_shape_and_no_batchnorm(encoder):
    encoder = build_encoder(ModelConfig(encoder=encoder), 1000)
    out = encoder(torch.randn(2, 12, 1000), torch.ones(2, 12, dtype=torch.bool))
    assert out.shape == (2, encoder.width) == (2, 128)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in encoder.modules())


def test_embedding_of_a_record_does_not_depend_on_its_batch():
    encoder = build_encoder(ModelConfig(encoder="resnet1d"), 200)
    x, mask = torch.randn(4, 12, 200), torch.ones(4, 12, dtype=torch.bool)
    assert torch.allclose(encoder(x, mask)[:2], encoder(x[:2], mask[:2]), atol=1e-5)


@pytest.mark.parametrize("size,width", [("tiny", 128), ("small", 384), ("base", 768)])
def test_resnet_sizes(size, width):
    encoder = build_encoder(ModelConfig(encoder="resnet1d", size=size), 1000)
    assert isinstance(encoder, ResNet1D) and encoder.width == width


def test_transformer_takes_shorter_windows_in_whole_patches():
    encoder = build_encoder(ModelConfig(), 200).eval()
    assert isinstance(encoder, ECGTransformer)
    mask = torch.ones(2, 12, dtype=torch.bool)
    assert encoder(torch.randn(2, 12, 100), mask).shape == (2, 128)
    for samples in (120, 250):  # not whole patches; longer than the position table
        with pytest.raises(ValueError, match="multiple of 50 up to 200"):
            encoder(torch.randn(2, 12, samples), mask)


def test_a_short_window_uses_the_first_positions():
    encoder = build_encoder(ModelConfig(), 200)
    lead_ids, pos_ids = encoder.token_ids(2)
    assert lead_ids.tolist() == [lead for lead in range(12) for _ in range(2)]
    assert pos_ids.tolist() == [0, 1] * 12


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown encoder"):
        build_encoder(ModelConfig(encoder="lstm"), 200)
