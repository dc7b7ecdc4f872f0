import pytest
import torch

from fedssl.config import ConfigError, ModelConfig
from fedssl.models import ConvTransformer, ECGTransformer, ResNet1D, build_encoder
from fedssl.objectives.generative import random_masking

ENCODERS = ["st_mem", "resnet1d", "conv_transformer"]
WIDTH = {"st_mem": 128, "resnet1d": 128, "conv_transformer": 64}  # size tiny


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
    width = WIDTH[encoder]
    encoder = build_encoder(ModelConfig(encoder=encoder), 1000)
    out = encoder(torch.randn(2, 12, 1000), torch.ones(2, 12, dtype=torch.bool))
    assert out.shape == (2, encoder.width) == (2, width)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in encoder.modules())


@pytest.mark.parametrize("encoder", ["resnet1d", "conv_transformer"])
def test_embedding_of_a_record_does_not_depend_on_its_batch(encoder):
    encoder = build_encoder(ModelConfig(encoder=encoder), 200)
    x, mask = torch.randn(4, 12, 200), torch.ones(4, 12, dtype=torch.bool)
    assert torch.allclose(encoder(x, mask)[:2], encoder(x[:2], mask[:2]), atol=1e-5)


@pytest.mark.parametrize("size,width", [("tiny", 128), ("small", 384), ("base", 768)])
def test_resnet_sizes(size, width):
    encoder = build_encoder(ModelConfig(encoder="resnet1d", size=size), 1000)
    assert isinstance(encoder, ResNet1D) and encoder.width == width


@pytest.mark.parametrize("encoder, size_depth", [("st_mem", 4), ("conv_transformer", 2)])  # size tiny
def test_depth_overrides_the_size(encoder, size_depth):
    assert len(build_encoder(ModelConfig(encoder=encoder), 200).blocks) == size_depth
    assert len(build_encoder(ModelConfig(encoder=encoder, depth=1), 200).blocks) == 1
    with pytest.raises(ConfigError, match="depth"):
        ModelConfig(encoder=encoder, depth=0)


def test_local_blocks_set_the_conv_transformers_token_convolutions():
    assert len(build_encoder(ModelConfig(encoder="conv_transformer"), 200).local) == 1
    assert len(build_encoder(ModelConfig(encoder="conv_transformer", local_blocks=2), 200).local) == 2
    with pytest.raises(ConfigError, match="local_blocks"):
        ModelConfig(local_blocks=-1)


def test_transformer_takes_shorter_windows_in_whole_patches():
    encoder = build_encoder(ModelConfig(encoder="st_mem"), 200).eval()
    assert isinstance(encoder, ECGTransformer)
    mask = torch.ones(2, 12, dtype=torch.bool)
    assert encoder(torch.randn(2, 12, 100), mask).shape == (2, 128)
    for samples in (120, 250):  # not whole patches; longer than the position table
        with pytest.raises(ValueError, match="multiple of 50 up to 200"):
            encoder(torch.randn(2, 12, samples), mask)


def test_a_short_window_uses_the_first_positions():
    encoder = build_encoder(ModelConfig(encoder="st_mem"), 200)
    lead_ids, pos_ids = encoder.token_ids(2)
    assert lead_ids.tolist() == [lead for lead in range(12) for _ in range(2)]
    assert pos_ids.tolist() == [0, 1] * 12


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown encoder"):
        build_encoder(ModelConfig(encoder="lstm"), 200)


def test_conv_transformer_makes_one_token_per_fifth_of_a_second():
    encoder = build_encoder(ModelConfig(encoder="conv_transformer"), 1000)
    assert isinstance(encoder, ConvTransformer) and encoder.tokens == 50
    mask = torch.ones(2, 12, dtype=torch.bool)
    assert encoder.encode(torch.randn(2, 12, 1000), mask).shape == (2, 50, 64)
    assert encoder.encode(torch.randn(2, 12, 500), mask).shape == (2, 25, 64)  # CMSC's half windows
    with pytest.raises(ValueError, match="multiple of 20 up to 1000"):
        encoder(torch.randn(2, 12, 510), mask)
    with pytest.raises(ConfigError, match="not a multiple of its 20-sample tokens"):
        build_encoder(ModelConfig(encoder="conv_transformer"), 1010)


