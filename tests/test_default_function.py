"""The default (conv_transformer, causal, tiny + CPC) computes the function its learning results were
measured with (docs/real_data.md, docs/learning_efficiency.md, the quickstart).

Speed work may change how the encoder and the loss are computed (memory layouts, where the
temperature is applied, which kernel runs attention), never what they compute: for fixed weights
and inputs the embedding, the stem tokens, the per-window CPC loss and every gradient must equal,
to float32 rounding, the explicit formulas below, written from the parameters with plain
functional ops as the model and loss were when those results were measured.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedssl.config import DataConfig, ModelConfig, ObjectiveConfig, Scenario, TrainConfig
from fedssl.models import ChannelNorm
from fedssl.objectives import build_objective


def reference_stem(encoder, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
    """Conv1d -> LayerNorm over channels (on the transposed map) -> GELU, three times (no GELU
    after the last): the stem tokens z (B, tokens, width)."""
    h = x * lead_mask[..., None].to(x.dtype)
    convs = [m for m in encoder.stem if isinstance(m, nn.Conv1d)]
    norms = [m.norm for m in encoder.stem if isinstance(m, ChannelNorm)]
    for i, (conv, norm) in enumerate(zip(convs, norms)):
        h = F.conv1d(h, conv.weight, conv.bias, conv.stride, conv.padding)
        h = F.layer_norm(h.transpose(1, 2), norm.normalized_shape, norm.weight, norm.bias, norm.eps).transpose(1, 2)
        if i < len(convs) - 1:
            h = F.gelu(h)
    return h.transpose(1, 2)


def reference_local(encoder, tokens: torch.Tensor) -> torch.Tensor:
    """Residual pre-norm convolutions over tokens, left-padded when causal."""
    for block in encoder.local:
        h = F.gelu(F.layer_norm(tokens, block.norm.normalized_shape, block.norm.weight, block.norm.bias,
                                block.norm.eps)).transpose(1, 2)
        left = block.kernel - 1 if encoder.causal else (block.kernel - 1) // 2
        h = F.pad(h, (left, block.kernel - 1 - left))
        tokens = tokens + F.conv1d(h, block.conv.weight, block.conv.bias).transpose(1, 2)
    return tokens


def reference_attention(attn, x: torch.Tensor, visible: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) v over the visible (and, when causal, earlier) tokens."""
    b, n, d = x.shape
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(b, n, 3, attn.heads, d // attn.heads).permute(
        2, 0, 3, 1, 4)
    allowed = visible[:, None, None, :].expand(b, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // attn.heads)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return F.linear(out.transpose(1, 2).reshape(b, n, d), attn.proj.weight, attn.proj.bias)


def reference_mix(encoder, tokens: torch.Tensor, visible: torch.Tensor, causal: bool) -> torch.Tensor:
    def norm(layer, h):
        return F.layer_norm(h, layer.normalized_shape, layer.weight, layer.bias, layer.eps)

    for block in encoder.blocks:
        tokens = tokens + reference_attention(block.attn, norm(block.norm1, tokens), visible, causal)
        first, last = block.mlp[0], block.mlp[-1]
        hidden = F.gelu(F.linear(norm(block.norm2, tokens), first.weight, first.bias))
        tokens = tokens + F.linear(hidden, last.weight, last.bias)
    return norm(encoder.norm, tokens)


def reference_embedding(encoder, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // encoder.stride
    tokens = reference_local(encoder, reference_stem(encoder, x, lead_mask)) + encoder.pos_embed.weight[:n]
    visible = lead_mask.any(1, keepdim=True).expand(-1, n)
    return reference_mix(encoder, tokens, visible, encoder.causal).mean(1)


def reference_cpc(objective, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
    """Per-window InfoNCE over every (t, k) with t + k inside the window, k among the steps ahead the
    objective predicts; candidates for z_{t+k} are all z_s of the same window; scores are cosine
    similarities over the temperature."""
    encoder, b, n = objective.encoder, x.shape[0], x.shape[-1] // objective.encoder.stride
    predicted = objective.ahead.tolist()
    ahead = [k for k in predicted if k < n]
    z = reference_stem(encoder, x, lead_mask)
    tokens = reference_local(encoder, z) + encoder.pos_embed.weight[:n]
    context = reference_mix(encoder, tokens, lead_mask.any(1, keepdim=True).expand(-1, n), causal=True)
    prediction = F.linear(context, objective.predict.weight, objective.predict.bias)
    prediction = prediction.view(b, n, len(predicted), -1)[:, :, :len(ahead)]
    logits = torch.einsum("btkd,bsd->btks", F.normalize(prediction, dim=-1), F.normalize(z, dim=-1))
    log_p = (logits / objective.temperature).log_softmax(-1)  # (B, t, k, s)
    losses = torch.zeros(b)
    terms = 0
    for t in range(n):
        for j, k in enumerate(ahead):
            if t + k < n:
                losses = losses - log_p[:, t, j, t + k]
                terms += 1
    return losses / terms


def default_objective(seed: int = 0, window_seconds: float = 10.0, **objective):
    """The default scenario's objective (its model and objective settings, `objective` replacing
    some), on `window_seconds` windows."""
    return build_objective(Scenario(seed=seed, data=DataConfig(window_seconds=window_seconds),
                                    objective=ObjectiveConfig(**objective)))


def ecg_batch(batch: int = 6, samples: int = 1000, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, samples, generator=generator)
    lead_mask = torch.ones(batch, 12, dtype=torch.bool)
    lead_mask[1, 6:] = False  # limb leads only
    lead_mask[2, ::2] = False
    return x, lead_mask


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to float32 rounding, relative to the tensor's scale."""
    scale = expected.abs().max().clamp_min(1e-12)
    error = ((actual - expected).abs().max() / scale).item()
    assert error < 2e-5, f"{what}: relative difference {error:.2e}"


def test_the_default_is_conv_transformer_causal_tiny_with_cpc():
    model, objective = ModelConfig(), ObjectiveConfig()
    assert (model.encoder, model.causal, model.size, objective.name) == ("conv_transformer", True, "tiny", "cpc")
    # one token convolution, two blocks of MLP 4 x width on 0.2-s tokens; CPC 1 to 4 steps ahead
    encoder = default_objective().encoder
    assert (len(encoder.local), len(encoder.blocks), encoder.blocks[0].mlp[0].out_features, encoder.stride) == (1, 2, 256, 20)
    assert default_objective().ahead.tolist() == [1, 2, 3, 4]


def test_the_default_encoder_computes_the_reference_formula():
    encoder = default_objective().encoder.eval()
    x, lead_mask = ecg_batch()
    with torch.no_grad():
        assert_close(encoder.stem_tokens(x, lead_mask), reference_stem(encoder, x, lead_mask), "stem tokens")
        assert_close(encoder(x, lead_mask), reference_embedding(encoder, x, lead_mask), "embedding")


@pytest.mark.parametrize("causal", [False, True])
def test_conv_transformer_computes_the_reference_formula_causal_or_not(causal):
    encoder = copy.deepcopy(default_objective(seed=3).encoder).eval()
    encoder.causal = causal
    x, lead_mask = ecg_batch(samples=400, seed=2)
    with torch.no_grad():
        assert_close(encoder(x, lead_mask), reference_embedding(encoder, x, lead_mask), f"embedding, causal {causal}")


@pytest.mark.parametrize("seconds, stride", [(10.0, None), (2.0, None), (10.0, 3), (2.0, 4)])
def test_the_cpc_loss_and_its_gradients_are_the_reference_ones(seconds, stride):
    """Full 10-s windows (50 tokens, all steps ahead) and 2-s ones (10 tokens: fewer steps fit); the
    default's steps ahead, and every third or fourth of them."""
    objective = default_objective(seed=5, window_seconds=seconds,
                                  **({} if stride is None else {"prediction_stride": stride})).train()
    reference = copy.deepcopy(objective)
    x, lead_mask = ecg_batch(samples=round(seconds * 100), seed=4)
    per_window = objective.per_sample_terms(x, lead_mask)["loss"]
    expected = reference_cpc(reference, x, lead_mask)
    assert_close(per_window, expected, "per-window CPC loss")
    per_window.mean().backward()
    expected.mean().backward()
    for (name, p), q in zip(objective.named_parameters(), reference.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert_close(p.grad, q.grad, f"gradient of {name}")


def test_fused_adamw_takes_the_steps_of_the_plain_one():
    """train_local's fused AdamW makes the per-tensor loop's updates, to float32 rounding, from the
    same gradients. (Gradients are shared: Adam turns rounding noise in a gradient that is zero in
    exact arithmetic, such as the attention key bias's, into a full learning-rate step.)"""
    x, lead_mask = ecg_batch(samples=400, seed=6)
    plain, fused = (default_objective(seed=7, window_seconds=4.0).train() for _ in range(2))
    lr, decay = 1e-3, TrainConfig().weight_decay
    optimizers = [torch.optim.AdamW(plain.parameters(), lr=lr, weight_decay=decay),
                  torch.optim.AdamW(fused.parameters(), lr=lr, weight_decay=decay, fused=True)]
    for _ in range(3):
        plain.zero_grad(set_to_none=True)
        plain(x, lead_mask)["loss"].backward()
        for p, q in zip(plain.parameters(), fused.parameters()):
            q.grad = p.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert (p - q).abs().max() <= 1e-6 * lr + 1e-6 * p.abs().max(), f"{name} after 3 steps"
