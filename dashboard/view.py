"""What the dashboard shows, as one JSON-ready dict built from the files of a run folder.

A run folder is written while it is read: `metrics.jsonl` grows by one line per round (the last
line may be half-written at the moment of reading), `summary.json` appears at the end of a
simulated run, and the simulation runner keeps `run_state.json` (simulations/run.py,
`recorded_outcome`) as running / finished / failed with the error line. A deployed ServerApp's run
folder has no `run_state.json`; its state is then inferred from the rounds recorded against the
rounds planned. Every field a run may lack (DP, central DP, federated probes, the collapse
monitor, probe intervals, the baselines) is None or empty rather than missing, so the page has
one shape to draw.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

from fedssl.config import ConfigError, Scenario, load_scenario
from fedssl.report import ABSENT, loss_terms, participation_reasons
from fedssl.runfolder import RoundRecord, RunFolder
from ops.processes import pid_alive

LOG_TAIL_BYTES = 64 * 1024  # the end of Flower's log is searched for the lines that explain a failure
RECENT_ROUNDS = 3  # rounds whose mean wall time estimates the time remaining

WAITING, RUNNING, FINISHED, FAILED = "waiting", "running", "finished", "failed"


def run_view(folder: str | Path) -> dict:
    """Everything the page shows about the run in `folder`; `now` is the reading's time (Unix), from
    which the page counts elapsed time and ages on its own clock between readings."""
    folder = RunFolder(folder)
    problems: list[str] = []
    scenario = _scenario(folder, problems)
    rounds = _rounds(folder, problems)
    summary = _json_file(folder.summary, problems)
    recorded = _json_file(folder.run_state, problems)
    planned = scenario.federation.rounds if scenario else None
    sites = [s.name for s in scenario.sites] if scenario else sorted(
        {site for r in rounds for site in r.site_windows})
    state, error = run_state(folder, scenario, rounds, summary, recorded)
    return json_safe({
        "run_dir": str(folder.root),
        "scenario": _scenario_facts(scenario),
        "now": time.time(),
        "state": state,
        "error": error,
        "log_errors": log_errors(folder.flower_log) if state == FAILED else [],
        "problems": problems,
        "round": rounds[-1].round if rounds else 0,
        "rounds": planned,
        "time": run_time(folder, rounds, recorded, state, planned),
        "sites": site_view(sites, rounds, scenario),
        "round_numbers": [r.round for r in rounds],
        "losses": {term: [_finite(r.losses.get(term)) for r in rounds] for term in loss_terms(rounds)},
        "probe": probe_view(rounds, summary),
        "collapse": _series(rounds, "embedding_rank", "embedding_std"),
        "central_dp": _series(rounds, "central_epsilon", "central_delta"),
        "wall": wall_view(rounds),
        "encoders": encoder_view(summary),
    })


def json_safe(value):
    """`value` with every NaN or infinity (an undefined AUROC, an unbounded epsilon, Python's json
    writes them) replaced by None: the page receives strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _rounds(folder: RunFolder, problems: list[str]) -> list[RoundRecord]:
    """The rounds recorded so far; the run is still writing them (fedssl.runfolder reads only
    complete lines, and names a damaged one in `problems`)."""
    try:
        return folder.rounds(problems)
    except OSError as err:
        problems.append(f"cannot read {folder.metrics.name}: {err}")
        return []


def run_state(folder: RunFolder, scenario: Scenario | None, rounds: list[RoundRecord], summary: dict | None,
              recorded: dict | None) -> tuple[str, str | None]:
    """(state, error line). The runner's own record wins; a runner recorded as running on this host
    whose process is gone was killed (it could not record why). Without a record (a deployed run):
    finished once summary.json exists or every planned round is recorded, else running."""
    if recorded and recorded.get("state") in (RUNNING, FINISHED, FAILED):
        if recorded["state"] == RUNNING and recorded.get("host") == socket.gethostname() \
                and not (isinstance(recorded.get("pid"), int) and pid_alive(recorded["pid"])):
            return FAILED, (f"the runner (process {recorded.get('pid')}) stopped without recording an outcome "
                            "(killed?)")
        return recorded["state"], recorded.get("error")
    if summary is not None:
        return FINISHED, None
    if scenario is None:
        return WAITING, None
    if rounds and rounds[-1].round >= scenario.federation.rounds:
        return FINISHED, None
    return RUNNING, None


def run_time(folder: RunFolder, rounds: list[RoundRecord], recorded: dict | None, state: str,
             planned: int | None) -> dict:
    """Start, end and last-update times (Unix) and the estimated seconds left for the rounds to run:
    the mean wall time (training + probe) of the last rounds times the rounds still to come."""
    recorded = recorded or {}
    started = recorded.get("started") or _mtime(folder.scenario)
    ended = None
    if state in (FINISHED, FAILED):  # a killed runner recorded no end: its files' last change is the best known
        ended = recorded.get("ended") or max(filter(None, (_mtime(path) for path in
                                                           (folder.summary, folder.metrics, folder.run_state))),
                                             default=None)
    durations = [r.seconds + r.probe_seconds for r in rounds[-RECENT_ROUNDS:]]
    remaining = None
    if state == RUNNING and planned is not None and durations:
        remaining = max(0, planned - rounds[-1].round) * sum(durations) / len(durations)
    return {"started": started, "ended": ended, "last_update": _mtime(folder.metrics),
            "remaining_seconds": remaining}


