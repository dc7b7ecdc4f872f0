"""ECG augmentations for contrastive views, on batches of standardised windows (B, 12, T).

Each keeps the window length and the meaning of the lead mask: a dropped lead is masked out, never
replaced by invented signal. Randomness comes from torch's generator, which the training loop
seeds, so the same seed gives the same views. Ranges are in standardised units (one unit is one
standard deviation of the lead) and follow common ECG SSL practice (e.g. CLOCS, Kiyasseh et al.
2021; Mehari & Strodthoff 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape)


def random_crop(x: torch.Tensor, min_fraction: float = 0.8) -> torch.Tensor:
    """Keep a random stretch of 80-100 % of the window, moved to its start, zeros after it.

    No resampling: stretching time would change the heart rate, which is a diagnosis (sinus
    tachycardia and bradycardia), so views must agree on it.
    """
    b, leads, t = x.shape
    length = (_uniform((b,), min_fraction, 1.0) * t).long()
    start = (torch.rand(b) * (t - length + 1)).long()
    time = torch.arange(t)[None]
    source = (start[:, None] + time).clamp_max(t - 1)
    cropped = torch.gather(x, 2, source[:, None, :].expand(-1, leads, -1))
    return cropped * (time < length[:, None])[:, None, :]


def amplitude_scale(x: torch.Tensor, low: float = 0.8, high: float = 1.25) -> torch.Tensor:
    """Scale each lead by a factor in [0.8, 1.25] (electrode contact, body habitus)."""
    return x * _uniform(x.shape[:2], low, high)[..., None]


def gaussian_noise(x: torch.Tensor, max_std: float = 0.1) -> torch.Tensor:
    """Add white noise with a per-record std in [0, 0.1]."""
    return x + torch.randn_like(x) * _uniform((x.shape[0], 1, 1), 0.0, max_std)


def baseline_wander(x: torch.Tensor, sample_rate: float, max_amplitude: float = 0.2,
                    low_hz: float = 0.05, high_hz: float = 0.5) -> torch.Tensor:
    """Add a 0.05-0.5 Hz sinusoid (respiration, movement) of amplitude up to 0.2, per lead."""
    b, leads, t = x.shape
    freq = _uniform((b, 1, 1), low_hz, high_hz)
    phase = _uniform((b, leads, 1), 0.0, 2 * math.pi)
    amplitude = _uniform((b, leads, 1), 0.0, max_amplitude)
    time = torch.arange(t) / sample_rate
    return x + amplitude * torch.sin(2 * math.pi * freq * time + phase)


def lead_dropout(x: torch.Tensor, lead_mask: torch.Tensor, p: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each recorded lead with probability p, always keeping at least one."""
    drop = (torch.rand(lead_mask.shape) < p) & lead_mask
    kept = lead_mask & ~drop
    restore = kept.sum(1) == 0  # a record that would lose every lead keeps its mask
    kept[restore] = lead_mask[restore]
    return x * kept[..., None], kept


@dataclass(frozen=True)
class Augment:
    """The view pipeline used by contrastive objectives."""

    sample_rate: float

    def __call__(self, x: torch.Tensor, lead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = random_crop(x)
        x = amplitude_scale(x)
        x = baseline_wander(x, self.sample_rate)
        x = gaussian_noise(x)
        return lead_dropout(x * lead_mask[..., None], lead_mask)
