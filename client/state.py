"""Site-local state that persists between rounds but never leaves the site.

Only `objective.encoder` is the shared foundation model. Everything else the objective holds
(decoder, projection head, ...) belongs to the site: it is saved to the site's state folder after
each round and loaded again at the start of the next one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

HEADS_FILE = "local_heads.pt"


def local_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `objective` that is not part of its encoder.

    Tensors are matched by identity, so an encoder that is also reachable under another name
    (e.g. `reconstruction.encoder`) is still recognised as shared and left out.
    """
    shared = {id(t) for t in objective.encoder.state_dict(keep_vars=True).values()}
    return {
        name: tensor.detach().clone()
        for name, tensor in objective.state_dict(keep_vars=True).items()
        if id(tensor) not in shared
    }


def load_local_state(objective: nn.Module, folder: Path) -> bool:
    """Load the site's saved heads into `objective`; False if this site has none yet."""
    path = Path(folder) / HEADS_FILE
    if not path.exists():
        return False
    saved = torch.load(path, map_location="cpu", weights_only=True)
    expected = local_state(objective)
    if set(saved) != set(expected):
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(
            f"{path} does not match this objective (missing {missing}, unexpected {unexpected}); "
            "was the scenario's objective changed? Delete the file to start the heads afresh."
        )
    objective.load_state_dict(saved, strict=False)
    return True


def save_local_state(objective: nn.Module, folder: Path) -> Path:
    """Save the site's heads atomically (temporary file + rename)."""
    return atomic_save(local_state(objective), Path(folder) / HEADS_FILE)


def atomic_save(obj: object, path: Path) -> Path:
    """`torch.save` that never leaves a half-written file behind, even if interrupted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
