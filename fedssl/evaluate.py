"""Evaluation of a frozen encoder: linear probe with macro AUROC on held-out labelled ECGs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from fedssl.config import Scenario, SiteConfig
from fedssl.data.site import load_site
from fedssl.data.windows import WindowSet


@dataclass(frozen=True)
class ProbeResult:
    macro_auroc: float
    per_class: dict[str, float]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    positive = positive.astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative examples")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def embed(encoder: nn.Module, data: WindowSet, batch_size: int = 256) -> np.ndarray:
    """Embeddings (N, D) of every window, in evaluation mode."""
    was_training = encoder.training
    encoder.eval()
    windows, mask = torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)
    out = [encoder(windows[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, len(data), batch_size)]
    encoder.train(was_training)
    return torch.cat(out).numpy()


def fit_logistic(features: np.ndarray, targets: np.ndarray, l2: float, iterations: int = 200) -> nn.Linear:
    """One-vs-rest L2-regularised logistic regression, fitted to convergence with L-BFGS."""
    x = torch.from_numpy(features).double()
    y = torch.from_numpy(targets).double()
    model = nn.Linear(x.shape[1], y.shape[1]).double()
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y) + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def linear_probe(encoder: nn.Module, train: WindowSet, test: WindowSet, l2: float = 1e-3) -> ProbeResult:
    """Macro AUROC of a logistic probe on frozen embeddings, over classes present on both sides."""
    classes = [c for c in train.classes() if c in test.classes()]
    y_train, y_test = train.targets(classes), test.targets(classes)
    usable = [i for i in range(len(classes)) if 0 < y_train[:, i].sum() < len(y_train) and 0 < y_test[:, i].sum() < len(y_test)]
    if not usable:
        raise ValueError("no class has both positive and negative windows in the probe's train and test sets")
    f_train, f_test = embed(encoder, train), embed(encoder, test)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    probe = fit_logistic((f_train - mean) / std, y_train[:, usable], l2)
    with torch.no_grad():
        scores = probe(torch.from_numpy((f_test - mean) / std).double()).numpy()
    per_class = {classes[c]: auroc(scores[:, j], y_test[:, c]) for j, c in enumerate(usable)}
    return ProbeResult(float(np.mean(list(per_class.values()))), per_class)


def probe_data(scenario: Scenario, workdir: Path) -> tuple[WindowSet, WindowSet]:
    """The held-out labelled set, split by record (and patient) into probe-train and probe-test."""
    held_out = SiteConfig("evaluation", folder=scenario.evaluation.folder,
                          synthetic=None if scenario.evaluation.folder else scenario.evaluation.synthetic)
    data = load_site(held_out, scenario.data, workdir, scenario.seed)
    return data.split_by_record(scenario.evaluation.test_fraction, scenario.seed)
