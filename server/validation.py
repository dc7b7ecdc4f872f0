"""Update validation: every site's reply is checked before it can reach the global encoder.

Pure functions of a round's replies, the global model sent that round and the layout of the
shared model; `FedSSLStrategy.aggregate_train` (server/strategy.py) runs them before aggregation.

A site sends its shared weights packed (fedssl/packing.py): one flat Array and a manifest in the
reply's one ConfigRecord. `unpack_replies` turns each back into one Array per tensor, which is
what the checks below, central DP and Flower's strategies work on, and leaves out a reply whose
packing is malformed (no manifest, a manifest that does not fit the array, anything else in its
ConfigRecord); a manifest of another model unpacks, and the key, shape and dtype checks below
reject it. `validate_replies` then leaves out every reply that

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

from fedssl.packing import PackingError, unpack
from fedssl.protocol import MANIFEST_KEY, PACKED_KEY, reason_site, reply_site


@dataclass(frozen=True)
class Rejection:
    """A site update left out of a round's aggregate."""

    round: int
    node_id: int
    site: str | None
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def unpack_replies(server_round: int, replies: list[Message], sites: Sequence[str] = ()
                   ) -> tuple[list[Message], list[Rejection]]:
    """Unpack the shared weights of each reply in place (error replies pass untouched); the
    replies that could be unpacked, and a rejection for each that could not."""
    unpacked, rejected = [], []
    for msg in replies:
        reason = None if msg.has_error() else unpack_reply(msg.content)
        if reason:
            rejected.append(rejection(server_round, msg, reason, sites))
        else:
            unpacked.append(msg)
    return unpacked, rejected


def unpack_reply(content: RecordDict) -> str | None:
    """Replace the packed Array and its manifest in `content` by one Array per tensor; or why not."""
    if len(content.array_records) != 1 or len(content.config_records) != 1:
        return (f"expected the packed weights in one ArrayRecord and their manifest in one ConfigRecord, got "
                f"{len(content.array_records)} ArrayRecord(s) and {len(content.config_records)} ConfigRecord(s)")
    (name, packed), = content.array_records.items()
    (config_name, config), = content.config_records.items()
    if list(packed) != [PACKED_KEY] or list(config) != [MANIFEST_KEY]:
        return (f"expected one Array {PACKED_KEY!r} and a ConfigRecord holding only {MANIFEST_KEY!r}, got "
                f"Arrays {list(packed)[:3]} and config keys {list(config)[:3]}")
    try:
        state = unpack(packed[PACKED_KEY].numpy(), config[MANIFEST_KEY])
    except (PackingError, TypeError, ValueError, OSError) as err:  # OSError etc.: undecodable Array bytes
        return f"cannot unpack the weights: {err}"[:300]
    content[name] = ArrayRecord(state)
    del content[config_name]
    return None


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
    rejected = [rejection(server_round, replies[i], reason, sites) for i, reason in sorted(reasons.items())]
    return kept, rejected


def rejection(server_round: int, msg: Message, reason: str, sites: Sequence[str]) -> Rejection:
    """`msg` left out of round `server_round` for `reason`, naming its node and, if it says validly, its site."""
    return Rejection(server_round, msg.metadata.src_node_id, reply_site(reply_metrics(msg), sites), reason)


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
