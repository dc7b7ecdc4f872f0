"""fedssl ClientApp: one hospital's local self-supervised training step of a federated round.

The site receives the global model, trains the whole objective (encoder + its own heads) on its
own windows for `train.local_steps` steps, keeps the heads on disk and replies with the shared
weights and scalar metrics only. What is shared is `federation.share`: the encoder (the heads
never leave the site) or the whole objective. With `federation.local_update: fedema` the site
starts from a blend of the global model and its own previous one; with FedProx (the strategy
sends `proximal-mu`) the local loss gets a proximal term. Recordings and windows never leave.

With DP-SGD enabled for the site (`sites[i].privacy`, else the scenario's `privacy`), the site
trains with the privacy ledger of its state folder, reports the epsilon it has spent so far and
its delta as the metrics `epsilon` and `delta` (`dp-sgd` 1; a site without DP sends `dp-sgd` 0
and zeros, since every reply must carry the same metric names), and declines a round that would
take it past its target epsilon: it replies with an Error of code `PRIVACY_BUDGET_CODE` and the fixed reason
`PRIVACY_BUDGET_REASON` (nothing about its data), and spends nothing.

Run config (`[tool.flwr.app.config]`): `scenario` (YAML path), `run-dir` (run folder).
Node config: `site` (deployment: the site's name in the scenario; in simulation the site is
`scenario.sites[partition-id]`), optional `state-folder` (default `<run-dir>/sites/<site>`),
`data-folder` (window cache, default `<run-dir>/data`) and `records-folder` (the site's WFDB
records on this machine, replacing the scenario's folder for this site).
"""

from __future__ import annotations

import dataclasses
import traceback
import zlib
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.state import (load_fedema_state, load_local_state, load_privacy_ledger,
                          save_fedema_state, save_local_state)
from fedssl.config import ConfigError, Scenario, SiteConfig, load_scenario
from fedssl.data.site import load_site
from fedssl.data.windows import WindowSet
from fedssl.evaluate import linear_probe
from fedssl.federated import cast_floating, encoder_state, fedema_start, shared_state
from fedssl.objectives import build_objective
from fedssl.privacy import PrivacyBudgetExceeded, PrivacyLedger
from fedssl.runfolder import RunFolder
from fedssl.train import train_local

app = ClientApp()

SITE_ERROR_CODE = 1000  # error replies from this app (Flower reserves small codes)
PRIVACY_BUDGET_CODE = 1001  # the site declines the round: it would pass its target epsilon
PRIVACY_BUDGET_REASON = "privacy budget exhausted"  # fixed: says nothing about the site's data
SITE_INDEX_KEY = "site-index"  # metric: the site's index in `scenario.sites` (server/validation.py)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received encoder on this site's data; reply with encoder weights + metrics.

    With central DP clipped at the sites (`federation.central_dp: client`, the server sends a
    clipping norm), Flower's `fixedclipping_mod` clips the update before it leaves the site.
    """
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, train_round)
    return train_round(msg, context)


def train_round(msg: Message, context: Context) -> Message:
    """One round's local training; an Error reply if it fails or the site declines it."""
    return answer(msg, context, train_site)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation (`evaluation.federated`): probe the global encoder on this site's
    own labelled windows; the reply holds scalars only (AUROC and window counts)."""
    return answer(msg, context, evaluate_site)


def answer(msg: Message, context: Context, work) -> Message:
    """Reply with `work(scenario, site, msg, context)`'s records, or an Error reply that says
    nothing about the site's data if it fails or the site declines the round."""
    site_name = "?"
    try:
        scenario = load_scenario(context.run_config["scenario"])
        site = which_site(scenario, context.node_config)
        site_name = site.name
        content = RecordDict(work(scenario, site, msg, context))
    except PrivacyBudgetExceeded as err:
        log(INFO, "fedssl | site %s declines the round: %s", site_name, err)  # stays in the site's log
        return Message(Error(code=PRIVACY_BUDGET_CODE, reason=PRIVACY_BUDGET_REASON), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - reported to the server instead of hanging the round
        # the details (paths, record ids) stay in the site's own log; the server learns only the kind
        log(ERROR, "fedssl | site %s: %s: %s\n%s", site_name, type(err).__name__, err, traceback.format_exc())
        reason = f"site {site_name}: {type(err).__name__} (details in the site's log)"
        return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=msg)
    return Message(content, reply_to=msg)


def train_site(scenario: Scenario, site: SiteConfig, msg: Message, context: Context) -> dict:
    """The round's local work at `site`: load heads + global model, train, save heads."""
    run_dir = Path(str(context.run_config["run-dir"]))
    state_folder = Path(str(context.node_config.get("state-folder", RunFolder(run_dir).site(site.name))))
    config, fed = msg.content["config"], scenario.federation
    server_round = int(config["server-round"])

    data = site_windows(scenario, site, context)
    objective = build_objective(scenario)
    # new-heads 1: the site had no heads of its own to continue (its first round, or a lost state folder)
    new_heads = fed.share == "encoder" and not load_local_state(objective, state_folder)
    received = cast_floating(msg.content["arrays"].to_torch_state_dict(), "float32")  # float16 on the wire
    start, extra = received, {}
    if fed.local_update == "fedema":
        previous, scale = load_fedema_state(state_folder)
        start, scale, mu = fedema_start(previous, received, fed.fedema_lambda or scale, fed.fedema_tau)
        extra = {"fedema-mu": mu}
    objective.load_state_dict(start, strict=False)

    proximal_mu = float(config.get("proximal-mu", 0.0))  # sent by FedProx
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
    metrics = MetricRecord({"num-examples": len(data), "examples-seen": int(result.examples),
                            SITE_INDEX_KEY: scenario.sites.index(site), "compute-seconds": float(result.seconds),
                            "new-heads": int(new_heads),
                            **{k: float(v) for k, v in result.losses.items()}, **extra})
    return {"arrays": ArrayRecord(cast_floating(shared, fed.transfer_dtype)), "metrics": metrics}


def evaluate_site(scenario: Scenario, site: SiteConfig, msg: Message, context: Context) -> dict:
    """Linear-probe macro AUROC of the received encoder on the site's labelled windows, split by
    patient (by record where no patient id is known) as the central probe is. A site whose labels cannot be probed (no class
    with positives and negatives on both sides) replies with `num-examples` 0, which the server
    leaves out of the mean, instead of failing the round."""
    encoder = build_objective(scenario).encoder
    encoder.load_state_dict(encoder_state(msg.content["arrays"].to_torch_state_dict()))
    evaluation = scenario.evaluation
    train, test = site_windows(scenario, site, context).split_by_patient(evaluation.test_fraction, scenario.seed)
    try:
        auroc, windows = linear_probe(encoder, train, test, evaluation.probe_l2).macro_auroc, len(test)
    except ValueError as err:  # no usable class at this site
        log(INFO, "fedssl | site %s: no federated probe: %s", site.name, err)
        auroc, windows = 0.0, 0
    return {"metrics": MetricRecord({"num-examples": windows, "probe-macro-auroc": auroc,
                                     SITE_INDEX_KEY: scenario.sites.index(site)})}


def site_windows(scenario: Scenario, site: SiteConfig, context: Context) -> WindowSet:
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
        return {"dp-sgd": 0, "epsilon": 0.0, "delta": 0.0}
    return {"dp-sgd": 1, "epsilon": float(ledger.epsilon()), "delta": float(ledger.delta)}


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
