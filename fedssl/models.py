"""ECG encoders. The encoder is the shared foundation model: the only part that leaves a site.

`ECGTransformer` follows ST-MEM (Na et al., "Guiding Masked Representation Learning to Capture
Spatio-Temporal Relationship of Electrocardiogram", ICLR 2024): every lead is cut into patches,
each patch embedded by one linear map, then tagged with a learnable lead embedding and a learnable
position embedding; a pre-norm transformer mixes all tokens and the embedding is their mean.
Missing leads are handled by the lead mask: their tokens never enter attention or the mean, so a
missing lead's values cannot change the embedding.

`ResNet1D` is the convolutional alternative (a 1-D ResNet as used by most ECG SSL work, e.g.
CLOCS and Mehari & Strodthoff 2022) for the objectives that need no patch tokens.

No encoder uses BatchNorm (Linear, LayerNorm, Embedding, Conv1d and GroupNorm only), so every
record's embedding depends on that record alone and Opacus can compute per-sample gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.config import ConfigError, ModelConfig
from fedssl.data.windows import STANDARD_LEADS

SIZES = {  # width, depth, heads
    "tiny": (128, 4, 4),
    "small": (384, 8, 6),
    "base": (768, 12, 12),  # as in ST-MEM and the seed paper
}
RESNET_SIZES = {  # channels of the four stages (the last is the embedding width), blocks per stage
    "tiny": ((16, 32, 64, 128), 1),
    "small": ((48, 96, 192, 384), 2),
    "base": ((96, 192, 384, 768), 2),
}
ENCODERS = ("st_mem", "resnet1d")
TOKEN_ENCODERS = ("st_mem",)  # encoders with patch tokens, which masked reconstruction needs


def init_weights(module: nn.Module) -> None:
    """MAE/ViT initialisation: small embeddings, so that the signal, not the lead and position
    tags, dominates the initial tokens and different ECGs start with different embeddings."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block whose attention only reads visible tokens."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), visible)
        return x + self.mlp(self.norm2(x))


