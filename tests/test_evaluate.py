import dataclasses

import numpy as np
import pytest
import torch

from fedssl.data.windows import WindowSet
from fedssl.evaluate import (ProbeResult, ProbeSplits, TestScores, _weighted_auroc, auroc, bootstrap_interval,
                             difference, linear_probe, summarise)
from tests.conftest import labelled


def test_auroc_matches_hand_counts_with_ties():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    positive = np.array([0, 0, 1, 1, 1])
    # positive-negative pairs ordered right: (0.35>0.1), (0.8>0.1), (0.8>0.4), (0.4>0.1), tie (0.4=0.4) counts half
    assert auroc(scores, positive) == pytest.approx(4.5 / 6)
    with pytest.raises(ValueError):
        auroc(scores, np.ones(5))


class MeanOfLeadOne(torch.nn.Module):
    def forward(self, x, mask):
        return torch.stack([x[:, 0].mean(1), x[:, 1].mean(1)], 1)


def test_probe_finds_a_linearly_separable_class_and_is_chance_without_signal():
    result = linear_probe(MeanOfLeadOne(), labelled(200, 0), labelled(200, 1))
    assert result.per_class["A"] > 0.99 and result.macro_auroc > 0.99

    class Noise(torch.nn.Module):
        def forward(self, x, mask):
            return torch.randn(len(x), 4)

    torch.manual_seed(0)
    assert abs(linear_probe(Noise(), labelled(200, 0), labelled(200, 1)).macro_auroc - 0.5) < 0.12


# -- intervals ------------------------------------------------------------------------------------


def test_weighted_auroc_counts_a_window_drawn_k_times_k_times():
    rng = np.random.default_rng(0)
    scores, positive = np.round(rng.standard_normal(30), 1), rng.random(30) < 0.4  # rounded: ties
    counts = rng.integers(0, 4, 30)
    weighted = _weighted_auroc(scores, positive, np.stack([np.ones(30), counts]))
    assert weighted[0] == pytest.approx(auroc(scores, positive))
    repeated = np.repeat(np.arange(30), counts)
    assert weighted[1] == pytest.approx(auroc(scores[repeated], positive[repeated]))
    assert np.isnan(_weighted_auroc(scores, positive, (~positive)[None].astype(float))[0])  # no positive left


def scored(split, patients: int, windows_per_patient: int, signal: float, seed: int) -> ProbeResult:
    """Test scores of one class where each patient's windows are near-copies of one another."""
    rng = np.random.default_rng(seed)
    label = rng.random(patients) < 0.5
    per_patient = rng.standard_normal(patients) + signal * label
    scores = np.repeat(per_patient, windows_per_patient) + 0.01 * rng.standard_normal(patients * windows_per_patient)
    groups = np.repeat([f"p{i}" for i in range(patients)], windows_per_patient)
    targets = np.repeat(label, windows_per_patient).astype(np.float32)[:, None]
    test = TestScores(split, ("A",), scores[:, None], targets, groups)
    value = auroc(scores, targets[:, 0])
    return ProbeResult(value, {"A": value}, test)


def test_interval_resamples_patients_not_their_windows():
    result = scored(0, patients=30, windows_per_patient=10, signal=1.0, seed=1)
    mean, low, high = bootstrap_interval([result], replicates=500)
    assert mean == result.macro_auroc and low < mean < high
    # the same scores with every window taken for its own patient: ten times the evidence, falsely
    as_windows = dataclasses.replace(result.test, groups=np.array([f"w{i}" for i in range(len(result.test.groups))]))
    _, w_low, w_high = bootstrap_interval([ProbeResult(result.macro_auroc, result.per_class, as_windows)], replicates=500)
    assert (high - low) > 2 * (w_high - w_low)


def test_interval_of_several_splits_contains_their_spread_and_differences_are_paired():
    runs = [scored(s, patients=40, windows_per_patient=2, signal=1.5, seed=s) for s in range(3)]
    summary = summarise(runs, replicates=400)
    assert summary["runs"] == [r.macro_auroc for r in runs]
    assert summary["macro_auroc"] == pytest.approx(np.mean(summary["runs"]))
    assert summary["ci95"][0] < summary["macro_auroc"] < summary["ci95"][1]
    assert difference(runs, runs, replicates=100) == {"mean": 0.0, "ci95": [0.0, 0.0]}
    # a weaker encoder on the same windows: the paired interval of the gap excludes 0
    weaker = [ProbeResult(0.0, {}, dataclasses.replace(r.test, scores=r.test.scores + 3 * np.random.default_rng(9)
                                                       .standard_normal(r.test.scores.shape))) for r in runs]
    weaker = [ProbeResult(auroc(w.test.scores[:, 0], w.test.targets[:, 0]), {}, w.test) for w in weaker]
    gap = difference(runs, weaker, replicates=400)
    assert gap["ci95"][0] > 0 and gap["mean"] == pytest.approx(np.mean([a.macro_auroc - b.macro_auroc
                                                                         for a, b in zip(runs, weaker)]))
    with pytest.raises(ValueError, match="same splits"):
        difference(runs, runs[:2], replicates=10)


def test_noise_cannot_pass_for_an_encoder():
    """A noise encoder's probe interval contains chance; a real signal's lies above it."""

    class Noise(torch.nn.Module):
        def forward(self, x, mask):
            return torch.randn(len(x), 4)

    data = WindowSet.concat([labelled(120, 0), labelled(120, 1)])
    probe = ProbeSplits.from_windows(data, test_fraction=0.5, seeds=3, seed=0, l2=1e-3)
    torch.manual_seed(0)
    noise = [summarise(probe.probe(Noise()), replicates=300) for _ in range(10)]
    assert all(len(n["runs"]) == 3 for n in noise)
    assert sum(n["ci95"][0] < 0.5 < n["ci95"][1] for n in noise) >= 8  # a 95 % interval: chance in nearly all
    signal = summarise(probe.probe(MeanOfLeadOne()), replicates=300)
    assert signal["ci95"][0] > max(n["ci95"][1] for n in noise)
