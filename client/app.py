"""fedssl ClientApp: one hospital's local self-supervised training step of a federated round.

The site receives the global model, trains the whole objective (encoder + its own heads) on its
own windows for `train.local_steps` steps, keeps the heads on disk and replies with the shared
weights and scalar metrics only. What is shared is `federation.share`: the encoder (the heads
never leave the site) or the whole objective. With `federation.local_update: fedema` the site
starts from a blend of the global model and its own previous one; with FedProx (the strategy
sends `proximal-mu`) the local loss gets a proximal term. Recordings and windows never leave.

Run config (`[tool.flwr.app.config]`): `scenario` (YAML path), `run-dir` (run folder).
Node config: `site` (deployment: the site's name in the scenario; in simulation the site is
`scenario.sites[partition-id]`), optional `state-folder` (default `<run-dir>/sites/<site>`)
and `data-folder` (default `<run-dir>/data`).
"""

from __future__ import annotations

import traceback
import zlib
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from client.state import load_fedema_state, load_local_state, save_fedema_state, save_local_state
from fedssl.config import ConfigError, Scenario, SiteConfig, load_scenario
from fedssl.data.site import load_site
from fedssl.federated import fedema_start, shared_state
from fedssl.objectives import build_objective
from fedssl.train import train_local

app = ClientApp()

SITE_ERROR_CODE = 1000  # error replies from this app (Flower reserves small codes)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received encoder on this site's data; reply with encoder weights + metrics."""
    site_name = "?"
    try:
        scenario = load_scenario(context.run_config["scenario"])
        site = which_site(scenario, context.node_config)
        site_name = site.name
        arrays, metrics = train_site(scenario, site, msg, context)
    except Exception as err:  # noqa: BLE001 - reported to the server instead of hanging the round
        reason = f"site {site_name}: {type(err).__name__}: {err}"
        log(ERROR, "fedssl | %s\n%s", reason, traceback.format_exc())
        return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=msg)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def train_site(scenario: Scenario, site: SiteConfig, msg: Message, context: Context) -> tuple[ArrayRecord, MetricRecord]:
    """The round's local work at `site`: load heads + global model, train, save heads."""
    run_dir = Path(str(context.run_config["run-dir"]))
    state_folder = Path(str(context.node_config.get("state-folder", run_dir / "sites" / site.name)))
    data_folder = Path(str(context.node_config.get("data-folder", run_dir / "data")))
    config, fed = msg.content["config"], scenario.federation
    server_round = int(config["server-round"])

    data = load_site(site, scenario.data, data_folder, scenario.seed)
    objective = build_objective(scenario)
    if fed.share == "encoder":
        load_local_state(objective, state_folder)
    received = msg.content["arrays"].to_torch_state_dict()
    start, extra = received, {}
    if fed.local_update == "fedema":
        previous, scale = load_fedema_state(state_folder)
        start, scale, mu = fedema_start(previous, received, fed.fedema_lambda or scale, fed.fedema_tau)
        extra = {"fedema-mu": mu}
    objective.load_state_dict(start, strict=False)

    proximal_mu = float(config.get("proximal-mu", 0.0))  # sent by FedProx
    result = train_local(objective, data, scenario.train, steps=scenario.train.local_steps,
                         seed=round_seed(scenario.seed, server_round, site.name),
                         proximal=(proximal_mu, received) if proximal_mu > 0 else None)
    save_local_state(objective, state_folder)
    shared = shared_state(objective, fed.share)
    if fed.local_update == "fedema":
        save_fedema_state(state_folder, shared, scale)

    log(INFO, "fedssl | site %s round %d: %d steps on %d windows, loss %.4f (%.1fs)",
        site.name, server_round, result.steps, len(data), result.losses["loss"], result.seconds)
    # FedAvg weights each site by its number of training windows (McMahan et al.'s n_k)
    metrics = MetricRecord({"num-examples": len(data), "examples-seen": int(result.examples),
                            **{k: float(v) for k, v in result.losses.items()}, **extra})
    return ArrayRecord(shared), metrics


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