def test_token_samples_set_the_length_of_the_conv_transformers_tokens():
    encoder = build_encoder(ModelConfig(encoder="conv_transformer", token_samples=40), 1000)
    assert encoder.tokens == 25 and encoder.stride == 40
    mask = torch.ones(2, 12, dtype=torch.bool)
    assert encoder.encode(torch.randn(2, 12, 1000), mask).shape == (2, 25, 64)
    with pytest.raises(ValueError, match="multiple of 40 up to 1000"):
        encoder(torch.randn(2, 12, 980), mask)
    with pytest.raises(ConfigError, match="token_samples"):
        build_encoder(ModelConfig(encoder="conv_transformer", token_samples=30), 1000)


@pytest.mark.parametrize("encoder, width", [("conv_transformer", 64), ("st_mem", 128)])
def test_mlp_ratio_sets_the_blocks_hidden_width(encoder, width):
    assert build_encoder(ModelConfig(encoder=encoder), 200).blocks[0].mlp[0].out_features == 4 * width
    assert build_encoder(ModelConfig(encoder=encoder, mlp_ratio=2), 200).blocks[0].mlp[0].out_features == 2 * width
    with pytest.raises(ConfigError, match="mlp_ratio"):
        ModelConfig(mlp_ratio=0)


# token t reads samples up to 20 t + 23 (40 t + 41 for 40-sample tokens): the first token to reach sample 600
@pytest.mark.parametrize("token_samples, first_reaching_600", [(20, 29), (40, 14)])
def test_a_causal_conv_transformer_token_does_not_see_the_future(token_samples, first_reaching_600):
    model = ModelConfig(encoder="conv_transformer", causal=True, token_samples=token_samples)
    encoder = build_encoder(model, 1000).eval()
    x, mask = torch.randn(2, 12, 1000), torch.ones(2, 12, dtype=torch.bool)
    y = x.clone()
    y[..., 600:] = torch.randn(2, 12, 400) * 10
    change = (encoder.encode(x, mask) - encoder.encode(y, mask)).abs().amax((0, 2))
    assert change[:first_reaching_600].max() < 1e-5 and change[first_reaching_600:].min() > 1e-3
    bidirectional = build_encoder(ModelConfig(encoder="conv_transformer", causal=False), 1000).eval()
    assert (bidirectional.encode(x, mask) - bidirectional.encode(y, mask))[:, 0].abs().max() > 1e-3


def test_hidden_time_spans_do_not_reach_the_visible_tokens():
    encoder = build_encoder(ModelConfig(encoder="conv_transformer"), 1000).eval()
    x, mask = torch.randn(3, 12, 1000), torch.ones(3, 12, dtype=torch.bool)
    keep, visible, hidden = random_masking(encoder.token_valid(mask), 0.75, encoder.mask_span)
    assert hidden.sum(1).tolist() == [38, 38, 38]  # 75 % of 50 tokens, rounded
    y = x.clone()
    samples_hidden = hidden.repeat_interleave(encoder.stride, dim=1)[:, None, :].expand_as(x)
    y[samples_hidden] = torch.randn(int(samples_hidden.sum())) * 10
    assert torch.allclose(encoder.encode(x, mask, keep, visible), encoder.encode(y, mask, keep, visible), atol=1e-5)
    assert not torch.allclose(encoder.encode(x, mask), encoder.encode(y, mask), atol=1e-3)


def test_masking_hides_whole_spans_of_time_tokens():
    valid = torch.ones(200, 50, dtype=torch.bool)
    _, _, hidden = random_masking(valid, 0.5, span=5)
    blocks = hidden.view(200, 10, 5).sum(-1)  # tokens 5i .. 5i + 4 are one span
    assert ((blocks == 0) | (blocks == 5)).float().mean() > 0.9  # only the span at the cut is split
    assert torch.equal(hidden.sum(1), torch.full((200,), 25))


def test_the_default_tiny_encoder_has_the_parameters_the_readme_states():
    """README: 138 k parameters at `tiny` for 10-s windows (1000 samples at 100 Hz)."""
    encoder = build_encoder(ModelConfig(), window_samples=1000)
    assert round(sum(p.numel() for p in encoder.parameters()), -3) == 138_000
