"""One federated round of fedssl, top to bottom: `FedSSLStrategy` and the base strategies.

Flower's `Strategy.start` loop calls, for every round r: `configure_train(r)`, the sites train,
`aggregate_train(r, replies)`, `configure_evaluate(r)` (federated evaluation), the sites probe,
`aggregate_evaluate(r, replies)`, and `evaluate_fn(r, arrays)`. `FedSSLStrategy` fills those hooks:

- `configure_train`: the base strategy samples the sites (with central DP Flower's fixed-clipping
  wrapper plans the round's private release); the global model goes out packed into one array
  (fedssl/packing.py) in the transfer dtype.
- `aggregate_train`: the SHA-256 of each reply as received -> unpack -> widen float16 -> validate
  (server/validation.py) -> central DP over a fixed denominator (server/central_dp.py) -> the base
  strategy's aggregation -> the round's `RoundRecord` (fedssl/runfolder.py), built from what those
  steps returned; a site that declined (its privacy budget, its policy) is named with its reason.
- `aggregate_evaluate` (`evaluation.federated`): each site's own probe AUROC and their mean.
- `finish_round`, passed to `start` as `evaluate_fn`: the server's probe and collapse monitor of
  the new global encoder, its checkpoints, the round's line in `metrics.jsonl`, `server.pt`.

The base strategy (`STRATEGIES`, chosen by `federation.strategy`) does only the aggregation
arithmetic: its metrics aggregation is switched off (`arrays_only`), and the round's loss terms are
the window-weighted means over the sites whose update was aggregated, computed here.

A resumed run (server/checkpoint.py) is started with the rounds still to run; Flower numbers them
from 1 again, so every hook adds the rounds already `done` to the number Flower passes: the sites,
the central-DP accountant, the records and the checkpoints see the run's real round numbers. Only
Flower's own `[ROUND i/n]` log lines count from 1.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum,
                                     MultiKrum, Strategy)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedssl.config import ConfigError, FederationConfig
from fedssl.federated import LOCAL_UPDATES, SHARE_MODES, TRANSFER_DTYPES, encoder_state
from fedssl.packing import pack
from fedssl.protocol import (COMPUTE_SECONDS_KEY, DECLINE_CODES, DELTA_KEY, DP_SGD_KEY, EPSILON_KEY,
                             FEDERATED_AUROC_KEY, MANIFEST_KEY, NEW_HEADS_KEY, PACKED_KEY, PER_SITE_METRICS,
                             PROBE_AUROC_KEY, TRAINING_METRICS, WEIGHT_KEY, payload_sha256, reason_site, reply_site)
from fedssl.runfolder import RoundRecord, RunFolder
from server.central_dp import CENTRAL_DP, SITE_WEIGHT_KEY, CentralDP
from server.checkpoint import ServerCheckpoint, optimizer_state
from server.robust import robust_options
from server.validation import (Rejection, model_layout, node_sites, reply_metrics, unpack_replies, validate_replies,
                               widen_float16)

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
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")  # not a mean: central DP's noise does not fit

# what the server adds to a round's record once the round's global encoder exists: the probe and the
# collapse monitor (server/app.py); it returns the record with those fields filled in
EvaluateEncoder = Callable[[RoundRecord, dict[str, torch.Tensor]], RoundRecord]


def unprobed(record: RoundRecord, encoder: dict[str, torch.Tensor]) -> RoundRecord:
    """An `EvaluateEncoder` that adds nothing: for strategies that only aggregate (tools, tests)."""
    return record


class NoSiteReplied(RuntimeError):
    """A round in which no site returned an update: continuing would only repeat the failure."""


@dataclass(frozen=True)
class SentRound:
    """What `configure_train` sent in a round: what its replies are checked and aggregated against."""

    round: int
    instructions: list[Message]
    global_arrays: ArrayRecord  # the global model as the strategy keeps it (float32), before the wire's dtype
    started: float  # time.perf_counter() when the round began


class FedSSLStrategy(Strategy):
    """The fedssl round around a Flower base strategy (see the module docstring).

    `reference` is the initial shared model: it fixes the names, shapes and dtypes every update
    must have and every checkpoint is written in. `sites` are the scenario's site names by index
    (replies name theirs with `site-index`). `evaluate_encoder` adds the server's probe of the
    global encoder to a round's record. `done` rounds were completed before this start (resume).
    `plan` is the fingerprint of the plan the messages carry (fedssl/plan.py), kept in each record.
    """

    def __init__(self, base: FedAvg, *, name: str, reference: dict[str, torch.Tensor], run: RunFolder, rounds: int,
                 evaluate_encoder: EvaluateEncoder = unprobed, sites: Sequence[str] = (), max_update_ratio: float = 5.0,
                 transfer_dtype: str = "float32", central_dp: CentralDP | None = None, done: int = 0,
                 epsilon: dict[str, float] | None = None, plan: str | None = None) -> None:
        self.base, self.name, self.central_dp, self.plan = base, name, central_dp, plan
        self.reference = reference
        self.layout = model_layout(ArrayRecord(reference))
        self.sites = tuple(sites)
        self.run, self.rounds, self.done = run, rounds, done
        self.evaluate_encoder = evaluate_encoder
        self.max_update_ratio, self.transfer_dtype = max_update_ratio, transfer_dtype
        self.epsilon = dict(epsilon or {})  # each DP site's epsilon as last reported: kept in server.pt
        self.node_sites: dict[int, str] = {}  # node id -> site name, from its well-formed replies
        self._sent: SentRound | None = None
        self._record: RoundRecord | None = None  # the round's record, from aggregate_train to finish_round

    def summary(self) -> None:
        log(INFO, "\t├──> fedssl: %s; update validation (keys, shapes, dtypes, finite values, norm <= %s x round "
            "median); transfer %s%s", self.name, self.max_update_ratio or "inf", self.transfer_dtype,
            f"; resumed after round {self.done}" if self.done else "")
        (self.central_dp or self.base).summary()

    # -- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample the sites and send them the global model (packed, in the transfer dtype)."""
        server_round += self.done
        started = time.perf_counter()
        planner = self.central_dp or self.base
        instructions = list(planner.configure_train(server_round, arrays, config, grid))
        self._sent = SentRound(server_round, instructions, arrays, started)
        return on_the_wire(instructions, self.transfer_dtype)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the round's usable updates and record the round; the loss means are returned."""
        server_round += self.done
        sent = self._sent
        if sent is None or sent.round != server_round:
            raise RuntimeError(f"aggregate_train of round {server_round} before its configure_train")
        replies = list(replies)
        self.node_sites.update(node_sites(replies, self.sites))
        # 0. what each site sent as it arrived, to compare with the site's audit log (client/audit.py)
        received = received_payloads(replies, self.sites)
        # 1. each site's packed weights back into one array per tensor, which the steps below work on
        unpacked, rejected = unpack_replies(server_round, replies, self.sites)
        # 2. the sites' float16 arrays back to float32, what the global model is kept in
        if self.transfer_dtype == "float16":
            for msg in unpacked:
                widen_float16(msg)
        # 3. validation: what reaches the aggregate (error replies pass, for Flower to log)
        global_arrays = {k: a.numpy() for k, a in sent.global_arrays.items()}
        kept, invalid = validate_replies(server_round, unpacked, global_arrays, self.layout, self.max_update_ratio,
                                         WEIGHT_KEY, self.sites)
        rejected += invalid
        for rejection in rejected:
            log_rejection(rejection)
        trained = [msg for msg in kept if not msg.has_error()]
        if not trained:
            raise NoSiteReplied(f"round {server_round}: no site returned an update"
                                f"{error_hint(replies)}; see the site errors above")
        if len(trained) < len(sent.instructions):
            log(WARNING, "fedssl | round %d: only %d of %d sites replied", server_round, len(trained),
                len(sent.instructions))
        # 4. central DP: every sampled site's clipped update (a zero update for a site without one), each
        # weighted 1, into 5. the base strategy's mean, then noised and accounted
        if self.central_dp:
            arrays, spent = self.central_dp.aggregate_train(server_round, sent.instructions, trained,
                                                            sent.global_arrays)
        # 5. otherwise the base strategy's aggregation alone
        else:
            arrays, _ = self.base.aggregate_train(server_round, kept)  # Flower logs the error replies
            spent = None
        # 6. the round's record from what the steps returned
        self._record = round_record(server_round, trained, replies, rejected, self.sites, self.node_sites,
                                    seconds=time.perf_counter() - sent.started, central=spent, plan=self.plan,
                                    received=received)
        log_declines(server_round, "round", self._record.declined)
        return arrays, MetricRecord(self._record.losses)

    # -- federated evaluation (evaluation.federated) --------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The base strategy's sites (none unless `evaluation.federated`), sent the global encoder (packed)."""
        instructions = self.base.configure_evaluate(server_round + self.done, arrays, config, grid)
        return on_the_wire(instructions, self.transfer_dtype)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Each site's own probe AUROC and their mean weighted by probe-test windows, into the
        round's record. Sites that could not probe (weight 0) are left out; with none left the
        mean is absent, not zero."""
        replies = list(replies)
        log_declines(server_round + self.done, "the evaluation of round",
                     [e for e in error_entries(replies, self.node_sites, self.sites) if e["code"] in DECLINE_CODES])
        by_site, mean = site_probes([msg for msg in replies if not msg.has_error()], self.sites)
        self._record = dataclasses.replace(self.current_record(server_round + self.done),
                                           site_probe_macro_auroc=by_site, federated_macro_auroc=mean)
        return MetricRecord({} if mean is None else {FEDERATED_AUROC_KEY: mean})

    # -- the end of the round (Flower's evaluate_fn) --------------------------------------------

    def finish_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Probe the round's global encoder, save it, record the round and the checkpoint a resumed
        run continues from, and log the round's progress line. Round 0 is Flower's look at the
        initial model before the first round: nothing to do (random init is the summary's baseline)."""
        if server_round == 0:
            return None
        server_round += self.done
        shared = global_state(arrays, self.reference)
        encoder = encoder_state(shared)
        record = self.evaluate_encoder(self.current_record(server_round), encoder)
        self.run.save_global_model(server_round, encoder, shared)
        self.run.append_round(record)
        self.epsilon.update(record.epsilon)
        ServerCheckpoint(server_round, self.name, {k: a.numpy() for k, a in arrays.items()},
                         optimizer_state(self.base), random.getstate(), dict(self.epsilon)).save(self.run.root)
        self._record = None
        log(INFO, "fedssl | %s", progress_line(record, self.rounds))
        return None if record.probe_macro_auroc is None else MetricRecord({PROBE_AUROC_KEY: record.probe_macro_auroc})

    def current_record(self, server_round: int) -> RoundRecord:
        if self._record is None or self._record.round != server_round:
            raise RuntimeError(f"round {server_round} has no aggregated training to record")
        return self._record


