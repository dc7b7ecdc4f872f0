"""ECG augmentations for contrastive and BYOL views, on batches of standardised windows (B, 12, T).

Each keeps the window length and the meaning of the lead mask: a dropped lead is masked out, never
replaced by invented signal. Randomness comes from torch's generator, which the training loop
seeds, so the same seed gives the same views. Ranges are in standardised units (one unit is one
standard deviation of the lead) and follow common ECG SSL practice (e.g. CLOCS, Kiyasseh et al.
2021; Mehari & Strodthoff 2022); the noise models are the recording artefacts of real sites
(Clifford et al., "Advanced Methods and Tools for ECG Data Analysis", 2006, ch. 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape)


def _stretch(b: int, t: int, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per record, a random stretch of `low`-`high` of the window: start, length, time index."""
    length = (_uniform((b,), low, high) * t).long()
    start = (torch.rand(b) * (t - length + 1)).long()
    return start[:, None], length[:, None], torch.arange(t)[None]


def random_crop(x: torch.Tensor, min_fraction: float = 0.8) -> torch.Tensor:
    """Keep a random stretch of 80-100 % of the window, moved to its start, zeros after it.

    No resampling: stretching time would change the heart rate, which is a diagnosis (sinus
    tachycardia and bradycardia), so views must agree on it.
    """
    b, leads, t = x.shape
    start, length, time = _stretch(b, t, min_fraction, 1.0)
    source = (start + time).clamp_max(t - 1)
    cropped = torch.gather(x, 2, source[:, None, :].expand(-1, leads, -1))
    return cropped * (time < length)[:, None, :]


def time_mask(x: torch.Tensor, max_fraction: float = 0.1, p: float = 0.5) -> torch.Tensor:
    """With probability p (0.5) per record, zero one random stretch of 0-10 % of the window on
    all leads (electrodes losing contact), so that no single beat is indispensable."""
    start, length, time = _stretch(x.shape[0], x.shape[2], 0.0, max_fraction)
    length = length * (torch.rand(length.shape) < p)
    return x * ~((time >= start) & (time < start + length))[:, None, :]


def amplitude_scale(x: torch.Tensor, low: float = 0.8, high: float = 1.25) -> torch.Tensor:
    """Scale each lead by a factor in [0.8, 1.25] (electrode contact, body habitus)."""
    return x * _uniform(x.shape[:2], low, high)[..., None]


def gaussian_noise(x: torch.Tensor, max_std: float = 0.1) -> torch.Tensor:
    """Add white noise with a per-record std in [0, 0.1] (amplifier and quantisation noise)."""
    return x + torch.randn_like(x) * _uniform((x.shape[0], 1, 1), 0.0, max_std)


def muscle_noise(x: torch.Tensor, sample_rate: float, max_std: float = 0.2, low_hz: float = 20.0,
                 high_hz: float = 150.0, max_seconds: float = 1.0) -> torch.Tensor:
    """Add electromyographic noise: white noise band-limited to 20-150 Hz (cut at Nyquist), with a
    per-lead std in [0, 0.2], in one Hann-shaped burst per record lasting 0-1 s (a contraction).

    A no-op when the band lies above Nyquist.
    """
    b, leads, t = x.shape
    freqs = torch.fft.rfftfreq(t, 1 / sample_rate)
    band = (freqs >= low_hz) & (freqs <= high_hz)
    if not band.any():
        return x
    noise = torch.fft.irfft(torch.fft.rfft(torch.randn_like(x)) * band, n=t)
    noise = noise / noise.std(-1, keepdim=True).clamp_min(1e-8)
    start, length, time = _stretch(b, t, 0.0, min(max_seconds * sample_rate / t, 1.0))
    inside = (time >= start) & (time < start + length)
    envelope = torch.sin(math.pi * (time - start) / length.clamp_min(1)).pow(2) * inside
    return x + noise * envelope[:, None, :] * _uniform((b, leads, 1), 0.0, max_std)


def mains_interference(x: torch.Tensor, sample_rate: float, max_amplitude: float = 0.1) -> torch.Tensor:
    """Add a 50 or 60 Hz sinusoid (power line; the frequency chosen per record) with per-lead
    amplitude in [0, 0.1] and random phase. Frequencies at or above Nyquist are skipped (they
    cannot be represented, and a lowpass before resampling has removed them anyway)."""
    b, leads, t = x.shape
    hz = torch.where(torch.rand(b, 1, 1) < 0.5, 50.0, 60.0)
    amplitude = _uniform((b, leads, 1), 0.0, max_amplitude) * (hz < sample_rate / 2)
    phase = _uniform((b, leads, 1), 0.0, 2 * math.pi)
    return x + amplitude * torch.sin(2 * math.pi * hz * torch.arange(t) / sample_rate + phase)


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
    """Drop each recorded lead with probability p (0.2), always keeping at least one."""
    drop = (torch.rand(lead_mask.shape) < p) & lead_mask
    kept = lead_mask & ~drop
    restore = kept.sum(1) == 0  # a record that would lose every lead keeps its mask
    kept[restore] = lead_mask[restore]
    return x * kept[..., None], kept


def sometimes(augmented: torch.Tensor, original: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """`augmented` for the records (first axis) where `chosen` (B,) is True, else `original`."""
    return torch.where(chosen.view(-1, *[1] * (original.dim() - 1)), augmented, original)


@dataclass(frozen=True)
class Augment:
    """The view pipeline: crop and time mask, then amplitude, the artefacts and lead dropout, each
    applied to a record with probability `p` (`objective.view_probability`). p < 1 is how SimCLR
    applies its distortions (Chen et al. 2020): applied all together to every record, they left a
    1-D ResNet's two views of a record too little to agree on (SimCLR on eight records did not learn
    at all, NT-Xent stayed at log(2B - 1)); p = 0.5 fixes that.
    """

    sample_rate: float
    p: float = 1.0

    def __call__(self, x: torch.Tensor, lead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = time_mask(random_crop(x))  # the time mask has its own probability
        for transform in (amplitude_scale, lambda v: baseline_wander(v, self.sample_rate),
                          lambda v: mains_interference(v, self.sample_rate),
                          lambda v: muscle_noise(v, self.sample_rate), gaussian_noise):
            x = sometimes(transform(x), x, self._chosen(x))
        x = x * lead_mask[..., None]
        dropped, kept = lead_dropout(x, lead_mask)
        chosen = self._chosen(x)
        return sometimes(dropped, x, chosen), sometimes(kept, lead_mask, chosen)

    def _chosen(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape[0]) < self.p
