"""The shared weights as the site's messages carry them: packed into one Array (fedssl/packing.py)
with its manifest in the message's ConfigRecord, so a round is one transfer object each way."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedssl.packing import State, pack, unpack
from fedssl.protocol import MANIFEST_KEY, PACKED_KEY


def received_state(content: RecordDict) -> State:
    """The shared weights the server sent, one tensor per name, in the dtype they travelled in."""
    (packed,) = content.array_records.values()
    (config,) = content.config_records.values()
    return unpack(packed[PACKED_KEY].numpy(), str(config[MANIFEST_KEY]))


def reply_records(state: State, dtype: str) -> dict[str, ArrayRecord | ConfigRecord]:
    """The records of a reply that carry `state` in `dtype` (`federation.transfer_dtype`)."""
    flat, manifest = pack(state, dtype)
    return {"arrays": ArrayRecord({PACKED_KEY: Array(flat)}), "config": ConfigRecord({MANIFEST_KEY: manifest})}
