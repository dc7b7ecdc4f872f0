"""Site-local state that persists between rounds but never leaves the site.

With `federation.share: encoder` only `objective.encoder` is shared. Everything else the objective
holds (decoder, projection head, ...) belongs to the site: it is saved to the site's state folder
after each round and loaded again at the start of the next one. With `share: all` the heads are
still saved (they are what the site trained last) but the next round starts from the server's.
With `local_update: fedema` the site also keeps what it shared last, to blend into the next round.
With DP-SGD (`privacy.enabled` for the site) its privacy ledger (`fedssl.privacy.LEDGER_FILE`)
lives here too: the epsilon it has spent survives SuperNode restarts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedssl.config import PrivacyConfig
from fedssl.data.windows import WindowSet
from fedssl.objectives import Objective
from fedssl.privacy import PrivacyLedger, privacy_units, unit_count
from fedssl.storage import atomic_torch_save

HEADS_FILE = "local_heads.pt"
FEDEMA_FILE = "fedema_previous.pt"  # {"state": shared state after local training, "scale": lambda}


def load_local_state(objective: Objective, folder: Path) -> bool:
    """Load the site's saved heads into `objective`; False if this site has none yet."""
    path = Path(folder) / HEADS_FILE
    if not path.exists():
        return False
    try:
        objective.load_local_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except ValueError as err:
        raise ValueError(f"{path}: {err}; was the scenario's objective changed? "
                         "Delete the file to start the heads afresh.") from None
    return True


def save_local_state(objective: Objective, folder: Path) -> Path:
    return atomic_torch_save(objective.local_state_dict(), Path(folder) / HEADS_FILE)


def load_fedema_state(folder: Path) -> tuple[dict[str, torch.Tensor] | None, float | None]:
    """The site's shared state after its last round and its FedEMA lambda; None, None at first."""
    path = Path(folder) / FEDEMA_FILE
    if not path.exists():
        return None, None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["state"], saved["scale"]


def save_fedema_state(folder: Path, state: dict[str, torch.Tensor], scale: float | None) -> Path:
    return atomic_torch_save({"state": state, "scale": scale}, Path(folder) / FEDEMA_FILE)


def load_privacy_ledger(folder: Path, privacy: PrivacyConfig, data: WindowSet) -> PrivacyLedger:
    """The site's privacy ledger in `folder`; a new one (delta from the site's units) at first."""
    return PrivacyLedger.load(Path(folder), privacy, unit_count(privacy_units(data, privacy.unit)))
