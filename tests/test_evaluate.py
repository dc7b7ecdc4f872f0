import numpy as np
import pytest
import torch

from fedssl.data.windows import RecordInfo, WindowSet
from fedssl.evaluate import auroc, linear_probe


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


def labelled(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    windows = rng.standard_normal((n, 12, 50)).astype(np.float32)
    windows[:, 0] += labels[:, None] * 2.0  # class A shifts lead I
    records = tuple(RecordInfo(f"r{i}", None, ("A",) if y else ("B",)) for i, y in enumerate(labels))
    return WindowSet(windows, np.ones((n, 12), bool), np.arange(n), records)


def test_probe_finds_a_linearly_separable_class_and_is_chance_without_signal():
    result = linear_probe(MeanOfLeadOne(), labelled(200, 0), labelled(200, 1))
    assert result.per_class["A"] > 0.99 and result.macro_auroc > 0.99

    class Noise(torch.nn.Module):
        def forward(self, x, mask):
            return torch.randn(len(x), 4)

    torch.manual_seed(0)
    assert abs(linear_probe(Noise(), labelled(200, 0), labelled(200, 1)).macro_auroc - 0.5) < 0.12
