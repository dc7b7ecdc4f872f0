"""Evaluation of a frozen encoder: linear probe with macro AUROC on held-out labelled ECGs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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
    from scipy.stats import rankdata  # here, not on top: ClientApps start faster

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


def probe_classes(train: WindowSet, test: WindowSet) -> tuple[list[str], list[int]]:
    """The classes present on both sides and the indices of those with positive and negative
    windows on both sides (the ones a probe can be fitted and scored on); ValueError if none."""
    classes = [c for c in train.classes() if c in test.classes()]
    y_train, y_test = train.targets(classes), test.targets(classes)
    usable = [i for i in range(len(classes)) if 0 < y_train[:, i].sum() < len(y_train) and 0 < y_test[:, i].sum() < len(y_test)]
    if not usable:
        raise ValueError("no class has both positive and negative windows in the probe's train and test sets")
    return classes, usable


def linear_probe(encoder: nn.Module, train: WindowSet, test: WindowSet, l2: float = 1e-3) -> ProbeResult:
    """Macro AUROC of a logistic probe on frozen embeddings, over classes present on both sides."""
    classes, usable = probe_classes(train, test)
    y_train, y_test = train.targets(classes), test.targets(classes)
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


def label_subset(train: WindowSet, classes: list[str] | tuple[str, ...], fraction: float, seed: int) -> WindowSet:
    """Windows of a random `fraction` of the labelled records (at least one record).

    Label efficiency is about how many labelled *records* a task needs, so records, not windows,
    are drawn. Before filling up at random, one positive record of every class that has one is
    taken (in random class order, reusing a record that covers several classes), so that a 1 %
    subset can still train every class; this may exceed the fraction when classes outnumber it.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    present = np.unique(train.record)
    if fraction == 1:
        return train
    rng = np.random.default_rng(seed)
    wanted = max(1, int(round(fraction * len(present))))
    positive = train.targets(classes)
    chosen: list[int] = []
    for c in rng.permutation(len(classes)):
        holders = np.unique(train.record[positive[:, c] > 0])
        if len(holders) and not np.isin(holders, chosen).any():
            chosen.append(int(rng.choice(holders)))
    rest = rng.permutation(np.setdiff1d(present, chosen))
    chosen += [int(r) for r in rest[: max(0, wanted - len(chosen))]]
    return train.subset(np.flatnonzero(np.isin(train.record, chosen)))


def usable_classes(train: WindowSet, test: WindowSet) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classes with positive and negative windows on both sides, and their targets."""
    classes = [c for c in train.classes() if c in test.classes()]
    y_train, y_test = train.targets(classes), test.targets(classes)
    usable = [i for i in range(len(classes))
              if 0 < y_train[:, i].sum() < len(y_train) and 0 < y_test[:, i].sum() < len(y_test)]
    if not usable:
        raise ValueError("no class has both positive and negative windows in the train and test sets")
    return [classes[i] for i in usable], y_train[:, usable], y_test[:, usable]


def fine_tune(encoder: nn.Module, train: WindowSet, test: WindowSet, *, epochs: int = 5,
              learning_rate: float = 1e-4, head_learning_rate: float = 1e-3, batch_size: int = 32,
              weight_decay: float = 0.01, seed: int = 0) -> tuple[ProbeResult, nn.Module]:
    """Encoder plus a linear head trained end to end with BCE; AUROC on `test`.

    The encoder is copied (the caller's stays as it was) and trained with a small learning rate,
    the freshly initialised head with a larger one. Returns the result and the tuned encoder.
    """
    classes, y_train, y_test = usable_classes(train, test)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    encoder = copy.deepcopy(encoder)
    width = embed(encoder, train.subset(np.arange(1))).shape[1]
    head = nn.Linear(width, len(classes))
    optimizer = torch.optim.AdamW([{"params": encoder.parameters(), "lr": learning_rate},
                                   {"params": head.parameters(), "lr": head_learning_rate}],
                                  weight_decay=weight_decay)
    windows, mask = torch.from_numpy(train.windows), torch.from_numpy(train.lead_mask)
    targets = torch.from_numpy(y_train)
    encoder.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(train)))
        for i in range(0, len(order), batch_size):
            index = order[i : i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            logits = head(encoder(windows[index], mask[index]))
            nn.functional.binary_cross_entropy_with_logits(logits, targets[index]).backward()
            optimizer.step()
    with torch.no_grad():
        scores = head(torch.from_numpy(embed(encoder, test))).numpy()
    per_class = {c: auroc(scores[:, j], y_test[:, j]) for j, c in enumerate(classes)}
    return ProbeResult(float(np.mean(list(per_class.values()))), per_class), encoder


def _summarise(runs: list[ProbeResult], records: list[int]) -> dict:
    macro = [r.macro_auroc for r in runs]
    classes = sorted({c for r in runs for c in r.per_class})
    per_class = {}
    for c in classes:
        values = [r.per_class[c] for r in runs if c in r.per_class]
        per_class[c] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": len(values)}
    return {"macro_auroc": {"mean": float(np.mean(macro)), "std": float(np.std(macro)), "runs": macro},
            "per_class": per_class, "labelled_records": records}


def label_efficiency(encoder: nn.Module, train: WindowSet, test: WindowSet, *,
                     fractions: tuple[float, ...] = (0.01, 0.1, 1.0), seeds: int = 3,
                     finetune: bool = False, l2: float = 1e-3, seed: int = 0,
                     finetune_kwargs: dict | None = None) -> dict:
    """Linear probe (and fine-tuning) on 1 %, 10 %, 100 % of the labelled records, over seeds.

    Returns {"linear_probe": {fraction: summary}, "fine_tune": {...}} where a summary holds the
    mean and std over seeds of macro AUROC, per-class AUROC, and the labelled record counts.
    The seed changes which records are drawn and, for fine-tuning, the head and the batch order.
    """
    methods = ["linear_probe"] + (["fine_tune"] if finetune else [])
    results: dict[str, dict[str, dict]] = {m: {} for m in methods}
    classes = train.classes()
    for fraction in fractions:
        runs: dict[str, list[ProbeResult]] = {m: [] for m in methods}
        records = []
        for s in range(seeds):
            subset = label_subset(train, classes, fraction, seed + s)
            records.append(len(np.unique(subset.record)))
            runs["linear_probe"].append(linear_probe(encoder, subset, test, l2))
            if finetune:
                runs["fine_tune"].append(fine_tune(encoder, subset, test, seed=seed + s, **(finetune_kwargs or {}))[0])
        for m in methods:
            results[m][str(fraction)] = _summarise(runs[m], records)
    return results


def results_table(results: dict) -> str:
    """Plain-text table: method x label fraction, macro AUROC mean ± std over seeds."""
    lines = [f"{'method':<14}{'labels':>8}{'records':>9}  macro AUROC (mean ± std)"]
    for method, by_fraction in results.items():
        for fraction, summary in by_fraction.items():
            auc = summary["macro_auroc"]
            records = summary["labelled_records"]
            lines.append(f"{method:<14}{float(fraction):>8.0%}{round(float(np.mean(records))):>9}  "
                         f"{auc['mean']:.4f} ± {auc['std']:.4f}")
    return "\n".join(lines)
