"""Update validation: every site's reply is checked before it can reach the global encoder.

Pure functions of a round's replies, the global model sent that round and the layout of the
shared model; `FedSSLStrategy.aggregate_train` (server/strategy.py) runs them before aggregation.
`validate_replies` leaves out every reply that

- does not hold exactly one ArrayRecord and one MetricRecord (and nothing else),
- lacks a positive, finite weight (`num-examples`), or has a metric that is not a finite scalar,
- has metric names that differ from those of the round's other sites,
- does not have the encoder's keys, shapes and dtypes, or holds NaN/inf values,
- moved the encoder further than `max_norm_ratio` x the median update norm of the round's
  well-formed replies (||w_i - w_global||; the bound needs a majority of honest sites, so it
  only bites from three replies on),

and says why in a `Rejection` naming the node and, when the reply carries a valid `site-index`,
the site. Error replies pass through untouched (the strategy records them).

With `transfer_dtype` float16 (`federation.transfer_dtype`) the sites' float16 arrays are cast
back to float32 (`widen_float16`) before validation: the global model is kept and aggregated in
float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedssl.protocol import reason_site, reply_site


@dataclass(frozen=True)
class Rejection:
    """A site update left out of a round's aggregate."""

    round: int
    node_id: int
    site: str | None
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def model_layout(reference: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Keys, shapes and dtypes every update must have: those of the initial shared model
    (aggregation may change the dtypes of the global arrays; the sites' may not)."""
    return {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in reference.items()}


def validate_replies(server_round: int, replies: list[Message], global_arrays: dict[str, np.ndarray],
                     spec: dict[str, tuple[tuple[int, ...], np.dtype]], max_norm_ratio: float,
                     weight_key: str, sites: Sequence[str] = ()) -> tuple[list[Message], list[Rejection]]:
    """Split `replies` into those to aggregate (error replies included) and rejections.
    `max_norm_ratio` 0 switches the norm bound off."""
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


def node_sites(replies: list[Message], sites: Sequence[str]) -> dict[int, str]:
    """{node id: site} of the replies that name a valid site: a well-formed reply by its metrics'
    `site-index`, an error reply (no metrics) by its reason (`fedssl.protocol.site_reason`)."""
    named = {msg.metadata.src_node_id: reason_site(msg.error.reason, sites)[0] if msg.has_error()
             else reply_site(reply_metrics(msg), sites) for msg in replies}
    return {node: site for node, site in named.items() if site is not None}
