"""Turn a raw record into standardised windows at the common rate, so that every site's data
looks alike to the encoder whatever recorder produced it.

A lead that carries no usable signal (NaN/Inf, saturated, flat) is dropped, not repaired: it
becomes a missing lead with a note. A record with no usable lead left is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from fedssl.config import DataConfig
from fedssl.data.records import RawRecord, RecordError
from fedssl.data.windows import STANDARD_LEADS

FILTER_ORDER = 2  # per band edge; the forward-backward pass doubles it and cancels the phase


@dataclass(frozen=True)
class RecordWindows:
    windows: np.ndarray  # float32 (n, 12, T)
    lead_mask: np.ndarray  # bool (12,)
    notes: tuple[str, ...]


def make_windows(raw: RawRecord, cfg: DataConfig) -> RecordWindows:
    # scipy is imported here, not on top: ClientApps that read cached windows start ~1 s faster
    from scipy.signal import resample_poly, sosfiltfilt

    ratio = _resampling_ratio(raw.sample_rate, cfg)
    length = -(-raw.signal.shape[1] * ratio.numerator // ratio.denominator)  # as resample_poly's
    window = round(cfg.window_seconds * cfg.sample_rate)
    if length < window:
        raise RecordError(f"too short: {raw.duration_seconds:.3g} s, a window is {cfg.window_seconds:g} s")

    problems = {lead: "saturated" for lead in np.flatnonzero(raw.saturated)}
    problems |= {lead: "non-finite" for lead in np.flatnonzero(raw.lead_mask)
                 if lead not in problems and not np.isfinite(raw.signal[lead]).all()}
    kept = _usable(raw.lead_mask, problems)
    signal = np.zeros((len(STANDARD_LEADS), length))
    if kept.any():
        resampled = resample_poly(raw.signal[kept], ratio.numerator, ratio.denominator, axis=-1,
                                  padtype="line")  # zero padding would ring at the record's edges
        signal[kept] = sosfiltfilt(_bandpass(cfg.highpass_hz, cfg.lowpass_hz, cfg.sample_rate), resampled)
        problems |= {lead: "flat" for lead in np.flatnonzero(kept) if signal[lead].std() < cfg.flat_std_mv}
        kept = _usable(raw.lead_mask, problems)
    if not kept.any():
        raise RecordError(_no_usable_lead(problems))

    signal[~kept] = 0.0
    signal[kept] = (signal[kept] - signal[kept].mean(1, keepdims=True)) / signal[kept].std(1, keepdims=True)
    starts, cap_note = _window_starts(length // window, cfg.max_windows_per_record)
    windows = np.stack([signal[:, s * window:(s + 1) * window] for s in starts]).astype(np.float32)
    notes = tuple(f"{problem} leads dropped: {names}" for problem, names in _by_problem(problems).items())
    return RecordWindows(windows, kept, notes + cap_note)


def _resampling_ratio(rate: float, cfg: DataConfig) -> Fraction:
    if not cfg.min_source_rate <= rate <= cfg.max_source_rate:  # also false for NaN
        raise RecordError(f"unsupported sampling rate: {rate:g} Hz, "
                          f"supported {cfg.min_source_rate}-{cfg.max_source_rate} Hz")
    return Fraction(cfg.sample_rate / rate).limit_denominator(1000)


@lru_cache
def _bandpass(low_hz: float, high_hz: float, rate: int) -> np.ndarray:
    if not 0 < low_hz < high_hz < rate / 2:
        raise ValueError(f"band-pass {low_hz}-{high_hz} Hz does not fit a sampling rate of {rate} Hz")
    from scipy.signal import butter

    return butter(FILTER_ORDER, [low_hz, high_hz], btype="bandpass", fs=rate, output="sos")


def _usable(lead_mask: np.ndarray, problems: dict[int, str]) -> np.ndarray:
    usable = lead_mask.copy()
    usable[list(problems)] = False
    return usable


def _by_problem(problems: dict[int, str]) -> dict[str, str]:
    leads: dict[str, list[str]] = {}
    for lead, problem in sorted(problems.items()):
        leads.setdefault(problem, []).append(STANDARD_LEADS[lead])
    return {problem: ", ".join(names) for problem, names in leads.items()}


def _no_usable_lead(problems: dict[int, str]) -> str:
    by_problem = _by_problem(problems)
    if len(by_problem) == 1:
        ((problem, names),) = by_problem.items()
        return f"all leads {problem}: {names}"
    return "no usable lead: " + "; ".join(f"{problem} {names}" for problem, names in by_problem.items())


def _window_starts(available: int, cap: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Window positions (in windows): all of them, or `cap` spread evenly over a long record."""
    if available <= cap:
        return np.arange(available), ()
    starts = np.linspace(0, available - 1, cap).round().astype(int)
    return starts, (f"windows capped: kept {cap} of {available}",)
