"""fedssl ServerApp: federated self-supervised pretraining of the scenario's encoder.

Each round the strategy sends the global model (the encoder, or the whole objective with
`federation.share: all`) to the sites, aggregates what they return and the ServerApp probes the
new global encoder on held-out labelled ECGs (linear probe, macro AUROC). Files written under
`run-dir`: `metrics.jsonl` (one line per round, with each DP site's epsilon and the rounds sites
declined for their privacy budget), `checkpoints/encoder_round_<r>.pt`, `encoder.pt`
(latest global encoder) and, with `share: all`, `global.pt` (latest whole global objective); also
`scenario.yaml` (the configuration used), `presence.json` (which sites are online, server/presence.py)
and, at the end, `report.md` with plots (fedssl/report.py).

`checkpoints/server.pt` holds what a resumed run needs (server/checkpoint.py).

Run config (`[tool.flwr.app.config]`): `scenario` (YAML path), `run-dir` (run folder), `resume`
(true: continue after the run folder's last completed round instead of starting afresh).
"""

from __future__ import annotations

import random
import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (FedAdam, FedAvg, FedAvgM, FedMedian,
                                     FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy)
from torch import nn

from fedssl.check import check_scenario
from fedssl.config import ConfigError, FederationConfig, Scenario, load_scenario
from fedssl.evaluate import ProbeSplits, summarise
from fedssl.federated import LOCAL_UPDATES, SHARE_MODES, TRANSFER_DTYPES, encoder_state, shared_state
from fedssl.monitor import embedding_health
from fedssl.objectives import build_objective
from fedssl.protocol import NUM_ROUNDS_KEY, PROBE_AUROC_KEY
from fedssl.report import save_run_config, write_report
from fedssl.runfolder import PRESENCE
from server.central_dp import CENTRAL_DP, SITE_WEIGHT_KEY, central_dp, no_metrics
from server.checkpoint import ContinuedStrategy, ServerCheckpoint, optimizer_state, resume_point
from server.metrics import RoundTracker
from server.presence import PatientGrid, PresenceFile
from server.robust import robust_options
from server.validation import ValidatedStrategy

app = ServerApp()

