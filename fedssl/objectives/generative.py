"""Generative SSL: masked ECG modelling.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, as adapted to
multi-lead ECG by Na et al., "Guiding Masked Representation Learning to Capture
Spatio-Temporal Relationship of Electrocardiogram" (ST-MEM), ICLR 2024: hide most patches of
every record, encode only the visible ones, and let a light decoder reconstruct the hidden
patches from their lead and position; the loss is on hidden patches with per-patch normalised
targets, so the model learns waveform shape rather than amplitude. On an encoder with time
tokens (`ConvTransformer`) the hidden units are time spans and the targets each hidden token's
twelve leads, normalised per lead (a missing lead is not reconstructed).
"""

from __future__ import annotations

import torch
from torch import nn

from fedssl.models import Block, init_weights
from fedssl.objectives.base import Objective


def random_masking(valid: torch.Tensor, ratio: float, span: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose, per record, a random (1 - ratio) of its recorded tokens to show the encoder, in
    runs of `span` consecutive tokens (time spans for an encoder with time tokens; one patch for
    ST-MEM), as MAE's `random_masking` with one noise value per span.

    Returns `keep` (B, K) token indices to encode, `visible` (B, K) which of them the record
    really shows (records with fewer recorded leads show fewer tokens), and `hidden` (B, N):
    recorded tokens to reconstruct. Tokens of missing leads are neither shown nor reconstructed.
    """
    b, n = valid.shape
    shown = (valid.sum(1) * (1 - ratio)).round().long().clamp_min(1)
    noise = torch.rand((b, -(-n // span)), device=valid.device).repeat_interleave(span, dim=1)[:, :n]
    noise = noise + (~valid) * 2.0  # recorded tokens first
    keep = noise.argsort(dim=1, stable=True)[:, : int(shown.max())]
    visible = torch.arange(keep.shape[1], device=valid.device)[None] < shown[:, None]
    hidden = valid & ~torch.zeros_like(valid).scatter(1, keep, visible)
    return keep, visible, hidden


class TokenDecoder(nn.Module):
    """MAE's light decoder: the encoded visible tokens and a mask token at every hidden place, each
    tagged with its place (`encoder.coordinates()`), through a few transformer blocks, then one
    linear map to `out_dim` values per token. Masked reconstruction predicts signal with it, JEPA
    predicts target embeddings; either way a head that stays at the site."""

    def __init__(self, encoder: nn.Module, width: int, depth: int, out_dim: int, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder.width, width)
        self.mask_token = nn.Embedding(1, width)
        self.places = nn.ModuleList(nn.Embedding(size, width) for _, size in encoder.coordinates())
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.predict = nn.Linear(width, out_dim)
        self.apply(init_weights)

    def forward(self, encoder: nn.Module, latent: torch.Tensor, keep: torch.Tensor, visible: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """(B, N, out_dim) from the encoded tokens `latent` (B, K, width) at `keep`; `valid` (B, N)."""
        b, n = valid.shape
        # the mask token is looked up per token (not broadcast) so that Opacus sees a batched input
        mask = self.mask_token(torch.zeros(b, n, dtype=torch.long, device=latent.device))
        shown = torch.where(visible[..., None], self.embed(latent), mask[:, : keep.shape[1]])
        tokens = mask.scatter(1, keep[..., None].expand_as(shown), shown)  # nothing hidden leaks in
        for place, (ids, _) in zip(self.places, encoder.coordinates()):
            tokens = tokens + place(ids.expand(b, -1))
        for block in self.blocks:
            tokens = block(tokens, valid)
        return self.predict(self.norm(tokens))


class MaskedReconstruction(nn.Module):
    """The decoder and its loss on hidden tokens' normalised signal; a head that stays at the site."""

    def __init__(self, encoder: nn.Module, mask_ratio: float, width: int, depth: int, heads: int = 4) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        groups, samples = encoder.target_shape
        self.decoder = TokenDecoder(encoder, width, depth, groups * samples, heads)

    def forward(self, encoder: nn.Module, x: torch.Tensor, lead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-record reconstruction loss (B,) and the pooled embedding of the visible tokens (B, D)."""
        valid = encoder.token_valid(lead_mask)
        keep, visible, hidden = random_masking(valid, self.mask_ratio, encoder.mask_span)
        latent = encoder.encode(x, lead_mask, keep=keep, visible=visible)
        targets, counted = encoder.reconstruction_targets(x, lead_mask)
        prediction = self.decoder(encoder, latent, keep, visible, valid).view_as(targets)
        error = (prediction - targets).pow(2).mean(-1)  # (B, N, groups): per lead for time tokens
        weights = (hidden[..., None] & counted).to(error.dtype)
        loss = (error * weights).sum((1, 2)) / weights.sum((1, 2)).clamp_min(1.0)
        return loss, encoder.pool(latent, visible)


class MaskedModeling(Objective):
    """Pure generative objective: reconstruct hidden tokens of the un-augmented window."""

    def __init__(self, encoder: nn.Module, reconstruction: MaskedReconstruction) -> None:
        super().__init__(encoder)
        self.reconstruction = reconstruction

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        loss, _ = self.reconstruction(self.encoder, x, lead_mask)
        return {"loss": loss.mean(), "generative": loss.mean()}