# -- building the strategy ----------------------------------------------------------------------

def make_strategy(fed: FederationConfig, sites: Sequence[str], reference: dict[str, torch.Tensor], run: RunFolder,
                  evaluate_encoder: EvaluateEncoder = unprobed, *,
                  federated_evaluation: bool = False, checkpoint: ServerCheckpoint | None = None,
                  plan: str | None = None) -> FedSSLStrategy:
    """The scenario's strategy, checked first; with `federated_evaluation` every site also probes
    each round's global encoder on its own labelled windows; with `checkpoint` it continues a run
    after the checkpoint's round (server optimiser state and node sampling restored); `plan` is the
    fingerprint of the plan its messages carry."""
    check_federation(fed, len(sites))
    central = fed.central_dp != "none"
    base = STRATEGIES[fed.strategy](
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0 if federated_evaluation else 0.0,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
        train_metrics_aggr_fn=arrays_only,
        evaluate_metrics_aggr_fn=arrays_only,
        **({"weighted_by_key": SITE_WEIGHT_KEY} if central else {}),  # central DP: an unweighted mean
        **strategy_options(fed),
        **robust_options(fed, len(sites)),
    )
    done = checkpoint.round if checkpoint else 0
    if checkpoint:
        checkpoint.restore(base)
    sampled = max(int(len(sites) * fed.fraction_train), fed.min_sites)
    return FedSSLStrategy(
        base, name=fed.strategy, reference=reference, sites=sites, run=run, rounds=fed.rounds,
        evaluate_encoder=evaluate_encoder, max_update_ratio=fed.max_update_ratio, transfer_dtype=fed.transfer_dtype,
        central_dp=CentralDP(base, fed.central_dp, fed.central_noise_multiplier, fed.central_clipping_norm, sampled,
                             len(sites), fed.central_delta, released=done) if central else None,
        done=done, epsilon=checkpoint.epsilon if checkpoint else None, plan=plan)


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
                              f"set federation.strategy: fedavg or fedprox")
        if not (fed.central_noise_multiplier >= 0 and fed.central_clipping_norm > 0 and 0 < fed.central_delta < 1):
            raise ConfigError("federation.central_noise_multiplier must be >= 0, central_clipping_norm > 0 and "
                              "central_delta in (0, 1)")


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


