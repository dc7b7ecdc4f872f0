"""Update validation: every site's reply is checked before it can reach the global encoder.

`ValidatedStrategy` wraps any `flwr.serverapp.strategy` strategy. It remembers the global encoder
it sends each round (`configure_train`) and, before delegating `aggregate_train`, leaves out every
reply that

- does not hold exactly one ArrayRecord and one MetricRecord (and nothing else),
- lacks a positive, finite weight (`num-examples`), or has a metric that is not a finite scalar,
- has metric names that differ from those of the round's other sites,
- does not have the encoder's keys, shapes and dtypes, or holds NaN/inf values,
- moved the encoder further than `max_norm_ratio` x the median update norm of the round's
  well-formed replies (||w_i - w_global||; the bound needs a majority of honest sites, so it
  only bites from three replies on).

Each rejection is logged with the node id, the site name when the reply carries a `site-index`
metric, and the reason, and is handed to `on_reject` (the run's metrics file records them).
Error replies pass through untouched for the wrapped strategy to log. `on_replies` sees every
reply of a round before validation (the tracker records error replies, e.g. a site declining a
round whose DP-SGD would pass its privacy budget).

With `transfer_dtype` float16 (`federation.transfer_dtype`) the global model goes out in float16
and the sites' float16 arrays are cast back to float32 here, before validation: the strategy
keeps and aggregates the global model in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedssl.federated import cast_floating
from fedssl.protocol import WEIGHT_KEY, reply_site



@dataclass(frozen=True)
class Rejection:
    """A site update left out of a round's aggregate."""

    round: int
    node_id: int
    site: str | None
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class ValidatedStrategy(Strategy):
    """`strategy` aggregating only the replies that pass the checks of this module.

    `reference` is the initial global encoder: it fixes the keys, shapes and dtypes every update
    must have (aggregation may change the dtypes of the global arrays; the sites' may not).
    `max_norm_ratio` 0 disables the norm bound.
    """

    def __init__(self, strategy: Strategy, reference: ArrayRecord, *, max_norm_ratio: float = 5.0,
                 weight_key: str = WEIGHT_KEY, sites: Sequence[str] = (), transfer_dtype: str = "float32",
                 on_reject: Callable[[Rejection], None] | None = None,
                 on_replies: Callable[[int, list[Message]], None] | None = None) -> None:
        if max_norm_ratio != 0 and max_norm_ratio < 1:
            raise ValueError(f"max_norm_ratio must be 0 (off) or at least 1, got {max_norm_ratio}")
        self.strategy = strategy
        self.spec = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in reference.items()}
        self.max_norm_ratio = max_norm_ratio
        self.weight_key = weight_key
        self.sites = tuple(sites)
        self.transfer_dtype = transfer_dtype
        self.on_reject = on_reject
        self.on_replies = on_replies
        self._global: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> Update validation: keys, shapes, dtypes, finite values, "
            "norm <= %s x round median", self.max_norm_ratio or "inf")
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global encoder the updates of `server_round` start from, then delegate."""
        self._global = {k: a.numpy() for k, a in arrays.items()}
        return self.on_wire(self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate the aggregation of the replies that pass validation."""
        if not self._global:
            raise RuntimeError("aggregate_train before configure_train: no global encoder to compare with")
        replies = list(replies)
        if self.on_replies:
            self.on_replies(server_round, replies)
        if self.transfer_dtype == "float16":
            for msg in replies:
                widen_float16(msg)
        kept, rejected = validate_replies(server_round, replies, self._global, self.spec,
                                          self.max_norm_ratio, self.weight_key, self.sites)
        for rejection in rejected:
            site = f"site {rejection.site} (node {rejection.node_id})" if rejection.site else f"node {rejection.node_id}"
            log(WARNING, "fedssl | round %d: rejected the update of %s: %s", server_round, site, rejection.reason)
            if self.on_reject:
                self.on_reject(rejection)
        return self.strategy.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.on_wire(self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def on_wire(self, messages: Iterable[Message]) -> list[Message]:
        """The strategy's messages with the global model in the transfer dtype; the strategy's own
        copy (what it aggregates into) stays float32."""
        messages = list(messages)
        if self.transfer_dtype != "float32":
            for content in {id(m.content): m.content for m in messages}.values():  # often one shared RecordDict
                for name, record in list(content.array_records.items()):
                    content[name] = ArrayRecord(cast_floating(record.to_torch_state_dict(), self.transfer_dtype))
        return messages


def widen_float16(msg: Message) -> None:
    """Cast the float16 arrays of a reply to float32, in place. Only float16: any other dtype stays
    for validation to judge, and an undecodable record is left for validation to reject."""
    if msg.has_error():
        return
    for name, record in list(msg.content.array_records.items()):
        try:
            state = record.to_torch_state_dict()
        except (TypeError, ValueError, OSError):
            continue
        msg.content[name] = ArrayRecord({k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()})


def validate_replies(server_round: int, replies: list[Message], global_arrays: dict[str, np.ndarray],
                     spec: dict[str, tuple[tuple[int, ...], np.dtype]], max_norm_ratio: float,
                     weight_key: str, sites: Sequence[str] = ()) -> tuple[list[Message], list[Rejection]]:
    """Split `replies` into those to aggregate (error replies included) and rejections."""
    reasons: dict[int, str] = {}  # reply index -> why it is left out
    norms: dict[int, float] = {}  # reply index -> ||w_i - w_global|| of well-formed replies
    for i, msg in enumerate(replies):
        if msg.has_error():
            continue
        reason = record_problem(msg.content, weight_key) or array_problem(msg.content, spec)
        if reason:
            reasons[i] = reason
        else:
            norms[i] = update_norm(next(iter(msg.content.array_records.values())), global_arrays)

    if norms:
        usual_keys = Counter(metric_keys(replies[i]) for i in norms).most_common(1)[0][0]
        median = float(np.median(list(norms.values())))
        for i, norm in norms.items():
            if metric_keys(replies[i]) != usual_keys:
                reasons[i] = (f"metric names {sorted(metric_keys(replies[i]))} differ from the other "
                              f"sites' {sorted(usual_keys)}")
            elif max_norm_ratio and median > 0 and norm > max_norm_ratio * median:
                reasons[i] = f"update norm {norm:.4g} exceeds {max_norm_ratio:g} x the round's median {median:.4g}"

    kept = [msg for i, msg in enumerate(replies) if i not in reasons]
    rejected = [Rejection(server_round, replies[i].metadata.src_node_id, reply_site(reply_metrics(replies[i]), sites),
                          reason)
                for i, reason in sorted(reasons.items())]
    return kept, rejected


def record_problem(content: RecordDict, weight_key: str) -> str | None:
    """Why `content` is not one encoder ArrayRecord plus one MetricRecord of finite scalars."""
    if len(content.array_records) != 1 or len(content.metric_records) != 1 or len(content) != 2:
        return (f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} "
                f"ArrayRecord(s), {len(content.metric_records)} MetricRecord(s) and "
                f"{len(content.config_records)} ConfigRecord(s)")
    metrics = next(iter(content.metric_records.values()))
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {key!r} is not a finite scalar: {value!r}"[:200]
    if weight_key not in metrics or metrics[weight_key] <= 0:
        return f"metric {weight_key!r} missing or not positive"
    return None


