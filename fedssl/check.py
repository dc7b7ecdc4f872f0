"""One validation pass over a whole scenario, run before any data is generated or Flower starts.

`fedssl.config` checks each setting's own range when a scenario is loaded; `check_scenario`
checks what needs more than one section or the code's registries: the sites, the synthetic
populations against the data settings, the encoder and objective names, the objective under
DP-SGD, and finally the objective itself, built once and run forward and backward on a dummy
batch of two windows, so that a model that cannot be built or gives a non-finite loss is refused
in seconds, not a minute into a federation. Every refusal is a `ConfigError` naming the dotted key
and what would work. `fedssl check SCENARIO.yaml`, `fedssl simulate` and the ServerApp run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedssl.config import ConfigError, DataConfig, Scenario, SyntheticSiteConfig

if TYPE_CHECKING:
    from fedssl.objectives import Objective

MIN_SITE_WINDOWS = 2  # a batch of one window has no other window to contrast with, nor a mean to speak of
# fewer records on a side of the probe's split leave no class with positives and negatives on both sides
# (necessary, not sufficient: `simulate` checks the materialised probe set itself)
MIN_PROBE_RECORDS = 4
HELD_OUT_NAME = "evaluation"  # the probe's held-out records are materialised as a site of this name


def check_scenario(scenario: Scenario, *, site_folders: bool = True) -> None:
    """Refuse a scenario that cannot run; return None if it can.

    `site_folders` False skips checking that the sites' record folders exist: a deployed ServerApp
    runs where they do not (each hospital's SuperNode reads its own).
    """
    from fedssl.objectives import build_objective

    check_sites(scenario, site_folders=site_folders)
    check_model(scenario)
    objective = build_objective(scenario)
    check_privacy(scenario, objective)
    check_forward(scenario, objective)


def check_sites(scenario: Scenario, *, site_folders: bool = True) -> None:
    if not scenario.sites:
        raise ConfigError("sites: the scenario names no site; a federation needs at least two, e.g. "
                          "sites: [{name: hospital_a, synthetic: {records: 60}}, "
                          "{name: clinic_b, folder: path/to/wfdb/records}]")
    for i, site in enumerate(scenario.sites):
        key = f"sites[{i}]"
        if site.name == HELD_OUT_NAME:
            raise ConfigError(f"{key}.name: {HELD_OUT_NAME!r} is the name of the held-out probe records; "
                              "choose another site name")
        if site_folders and site.folder is not None and not Path(site.folder).is_dir():
            raise ConfigError(f"{key}.folder: {site.folder} does not exist or is not a folder")
        if site.synthetic is not None:
            check_synthetic(site.synthetic, scenario.data, f"{key}.synthetic")
    evaluation = scenario.evaluation
    if evaluation.folder is not None:
        if not Path(evaluation.folder).is_dir():
            raise ConfigError(f"evaluation.folder: {evaluation.folder} does not exist or is not a folder")
    elif evaluation.synthetic is None:
        raise ConfigError("evaluation: give a folder or a synthetic population of held-out labelled records")
    else:
        check_synthetic(evaluation.synthetic, scenario.data, "evaluation.synthetic")
        test = round(evaluation.test_fraction * evaluation.synthetic.records)  # as WindowSet.split_by_record
        train = evaluation.synthetic.records - test
        if min(train, test) < MIN_PROBE_RECORDS:
            raise ConfigError(f"evaluation.synthetic.records: {evaluation.synthetic.records} records split "
                              f"{train} train / {test} test by evaluation.test_fraction {evaluation.test_fraction:g}; "
                              f"the probe needs at least {MIN_PROBE_RECORDS} on each side, with positives and "
                              f"negatives of a class on both")


def check_synthetic(spec: SyntheticSiteConfig, data: DataConfig, key: str) -> None:
    """A synthetic population that the data settings can read and that yields enough windows."""
    from fedssl.data.synthetic import EXCLUSIVE, RHYTHMS
    from fedssl.data.windows import STANDARD_LEADS

    if not data.min_source_rate <= spec.sample_rate <= data.max_source_rate:
        raise ConfigError(f"{key}.sample_rate: {spec.sample_rate} Hz is outside what data accepts "
                          f"(data.min_source_rate {data.min_source_rate} to data.max_source_rate "
                          f"{data.max_source_rate} Hz)")
    unknown = sorted(set(spec.missing_leads) - set(STANDARD_LEADS))
    if unknown:
        raise ConfigError(f"{key}.missing_leads: unknown lead(s) {unknown}; leads are {list(STANDARD_LEADS)}")
    if set(STANDARD_LEADS) <= set(spec.missing_leads):
        raise ConfigError(f"{key}.missing_leads: every lead is missing; at least one must be recorded")
    if spec.prevalence and not any(spec.prevalence[r] > 0 for r in RHYTHMS):
        raise ConfigError(f"{key}.prevalence: every rhythm ({', '.join(RHYTHMS)}) has probability 0; "
                          "at least one needs a positive probability")
    for pair in EXCLUSIVE:
        if spec.prevalence and sum(spec.prevalence[c] for c in pair) > 1:
            raise ConfigError(f"{key}.prevalence: {' and '.join(pair)} exclude each other; their "
                              "probabilities must add up to at most 1")
    per_record = min(int(spec.duration_seconds // data.window_seconds), data.max_windows_per_record)
    if per_record == 0:
        raise ConfigError(f"{key}.duration_seconds: records of {spec.duration_seconds:g} s are shorter than "
                          f"a window (data.window_seconds {data.window_seconds:g})")
    if spec.records * per_record < MIN_SITE_WINDOWS:
        raise ConfigError(f"{key}.records: {spec.records} record(s) of {per_record} window(s) each; "
                          f"training needs at least {MIN_SITE_WINDOWS} windows")


def check_model(scenario: Scenario) -> None:
    """Names against the registries (fedssl.models, fedssl.objectives), and the window against the
    patch size, each reported under its own key."""
    from fedssl.models import ENCODERS, TOKEN_ENCODERS
    from fedssl.objectives import NAMES

    model, objective = scenario.model, scenario.objective
    if model.encoder not in ENCODERS:
        raise ConfigError(f"model.encoder: unknown encoder {model.encoder!r}; known: {list(ENCODERS)}")
    if objective.name not in NAMES:
        raise ConfigError(f"objective.name: unknown objective {objective.name!r}; known: {list(NAMES)}")
    window = window_samples(scenario.data)
    if model.encoder in TOKEN_ENCODERS and window % model.patch_size:
        divisors = [d for d in range(2, window // 2 + 1) if window % d == 0]
        raise ConfigError(f"model.patch_size: {model.patch_size} does not divide the window of {window} samples "
                          f"(data.window_seconds {scenario.data.window_seconds:g} x data.sample_rate "
                          f"{scenario.data.sample_rate}); patch sizes that do: {divisors[:12]}")


def check_privacy(scenario: Scenario, objective: Objective) -> None:
    """Every site with DP-SGD must train an objective whose loss is per sample."""
    from fedssl.privacy import PrivacyError, check_dp_safe

    private = [(i, s) for i, s in enumerate(scenario.sites) if scenario.privacy_of(s).enabled]
    if not private:
        return
    try:
        check_dp_safe(objective)
    except PrivacyError as err:
        i, site = private[0]
        where = f"sites[{i}].privacy" if site.privacy is not None else "privacy"
        raise ConfigError(f"{where}.enabled with objective.name {scenario.objective.name!r}: {err}") from None


def check_forward(scenario: Scenario, objective: Objective) -> None:
    """One training step's learning rate, forward and backward pass of `objective` on two dummy
    windows: what cannot run, or gives a non-finite loss, is refused here."""
    from fedssl.privacy import PrivacyError, check_dp_safe
    from fedssl.train import learning_rate_at

    learning_rate_at(0, scenario.train.local_steps, scenario.train)  # refuses an unknown train.lr_schedule

    try:
        check_dp_safe(objective)
    except PrivacyError:  # its loss contrasts the windows of a batch
        if scenario.train.batch_size < MIN_SITE_WINDOWS:
            raise ConfigError(f"train.batch_size: objective {scenario.objective.name!r} contrasts each window "
                              f"with the others of its batch; it needs at least {MIN_SITE_WINDOWS}, got "
                              f"{scenario.train.batch_size}") from None
    generator = torch.Generator().manual_seed(scenario.seed)
    x = torch.randn(MIN_SITE_WINDOWS, 12, window_samples(scenario.data), generator=generator)
    mask = torch.ones(MIN_SITE_WINDOWS, 12, dtype=torch.bool)
    groups = torch.arange(MIN_SITE_WINDOWS)
    objective.train()
    try:
        loss = objective(x, mask, groups)["loss"]
        loss.backward()
    except ConfigError:
        raise
    except (RuntimeError, ValueError, IndexError) as err:
        raise ConfigError(f"model {scenario.model.encoder} {scenario.model.size} with objective "
                          f"{scenario.objective.name!r} cannot train on a window of {window_samples(scenario.data)} "
                          f"samples: {err}") from None
    if not torch.isfinite(loss):
        raise ConfigError(f"objective: the loss of {scenario.objective.name!r} is {loss.item()} on a dummy batch; "
                          "check objective.temperature, mask_ratio and the loss weights")


def window_samples(data: DataConfig) -> int:
    return round(data.window_seconds * data.sample_rate)
