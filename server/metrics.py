"""Per-round bookkeeping of the ServerApp: `metrics.jsonl`, encoder checkpoints, progress lines.

The strategy tells the tracker about each round twice: when the training replies are aggregated
(`aggregate_train_metrics`, passed to the strategy as `train_metrics_aggr_fn`) and when the new
global model is evaluated (`finish_round`, called from the strategy's `evaluate_fn`). The global
model is the shared state (`fedssl.federated.shared_state`); checkpoints hold its encoder.

Per-site metrics are kept out of the weighted means: `site-index` names the replying site, and
`dp-sgd`/`epsilon`/`delta` (client/app.py) give each DP site's privacy spent so far, written to
`metrics.jsonl` as `epsilon` / `delta` {site: value} (sites training without DP are left out).
Error replies are recorded too: `declined` lists the sites that declined the round because it
would pass their privacy budget (error code `PRIVACY_BUDGET_CODE`), `errors` any other failure.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedssl.federated import encoder_state
from fedssl.storage import atomic_torch_save
from server.validation import SITE_INDEX_KEY, Rejection

PRIVACY_BUDGET_CODE = 1001  # client/app.py's error code of a round declined for the privacy budget
PER_SITE_METRICS = (SITE_INDEX_KEY, "dp-sgd", "epsilon", "delta", "compute-seconds", "new-heads")  # not averaged over sites


class NoSiteReplied(RuntimeError):
    """A round in which no site returned an update: continuing would only repeat the failure."""


@dataclass
class RoundTracker:
    run_dir: Path
    rounds: int
    reference: dict[str, torch.Tensor]  # the initial shared state: names, shapes and dtypes
    sites: tuple[str, ...] = ()  # site names by index (replies name theirs with `site-index`)
    resume_after: int = 0  # a resumed run keeps the metrics of rounds 1..resume_after
    epsilon: dict[str, float] = field(default_factory=dict)  # each DP site's epsilon as last reported
    _round: int = 1  # the round whose training replies come next
    _started: float = field(default_factory=time.perf_counter)
    _train: dict[int, dict] = field(default_factory=dict)
    _rejected: dict[int, list[dict]] = field(default_factory=dict)  # round -> updates left out
    _errors: dict[int, list[dict]] = field(default_factory=dict)  # round -> error replies
    _nodes: dict[int, str] = field(default_factory=dict)  # node id -> site name, from its replies
    _site_probes: dict[int, dict] = field(default_factory=dict)  # round -> federated evaluation
    _central_dp: dict[int, dict] = field(default_factory=dict)  # round -> site-level privacy spent so far

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if self.resume_after and self.metrics_path.exists():  # drop lines of rounds after the checkpoint: they run again
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["round"] <= self.resume_after]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        else:
            self.metrics_path.unlink(missing_ok=True)  # one file per run: a rerun starts afresh

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def start_round(self, server_round: int) -> None:
        """Mark the start of `server_round` (its wall time runs until its replies are aggregated)."""
        self._round, self._started = server_round, time.perf_counter()

    def aggregate_train_metrics(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Weighted mean of the sites' loss terms (the strategy's `train_metrics_aggr_fn`)."""
        aggregated = aggregate_metricrecords(replies, weight_key)
        examples = sum(int(next(iter(r.metric_records.values()))[weight_key]) for r in replies)
        epsilon, delta, windows, compute = {}, {}, {}, {}
        new_heads: list[str] = []
        for i, reply in enumerate(replies):
            metrics = next(iter(reply.metric_records.values()))
            site = self.site_name(metrics.get(SITE_INDEX_KEY), f"reply-{i}")
            windows[site] = int(metrics[weight_key])  # the site's training windows (client/app.py)
            if metrics.get("new-heads"):
                new_heads.append(site)
            if "compute-seconds" in metrics:  # its training loop alone: the rest of `seconds` is overhead
                compute[site] = round(float(metrics["compute-seconds"]), 3)
            if metrics.get("dp-sgd"):
                epsilon[site], delta[site] = float(metrics["epsilon"]), float(metrics["delta"])
        for key in PER_SITE_METRICS:
            aggregated.pop(key, None)
        self._train[self._round] = {
            "losses": {k: float(v) for k, v in aggregated.items()},
            "epsilon": epsilon,
            "delta": delta,
            "site_windows": windows,
            "new_heads": new_heads,
            "compute_seconds": compute,
            "sites": len(replies),
            "examples": examples,
            "seconds": time.perf_counter() - self._started,
        }
        return aggregated

    def aggregate_evaluate_metrics(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Federated evaluation (`evaluation.federated`): each site's own probe AUROC and their mean
        weighted by probe-test windows (the strategy's `evaluate_metrics_aggr_fn`). Sites that could
        not probe (weight 0) are left out; with none left the mean is absent, not zero."""
        by_site, weights = {}, {}
        for i, reply in enumerate(replies):
            metrics = next(iter(reply.metric_records.values()))
            if metrics.get(weight_key, 0) > 0:
                site = self.site_name(metrics.get(SITE_INDEX_KEY), f"reply-{i}")
                by_site[site], weights[site] = float(metrics["probe-macro-auroc"]), int(metrics[weight_key])
        mean = sum(by_site[s] * weights[s] for s in by_site) / sum(weights.values()) if by_site else None
        self._site_probes[self._round] = {"site_probe_macro_auroc": by_site, "federated_macro_auroc": mean}
        return MetricRecord({} if mean is None else {"federated-macro-auroc": mean})

    def record_central_dp(self, server_round: int, spent) -> None:
        """The site-level (central DP) epsilon and delta spent up to `server_round`, all rounds composed
        (`server/central_dp.py`; written as `central_epsilon` / `central_delta`)."""
        self._central_dp[server_round] = {"central_epsilon": float(spent.epsilon), "central_delta": float(spent.delta)}

    def record_rejection(self, rejection: Rejection) -> None:
        """Remember an update left out of its round's aggregate (`ValidatedStrategy.on_reject`)."""
        self._rejected.setdefault(rejection.round, []).append(rejection.as_dict())

    def site_name(self, index, default: str) -> str:
        if isinstance(index, (int, float)) and float(index).is_integer() and 0 <= int(index) < len(self.sites):
            return self.sites[int(index)]
        return default if index is None else str(index)

    def observe_replies(self, server_round: int, replies: list[Message]) -> None:
        """Remember the round's error replies (a declined round or a failure) and which node is
        which site (`ValidatedStrategy.on_replies`)."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if not msg.has_error():
                index = site_index(msg)
                if index is not None:
                    self._nodes[node] = self.site_name(index, str(index))
                continue
            self._errors.setdefault(server_round, []).append(
                {"node_id": node, "site": self._nodes.get(node), "code": msg.error.code,
                 "reason": msg.error.reason})

    def require_update(self, server_round: int) -> None:
        """Stop the run if no site returned an update this round (their errors are logged above)."""
        if server_round not in self._train:
            errors = self._errors.get(server_round, [])
            hint = (f" ({len(errors)} error repl{'y' if len(errors) == 1 else 'ies'}; with federation.central_dp, "
                    "Flower's DP wrappers skip a round in which any site fails or declines)") if errors else ""
            raise NoSiteReplied(f"round {server_round}: no site returned an update{hint}; "
                                "see the site errors above")

    def finish_round(self, server_round: int, arrays: ArrayRecord, probe_auroc: float | None,
                     probe_seconds: float, expected: int, probe_ci95: list[float] | None = None,
                     monitor: dict[str, float] | None = None) -> dict:
        """Checkpoint the round's global encoder, append its metrics line and log progress.

        `monitor` holds the collapse monitor of the global encoder (`embedding_rank`,
        `embedding_std`: fedssl/monitor.py), written as they are.

        When more than the encoder is shared (`share: all`), `global.pt` holds the whole
        latest global objective state as well.
        """
        self.require_update(server_round)
        train = self._train[server_round]
        shared = self.state_dict(arrays)
        state = encoder_state(shared)
        atomic_torch_save(state, self.run_dir / "checkpoints" / f"encoder_round_{server_round}.pt")
        atomic_torch_save(state, self.run_dir / "encoder.pt")
        if len(state) < len(shared):
            atomic_torch_save(shared, self.run_dir / "global.pt")
        errors = self._errors.pop(server_round, [])
        record = {
            "round": server_round,
            **train["losses"],
            "probe_macro_auroc": probe_auroc,
            "probe_macro_auroc_ci95": probe_ci95,  # [low, high]: bootstrap over test patients (fedssl.evaluate)
            **(monitor or {}),
            **self._site_probes.pop(server_round, {}),
            "seconds": round(train["seconds"], 3),  # round wall time: sending, site work, replies, aggregation
            "compute_seconds": train["compute_seconds"],  # {site: seconds in its training loop}
            "probe_seconds": round(probe_seconds, 3),
            "sites": train["sites"],
            "site_windows": train["site_windows"],  # the sites whose update was aggregated
            # sites that started from new heads: their first round, or they lost their state folder
            "new_heads": train["new_heads"],
            "examples": train["examples"],
            "rejected": self._rejected.pop(server_round, []),
            "epsilon": train.get("epsilon", {}),
            "delta": train.get("delta", {}),
            "declined": [e for e in errors if e["code"] == PRIVACY_BUDGET_CODE],
            "errors": [e for e in errors if e["code"] != PRIVACY_BUDGET_CODE],
            **self._central_dp.pop(server_round, {}),
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.epsilon.update(record["epsilon"])
        if train["sites"] < expected:
            log(WARNING, "fedssl | round %d: only %d of %d sites replied", server_round, train["sites"], expected)
        log(INFO, "fedssl | %s", progress_line(record, self.rounds))
        self.start_round(server_round + 1)
        return record

    def state_dict(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The global shared state as a state dict with the initial state's dtypes.

        Averaging turns integer buffers into floats (and FedAdam/FedYogi float32 into float64);
        casting back keeps checkpoints loadable exactly like a fresh model's `state_dict()`.
        """
        received = arrays.to_torch_state_dict()
        if set(received) != set(self.reference):
            raise ValueError(f"aggregated arrays do not match the shared model: "
                             f"{sorted(set(received) ^ set(self.reference))[:5]}")
        return {k: received[k].to(self.reference[k].dtype).clone() for k in self.reference}


def site_index(msg: Message):
    """The `site-index` metric of a well-formed reply, else None."""
    if len(msg.content.metric_records) != 1:
        return None
    return next(iter(msg.content.metric_records.values())).get(SITE_INDEX_KEY)


def progress_line(record: dict, rounds: int) -> str:
    """`round 2/5 | loss 0.4123 | probe AUROC 0.712 [0.641, 0.779] | 12.3s + 2.1s probe | 3 sites`."""
    auroc = record.get("probe_macro_auroc")
    parts = [
        f"round {record['round']}/{rounds}",
        f"loss {record['loss']:.4f}" if isinstance(record.get("loss"), float) else "loss ?",
        (f"probe AUROC {auroc:.3f}" + (" [{:.3f}, {:.3f}]".format(*record["probe_macro_auroc_ci95"])
                                        if record.get("probe_macro_auroc_ci95") else "")
         if auroc is not None and math.isfinite(auroc) else "probe AUROC -"),
        *([f"site probes {record['federated_macro_auroc']:.3f}"] if record.get("federated_macro_auroc") else []),
        f"{record['seconds']:.1f}s" + (f" + {record['probe_seconds']:.1f}s probe" if record["probe_seconds"] else ""),
        f"{record['sites']} site" + ("" if record["sites"] == 1 else "s"),
    ]
    return " | ".join(parts)
