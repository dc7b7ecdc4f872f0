"""What a federated encoder is compared against: random init, each site alone, all sites pooled.

Every encoder is trained by the same loop with the same budget: a local-only site takes as many
optimizer steps as it took in the whole federation (rounds x local steps), so any gain of the
federated encoder comes from the other sites' data, not from more training. Centralized training
on the pooled sites (the upper bound federation aims for) takes as many steps of the same batch
size as all sites together took (sites x rounds x local steps): the same number of samples seen.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from fedssl.config import Scenario
from fedssl.data.site import load_site
from fedssl.data.windows import WindowSet
from fedssl.evaluate import ProbeResult, ProbeSplits, difference, summarise
from fedssl.objectives import build_objective
from fedssl.train import TrainResult, train_local

log = logging.getLogger("fedssl.baselines")


def local_only_state(scenario: Scenario, site_index: int, workdir: Path) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Encoder weights of one site trained alone with the federation's budget."""
    site = scenario.sites[site_index]
    objective = build_objective(scenario)
    data = load_site(site, scenario.data, workdir, scenario.seed)
    steps = scenario.federation.rounds * scenario.train.local_steps
    result = train_local(objective, data, scenario.train, steps=steps, seed=scenario.seed + 1000 * (site_index + 1))
    return objective.encoder.state_dict(), result


def centralized_steps(scenario: Scenario) -> int:
    """Optimizer steps of centralized training: the federation's, summed over its sites."""
    return len(scenario.sites) * scenario.federation.rounds * scenario.train.local_steps


def centralized_state(scenario: Scenario, workdir: Path) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Encoder weights trained on the pooled windows of every site with the federation's budget."""
    if not scenario.sites:
        raise ValueError("the scenario has no sites to pool")
    pooled = WindowSet.concat([load_site(site, scenario.data, workdir, scenario.seed) for site in scenario.sites])
    objective = build_objective(scenario)
    steps = centralized_steps(scenario)
    log.info("centralized: %d windows of %d sites, %d steps ...", len(pooled), len(scenario.sites), steps)
    result = train_local(objective, pooled, scenario.train, steps=steps, seed=scenario.seed)
    return objective.encoder.state_dict(), result


def local_only_states(scenario: Scenario, workdir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every site's local-only encoder, trained side by side (one process per core)."""
    workers = max(1, min(len(scenario.sites), os.cpu_count() or 1))
    steps = scenario.federation.rounds * scenario.train.local_steps
    log.info("local-only baselines: %d sites x %d steps, %d at a time ...", len(scenario.sites), steps, workers)
    states = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(local_only_state, scenario, i, workdir): site.name
                   for i, site in enumerate(scenario.sites)}
        for future in as_completed(futures):
            states[futures[future]], result = future.result()
            log.info("local-only %s: %d steps, loss %.4f, %.1fs", futures[future], result.steps,
                     result.losses["loss"], result.seconds)
    return {site.name: states[site.name] for site in scenario.sites}


def random_init_states(scenario: Scenario) -> list[dict[str, torch.Tensor]]:
    """`evaluation.random_inits` untrained encoders: the first is the federation's starting point
    (seeded by `scenario.seed`), the others seeded by seed + 1, seed + 2, ... One initialisation
    alone swings a small probe by several hundredths, so the reference is their mean."""
    return [build_objective(dataclasses.replace(scenario, seed=scenario.seed + i)).encoder.state_dict()
            for i in range(scenario.evaluation.random_inits)]


def probe_states(scenario: Scenario, probe: ProbeSplits, states: list[dict[str, torch.Tensor]]) -> list[ProbeResult]:
    """Every encoder state probed on every split of `probe`."""
    encoder = build_objective(scenario).encoder
    results = []
    for state in states:
        encoder.load_state_dict(state)
        results += probe.probe(encoder)
    return results


def compare(scenario: Scenario, workdir: Path, federated_encoder_state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Linear-probe results by encoder name: random_init, federated, local_only/<site>.

    Each entry (`fedssl.evaluate.summarise`): `macro_auroc` (mean over the probe's splits, and for
    random_init over its initialisations too), `ci95`, `runs` and the mean `per_class`; entries
    other than federated also have `federated_minus`: federated minus this encoder with its paired
    interval.
    """
    probe = ProbeSplits.of(scenario, workdir)
    states = {"random_init": random_init_states(scenario), "federated": [federated_encoder_state]}
    if scenario.evaluation.local_baselines:
        states |= {f"local_only/{name}": [state] for name, state in local_only_states(scenario, workdir).items()}
    replicates = scenario.evaluation.bootstrap
    results = {name: probe_states(scenario, probe, group) for name, group in states.items()}
    summaries = {name: summarise(runs, replicates, scenario.seed) for name, runs in results.items()}
    for name, runs in results.items():
        if name != "federated":
            summaries[name]["federated_minus"] = difference(results["federated"], runs, replicates, scenario.seed)
    return summaries