class ECGTransformer(nn.Module):
    """ST-MEM encoder. Takes any window length that is a multiple of `patch_size` up to
    `window_samples`; a shorter window gets the first positions (CMSC encodes half windows)."""

    def __init__(self, window_samples: int, patch_size: int, width: int, depth: int, heads: int,
                 dropout: float = 0.0, leads: int = len(STANDARD_LEADS)) -> None:
        super().__init__()
        if window_samples % patch_size:
            raise ConfigError(f"window of {window_samples} samples is not a multiple of patch_size {patch_size}")
        self.leads, self.patch_size = leads, patch_size
        self.patches_per_lead = window_samples // patch_size
        self.width = width
        self.patch_embed = nn.Linear(patch_size, width)
        self.lead_embed = nn.Embedding(leads, width)
        self.pos_embed = nn.Embedding(self.patches_per_lead, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        lead_ids = torch.arange(leads).repeat_interleave(self.patches_per_lead)
        pos_ids = torch.arange(self.patches_per_lead).repeat(leads)
        self.register_buffer("lead_ids", lead_ids, persistent=False)
        self.register_buffer("pos_ids", pos_ids, persistent=False)
        self.apply(init_weights)

    @property
    def tokens(self) -> int:
        return self.leads * self.patches_per_lead

    def patches(self, samples: int) -> int:
        """Patches per lead of a window of `samples` samples."""
        if samples % self.patch_size or not 0 < samples <= self.patches_per_lead * self.patch_size:
            raise ValueError(f"window of {samples} samples: need a multiple of {self.patch_size} "
                             f"up to {self.patches_per_lead * self.patch_size}")
        return samples // self.patch_size

    def token_ids(self, patches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lead and position index of every token of windows with `patches` patches per lead."""
        def first(ids: torch.Tensor) -> torch.Tensor:
            return ids.view(self.leads, self.patches_per_lead)[:, :patches].reshape(-1)
        return first(self.lead_ids), first(self.pos_ids)

    def tags(self, batch: int, patches: int) -> torch.Tensor:
        """Lead + position embeddings of every token, (B, tokens, width).

        Looked up per record (not once and broadcast) so that Opacus sees a batched input and
        computes correct per-sample gradients for the embedding tables.
        """
        lead_ids, pos_ids = self.token_ids(patches)
        return self.lead_embed(lead_ids.expand(batch, -1)) + self.pos_embed(pos_ids.expand(batch, -1))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, leads, T) -> (B, leads * patches, patch_size), lead-major."""
        return x.reshape(x.shape[0], self.leads * self.patches(x.shape[-1]), self.patch_size)

    def token_valid(self, lead_mask: torch.Tensor, patches: int | None = None) -> torch.Tensor:
        """(B, leads) bool -> (B, tokens) bool: a token is valid when its lead was recorded."""
        return lead_mask.repeat_interleave(patches or self.patches_per_lead, dim=1)

    def encode(self, x: torch.Tensor, lead_mask: torch.Tensor,
               keep: torch.Tensor | None = None, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, K, width) of the tokens `keep` (B, K) indexes (all when None).

        `visible` (B, K) says which of those tokens attention may read; by default the tokens of
        recorded leads.
        """
        b, patches = x.shape[0], self.patches(x.shape[-1])
        tokens = self.patch_embed(self.patchify(x)) + self.tags(b, patches)
        ids = torch.arange(tokens.shape[1], device=x.device)
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, self.width))
            ids = keep
        if visible is None:
            visible = torch.gather(self.token_valid(lead_mask, patches), 1, ids.expand(b, -1))
        for block in self.blocks:
            tokens = block(tokens, visible)
        return self.norm(tokens)

    @staticmethod
    def pool(tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Mean of the visible tokens: (B, K, width) -> (B, width)."""
        weights = visible.to(tokens.dtype)[..., None]
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        """The ECG embedding used downstream: (B, leads, T), (B, leads) -> (B, width)."""
        visible = self.token_valid(lead_mask, self.patches(x.shape[-1]))
        return self.pool(self.encode(x, lead_mask, visible=visible), visible)


def group_norm(channels: int) -> nn.GroupNorm:
    """Per-record normalisation in place of BatchNorm (Wu & He, "Group Normalization", ECCV 2018)."""
    return nn.GroupNorm(min(8, channels // 4), channels)


class ResidualBlock(nn.Module):
    """Pre-activation basic block (He et al., "Identity Mappings in Deep Residual Networks", 2016)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, dropout: float = 0.0,
                 kernel: int = 7) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels_in), nn.GELU(),
            nn.Conv1d(channels_in, channels_out, kernel, stride, kernel // 2),
            group_norm(channels_out), nn.GELU(), nn.Dropout(dropout),
            nn.Conv1d(channels_out, channels_out, kernel, 1, kernel // 2),
        )
        self.skip = (nn.Identity() if stride == 1 and channels_in == channels_out
                     else nn.Conv1d(channels_in, channels_out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class ResNet1D(nn.Module):
    """1-D ResNet over the leads as channels, with the lead mask as 12 more input channels.

    Missing leads are zeroed here, before the first convolution, so their values cannot change
    the embedding; the mask channels tell the network which zeros mean "not recorded". Any
    window length works (the embedding is a global average over time).
    """

    def __init__(self, channels: tuple[int, ...], blocks: int, dropout: float = 0.0,
                 leads: int = len(STANDARD_LEADS)) -> None:
        super().__init__()
        self.width = channels[-1]
        self.stem = nn.Conv1d(2 * leads, channels[0], 15, 2, 7)
        stages = []
        for i, out in enumerate(channels):
            stages += [ResidualBlock(channels[max(i - 1, 0)], out, 1 if i == 0 else 2, dropout)]
            stages += [ResidualBlock(out, out, 1, dropout) for _ in range(blocks - 1)]
        self.stages = nn.Sequential(*stages)
        self.norm = group_norm(self.width)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        """(B, leads, T), (B, leads) -> (B, width)."""
        mask = lead_mask[..., None].to(x.dtype)
        h = self.stages(self.stem(torch.cat([x * mask, mask.expand_as(x)], dim=1)))
        return F.gelu(self.norm(h)).mean(-1)


def build_encoder(model: ModelConfig, window_samples: int) -> nn.Module:
    if model.encoder not in ENCODERS:
        raise ConfigError(f"model.encoder: unknown encoder {model.encoder!r}; known: {list(ENCODERS)}")
    if model.size not in SIZES:
        raise ConfigError(f"model.size: unknown size {model.size!r}; known: {sorted(SIZES)}")
    if model.encoder == "resnet1d":
        return ResNet1D(*RESNET_SIZES[model.size], model.dropout)
    width, depth, heads = SIZES[model.size]
    return ECGTransformer(window_samples, model.patch_size, width, depth, heads, model.dropout)
