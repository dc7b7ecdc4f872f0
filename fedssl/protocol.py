"""The message protocol between the fedssl ServerApp (server/) and ClientApp (client/).

Every name a message carries between the two apps is defined here once: the config keys the
server sends with a round, the names of the packed shared weights and their manifest (both ways),
the metric keys a site replies with, and the codes and reasons of a site's error replies. Both apps
import this module and neither imports the other, so a key renamed on one side cannot silently stop
matching on the other. It holds names and pure functions, no Flower types: the science core stays
importable without a federation framework.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

# -- server -> site: a round's ConfigRecord ------------------------------------------------------
SERVER_ROUND_KEY = "server-round"  # the round number, added by Flower's FedAvg family
NUM_ROUNDS_KEY = "num-rounds"  # the federation's planned rounds
PROXIMAL_MU_KEY = "proximal-mu"  # FedProx's proximal weight, added by Flower's FedProx
# the run's plan (fedssl/plan.py) as canonical JSON, in every train and evaluate message: all a site
# knows of the run; the same text, so the same fingerprint, every round
PLAN_KEY = "plan"

# -- both ways: the shared weights packed (fedssl/packing.py), one transfer object per message ----
PACKED_KEY = "packed"  # the one Array of the message's ArrayRecord: every shared tensor, flattened
MANIFEST_KEY = "manifest"  # in the message's ConfigRecord: the JSON manifest that cuts it into tensors

# -- site -> server: the reply's one MetricRecord ------------------------------------------------
WEIGHT_KEY = "num-examples"  # training (or probe-test) windows: FedAvg's n_k, Flower's default key
EXAMPLES_SEEN_KEY = "examples-seen"  # windows drawn this round (steps x batch size)
SITE_INDEX_KEY = "site-index"  # the site's index in `scenario.sites`
COMPUTE_SECONDS_KEY = "compute-seconds"  # the training loop alone, without Flower's overhead
NEW_HEADS_KEY = "new-heads"  # 1: the site had no heads of its own to continue
DP_SGD_KEY = "dp-sgd"  # 1: the site trained with DP-SGD; then EPSILON_KEY / DELTA_KEY hold its guarantee
EPSILON_KEY = "epsilon"  # the site's epsilon spent so far, all rounds composed (0.0 without DP)
DELTA_KEY = "delta"
FEDEMA_MU_KEY = "fedema-mu"  # FedEMA's blend of the global and the site's previous model
PROBE_AUROC_KEY = "probe-macro-auroc"  # federated evaluation: the site's own linear-probe AUROC
FEDERATED_AUROC_KEY = "federated-macro-auroc"  # the server's mean of PROBE_AUROC_KEY over sites
# describe one site, not the round: kept out of the weighted mean over sites
PER_SITE_METRICS = (SITE_INDEX_KEY, DP_SGD_KEY, EPSILON_KEY, DELTA_KEY, COMPUTE_SECONDS_KEY, NEW_HEADS_KEY)
# averaged over the sites but describe their training, not its loss; every other metric of a training
# reply (besides WEIGHT_KEY and PER_SITE_METRICS) is a loss term: "loss", the one minimised, and its parts
TRAINING_METRICS = (EXAMPLES_SEEN_KEY, FEDEMA_MU_KEY)

# -- site -> server: error replies (Flower reserves the small codes) ------------------------------
SITE_ERROR_CODE = 1000  # the site's round failed; the reason names the error's kind only
PRIVACY_BUDGET_CODE = 1001  # the site declines the round: it would pass its target epsilon
PRIVACY_BUDGET_REASON = "privacy budget exhausted"  # fixed: says nothing about the site's data
# the site declines the plan: its policy refuses it, or it awaits manual approval at the site; the
# reason is about the plan only (fedssl/plan.py: policy_problems), never about the site's data
PLAN_DECLINED_CODE = 1002
DECLINE_CODES = (PRIVACY_BUDGET_CODE, PLAN_DECLINED_CODE)  # the site chose not to train: not a failure


def site_reason(site: str, reason: str) -> str:
    """The reason of a site's error reply: `site <name>: <reason>`. An error reply carries no
    metrics, so it names its site here; a site that declines every round is named all the same."""
    return f"site {site}: {reason}"


def reason_site(reason: str, sites: Sequence[str]) -> tuple[str | None, str]:
    """(site, reason after the name) of an error reply's reason written by `site_reason`; (None,
    reason) if it names no site of `sites` (Flower's own errors, a site that could not tell which it
    is). As with `reply_site`, a reply is not trusted to name itself well: only a known name counts.
    Site names hold no `: ` (fedssl.config.check_name), so the first one ends the name."""
    head, separator, rest = reason.partition(": ")
    name = head.removeprefix("site ")
    return (name, rest) if separator and head.startswith("site ") and name in sites else (None, reason)


def payload_sha256(arrays: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 of a message's arrays as they travel, (name, serialised bytes) in record order: the
    site logs it for what it sends (client/audit.py), the server records it for what it received
    (RoundRecord.received), so the two can be compared. Each name and each payload is hashed with
    its length first, so no two different sequences of arrays hash alike by concatenation."""
    digest = hashlib.sha256()
    for name, data in arrays:
        for part in (name.encode(), bytes(data)):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def reply_site(metrics: Mapping | None, sites: Sequence[str]) -> str | None:
    """The name of the site whose reply carries `metrics`, if they hold a valid site index.

    A reply is not trusted to name itself well: an index that is missing, not a whole number or
    outside `sites` names no site (None) rather than a wrong one.
    """
    index = None if metrics is None else metrics.get(SITE_INDEX_KEY)
    if isinstance(index, bool) or not isinstance(index, (int, float)) or not float(index).is_integer():
        return None
    return sites[int(index)] if 0 <= index < len(sites) else None
