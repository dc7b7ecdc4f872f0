"""A run folder and what it records: every path and file a run writes, and one round's record.

A site or scenario name comes from a user's YAML file; joined to a folder unchecked, `../x`,
`/tmp/x` or `""` would make the project write, or remove, files elsewhere. `inside(base, ...)`
resolves a path and refuses it unless it lies inside `base`; `RunFolder` names the files of one
run folder (the layout below) through it, so no other module joins file names itself:

    scenario.yaml  metrics.jsonl  summary.json  report.md  report_<plot>.png  encoder.pt  global.pt
    run_state.json presence.json  checkpoints/  sites/<site>/  data/  logs/  flower/  earlier/<time>/

`metrics.jsonl` holds one `RoundRecord` per completed round, as one JSON line: the ServerApp
appends it (server/strategy.py) and the report, the export, the simulation runner and the
dashboard read it back with `RunFolder.rounds()`, the dashboard while the run still writes it.

Names are checked when a scenario is loaded (`fedssl.config.check_name`); `inside`
is the second line of defence for paths that do not come from a scenario (a node config, say).
This module imports no Flower: a run folder is read where no federation framework is installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fedssl.config import ConfigError, Scenario, check_name, load_scenario, save_scenario
from fedssl.protocol import TRAINING_METRICS
from fedssl.storage import atomic_torch_save, atomic_write

# what a run writes besides its inputs (scenario.yaml, data/) and Flower's files (logs/, flower/):
# the files a new run would mix with its own, moved aside by `RunFolder.archive_results`
# the ServerApp's record of which sites are online and when each was last seen (server/presence.py)
PRESENCE = "presence.json"
RESULTS = ("metrics.jsonl", "checkpoints", "encoder.pt", "global.pt", "summary.json", "report.md", "sites",
           PRESENCE)
INPUTS = ("data",)  # what may already be in a new run's folder: data caches are reused
# the simulation runner's record of the run (running / finished / failed with its error line), which
# each run rewrites when it starts: not a result to move aside (simulations/run.py, `recorded_outcome`)
RUN_STATE = "run_state.json"
SCENARIO = "scenario.yaml"


class RunFolderError(ValueError):
    """A folder that is not a (complete enough) fedssl run folder; the message says what is missing."""


@dataclass(frozen=True)
class RoundRecord:
    """What the ServerApp records about one completed round: one line of `metrics.jsonl`.

    The loss terms (`losses`, "loss" the one minimised, the others its components) are kept apart
    from everything else, so a reader plots exactly the loss terms and never a privacy value or a
    count that happens to be a number. Sites are named by the scenario's site names; a reply that
    named no valid site is counted but not named. A field a round did not measure is None (or
    empty), never missing.
    """

    round: int
    # the sites' training: window-weighted means over the sites whose update was aggregated
    losses: dict[str, float] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)  # other means: examples-seen, fedema-mu
    # who took part
    sites: int = 0  # updates aggregated
    examples: int = 0  # their training windows, summed
    site_windows: dict[str, int] = field(default_factory=dict)  # {site whose update was aggregated: windows}
    new_heads: list[str] = field(default_factory=list)  # sites that started from new heads (first round, lost state)
    rejected: list[dict] = field(default_factory=list)  # updates validation left out: round, node_id, site, reason
    # sites that chose not to train (privacy budget, their policy or a plan awaiting their approval) and
    # other error replies: node_id, site, code, reason (fedssl.protocol's codes)
    declined: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    # what travelled: the fingerprint of the plan the round's messages carried (fedssl/plan.py) and, per
    # site, the SHA-256 of the arrays its reply carried as received (fedssl.protocol.payload_sha256):
    # each site's audit log (client/audit.py) holds the same hash of what it sent
    plan: str | None = None
    received: dict[str, str] = field(default_factory=dict)
    # privacy: each DP-SGD site's (epsilon, delta) so far; site-level (central DP) ones, all rounds composed
    epsilon: dict[str, float] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)
    central_epsilon: float | None = None
    central_delta: float | None = None
    # time: the round's wall time (sending, site work, replies, aggregation), each site's training loop
    # alone (the rest of `seconds` is overhead) and the server's probe
    seconds: float = 0.0
    compute_seconds: dict[str, float] = field(default_factory=dict)
    probe_seconds: float = 0.0
    # the global encoder: linear probe with its 95 % bootstrap interval [low, high] (fedssl.evaluate),
    # collapse monitor (fedssl.monitor), and with federated evaluation each site's own probe and their mean
    probe_macro_auroc: float | None = None
    probe_macro_auroc_ci95: list[float] | None = None
    embedding_rank: float | None = None
    embedding_std: float | None = None
    site_probe_macro_auroc: dict[str, float] = field(default_factory=dict)
    federated_macro_auroc: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> RoundRecord:
        """The record of one `metrics.jsonl` line, also of the flat lines older fedssl versions
        wrote (loss terms among the other keys): their run folders still report. Keys this version
        does not know are left out. A line that is not a round's JSON object is a ValueError."""
        data = json.loads(line)
        if not isinstance(data, dict) or isinstance(data.get("round"), bool) or not isinstance(data.get("round"), int):
            raise ValueError("not a round's record (a JSON object with an integer round)")
        known = {f.name for f in dataclasses.fields(cls)}
        if "losses" not in data:  # a flat line: every other number is a weighted mean of the sites' metrics
            means = {k: float(v) for k, v in data.items()
                     if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool)}
            data = {**data, "losses": {k: v for k, v in means.items() if k not in TRAINING_METRICS},
                    "training": {k: v for k, v in means.items() if k in TRAINING_METRICS}}
        return cls(**{k: v for k, v in data.items() if k in known})


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
    """The paths and files of one run folder; `path()` refuses anything outside it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def path(self, *parts: str) -> Path:
        return inside(self.root, *parts)

    @property
    def scenario(self) -> Path:
        return self.path(SCENARIO)

    @property
    def metrics(self) -> Path:
        """`metrics.jsonl`: one `RoundRecord` per completed round."""
        return self.path("metrics.jsonl")

    @property
    def checkpoints(self) -> Path:
        return self.path("checkpoints")

    def encoder_checkpoint(self, server_round: int) -> Path:
        """The global encoder after `server_round`."""
        return self.path("checkpoints", f"encoder_round_{server_round}.pt")

    @property
    def server_checkpoint(self) -> Path:
        """What a resumed ServerApp continues from (server/checkpoint.py)."""
        return self.path("checkpoints", "server.pt")

    @property
    def encoder(self) -> Path:
        """The latest global encoder."""
        return self.path("encoder.pt")

    @property
    def global_model(self) -> Path:
        """The latest whole global objective, when more than the encoder is shared (`share: all`)."""
        return self.path("global.pt")

    @property
    def summary(self) -> Path:
        """The simulation runner's comparison with the baselines (simulations/run.py)."""
        return self.path("summary.json")

    @property
    def report(self) -> Path:
        return self.path("report.md")

    def report_plot(self, name: str) -> Path:
        return self.path(f"report_{check_name(name, 'plot name')}.png")

    @property
    def run_state(self) -> Path:
        """The simulation runner's record: running (its process id), finished, or failed."""
        return self.path(RUN_STATE)

    @property
    def presence(self) -> Path:
        """The ServerApp's record of which sites are online and when each was last seen
        (server/presence.py), read by the dashboard."""
        return self.path(PRESENCE)

    @property
    def data(self) -> Path:
        """Materialised sites and window caches (`records/<site>`, `cache/<site>`, probe data)."""
        return self.path("data")

    @property
    def logs(self) -> Path:
        return self.path("logs")

    @property
    def flower_log(self) -> Path:
        """Flower's full output of a simulated run."""
        return self.path("logs", "flower.log")

    @property
    def superlink_log(self) -> Path:
        """The output of a simulated run's own SuperLink."""
        return self.path("logs", "superlink.log")

    @property
    def launch_config(self) -> Path:
        """The run config `fedssl launch` submitted with a deployed run (ops/coordinator.py)."""
        return self.path("logs", "run_config.toml")

    @property
    def launch_log(self) -> Path:
        """Everything `flwr run --stream` printed for a deployed run; `fedssl launch` shows only
        the `fedssl | ...` lines of it."""
        return self.path("logs", "launch.log")

    @property
    def flower(self) -> Path:
        """The run's FLWR_HOME."""
        return self.path("flower")

    def site(self, name: str) -> Path:
        """A site's own state: heads, FedEMA state, privacy ledger. Never removed by a new run."""
        return self.path("sites", check_name(name, "site name"))

    # -- files ------------------------------------------------------------------------------------

    def load_scenario(self) -> Scenario:
        """The configuration the run used; a RunFolderError if the folder has none or a bad one."""
        if not self.scenario.is_file():
            raise RunFolderError(f"{self.root} is not a fedssl run folder: no {SCENARIO}")
        try:
            return load_scenario(self.scenario)
        except ConfigError as err:
            raise RunFolderError(f"run folder {self.root}: {err}") from None

    def keep_scenario(self, scenario: Scenario, source: str | Path) -> None:
        """Keep the scenario as resolved (`scenario.yaml`), unless it is read from there (the
        simulation runner saves it before the sites start reading it)."""
        if Path(source).resolve() != self.scenario.resolve():
            self.root.mkdir(parents=True, exist_ok=True)
            save_scenario(scenario, self.scenario)

    def rounds(self, problems: list[str] | None = None) -> list[RoundRecord]:
        """The rounds recorded so far ([] before the first). A line is complete once its newline is
        written (the server appends whole lines; a reader during a run can catch the last one half
        written), so the piece after the last newline is not read. A complete line that is not a
        round's record raises a RunFolderError, or with `problems` is left out and named there."""
        try:
            text = self.metrics.read_text()
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(text.split("\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                records.append(RoundRecord.from_json(line))
            except (ValueError, TypeError):
                problem = f"{self.metrics.name} line {number} is not a round's metrics"
                if problems is None:
                    raise RunFolderError(f"run folder {self.root}: {problem}") from None
                problems.append(problem + "; left out")
        return records

    def append_round(self, record: RoundRecord) -> None:
        """Add a completed round's record: one line, written by one call."""
        with self.metrics.open("a") as f:
            f.write(record.to_json() + "\n")

    def start_rounds(self, resume_after: int = 0) -> None:
        """Begin the run's `metrics.jsonl`: a new run starts it empty, a run resumed after round
        `resume_after` keeps the records up to that round (the later ones run again)."""
        if not resume_after:
            self.metrics.unlink(missing_ok=True)
            return
        kept = [r for r in self.rounds() if r.round <= resume_after]
        atomic_write(self.metrics, lambda f: f.write("".join(r.to_json() + "\n" for r in kept).encode()))

    def save_global_model(self, server_round: int, encoder: dict, shared: dict) -> None:
        """The round's global encoder (its checkpoint and `encoder.pt`) and, when more than the
        encoder is shared, the whole global objective (`global.pt`); each file whole or not at all."""
        atomic_torch_save(encoder, self.encoder_checkpoint(server_round))
        atomic_torch_save(encoder, self.encoder)
        if len(encoder) < len(shared):
            atomic_torch_save(shared, self.global_model)

    def read_summary(self) -> dict | None:
        """`summary.json` of a simulated run (None before the runner has compared the encoders)."""
        try:
            return json.loads(self.summary.read_text())
        except FileNotFoundError:
            return None
        except ValueError as err:
            raise RunFolderError(f"run folder {self.root}: {self.summary.name}: {err}") from None

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))

    def earlier_results(self) -> list[Path]:
        """Results of an earlier run here (what a new run must not mix with its own)."""
        return [p for p in (self.path(name) for name in RESULTS) if p.exists()]

    def foreign_entries(self) -> list[Path]:
        """Entries that are neither inputs of a run nor what a run writes: not ours to overwrite."""
        ours = set(RESULTS) | set(INPUTS) | {SCENARIO, "logs", "flower", "earlier", RUN_STATE}
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