# Strategies that need nothing from the sites beyond shared weights and `num-examples`
# (FedProx's proximal term is added by the sites, see client/app.py).
STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedprox": FedProx,
    "krum": Krum,
    "multikrum": MultiKrum,
}
ADAPTIVE_LEARNING_RATE = 0.01  # default server eta of fedadam/fedyogi (see FederationConfig)
# federation.central_dp: site-level DP of the aggregate (server/central_dp.py: clip each site's update, noise
# the mean); "client" needs the sites to clip (client/app.py applies Flower's fixedclipping_mod when asked)
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")  # not a mean: central DP's noise does not fit


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `federation.rounds` rounds of the scenario's strategy and probe each global encoder."""
    scenario = load_scenario(context.run_config["scenario"])
    # refused before any site is waited for, as `fedssl simulate` refuses it; the sites' folders are theirs
    check_scenario(scenario, site_folders=False)
    run_dir = Path(str(context.run_config["run-dir"]))
    save_run_config(scenario, context.run_config["scenario"], run_dir)  # deployed runs record their config too
    fed = scenario.federation
    random.seed(scenario.seed)  # the strategies sample nodes with `random`

    initial = shared_state(build_objective(scenario), fed.share)
    # run config `resume`: continue after the run folder's last checkpoint (server/checkpoint.py)
    checkpoint = resume_point(run_dir, fed.strategy, fed.rounds, initial) if context.run_config.get("resume") else None
    done = checkpoint.round if checkpoint else 0
    tracker = RoundTracker(run_dir, fed.rounds, initial, sites=tuple(s.name for s in scenario.sites),
                           resume_after=done)
    strategy = make_strategy(fed, len(scenario.sites), tracker, scenario.evaluation.federated)
    if checkpoint:
        checkpoint.restore(strategy)
        tracker.epsilon.update(checkpoint.epsilon)
    log(INFO, "fedssl | scenario %s: %d sites, %d rounds of %s (share %s, %s), %d local steps",
        scenario.name, len(scenario.sites), fed.rounds, fed.strategy, fed.share, fed.local_update,
        scenario.train.local_steps)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Checkpoint and probe the global encoder after `server_round` (`done`: before the first)."""
        if server_round == done:  # the initial encoder is the random-init baseline of the summary
            tracker.start_round(done + 1)
            return None
        tracker.require_update(server_round)
        auroc, ci95, seconds = None, None, 0.0
        encoder = global_encoder(scenario, encoder_state(tracker.state_dict(arrays)))
        if scenario.evaluation.every_round or server_round == fed.rounds:
            auroc, ci95, seconds = probe(scenario, run_dir, encoder)
        sampled = max(int(len(list(grid.get_node_ids())) * fed.fraction_train), fed.min_sites)
        tracker.finish_round(server_round, arrays, auroc, seconds, expected=sampled, probe_ci95=ci95,
                             monitor=collapse_monitor(scenario, run_dir, encoder))
        ServerCheckpoint(server_round, fed.strategy, {k: a.numpy() for k, a in arrays.items()},
                         optimizer_state(strategy), random.getstate(), dict(tracker.epsilon)).save(run_dir)
        return None if auroc is None else MetricRecord({PROBE_AUROC_KEY: auroc})

    # never wait without end: fail naming the missing sites after connect_timeout; keep presence.json
    grid = PatientGrid(grid, [s.name for s in scenario.sites], fed.min_sites, timeout=fed.connect_timeout,
                       straggler_timeout=fed.straggler_timeout, presence=PresenceFile(run_dir / PRESENCE))
    continued = ContinuedStrategy(strategy, done)  # rounds done+1 .. fed.rounds
    if done < fed.rounds:
        continued.start(
            grid=grid,
            timeout=fed.round_timeout,  # seconds a round waits for the sites' replies
            initial_arrays=checkpoint.array_record() if checkpoint else ArrayRecord(initial),
            num_rounds=fed.rounds - done,
            train_config=ConfigRecord({NUM_ROUNDS_KEY: fed.rounds}),  # FedAvg adds SERVER_ROUND_KEY
            evaluate_fn=continued.evaluate_fn(evaluate),
        )
    log(INFO, "fedssl | report with plots: %s", write_report(run_dir))
    # simulations/run.py recognises a completed run by this line (DONE_MARK)
    log(INFO, "fedssl | done: global encoder in %s", run_dir / "encoder.pt")


def check_federation(fed: FederationConfig, num_sites: int) -> None:
    """Refuse a federation section that this ServerApp cannot run, before any data is generated (the
    section's own ranges are checked when it is loaded, fedssl/config.py)."""
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"federation.strategy: unknown strategy {fed.strategy!r}; known: {sorted(STRATEGIES)}")
    if not 1 <= fed.min_sites <= num_sites:
        raise ConfigError(f"federation.min_sites must be between 1 and the number of sites ({num_sites}), "
                          f"got {fed.min_sites}")
    for key, value, known in (("share", fed.share, SHARE_MODES), ("local_update", fed.local_update, LOCAL_UPDATES),
                              ("transfer_dtype", fed.transfer_dtype, tuple(TRANSFER_DTYPES))):
        if value not in known:
            raise ConfigError(f"federation.{key}: unknown value {value!r}; known: {list(known)}")
    robust_options(fed, num_sites)  # refuses robust settings these sites cannot meet
    if fed.central_dp not in ("none", *CENTRAL_DP):
        raise ConfigError(f"federation.central_dp: expected none, server or client, got {fed.central_dp!r}")
    if fed.central_dp != "none":
        if fed.strategy in ROBUST:
            raise ConfigError(f"federation.central_dp: {fed.strategy} does not average the updates, so the "
                              f"noise calibrated for a mean does not protect it; use fedavg, fedavgm, fedprox, "
                              f"fedadam or fedyogi")
        if STRATEGIES[fed.strategy].aggregate_train is not FedAvg.aggregate_train:
            raise ConfigError(f"federation.central_dp: {fed.strategy} moves the global model by more than the "
                              f"mean update (server optimiser), which the site-level accountant does not cover; "
                              f"use fedavg or fedprox")
        if not (fed.central_noise_multiplier >= 0 and fed.central_clipping_norm > 0 and 0 < fed.central_delta < 1):
            raise ConfigError("federation.central_noise_multiplier must be >= 0, central_clipping_norm > 0 and "
                              "central_delta in (0, 1)")


