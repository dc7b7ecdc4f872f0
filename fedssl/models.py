"""ECG encoders. The encoder is the shared foundation model: the only part that leaves a site.

`ECGTransformer` follows ST-MEM (Na et al., "Guiding Masked Representation Learning to Capture
Spatio-Temporal Relationship of Electrocardiogram", ICLR 2024): every lead is cut into patches,
each patch embedded by one linear map, then tagged with a learnable lead embedding and a learnable
position embedding; a pre-norm transformer mixes all tokens and the embedding is their mean.
Missing leads are handled by the lead mask: their tokens never enter attention or the mean, so a
missing lead's values cannot change the embedding.

`ConvTransformer` is the CPU-efficient token encoder: the twelve leads enter as channels of a
strided convolutional stem (total stride 20: one token per 0.2 s at 100 Hz, 50 tokens per 10-s
window instead of ST-MEM's 240), and a small transformer mixes the time tokens. Convolutional
front ends with few tokens are what ECG SSL found to work at small compute (the strided
encoders of CPC for ECG, Mehari & Strodthoff, "Self-supervised representation learning from
12-lead ECG data", 2022; ECG-CPC, arXiv 2509.25095); attention over 50 tokens costs little.
Masked modelling masks time spans of its tokens; CPC runs its attention causally.

`ResNet1D` is the convolutional alternative (a 1-D ResNet as used by most ECG SSL work, e.g.
CLOCS and Mehari & Strodthoff 2022) for the objectives that need no tokens.

Token encoders (ST-MEM and ConvTransformer) share one interface used by masked modelling and
JEPA: `tokens`, `mask_span`, `token_valid(lead_mask)`, `encode(x, lead_mask, keep, visible)`,
`pool`, `coordinates()` (the ids a decoder embeds to place a token) and
`reconstruction_targets(x, lead_mask)`.

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
CONV_TRANSFORMER_SIZES = {  # stem channels, width, depth, heads
    "tiny": ((16, 32), 64, 2, 4),
    "small": ((32, 64), 128, 2, 4),
    "base": ((64, 128), 256, 4, 8),
}
STEM_STRIDES = {20: (2, 2, 5), 40: (2, 4, 5)}  # ConvTransformer: its stem's strides per token's samples
ENCODERS = ("st_mem", "resnet1d", "conv_transformer")
TOKEN_ENCODERS = ("st_mem", "conv_transformer")  # encoders with tokens, which masked modelling needs
TIME_TOKEN_ENCODERS = ("conv_transformer",)  # tokens in time order, one per time step: CPC needs them


def normalised(segments: torch.Tensor) -> torch.Tensor:
    """Each segment (last axis) standardised on its own: MAE's norm_pix_loss targets, so that
    masked modelling learns waveform shape rather than amplitude."""
    mean = segments.mean(-1, keepdim=True)
    var = segments.var(-1, keepdim=True, unbiased=False)
    return (segments - mean) / (var + 1e-6).sqrt()


def init_weights(module: nn.Module) -> None:
    """MAE/ViT initialisation: small embeddings, so that the signal, not the lead and position
    tags, dominates the initial tokens and different ECGs start with different embeddings."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, visible: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = visible[:, None, None, :]
        if causal:  # a token reads itself and earlier tokens only
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block whose attention only reads visible tokens."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor, visible: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), visible, causal)
        return x + self.mlp(self.norm2(x))