def array_problem(content: RecordDict, spec: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why the reply's ArrayRecord is not a finite encoder state of the expected layout."""
    arrays = next(iter(content.array_records.values()))
    if set(arrays) != set(spec):
        missing, extra = sorted(set(spec) - set(arrays)), sorted(set(arrays) - set(spec))
        return f"encoder keys differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, (shape, dtype) in spec.items():
        try:
            value = arrays[key].numpy()
        except (TypeError, ValueError, OSError) as err:  # undecodable bytes or a foreign stype
            return f"{key}: cannot decode: {err}"
        if value.shape != shape:
            return f"{key}: shape {value.shape}, expected {shape}"
        if value.dtype != dtype:
            return f"{key}: dtype {value.dtype}, expected {dtype}"
        if not np.isfinite(value).all():
            return f"{key}: non-finite values"
    return None


def update_norm(arrays: ArrayRecord, global_arrays: dict[str, np.ndarray]) -> float:
    """||w - w_global|| over all entries, in float64."""
    total = 0.0
    for key, array in arrays.items():
        total += float(np.square(array.numpy().astype(np.float64) - global_arrays[key]).sum())
    return math.sqrt(total)


def reply_metrics(msg: Message) -> MetricRecord | None:
    """The one MetricRecord of a well-formed reply (fedssl/protocol.py), else None."""
    if msg.has_error() or len(msg.content.metric_records) != 1:
        return None
    return next(iter(msg.content.metric_records.values()))


def metric_keys(msg: Message) -> frozenset[str]:
    return frozenset(reply_metrics(msg).keys())
