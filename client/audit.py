"""The site's audit log: one JSON line per message the site answered, in its state folder.

A hospital's record of what it did for the federation, kept on its own machine: for each train or
evaluate message, when (`time`, ISO UTC), for which run and round, under which plan (`plan`, its
fingerprint, fedssl/plan.py), what came of it (`outcome`: trained, evaluated, declined or failed,
with the `reason` it gave the coordinator), how much it read and did (`records`, `windows`,
`steps`, `examples`, `epsilon` spent so far; null where nothing was done) and what left the site
(`sent`: each array's name, shape and dtype, the bytes and their SHA-256, null when nothing was
sent). The hash is `fedssl.protocol.payload_sha256`, as the coordinator records it for each reply
it received (RoundRecord.received): the two logs can be compared line by line (with
`federation.central_dp: client` too: the site clips its update before it is packed and logged).

Never data, never paths: the log may be shown to anyone who asks what the site shared.
Standard library only (no Flower, no torch): `fedssl node` reads it where no training runs.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

AUDIT_FILE = "audit.jsonl"


def record(state_folder: str | Path, entry: dict) -> None:
    """Append `entry`, stamped with the current `time` (ISO UTC), as one line of the audit log, on
    disk before this returns: the site's answer leaves only once its line is written."""
    path = Path(state_folder) / AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    with path.open("a") as f:
        f.write(json.dumps({"time": now, **entry}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_audit(state_folder: str | Path) -> list[dict]:
    """The audit log's entries, oldest first ([] before the first). A line is complete once its
    newline is written, so the piece after the last newline (a write in progress) is left out."""
    try:
        text = (Path(state_folder) / AUDIT_FILE).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]