class ECGTransformer(nn.Module):
    """ST-MEM encoder. Takes any window length that is a multiple of `patch_size` up to
    `window_samples`; a shorter window gets the first positions (CMSC encodes half windows)."""

    mask_span = 1  # masked modelling hides single patches, as ST-MEM does

    def __init__(self, window_samples: int, patch_size: int, width: int, depth: int, heads: int,
                 dropout: float = 0.0, leads: int = len(STANDARD_LEADS), mlp_ratio: int = 4) -> None:
        super().__init__()
        if window_samples % patch_size:
            raise ConfigError(f"window of {window_samples} samples is not a multiple of patch_size {patch_size}")
        self.leads, self.patch_size = leads, patch_size
        self.patches_per_lead = window_samples // patch_size
        self.width = width
        self.patch_embed = nn.Linear(patch_size, width)
        self.lead_embed = nn.Embedding(leads, width)
        self.pos_embed = nn.Embedding(self.patches_per_lead, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, mlp_ratio) for _ in range(depth))
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

    @property
    def target_shape(self) -> tuple[int, int]:
        """(groups, samples) of one token's reconstruction target: one patch of one lead."""
        return 1, self.patch_size

    def coordinates(self) -> list[tuple[torch.Tensor, int]]:
        """What places each token of a full window, for a decoder to embed: (ids (tokens,), table size)."""
        return [(self.lead_ids, self.leads), (self.pos_ids, self.patches_per_lead)]

    def reconstruction_targets(self, x: torch.Tensor, lead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch normalised patches (B, tokens, 1, patch_size) and which count (B, tokens, 1)."""
        return normalised(self.patchify(x))[:, :, None], self.token_valid(lead_mask)[..., None]


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


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each time step of a (B, C, T) feature map (as ConvNeXt's
    channels-first LayerNorm). Unlike GroupNorm it never mixes time steps, so a token depends on
    its own receptive field only: causal attention stays causal and hidden spans stay hidden.

    The output is (B, C, T) either way; `channels_first` says how it lies in memory: contiguous
    (B, C, T) for a convolution to read next (and the GELU before it: on the transposed view,
    GELU's backward ran ~8 times slower, and the convolution copied its input anyway), or as the
    transposed view of a contiguous (B, T, C), which the stem's last norm hands on as tokens."""

    def __init__(self, channels: int, channels_first: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)  # on (B, T, C), so Opacus' LayerNorm formula applies
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return out.contiguous() if self.channels_first else out


class TokenConvBlock(nn.Module):
    """Pre-norm residual convolution over time tokens (B, T, width), kernel `kernel`: it widens
    each token's view to its neighbours, where attention alone would start from 0.3-s patches.
    Causal (left padding only) when the encoder is, so that a token never reads later ones."""

    def __init__(self, width: int, kernel: int = 5) -> None:
        super().__init__()
        self.kernel = kernel
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(width, width, kernel)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        h = F.gelu(self.norm(x)).transpose(1, 2)
        left = self.kernel - 1 if causal else (self.kernel - 1) // 2
        h = F.pad(h, (left, self.kernel - 1 - left))
        return x + self.conv(h).transpose(1, 2)


class ConvTransformer(nn.Module):
    """Strided convolutional stem over the leads as channels, then a transformer over time tokens.

    The stem (three Conv1d + `ChannelNorm` + GELU, strides 2, 2, 5) turns a (B, 12, T) window
    into T / 20 tokens; stem token t is the local shape of all twelve leads in 0.2 s and depends
    on samples 20t - 7 .. 20t + 23 only (a 0.31-s receptive field; with `token_samples` 40,
    strides 2, 4, 5: 0.4-s tokens reading samples 40t - 5 .. 40t + 41). Each residual convolution
    over tokens (`TokenConvBlock`, `local_blocks`) widens that by four tokens before attention. Missing leads are
    zeroed before the stem, so their values cannot change the embedding. (A per-record bias from
    the lead mask, as `ResNet1D`'s mask channels give, made SimCLR collapse to one embedding for
    all records in the overfitting test; without it the same test learns.)
    Masked modelling hides whole time spans (`mask_span` tokens): their samples are zeroed before
    the stem too, so nothing hidden reaches a visible token through the stem's receptive field,
    and only the kept tokens enter the transformer (MAE). Any window length that is a multiple
    of `token_samples` up to `window_samples` works (a shorter one gets the first positions).
    """

    mask_span = 2  # masked modelling hides 0.4-s spans: about half a beat at rest

    def __init__(self, window_samples: int, stem_channels: tuple[int, int], width: int, depth: int,
                 heads: int, dropout: float = 0.0, leads: int = len(STANDARD_LEADS),
                 causal: bool = False, local_blocks: int = 1, token_samples: int = 20, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.stride = token_samples
        if window_samples % self.stride:
            raise ConfigError(f"model.encoder conv_transformer: window of {window_samples} samples is not a "
                              f"multiple of its {self.stride}-sample tokens")
        self.leads, self.width, self.causal = leads, width, causal
        self.tokens = window_samples // self.stride
        channels = (leads, *stem_channels, width)
        kernels = (7, 5, 5)
        convs = [nn.Conv1d(channels[i], channels[i + 1], kernel, stride, (kernel - stride + 1) // 2)
                 for i, (kernel, stride) in enumerate(zip(kernels, STEM_STRIDES[token_samples]))]  # T / stride outputs
        layers: list[nn.Module] = []
        for i, conv in enumerate(convs, start=1):
            last = i == len(convs)  # its norm's output becomes the tokens (B, tokens, width)
            layers += [conv, ChannelNorm(channels[i], channels_first=not last)] + ([] if last else [nn.GELU()])
        self.stem = nn.Sequential(*layers)
        self.local = nn.ModuleList(TokenConvBlock(width) for _ in range(local_blocks))
        self.pos_embed = nn.Embedding(self.tokens, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("pos_ids", torch.arange(self.tokens), persistent=False)
        self.apply(init_weights)

    def steps(self, samples: int) -> int:
        """Tokens of a window of `samples` samples."""
        if samples % self.stride or not 0 < samples <= self.tokens * self.stride:
            raise ValueError(f"window of {samples} samples: need a multiple of {self.stride} "
                             f"up to {self.tokens * self.stride}")
        return samples // self.stride

    def token_valid(self, lead_mask: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
        """(B, leads) -> (B, tokens): every time token is valid when any lead was recorded."""
        return lead_mask.any(1, keepdim=True).expand(-1, tokens or self.tokens)

    def stem_tokens(self, x: torch.Tensor, lead_mask: torch.Tensor,
                    shown: torch.Tensor | None = None) -> torch.Tensor:
        """Stem tokens (B, tokens, width), without position: local features, CPC's z_t.

        `shown` (B, tokens) bool: the samples of other tokens are zeroed (masked modelling)."""
        x = x * lead_mask[..., None].to(x.dtype)
        if shown is not None:
            x = x * shown.repeat_interleave(self.stride, dim=1)[:, None, :].to(x.dtype)
        return self.stem(x).transpose(1, 2)

    def positions(self, batch: int, tokens: int) -> torch.Tensor:
        """Position embeddings (B, tokens, width), looked up per record so Opacus sees a batch."""
        return self.pos_embed(self.pos_ids[:tokens].expand(batch, -1))

    def mix(self, tokens: torch.Tensor, visible: torch.Tensor, causal: bool | None = None) -> torch.Tensor:
        """The transformer over (B, K, width) tokens, attending to `visible` (B, K) ones."""
        for block in self.blocks:
            tokens = block(tokens, visible, self.causal if causal is None else causal)
        return self.norm(tokens)

    def local_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual convolutions over (B, tokens, width) stem tokens (before positions)."""
        for block in self.local:
            tokens = block(tokens, self.causal)
        return tokens

    def encode(self, x: torch.Tensor, lead_mask: torch.Tensor,
               keep: torch.Tensor | None = None, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, K, width) of the tokens `keep` (B, K) indexes (all when None);
        of those, `visible` (B, K) are shown, the others hidden (padding of the batch)."""
        b, n = x.shape[0], self.steps(x.shape[-1])
        shown = None
        if keep is not None:
            visible = torch.ones_like(keep, dtype=torch.bool) if visible is None else visible
            shown = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter(1, keep, visible)
        tokens = self.local_features(self.stem_tokens(x, lead_mask, shown)) + self.positions(b, n)
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, self.width))
        if visible is None:
            visible = self.token_valid(lead_mask, n)
        return self.mix(tokens, visible)

    pool = staticmethod(ECGTransformer.pool)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        """The ECG embedding used downstream: (B, leads, T), (B, leads) -> (B, width)."""
        return self.encode(x, lead_mask).mean(1)

    @property
    def target_shape(self) -> tuple[int, int]:
        """(groups, samples) of one token's reconstruction target: 0.2 s of every lead."""
        return self.leads, self.stride

    def coordinates(self) -> list[tuple[torch.Tensor, int]]:
        return [(self.pos_ids, self.tokens)]

    def reconstruction_targets(self, x: torch.Tensor, lead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's 0.2 s of every lead, normalised per lead (B, tokens, leads, stride), and
        which leads count (B, tokens, leads): a missing lead is not reconstructed."""
        b, leads, t = x.shape
        segments = x.view(b, leads, t // self.stride, self.stride).transpose(1, 2)
        return normalised(segments), lead_mask[:, None, :].expand(-1, t // self.stride, -1)


def transformer_size(model: ModelConfig) -> tuple:
    """The size's tuple of a token encoder (`SIZES` or `CONV_TRANSFORMER_SIZES`), its depth
    replaced by `model.depth` when set."""
    *shape, depth, heads = (CONV_TRANSFORMER_SIZES if model.encoder == "conv_transformer" else SIZES)[model.size]
    return (*shape, depth if model.depth is None else model.depth, heads)


def build_encoder(model: ModelConfig, window_samples: int) -> nn.Module:
    if model.encoder not in ENCODERS:
        raise ConfigError(f"model.encoder: unknown encoder {model.encoder!r}; known: {list(ENCODERS)}")
    if model.size not in SIZES:
        raise ConfigError(f"model.size: unknown size {model.size!r}; known: {sorted(SIZES)}")
    if model.encoder == "resnet1d":
        return ResNet1D(*RESNET_SIZES[model.size], model.dropout)
    if model.encoder == "conv_transformer":
        if model.token_samples not in STEM_STRIDES:
            raise ConfigError(f"model.token_samples: {model.token_samples}; known: {sorted(STEM_STRIDES)}")
        return ConvTransformer(window_samples, *transformer_size(model), model.dropout, causal=model.causal,
                               local_blocks=model.local_blocks, token_samples=model.token_samples,
                               mlp_ratio=model.mlp_ratio)
    width, depth, heads = transformer_size(model)
    return ECGTransformer(window_samples, model.patch_size, width, depth, heads, model.dropout, mlp_ratio=model.mlp_ratio)