def arrays_only(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """The base strategy's metrics aggregation: none. `FedSSLStrategy` computes the round's means
    over the sites whose update was aggregated (under central DP the base sees only uniform weights)."""
    return MetricRecord()


# -- the round's record: pure functions of its replies ------------------------------------------

def round_record(server_round: int, trained: list[Message], replies: list[Message], rejected: list[Rejection],
                 sites: Sequence[str], known_nodes: dict[int, str], *, seconds: float, central=None,
                 plan: str | None = None, received: dict[str, str] | None = None) -> RoundRecord:
    """The round's record from its aggregated replies (`trained`), all its replies (their errors:
    declines and failures), the validation's rejections, central DP's privacy spent so far
    (`central`, Flower's PrivacySpent, None without central DP's accountant), the plan's fingerprint
    and the hash of each site's reply as received (`received_payloads`)."""
    metrics = [(site_name(reply_metrics(msg), sites, i), reply_metrics(msg)) for i, msg in enumerate(trained)]
    means = aggregate_metricrecords([msg.content for msg in trained], WEIGHT_KEY)
    errors = error_entries(replies, known_nodes, sites)
    return RoundRecord(
        round=server_round,
        losses={k: float(v) for k, v in means.items() if k not in PER_SITE_METRICS and k not in TRAINING_METRICS},
        training={k: float(v) for k, v in means.items() if k in TRAINING_METRICS},
        sites=len(trained),
        examples=sum(int(m[WEIGHT_KEY]) for _, m in metrics),
        site_windows={site: int(m[WEIGHT_KEY]) for site, m in metrics},
        new_heads=[site for site, m in metrics if m.get(NEW_HEADS_KEY)],
        rejected=[r.as_dict() for r in rejected],
        declined=[e for e in errors if e["code"] in DECLINE_CODES],
        errors=[e for e in errors if e["code"] not in DECLINE_CODES],
        epsilon={site: float(m[EPSILON_KEY]) for site, m in metrics if m.get(DP_SGD_KEY)},
        delta={site: float(m[DELTA_KEY]) for site, m in metrics if m.get(DP_SGD_KEY)},
        central_epsilon=None if central is None else float(central.epsilon),
        central_delta=None if central is None else float(central.delta),
        seconds=round(seconds, 3),
        compute_seconds={site: round(float(m[COMPUTE_SECONDS_KEY]), 3) for site, m in metrics
                         if COMPUTE_SECONDS_KEY in m},
        plan=plan,
        received=dict(received or {}),
    )


def site_name(metrics: MetricRecord | None, sites: Sequence[str], index: int) -> str:
    """The replying site's name, or `reply-<index>` for a reply that names no valid site."""
    return reply_site(metrics, sites) or f"reply-{index}"



def error_entries(replies: list[Message], known_nodes: dict[int, str], sites: Sequence[str]) -> list[dict]:
    """The round's error replies: node id, site (None if its node never named itself), code, and
    reason (without the site's name that leads a site's own error, `fedssl.protocol.site_reason`)."""
    return [{"node_id": msg.metadata.src_node_id, "site": known_nodes.get(msg.metadata.src_node_id),
             "code": msg.error.code, "reason": reason_site(msg.error.reason, sites)[1]}
            for msg in replies if msg.has_error()]


def received_payloads(replies: list[Message], sites: Sequence[str]) -> dict[str, str]:
    """{site: `payload_sha256` of its reply's arrays} as received, before anything is widened or
    unpacked: what the site's audit log says it sent. Error replies sent none."""
    answers = [msg for msg in replies if not msg.has_error()]
    return {site_name(reply_metrics(msg), sites, i):
            payload_sha256((k, a.data) for record in msg.content.array_records.values() for k, a in record.items())
            for i, msg in enumerate(answers)}


def log_declines(server_round: int, what: str, declined: list[dict]) -> None:
    """`fedssl | site X declines round r: <reason>` for each decline (its privacy budget, its policy)."""
    for entry in declined:
        who = f"site {entry['site']}" if entry["site"] else f"node {entry['node_id']}"
        log(INFO, "fedssl | %s declines %s %d: %s", who, what, server_round, entry["reason"])


def error_hint(replies: list[Message]) -> str:
    errors = sum(msg.has_error() for msg in replies)
    return f" ({errors} error repl{'y' if errors == 1 else 'ies'})" if errors else ""


def site_probes(replies: list[Message], sites: Sequence[str]) -> tuple[dict[str, float], float | None]:
    """({site: its own probe AUROC}, their mean weighted by probe-test windows or None) of the
    federated evaluation replies; a site that could not probe replies with weight 0 and is left out."""
    by_site, weights = {}, {}
    for i, msg in enumerate(replies):
        metrics = reply_metrics(msg)
        if metrics is not None and metrics.get(WEIGHT_KEY, 0) > 0:
            site = site_name(metrics, sites, i)
            by_site[site], weights[site] = float(metrics[PROBE_AUROC_KEY]), int(metrics[WEIGHT_KEY])
    mean = sum(by_site[s] * weights[s] for s in by_site) / sum(weights.values()) if by_site else None
    return by_site, mean


def log_rejection(rejection: Rejection) -> None:
    who = (f"site {rejection.site} (node {rejection.node_id})" if rejection.site else f"node {rejection.node_id}")
    log(WARNING, "fedssl | round %d: rejected the update of %s: %s", rejection.round, who, rejection.reason)


def progress_line(record: RoundRecord, rounds: int) -> str:
    """`round 2/5 | loss 0.4123 | probe AUROC 0.712 [0.641, 0.779] | 12.3s + 2.1s probe | 3 sites`."""
    auroc, loss = record.probe_macro_auroc, record.losses.get("loss")
    parts = [
        f"round {record.round}/{rounds}",
        f"loss {loss:.4f}" if loss is not None else "loss ?",
        (f"probe AUROC {auroc:.3f}" + (" [{:.3f}, {:.3f}]".format(*record.probe_macro_auroc_ci95)
                                        if record.probe_macro_auroc_ci95 else "")
         if auroc is not None and math.isfinite(auroc) else "probe AUROC -"),
        *([f"site probes {record.federated_macro_auroc:.3f}"] if record.federated_macro_auroc else []),
        f"{record.seconds:.1f}s" + (f" + {record.probe_seconds:.1f}s probe" if record.probe_seconds else ""),
        f"{record.sites} site" + ("" if record.sites == 1 else "s"),
    ]
    return " | ".join(parts)


# -- the model on the wire and in the checkpoints -------------------------------------------------

def on_the_wire(messages: Iterable[Message], transfer_dtype: str) -> list[Message]:
    """`messages` with the global model packed (fedssl/packing.py) in `transfer_dtype`
    (`federation.transfer_dtype`): one Array, its manifest in the message's ConfigRecord. The
    strategy's own copy, which it aggregates into, stays one float32 Array per tensor."""
    messages = list(messages)
    for content in {id(m.content): m.content for m in messages}.values():  # often one shared RecordDict
        (name, record), = content.array_records.items()
        flat, manifest = pack(record.to_torch_state_dict(), transfer_dtype)
        content[name] = ArrayRecord({PACKED_KEY: Array(flat)})
        next(iter(content.config_records.values()))[MANIFEST_KEY] = manifest
    return messages


def global_state(arrays: ArrayRecord, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The aggregated global model as a state dict with the initial model's dtypes.

    Averaging turns integer buffers into floats (and FedAdam/FedYogi float32 into float64);
    casting back keeps checkpoints loadable exactly like a fresh model's `state_dict()`.
    """
    received = arrays.to_torch_state_dict()
    if set(received) != set(reference):
        raise ValueError(f"aggregated arrays do not match the shared model: "
                         f"{sorted(set(received) ^ set(reference))[:5]}")
    return {k: received[k].to(reference[k].dtype).clone() for k in reference}
