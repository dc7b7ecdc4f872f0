import torch

from fedssl.config import ModelConfig
from fedssl.models import build_encoder


def test_a_missing_lead_does_not_change_the_embedding():
    encoder = build_encoder(ModelConfig(), 200).eval()
    x = torch.randn(3, 12, 200)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[:, [2, 9]] = False
    y = x.clone()
    y[:, [2, 9]] = torch.randn(3, 2, 200) * 100
    assert torch.allclose(encoder(x, mask), encoder(y, mask), atol=1e-5)
    mask[:, 2] = True  # once recorded, the lead does matter
    assert not torch.allclose(encoder(x, mask), encoder(y, mask), atol=1e-3)


def test_embedding_shape_and_no_batchnorm():
    encoder = build_encoder(ModelConfig(), 1000)
    out = encoder(torch.randn(2, 12, 1000), torch.ones(2, 12, dtype=torch.bool))
    assert out.shape == (2, 128)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
