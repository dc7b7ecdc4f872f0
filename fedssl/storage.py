"""Files that are written whole or not at all: a crash mid-write never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: object, path: Path) -> Path:
    import torch  # here, not at the top: a site's JSON files (client/audit.py, client/approval.py) need no torch

    return atomic_write(path, lambda f: torch.save(obj, f))
