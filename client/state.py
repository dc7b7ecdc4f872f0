"""Site-local state that persists between rounds but never leaves the site.

Only `objective.encoder` is the shared foundation model. Everything else the objective holds
(decoder, projection head, ...) belongs to the site: it is saved to the site's state folder after
each round and loaded again at the start of the next one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedssl.objectives import Objective
from fedssl.storage import atomic_torch_save

HEADS_FILE = "local_heads.pt"


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
