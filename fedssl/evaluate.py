"""Evaluation of a frozen encoder: linear probe with macro AUROC on held-out labelled ECGs.

Small labelled ECG sets make a single probe number noise: one random initialisation, one split
or one lucky patient swings it by several hundredths. So the held-out set is split by patient
(never windows of one recording, or one patient, on both sides), several times (`evaluation.seeds`),
every number is a mean over splits (and over pretraining seeds where a benchmark has several)
and carries a 95 % bootstrap interval that resamples splits and then test patients
(`bootstrap_interval`); differences between encoders get a paired interval (`difference`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fedssl.config import ConfigError, Scenario, SiteConfig
from fedssl.data.site import load_site
from fedssl.data.windows import WindowSet


@dataclass(frozen=True)
class TestScores:
    """A probe's scores on its test windows, kept so that intervals can resample test patients."""

    __test__ = False  # not a pytest test class, whatever its name

    split: int | str  # which test set: results with the same split were scored on the same windows
    classes: tuple[str, ...]
    scores: np.ndarray  # float64 (N, C): probe logits
    targets: np.ndarray  # float32 (N, C): multi-hot labels
    groups: np.ndarray  # str (N,): the patient (or record) of each test window


@dataclass(frozen=True)
class ProbeResult:
    macro_auroc: float
    per_class: dict[str, float]
    test: TestScores | None = None


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


def linear_probe(encoder: nn.Module, train: WindowSet, test: WindowSet, l2: float = 1e-3,
                 split: int | str = 0) -> ProbeResult:
    """Macro AUROC of a logistic probe on frozen embeddings, over classes with positive and
    negative windows on both sides; the test scores are kept (under the name `split`)."""
    return probe_features(embed(encoder, train), train, embed(encoder, test), test, l2, split)


def probe_features(f_train: np.ndarray, train: WindowSet, f_test: np.ndarray, test: WindowSet,
                   l2: float = 1e-3, split: int | str = 0) -> ProbeResult:
    """`linear_probe` on embeddings already computed (one embedding serves several splits)."""
    classes, y_train, y_test = usable_classes(train, test)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    probe = fit_logistic((f_train - mean) / std, y_train, l2)
    with torch.no_grad():
        scores = probe(torch.from_numpy((f_test - mean) / std).double()).numpy()
    per_class = {c: auroc(scores[:, j], y_test[:, j]) for j, c in enumerate(classes)}
    return ProbeResult(float(np.mean(list(per_class.values()))), per_class,
                       TestScores(split, tuple(classes), scores, y_test, test.patient_groups()))


# -- held-out evaluation over splits, with intervals --------------------------------------------

def held_out_set(scenario: Scenario, workdir: Path) -> WindowSet:
    """The held-out labelled ECGs of `evaluation` (a folder, or a synthetic population)."""
    evaluation = scenario.evaluation
    for key in ("seeds", "random_inits", "bootstrap"):
        if getattr(evaluation, key) < 1:
            raise ConfigError(f"evaluation.{key} must be at least 1, got {getattr(evaluation, key)}")
    held_out = SiteConfig("evaluation", folder=evaluation.folder, labels_csv=evaluation.labels_csv,
                          synthetic=None if evaluation.folder else evaluation.synthetic)
    return load_site(held_out, scenario.data, workdir, scenario.seed)


@dataclass(frozen=True)
class ProbeSplits:
    """The held-out set and its `evaluation.seeds` patient-level splits into probe-train and test."""

    data: WindowSet
    splits: tuple[tuple[np.ndarray, np.ndarray], ...]  # (train, test) window indices, seeds seed, seed + 1, ...
    seed: int
    l2: float

    @staticmethod
    def of(scenario: Scenario, workdir: Path) -> "ProbeSplits":
        data = held_out_set(scenario, workdir)
        return ProbeSplits.from_windows(data, scenario.evaluation.test_fraction, scenario.evaluation.seeds,
                                        scenario.seed, scenario.evaluation.probe_l2)

    @staticmethod
    def from_windows(data: WindowSet, test_fraction: float, seeds: int, seed: int, l2: float) -> "ProbeSplits":
        return ProbeSplits(data, tuple(data.patient_split(test_fraction, s) for s in range(seed, seed + seeds)),
                           seed, l2)

    def first(self) -> tuple[WindowSet, WindowSet]:
        train, test = self.splits[0]
        return self.data.subset(train), self.data.subset(test)

    def probe(self, encoder: nn.Module) -> list[ProbeResult]:
        """The encoder probed on every split (embedding the held-out set once), named by split seed."""
        features = embed(encoder, self.data)
        return [probe_features(features[train], self.data.subset(train), features[test], self.data.subset(test),
                               self.l2, split=self.seed + i)
                for i, (train, test) in enumerate(self.splits)]


