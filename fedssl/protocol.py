"""The message protocol between the fedssl ServerApp (server/) and ClientApp (client/).

Every name a message carries between the two apps is defined here once: the config keys the
server sends with a round, the names of the packed shared weights and their manifest (both ways),
the metric keys a site replies with, and the codes of a site's error replies. Both apps import
this module and neither imports the other, so a key renamed on one side cannot silently stop
matching on the other. It holds names and one pure function, no Flower types: the science core
stays importable without a federation framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# -- server -> site: a round's ConfigRecord ------------------------------------------------------
SERVER_ROUND_KEY = "server-round"  # the round number, added by Flower's FedAvg family
NUM_ROUNDS_KEY = "num-rounds"  # the federation's planned rounds
PROXIMAL_MU_KEY = "proximal-mu"  # FedProx's proximal weight, added by Flower's FedProx

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


def reply_site(metrics: Mapping | None, sites: Sequence[str]) -> str | None:
    """The name of the site whose reply carries `metrics`, if they hold a valid site index.

    A reply is not trusted to name itself well: an index that is missing, not a whole number or
    outside `sites` names no site (None) rather than a wrong one.
    """
    index = None if metrics is None else metrics.get(SITE_INDEX_KEY)
    if isinstance(index, bool) or not isinstance(index, (int, float)) or not float(index).is_integer():
        return None
    return sites[int(index)] if 0 <= index < len(sites) else None
