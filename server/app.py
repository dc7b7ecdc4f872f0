"""fedssl ServerApp: federated self-supervised pretraining of the scenario's encoder.

Each round the strategy (server/strategy.py) sends the global model (the encoder, or the whole
objective with `federation.share: all`) to the sites, validates and aggregates what they return,
and the ServerApp probes the new global encoder on held-out labelled ECGs (linear probe, macro
AUROC) and watches it for collapse. The run folder (fedssl/runfolder.py) gets `scenario.yaml`,
one line per round in `metrics.jsonl`, the encoder after every round (`checkpoints/`, `encoder.pt`,
and `global.pt` with `share: all`), `checkpoints/server.pt` (what a resumed run needs,
server/checkpoint.py), `presence.json` (which sites are online, server/presence.py) and at the end
`report.md` with plots (fedssl/report.py).

The sites never read the scenario: every train and evaluate message carries the run's plan
(fedssl/plan.py, config key `plan`), the settings a site trains and probes with, the same text
every round. A site may decline it (its policy, or a plan awaiting approval at the site): the round
goes on with the others, and the round's record names who declined and why.

Run config (`[tool.flwr.app.config]`): `scenario` (YAML path), `run-dir` (run folder), `resume`
(true: continue after the run folder's last completed round instead of starting afresh).
"""

from __future__ import annotations

import dataclasses
import random
import time
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedssl.check import check_scenario
from fedssl.config import Scenario, load_scenario
from fedssl.evaluate import ProbeSplits, summarise
from fedssl.federated import shared_state
from fedssl.monitor import embedding_health
from fedssl.objectives import build_objective
from fedssl.plan import Plan
from fedssl.protocol import NUM_ROUNDS_KEY, PLAN_KEY
from fedssl.report import write_report
from fedssl.runfolder import RoundRecord, RunFolder
from server.checkpoint import resume_point
from server.presence import PatientGrid, PresenceFile
from server.strategy import make_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `federation.rounds` rounds of the scenario's strategy and probe each global encoder."""
    scenario = load_scenario(context.run_config["scenario"])
    # refused before any site is waited for, as `fedssl simulate` refuses it; the sites' folders are theirs
    check_scenario(scenario, site_folders=False)
    run = RunFolder(str(context.run_config["run-dir"]))
    run.keep_scenario(scenario, context.run_config["scenario"])  # deployed runs record their config too
    fed, sites = scenario.federation, [s.name for s in scenario.sites]
    random.seed(scenario.seed)  # the strategies sample nodes with `random`

    plan = Plan.of(scenario)
    initial = shared_state(build_objective(scenario), fed.share)
    # run config `resume`: continue after the run folder's last checkpoint (server/checkpoint.py)
    checkpoint = resume_point(run.root, fed.strategy, fed.rounds, initial) if context.run_config.get("resume") else None
    strategy = make_strategy(fed, sites, initial, run, GlobalEvaluation(scenario, run),
                             federated_evaluation=scenario.evaluation.federated, checkpoint=checkpoint,
                             plan=plan.fingerprint)
    run.start_rounds(resume_after=strategy.done)
    log(INFO, "fedssl | scenario %s: %d sites, %d rounds of %s (share %s, %s), %d local steps; plan %s",
        scenario.name, len(sites), fed.rounds, fed.strategy, fed.share, fed.local_update, scenario.train.local_steps,
        plan.short)

    strategy.start(
        # never wait without end: fail naming the missing sites after connect_timeout; keep presence.json
        grid=PatientGrid(grid, sites, fed.min_sites, timeout=fed.connect_timeout,
                         straggler_timeout=fed.straggler_timeout, presence=PresenceFile(run.presence)),
        initial_arrays=checkpoint.array_record() if checkpoint else ArrayRecord(initial),
        num_rounds=fed.rounds - strategy.done,  # numbered on from strategy.done + 1
        timeout=fed.round_timeout,  # seconds a round waits for the sites' replies
        # the plan in every message, train and evaluate; FedAvg adds SERVER_ROUND_KEY to both
        train_config=ConfigRecord({NUM_ROUNDS_KEY: fed.rounds, PLAN_KEY: plan.text}),
        evaluate_config=ConfigRecord({PLAN_KEY: plan.text}),
        evaluate_fn=strategy.finish_round,
    )
    log(INFO, "fedssl | report with plots: %s", write_report(run.root))
    # simulations/run.py recognises a completed run by this line (DONE_MARK)
    log(INFO, "fedssl | done: global encoder in %s", run.encoder)


class GlobalEvaluation:
    """The server's look at each round's global encoder, added to the round's record: the collapse
    monitor every round, the linear probe every round (`evaluation.every_round`) or after the last."""

    def __init__(self, scenario: Scenario, run: RunFolder) -> None:
        self.scenario, self.run = scenario, run
        self._splits: ProbeSplits | None = None

    @property
    def splits(self) -> ProbeSplits:
        """The held-out set and its patient-level probe splits, read at the first probe."""
        if self._splits is None:
            self._splits = ProbeSplits.of(self.scenario, self.run.data)
        return self._splits

    def __call__(self, record: RoundRecord, encoder_state: dict[str, torch.Tensor]) -> RoundRecord:
        encoder = build_objective(self.scenario).encoder
        encoder.load_state_dict(encoder_state)
        # `embedding_rank` and `embedding_std` on the first windows of the first probe-train split:
        # the same fixed windows every round (fedssl/monitor.py)
        record = dataclasses.replace(record, **embedding_health(encoder, self.splits.first()[0]))
        if not (self.scenario.evaluation.every_round or record.round == self.scenario.federation.rounds):
            return record
        start = time.perf_counter()
        result = summarise(self.splits.probe(encoder), self.scenario.evaluation.bootstrap, self.scenario.seed)
        return dataclasses.replace(record, probe_macro_auroc=result["macro_auroc"],
                                   probe_macro_auroc_ci95=result["ci95"],
                                   probe_seconds=round(time.perf_counter() - start, 3))
