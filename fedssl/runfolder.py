"""The one place that turns names into paths: every file a run writes lies inside its folder.

A site or scenario name comes from a user's YAML file; joined to a folder unchecked, `../x`,
`/tmp/x` or `""` would make the project write, or remove, files elsewhere. `inside(base, ...)`
resolves a path and refuses it unless it lies inside `base`; `RunFolder` names the files of one
run folder (the layout below) through it, so callers never join strings themselves.

    scenario.yaml  metrics.jsonl  summary.json  report.md  encoder.pt  global.pt  presence.json
    checkpoints/   sites/<site>/  data/         logs/      flower/     earlier/<time>/

Names are checked when a scenario is loaded (`fedssl.config.check_name`); `inside`
is the second line of defence for paths that do not come from a scenario (a node config, say).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from fedssl.config import ConfigError, check_name

# the ServerApp's record of which sites are online and when each was last seen (server/presence.py)
PRESENCE = "presence.json"
# what a run writes besides its inputs (scenario.yaml, data/) and Flower's files (logs/, flower/):
# the files a new run would mix with its own, moved aside by `RunFolder.archive_results`
RESULTS = ("metrics.jsonl", "checkpoints", "encoder.pt", "global.pt", "summary.json", "report.md", "sites",
           PRESENCE)
INPUTS = ("data",)  # what may already be in a new run's folder: data caches are reused
# the simulation runner's record of the run (running / finished / failed with its error line), which
# each run rewrites when it starts: not a result to move aside (simulations/run.py, `recorded_outcome`)
RUN_STATE = "run_state.json"


class UnsafePathError(ConfigError):
    """A path that would lie outside the folder it belongs to."""


def inside(base: str | Path, *parts: str) -> Path:
    """`base / parts...`, refused unless it lies inside `base` (and is not `base` itself when parts
    are given: a site folder that is the whole data folder is as wrong as `../x`).

    The parts are normalised as written (`..` and absolute parts are caught), not through symlinks:
    a link the user placed inside the folder (e.g. `data` -> a shared cache) is theirs to follow.
    """
    root = Path(base).resolve()
    path = Path(os.path.normpath(root.joinpath(*parts)))
    if (path == root and parts) or not path.is_relative_to(root):
        raise UnsafePathError(f"{'/'.join(parts)!r} would be {path}, outside {root}: refused")
    return path


class RunFolder:
    """The paths of one run folder; `path()` refuses anything outside it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def path(self, *parts: str) -> Path:
        return inside(self.root, *parts)

    @property
    def scenario(self) -> Path:
        return self.path("scenario.yaml")

    @property
    def metrics(self) -> Path:
        return self.path("metrics.jsonl")

    @property
    def checkpoints(self) -> Path:
        return self.path("checkpoints")

    @property
    def encoder(self) -> Path:
        return self.path("encoder.pt")

    @property
    def summary(self) -> Path:
        return self.path("summary.json")

    @property
    def report(self) -> Path:
        return self.path("report.md")

    @property
    def data(self) -> Path:
        """Materialised sites and window caches (`records/<site>`, `cache/<site>`, probe data)."""
        return self.path("data")

    @property
    def logs(self) -> Path:
        return self.path("logs")

    @property
    def flower(self) -> Path:
        """The run's FLWR_HOME."""
        return self.path("flower")

    def site(self, name: str) -> Path:
        """A site's own state: heads, FedEMA state, privacy ledger. Never removed by a new run."""
        return self.path("sites", check_name(name, "site name"))

    def earlier_results(self) -> list[Path]:
        """Results of an earlier run here (what a new run must not mix with its own)."""
        return [p for p in (self.path(name) for name in RESULTS) if p.exists()]

    def foreign_entries(self) -> list[Path]:
        """Entries that are neither inputs of a run nor what a run writes: not ours to overwrite."""
        ours = set(RESULTS) | set(INPUTS) | {"scenario.yaml", "logs", "flower", "earlier", RUN_STATE}
        return sorted(p for p in self.root.iterdir() if p.name not in ours and not p.name.startswith("report_"))

    def archive_results(self) -> Path | None:
        """Move an earlier run's results (site state included) to `earlier/<time>/`; nothing is
        deleted. The folder they went to, or None if there were none."""
        results = self.earlier_results() + sorted(self.root.glob("report_*.png"))
        if not results:
            return None
        target = self.path("earlier", f"{datetime.now():%Y%m%d-%H%M%S-%f}")
        target.mkdir(parents=True)
        for path in results:
            path.rename(target / path.name)
        return target
