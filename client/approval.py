"""Manual approval of plans (site policy `manual_approval: true`), in the site's state folder.

A site that approves plans by hand declines every round of a plan it has not approved, and leaves
the plan for a person to read: `<state>/plans/pending/<fingerprint>.json`. `fedssl node approve
<fingerprint or its first digits>` moves it to `<state>/plans/approved/`; from the next round on
the site trains under it. A plan is approved by its fingerprint (fedssl/plan.py): the same plan
every round of a run, so one approval covers the run, and any change to the plan asks again.

Standard library and fedssl.storage only (no Flower, no torch): the `fedssl node` command calls
it where no training runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedssl.storage import atomic_write

FINGERPRINT = re.compile(r"[0-9a-f]{64}")  # a plan's SHA-256: also all that may become a file name here


def plans_folder(state_folder: str | Path, which: str) -> Path:
    return Path(state_folder) / "plans" / which


def plan_file(state_folder: str | Path, which: str, fingerprint: str) -> Path:
    """`<state>/plans/<which>/<fingerprint>.json`, refused for anything but a full fingerprint."""
    if not FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"not a plan fingerprint (64 hex digits): {fingerprint!r}")
    return plans_folder(state_folder, which) / f"{fingerprint}.json"


def request_approval(state_folder: str | Path, fingerprint: str, plan: dict) -> None:
    """Leave `plan` for a person to approve (written whole: a reader never sees half a plan)."""
    text = json.dumps(plan, indent=2, sort_keys=True) + "\n"
    atomic_write(plan_file(state_folder, "pending", fingerprint), lambda f: f.write(text.encode()))


def pending_plans(state_folder: str | Path) -> dict[str, dict]:
    """{fingerprint: plan} of the plans awaiting approval, by fingerprint."""
    files = sorted(plans_folder(state_folder, "pending").glob("*.json"))
    return {f.stem: json.loads(f.read_text()) for f in files if FINGERPRINT.fullmatch(f.stem)}


def approve(state_folder: str | Path, fingerprint_or_prefix: str) -> str:
    """Approve the pending plan whose fingerprint is or starts with `fingerprint_or_prefix`; its
    full fingerprint. Approving an approved plan again changes nothing. A ValueError (one line) if
    no plan, or more than one, matches."""
    prefix = fingerprint_or_prefix.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,64}", prefix):
        raise ValueError(f"expected a plan fingerprint or its first hex digits, got {fingerprint_or_prefix!r}")
    pending = [fp for fp in pending_plans(state_folder) if fp.startswith(prefix)]
    if len(pending) > 1:
        raise ValueError(f"plan {prefix} is ambiguous: it starts {len(pending)} pending plans "
                         f"({', '.join(fp[:16] for fp in pending)}); give more digits")
    if pending:
        approved = plan_file(state_folder, "approved", pending[0])
        approved.parent.mkdir(parents=True, exist_ok=True)
        plan_file(state_folder, "pending", pending[0]).replace(approved)
        return pending[0]
    done = [f.stem for f in plans_folder(state_folder, "approved").glob(f"{prefix}*.json")]
    if len(done) == 1:
        return done[0]
    waiting = ", ".join(fp[:12] for fp in pending_plans(state_folder)) or "none"
    raise ValueError(f"no pending plan {prefix} in {plans_folder(state_folder, 'pending')} (pending: {waiting})")


def is_approved(state_folder: str | Path, fingerprint: str) -> bool:
    return plan_file(state_folder, "approved", fingerprint).is_file()