def make_strategy(fed: FederationConfig, num_sites: int, tracker: RoundTracker,
                  federated_evaluation: bool = False) -> Strategy:
    """The scenario's strategy behind update validation; with `federated_evaluation` every site
    also probes each round's global encoder on its own labelled windows."""
    check_federation(fed, num_sites)
    central = fed.central_dp != "none"
    strategy = STRATEGIES[fed.strategy](
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0 if federated_evaluation else 0.0,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
        # central DP: an unweighted mean; its wrapper hands the sites' metrics to the tracker
        train_metrics_aggr_fn=no_metrics if central else tracker.aggregate_train_metrics,
        **({"weighted_by_key": SITE_WEIGHT_KEY} if central else {}),
        evaluate_metrics_aggr_fn=tracker.aggregate_evaluate_metrics,
        **strategy_options(fed),
        **robust_options(fed, num_sites),
    )
    if central:  # validation stays outermost: it sees the sites' own updates
        sampled = max(int(num_sites * fed.fraction_train), fed.min_sites)
        strategy = central_dp(strategy, fed.central_dp, fed.central_noise_multiplier, fed.central_clipping_norm,
                              sampled, num_sites, fed.central_delta, tracker.aggregate_train_metrics,
                              tracker.record_central_dp, released=tracker.resume_after)
    return ValidatedStrategy(strategy, ArrayRecord(tracker.reference), max_norm_ratio=fed.max_update_ratio,
                             transfer_dtype=fed.transfer_dtype,
                             sites=tracker.sites, on_reject=tracker.record_rejection,
                             on_replies=tracker.observe_replies)


def strategy_options(fed: FederationConfig) -> dict:
    """The scenario's hyperparameters of its strategy, in Flower's names."""
    lr = fed.server_learning_rate
    if fed.strategy == "fedavgm":
        return {"server_learning_rate": 1.0 if lr is None else lr, "server_momentum": fed.server_momentum}
    if fed.strategy in ("fedadam", "fedyogi"):
        return {"eta": ADAPTIVE_LEARNING_RATE if lr is None else lr, "beta_1": fed.server_momentum,
                "tau": fed.server_tau}
    if fed.strategy == "fedprox":
        return {"proximal_mu": fed.proximal_mu}
    return {}


_probe_sets: dict = {}


def probe_splits(scenario: Scenario, run_dir: Path) -> ProbeSplits:
    """The held-out set and its patient-level probe splits, read once per run folder."""
    workdir = run_dir / "data"
    if workdir not in _probe_sets:
        _probe_sets[workdir] = ProbeSplits.of(scenario, workdir)
    return _probe_sets[workdir]


def global_encoder(scenario: Scenario, state: dict) -> nn.Module:
    encoder = build_objective(scenario).encoder
    encoder.load_state_dict(state)
    return encoder


def probe(scenario: Scenario, run_dir: Path, encoder: nn.Module) -> tuple[float, list[float], float]:
    """Linear-probe macro AUROC of `encoder` (mean over the held-out set's patient-level splits),
    its 95 % bootstrap interval and the seconds it took."""
    start = time.perf_counter()
    splits = probe_splits(scenario, run_dir)
    result = summarise(splits.probe(encoder), scenario.evaluation.bootstrap, scenario.seed)
    return result["macro_auroc"], result["ci95"], time.perf_counter() - start


def collapse_monitor(scenario: Scenario, run_dir: Path, encoder: nn.Module) -> dict[str, float]:
    """`embedding_rank` and `embedding_std` of `encoder` on the first windows of the first
    probe-train split: the same fixed windows every round (fedssl/monitor.py)."""
    train, _ = probe_splits(scenario, run_dir).first()
    return embedding_health(encoder, train)
