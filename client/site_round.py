"""One site's answer to one message: the round's local training or its federated probe.

Everything heavy a site does lives here (torch, its windows, the objective, DP-SGD); `client/app.py`
is the Flower glue that hands each message to `respond`, in its own process or, with a warm worker
on the node, in the worker's (client/worker.py), so a message costs no imports there.
"""

from __future__ import annotations

import dataclasses
import traceback
import zlib
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Error, MetricRecord, RecordDict
from flwr.common import log

from client.state import (load_fedema_state, load_local_state, load_privacy_ledger,
                          save_fedema_state, save_local_state)
from client.wire import received_state, reply_records
from fedssl.config import ConfigError, Scenario, SiteConfig, load_scenario
from fedssl.data.site import load_site
from fedssl.data.windows import WindowSet
from fedssl.evaluate import linear_probe
from fedssl.federated import cast_floating, encoder_state, fedema_start, shared_state
from fedssl.objectives import build_objective
from fedssl.privacy import PrivacyBudgetExceeded, PrivacyLedger
from fedssl.protocol import (COMPUTE_SECONDS_KEY, DELTA_KEY, DP_SGD_KEY, EPSILON_KEY, EXAMPLES_SEEN_KEY,
                             FEDEMA_MU_KEY, NEW_HEADS_KEY, PRIVACY_BUDGET_CODE, PRIVACY_BUDGET_REASON,
                             PROBE_AUROC_KEY, PROXIMAL_MU_KEY, SERVER_ROUND_KEY, SITE_ERROR_CODE, SITE_INDEX_KEY,
                             WEIGHT_KEY)
from fedssl.runfolder import RunFolder
from fedssl.train import train_local


class SiteContext:
    """What a site's work reads besides the message: the run and node configs (Flower's Context)."""

    def __init__(self, run_config: dict, node_config: dict) -> None:
        self.run_config, self.node_config = run_config, node_config


def respond(kind: str, content: RecordDict, run_config: dict, node_config: dict) -> RecordDict | Error:
    """The reply's content to a `train` or `evaluate` message, or an Error that says nothing about
    the site's data if the work fails or the site declines the round."""
    work = {"train": train_site, "evaluate": evaluate_site}[kind]
    context = SiteContext(dict(run_config), dict(node_config))
    site_name = "?"
    try:
        scenario = load_scenario(context.run_config["scenario"])
        site = which_site(scenario, context.node_config)
        site_name = site.name
        return RecordDict(work(scenario, site, content, context))
    except PrivacyBudgetExceeded as err:
        log(INFO, "fedssl | site %s declines the round: %s", site_name, err)  # stays in the site's log
        return Error(code=PRIVACY_BUDGET_CODE, reason=PRIVACY_BUDGET_REASON)
    except Exception as err:  # noqa: BLE001 - reported to the server instead of hanging the round
        # the details (paths, record ids) stay in the site's own log; the server learns only the kind
        log(ERROR, "fedssl | site %s: %s: %s\n%s", site_name, type(err).__name__, err, traceback.format_exc())
        return Error(code=SITE_ERROR_CODE, reason=f"site {site_name}: {type(err).__name__} (details in the site's log)")


def train_site(scenario: Scenario, site: SiteConfig, content: RecordDict, context: SiteContext) -> dict:
    """The round's local work at `site`: load heads + global model, train, save heads."""
    run_dir = Path(str(context.run_config["run-dir"]))
    state_folder = Path(str(context.node_config.get("state-folder", RunFolder(run_dir).site(site.name))))
    config, fed = content["config"], scenario.federation
    server_round = int(config[SERVER_ROUND_KEY])

    data = site_windows(scenario, site, context)
    objective = build_objective(scenario)
    # new-heads 1: the site had no heads of its own to continue (its first round, or a lost state folder)
    new_heads = fed.share == "encoder" and not load_local_state(objective, state_folder)
    received = cast_floating(received_state(content), "float32")  # float16 on the wire
    start, extra = received, {}
    if fed.local_update == "fedema":
        previous, scale = load_fedema_state(state_folder)
        start, scale, mu = fedema_start(previous, received, fed.fedema_lambda or scale, fed.fedema_tau)
        extra = {FEDEMA_MU_KEY: mu}
    objective.load_state_dict(start, strict=False)

    proximal_mu = float(config.get(PROXIMAL_MU_KEY, 0.0))  # sent by FedProx
    privacy = scenario.privacy_of(site)
    ledger = load_privacy_ledger(state_folder, privacy, data) if privacy.enabled else None
    result = train_local(objective, data, scenario.train, steps=scenario.train.local_steps,
                         seed=round_seed(scenario.seed, server_round, site.name),
                         proximal=(proximal_mu, received) if proximal_mu > 0 else None,
                         privacy=privacy if privacy.enabled else None, ledger=ledger,
                         # the whole federation's steps: the LR schedule (and DP's calibration) spans
                         # them, this round's steps continue it where round server_round - 1 ended
                         planned_steps=fed.rounds * scenario.train.local_steps,
                         first_step=(server_round - 1) * scenario.train.local_steps, round=server_round)
    # every site sends the same metric names (Flower's aggregation requires it): a site without
    # DP reports dp-sgd 0 and epsilon = delta = 0.0, which the server does not read as a guarantee
    extra = {**extra, **privacy_metrics(ledger)}
    save_local_state(objective, state_folder)
    shared = shared_state(objective, fed.share)
    if fed.local_update == "fedema":
        save_fedema_state(state_folder, shared, scale)

    log(INFO, "fedssl | site %s round %d: %d steps on %d windows, loss %.4f (%.1fs, %s)",
        site.name, server_round, result.steps, len(data), result.losses["loss"], result.seconds,
        "new heads" if new_heads else "its own heads")
    # FedAvg weights each site by its number of training windows (McMahan et al.'s n_k)
    # compute-seconds: the training loop alone, so the server can tell Flower's round overhead apart
    metrics = MetricRecord({WEIGHT_KEY: len(data), EXAMPLES_SEEN_KEY: int(result.examples),
                            SITE_INDEX_KEY: scenario.sites.index(site), COMPUTE_SECONDS_KEY: float(result.seconds),
                            NEW_HEADS_KEY: int(new_heads),
                            **{k: float(v) for k, v in result.losses.items()}, **extra})
    return {**reply_records(shared, fed.transfer_dtype), "metrics": metrics}


