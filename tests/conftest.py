"""Shared fixtures: small scenarios that keep the suite fast on two cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dataclasses

from fedssl.config import (DataConfig, EvaluationConfig, FederationConfig, ModelConfig, ObjectiveConfig, Scenario,
                           SiteConfig, SyntheticSiteConfig, TrainConfig)
from fedssl.data.windows import RecordInfo, WindowSet

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def small_scenario(objective: str = "hybrid", **objective_kwargs) -> Scenario:
    """Two-second windows: 4 patches per lead, 48 tokens, fast enough for many tests."""
    return Scenario(data=DataConfig(window_seconds=2.0),
                    objective=ObjectiveConfig(name=objective, **objective_kwargs))


def two_site_scenario(objective: str, records: int, model: ModelConfig = ModelConfig()) -> Scenario:
    """Two small synthetic sites (50 vs 60 Hz mains), two rounds of two steps, a 40-record probe set."""
    site = SyntheticSiteConfig(records=records, duration_seconds=4.0, sample_rate=250)
    return dataclasses.replace(
        small_scenario(objective), model=model,
        train=TrainConfig(batch_size=4, local_steps=2),
        federation=FederationConfig(rounds=2, min_sites=2),
        evaluation=EvaluationConfig(synthetic=dataclasses.replace(site, records=40)),
        sites=(SiteConfig("a", synthetic=site), SiteConfig("b", synthetic=dataclasses.replace(site, mains_hz=60.0))),
    )


def random_windows(n: int = 16, samples: int = 200, seed: int = 0, missing: tuple[int, ...] = ()) -> WindowSet:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, 12), bool)
    mask[:, list(missing)] = False
    # each record-lead a sum of two sinusoids: structure a model can learn, unlike white noise
    t = np.arange(samples) / 100.0
    freq = rng.uniform(0.5, 8.0, (n, 12, 2, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 12, 2, 1))
    windows = np.sin(2 * np.pi * freq * t + phase).sum(2) + 0.1 * rng.standard_normal((n, 12, samples))
    windows = windows.astype(np.float32) * mask[..., None]
    records = tuple(RecordInfo(f"r{i}", None, ()) for i in range(n))
    return WindowSet(windows, mask, np.arange(n), records)