def site_view(sites: list[str], rounds: list[RoundRecord], scenario: Scenario | None) -> list[dict]:
    """Per site: its part in every round (with the reason of a decline, rejection or error), the last
    round it replied in, its training windows, and the epsilon it spent against its DP budget."""
    table = participation_reasons(sites, rounds)
    view = []
    for site in sites:
        cells = [{"round": r.round, "state": row[site][0], "reason": row[site][1]} for r, row in zip(rounds, table)]
        replied = [c["round"] for c in cells if c["state"] != ABSENT]
        windows = [r.site_windows[site] for r in rounds if site in r.site_windows]
        epsilon = [r.epsilon[site] for r in rounds if site in r.epsilon]
        delta = [r.delta[site] for r in rounds if site in r.delta]
        privacy = _privacy(scenario, site)
        view.append({
            "name": site,
            "last_seen": replied[-1] if replied else None,
            "windows": windows[-1] if windows else None,
            "epsilon": epsilon[-1] if epsilon else None,
            "epsilon_by_round": [r.epsilon.get(site) for r in rounds],
            "delta": delta[-1] if delta else None,
            "dp": privacy is not None,
            "budget": privacy.target_epsilon if privacy else None,
            "unit": privacy.unit if privacy else None,
            "probe_auroc": [_finite(r.site_probe_macro_auroc.get(site)) for r in rounds],
            "cells": cells,
        })
    return view


def probe_view(rounds: list[RoundRecord], summary: dict | None) -> dict:
    """The global encoder's probe AUROC per round with its 95 % interval, the sites' federated mean,
    and the random-init encoder's AUROC (from summary.json: known once the run is compared)."""
    random_init = encoder_view(summary).get("random_init")
    return {
        "auroc": [_finite(r.probe_macro_auroc) for r in rounds],
        "ci95": [_interval(r.probe_macro_auroc_ci95) for r in rounds],
        "federated": [_finite(r.federated_macro_auroc) for r in rounds],
        "random_init": random_init and {
            "macro_auroc": random_init["macro_auroc"], "ci95": random_init["ci95"],
            "inits": ((summary or {}).get("evaluation") or {}).get("random_inits"),  # its mean is over these
        },
    }


def encoder_view(summary: dict | None) -> dict[str, dict]:
    """Per encoder compared in summary.json: macro AUROC, its 95 % interval, and the federated
    encoder's paired difference to it with its interval (the per-class and per-probe values stay
    in the file)."""
    encoders = (summary or {}).get("encoders") or {}
    view = {}
    for name, result in encoders.items():
        if not isinstance(result, dict):
            continue
        difference = result.get("federated_minus") if isinstance(result.get("federated_minus"), dict) else {}
        view[name] = {"macro_auroc": _finite(result.get("macro_auroc")), "ci95": _interval(result.get("ci95")),
                      "federated_minus": {"mean": _finite(difference.get("mean")),
                                          "ci95": _interval(difference.get("ci95"))} if difference else None}
    return view


def wall_view(rounds: list[RoundRecord]) -> dict:
    """Each round's wall time split into compute (the slowest site's training loop: the round waits
    for it) and overhead (the rest: sending, waiting, validation, aggregation), and the probe."""
    compute = [max(r.compute_seconds.values()) if r.compute_seconds else None for r in rounds]
    seconds = [r.seconds for r in rounds]
    return {
        "seconds": seconds,
        "compute": compute,
        "overhead": [None if c is None or s is None else max(0.0, s - c) for s, c in zip(seconds, compute)],
        "probe": [r.probe_seconds for r in rounds],
    }


def log_errors(path: Path, keep: int = 3) -> list[str]:
    """The last `keep` ERROR lines near the end of Flower's log (the reason behind a failure)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in tail.splitlines() if "ERROR" in line][-keep:]


def _series(rounds: list[RoundRecord], *fields: str) -> dict | None:
    """{field: value per round} when any round has one of `fields`, else None (the run does not record them)."""
    if all(getattr(r, name) is None for r in rounds for name in fields):
        return None
    return {name: [_finite(getattr(r, name)) for r in rounds] for name in fields}


def _scenario(folder: RunFolder, problems: list[str]) -> Scenario | None:
    if not folder.scenario.is_file():
        return None
    try:
        return load_scenario(folder.scenario)
    except ConfigError as err:
        problems.append(str(err))
        return None


def _scenario_facts(scenario: Scenario | None) -> dict | None:
    if scenario is None:
        return None
    fed = scenario.federation
    return {"name": scenario.name, "objective": scenario.objective.name, "strategy": fed.strategy,
            "encoder": f"{scenario.model.encoder} {scenario.model.size}", "local_steps": scenario.train.local_steps,
            "central_dp": fed.central_dp}


def _privacy(scenario: Scenario | None, site: str):
    """The site's DP-SGD setting when it trains with DP, else None."""
    if scenario is None or site not in {s.name for s in scenario.sites}:
        return None
    privacy = scenario.privacy_of(scenario.site(site))
    return privacy if privacy.enabled else None


def _json_file(path: Path, problems: list[str]) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        problems.append(f"cannot read {path.name}: {err}")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return value


def _finite(value) -> float | None:
    """A number JSON can carry: NaN and infinities (an undefined AUROC) become None."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _interval(value) -> list[float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(v) is not None for v in value):
        return [float(value[0]), float(value[1])]
    return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None