def summarise(results: Sequence[ProbeResult], replicates: int = 1000, seed: int = 0) -> dict:
    """Mean macro AUROC of `results` with its 95 % bootstrap interval (`bootstrap_interval`), every
    result's macro AUROC (`runs`) and the mean AUROC per class."""
    mean, low, high = bootstrap_interval(results, replicates=replicates, seed=seed)
    classes = sorted({c for r in results for c in r.per_class})
    return {"macro_auroc": mean, "ci95": [low, high], "runs": [r.macro_auroc for r in results],
            "per_class": {c: float(np.mean([r.per_class[c] for r in results if c in r.per_class])) for c in classes}}


def difference(results: Sequence[ProbeResult], reference: Sequence[ProbeResult], replicates: int = 1000,
               seed: int = 0) -> dict:
    """Mean macro AUROC of `results` minus that of `reference` (probed on the same splits), with
    its paired 95 % bootstrap interval: both are resampled with the same test patients."""
    mean, low, high = bootstrap_interval(results, reference, replicates=replicates, seed=seed)
    return {"mean": mean, "ci95": [low, high]}


def bootstrap_interval(results: Sequence[ProbeResult], minus: Sequence[ProbeResult] = (), *,
                       replicates: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """The mean macro AUROC over splits (each split's value: the mean over the results scored on
    it, minus the mean over `minus` on it) and the 2.5 / 97.5 percentiles of a two-level bootstrap.

    Level one draws splits with replacement (the spread between seeds: pretraining and split),
    level two draws each drawn split's test patients with replacement (records without a patient
    id count as their own patient), never single windows: windows of one recording are not
    independent evidence. A class without positives or negatives in a resample is left out of
    that resample's macro mean. With one split, only its patients are resampled.
    """
    tests = _by_split(results)
    others = _by_split(minus)
    if minus and set(others) != set(tests):
        raise ValueError(f"a difference needs both sides probed on the same splits, got {sorted(tests)} "
                         f"and {sorted(others)}")
    splits = sorted(tests, key=str)
    point = float(np.mean([np.mean([_macro(t) for t in tests[k]]) - (np.mean([_macro(t) for t in others[k]])
                                                                       if minus else 0.0) for k in splits]))
    rng = np.random.default_rng(seed)
    drawn = rng.integers(len(splits), size=(replicates, len(splits))) if len(splits) > 1 \
        else np.zeros((replicates, 1), int)
    values = np.empty(drawn.shape)
    for k, split in enumerate(splits):
        where = drawn == k
        groups = tests[split][0].groups
        if any(not np.array_equal(t.groups, groups) for t in tests[split] + others.get(split, [])):
            raise ValueError(f"results of split {split!r} were not scored on the same test windows")
        unique, window_group = np.unique(groups, return_inverse=True)
        patient_weights = rng.multinomial(len(unique), np.full(len(unique), 1 / len(unique)), size=where.sum())
        weights = patient_weights[:, window_group].astype(np.float64)
        value = np.mean([_weighted_macro(t, weights) for t in tests[split]], axis=0)
        if minus:
            value = value - np.mean([_weighted_macro(t, weights) for t in others[split]], axis=0)
        values[where] = value
    replicate_means = values.mean(1)
    low, high = np.nanpercentile(replicate_means, [2.5, 97.5])
    return point, float(low), float(high)


def _by_split(results: Sequence[ProbeResult]) -> dict[int | str, list[TestScores]]:
    grouped: dict[int | str, list[TestScores]] = {}
    for result in results:
        if result.test is None:
            raise ValueError("an interval needs the probe's test scores (ProbeResult.test)")
        grouped.setdefault(result.test.split, []).append(result.test)
    return grouped


def _macro(test: TestScores) -> float:
    return float(_weighted_macro(test, np.ones((1, len(test.groups))))[0])


def _weighted_macro(test: TestScores, weights: np.ndarray) -> np.ndarray:
    """Macro AUROC of `test` for each row of window weights (M, N): a row of resampling counts
    gives the AUROC of that resample, where a window drawn k times counts k times."""
    per_class = np.stack([_weighted_auroc(test.scores[:, c], test.targets[:, c] > 0, weights)
                          for c in range(len(test.classes))], 1)
    counted = (~np.isnan(per_class)).sum(1)
    return np.where(counted > 0, np.nansum(per_class, 1) / np.maximum(counted, 1), np.nan)


def _weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC (ties count half) with window weights, one value per row of `weights`;
    NaN where a row leaves no positive or no negative weight."""
    values, position = np.unique(scores, return_inverse=True)
    onehot = np.zeros((len(scores), len(values)))
    onehot[np.arange(len(scores)), position] = 1.0
    pos = (weights * positive) @ onehot  # (M, distinct scores): positive weight at each score
    neg = (weights * ~positive) @ onehot
    below = np.cumsum(neg, 1) - neg  # negative weight strictly below each score
    with np.errstate(invalid="ignore", divide="ignore"):
        area = (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))
    return np.where((pos.sum(1) > 0) & (neg.sum(1) > 0), area, np.nan)


def probe_data(scenario: Scenario, workdir: Path) -> tuple[WindowSet, WindowSet]:
    """The held-out labelled set's first patient-level split into probe-train and probe-test."""
    return ProbeSplits.of(scenario, workdir).first()


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
              weight_decay: float = 0.01, seed: int = 0, split: int | str = 0) -> tuple[ProbeResult, nn.Module]:
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
    test_scores = TestScores(split, tuple(classes), scores.astype(np.float64), y_test, test.patient_groups())
    return ProbeResult(float(np.mean(list(per_class.values()))), per_class, test_scores), encoder


