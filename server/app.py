"""fedssl ServerApp: federated self-supervised pretraining of the scenario's encoder.

Each round the strategy sends the global encoder to the sites, averages the encoders they return
and the ServerApp probes the new global encoder on held-out labelled ECGs (linear probe, macro
AUROC). Files written under `run-dir`: `metrics.jsonl` (one line per round),
`checkpoints/encoder_round_<r>.pt` and `encoder.pt` (latest global encoder).

Run config (`[tool.flwr.app.config]`): `scenario` (YAML path), `run-dir` (run folder).
"""

from __future__ import annotations

import random
import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, FedYogi, Strategy

from fedssl.config import ConfigError, FederationConfig, Scenario, load_scenario
from fedssl.evaluate import linear_probe, probe_data
from fedssl.objectives import build_objective
from server.metrics import RoundTracker

app = ServerApp()

# Strategies that need nothing from the sites beyond encoder weights and `num-examples`.
STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `federation.rounds` rounds of the scenario's strategy and probe each global encoder."""
    scenario = load_scenario(context.run_config["scenario"])
    run_dir = Path(str(context.run_config["run-dir"]))
    fed = scenario.federation
    random.seed(scenario.seed)  # the strategies sample nodes with `random`

    encoder = build_objective(scenario).encoder
    tracker = RoundTracker(run_dir, fed.rounds, encoder.state_dict())
    strategy = make_strategy(fed, len(scenario.sites), tracker)
    log(INFO, "fedssl | scenario %s: %d sites, %d rounds of %s, %d local steps",
        scenario.name, len(scenario.sites), fed.rounds, fed.strategy, scenario.train.local_steps)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Checkpoint and probe the global encoder after `server_round` (0: before round 1)."""
        if server_round == 0:  # the initial encoder is the random-init baseline of the summary
            tracker.start_round(1)
            return None
        tracker.require_update(server_round)
        auroc, seconds = None, 0.0
        if scenario.evaluation.every_round or server_round == fed.rounds:
            auroc, seconds = probe(scenario, run_dir, tracker.state_dict(arrays))
        sampled = max(int(len(list(grid.get_node_ids())) * fed.fraction_train), fed.min_sites)
        tracker.finish_round(server_round, arrays, auroc, seconds, expected=sampled)
        return None if auroc is None else MetricRecord({"probe-macro-auroc": auroc})

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(encoder.state_dict()),
        num_rounds=fed.rounds,
        train_config=ConfigRecord({"num-rounds": fed.rounds}),  # FedAvg adds "server-round"
        evaluate_fn=evaluate,
    )
    # simulations/run.py recognises a completed run by this line (DONE_MARK)
    log(INFO, "fedssl | done: global encoder in %s", run_dir / "encoder.pt")


def check_federation(fed: FederationConfig, num_sites: int) -> None:
    """Refuse a federation section that cannot run, before any data is generated."""
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"federation.strategy: unknown strategy {fed.strategy!r}; known: {sorted(STRATEGIES)}")
    if not 1 <= fed.min_sites <= num_sites:
        raise ConfigError(f"federation.min_sites must be between 1 and the number of sites ({num_sites}), "
                          f"got {fed.min_sites}")


def make_strategy(fed: FederationConfig, num_sites: int, tracker: RoundTracker) -> Strategy:
    """The scenario's strategy, training on sites only (no client-side evaluation rounds)."""
    check_federation(fed, num_sites)
    return STRATEGIES[fed.strategy](
        fraction_train=fed.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
        train_metrics_aggr_fn=tracker.aggregate_train_metrics,
    )


_probe_sets: dict = {}


def probe(scenario: Scenario, run_dir: Path, encoder_state: dict) -> tuple[float, float]:
    """Macro AUROC of the linear probe on `encoder_state`, and the seconds it took."""
    start = time.perf_counter()
    workdir = run_dir / "data"
    if workdir not in _probe_sets:
        _probe_sets[workdir] = probe_data(scenario, workdir)
    train, test = _probe_sets[workdir]
    encoder = build_objective(scenario).encoder
    encoder.load_state_dict(encoder_state)
    result = linear_probe(encoder, train, test, scenario.evaluation.probe_l2)
    return result.macro_auroc, time.perf_counter() - start