def evaluate_site(scenario: Scenario, site: SiteConfig, content: RecordDict, context: SiteContext) -> dict:
    """Linear-probe macro AUROC of the received encoder on the site's labelled windows, split by
    patient (by record where no patient id is known) as the central probe is. A site whose labels cannot be probed (no class
    with positives and negatives on both sides) replies with `num-examples` 0, which the server
    leaves out of the mean, instead of failing the round."""
    encoder = build_objective(scenario).encoder
    encoder.load_state_dict(encoder_state(received_state(content)))
    evaluation = scenario.evaluation
    train, test = site_windows(scenario, site, context).split_by_patient(evaluation.test_fraction, scenario.seed)
    try:
        auroc, windows = linear_probe(encoder, train, test, evaluation.probe_l2).macro_auroc, len(test)
    except ValueError as err:  # no usable class at this site
        log(INFO, "fedssl | site %s: no federated probe: %s", site.name, err)
        auroc, windows = 0.0, 0
    return {"metrics": MetricRecord({WEIGHT_KEY: windows, PROBE_AUROC_KEY: auroc,
                                     SITE_INDEX_KEY: scenario.sites.index(site)})}


def site_windows(scenario: Scenario, site: SiteConfig, context: SiteContext) -> WindowSet:
    """The site's windows (built once from its records, then read from its cache).

    Node config `records-folder` (deployment) is the site's WFDB folder on this hospital's machine:
    it replaces the scenario's `folder` (or `synthetic`) for this site, so one scenario file serves
    every hospital whatever its paths.
    """
    run_dir = Path(str(context.run_config["run-dir"]))
    data_folder = Path(str(context.node_config.get("data-folder", RunFolder(run_dir).data)))
    if "records-folder" in context.node_config:
        site = dataclasses.replace(site, folder=str(context.node_config["records-folder"]), synthetic=None)
    return load_site(site, scenario.data, data_folder, scenario.seed)


def privacy_metrics(ledger: PrivacyLedger | None) -> dict[str, float]:
    """`dp-sgd` (1/0) and, with DP, the site's epsilon spent so far (all rounds) and its delta."""
    if ledger is None:
        return {DP_SGD_KEY: 0, EPSILON_KEY: 0.0, DELTA_KEY: 0.0}
    return {DP_SGD_KEY: 1, EPSILON_KEY: float(ledger.epsilon()), DELTA_KEY: float(ledger.delta)}


def which_site(scenario: Scenario, node_config: dict) -> SiteConfig:
    """This node's site: node config `site` (deployment) or `partition-id` (simulation)."""
    if "site" in node_config:
        return scenario.site(str(node_config["site"]))
    if "partition-id" not in node_config:
        raise ConfigError("node config has neither 'site' nor 'partition-id'; start the SuperNode "
                          "with --node-config \"site='<name>'\"")
    index, count = int(node_config["partition-id"]), int(node_config.get("num-partitions", -1))
    if count != len(scenario.sites):
        raise ConfigError(f"the simulation has {count} nodes but the scenario has {len(scenario.sites)} "
                          "sites; set num-supernodes to the number of sites")
    return scenario.sites[index]


def round_seed(seed: int, server_round: int, site: str) -> int:
    """A seed that differs per (scenario seed, round, site) and is stable across processes."""
    return zlib.crc32(f"{seed}:{server_round}:{site}".encode()) & 0x7FFFFFFF