def _summarise(runs: list[ProbeResult], records: list[int]) -> dict:
    macro = [r.macro_auroc for r in runs]
    classes = sorted({c for r in runs for c in r.per_class})
    per_class = {}
    for c in classes:
        values = [r.per_class[c] for r in runs if c in r.per_class]
        per_class[c] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": len(values)}
    _, low, high = bootstrap_interval(runs)
    return {"macro_auroc": {"mean": float(np.mean(macro)), "std": float(np.std(macro)), "ci95": [low, high],
                            "runs": macro},
            "per_class": per_class, "labelled_records": records}


def label_efficiency(encoder: nn.Module, train: WindowSet, test: WindowSet, *,
                     fractions: tuple[float, ...] = (0.01, 0.1, 1.0), seeds: int = 3,
                     finetune: bool = False, l2: float = 1e-3, seed: int = 0,
                     finetune_kwargs: dict | None = None) -> dict:
    """Linear probe (and fine-tuning) on 1 %, 10 %, 100 % of the labelled records, over seeds.

    Returns {"linear_probe": {fraction: summary}, "fine_tune": {...}} where a summary holds the
    mean, std and 95 % bootstrap interval (`bootstrap_interval`) over seeds of macro AUROC, the
    per-class AUROC and the labelled record counts.
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
            # each draw of labelled records is its own "split": the interval resamples draws, then test patients
            runs["linear_probe"].append(linear_probe(encoder, subset, test, l2, split=s))
            if finetune:
                runs["fine_tune"].append(fine_tune(encoder, subset, test, seed=seed + s, split=s,
                                                   **(finetune_kwargs or {}))[0])
        for m in methods:
            results[m][str(fraction)] = _summarise(runs[m], records)
    return results


def results_table(results: dict) -> str:
    """Plain-text table: method x label fraction, macro AUROC mean ± std over seeds [95 % interval]."""
    lines = [f"{'method':<14}{'labels':>8}{'records':>9}  macro AUROC (mean ± std over seeds [95 % interval])"]
    for method, by_fraction in results.items():
        for fraction, summary in by_fraction.items():
            auc = summary["macro_auroc"]
            records = summary["labelled_records"]
            lines.append(f"{method:<14}{float(fraction):>8.0%}{round(float(np.mean(records))):>9}  "
                         f"{auc['mean']:.4f} ± {auc['std']:.4f} [{auc['ci95'][0]:.4f}, {auc['ci95'][1]:.4f}]")
    return "\n".join(lines)
