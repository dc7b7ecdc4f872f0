"""What the dashboard shows, as one JSON-ready dict built from the files of a run folder.

A run folder is written while it is read: `metrics.jsonl` grows by one line per round (the last
line may be half-written at the moment of reading), `summary.json` appears at the end of a
simulated run, and the simulation runner keeps `run_state.json` (simulations/run.py,
`recorded_outcome`) as running / finished / failed with the error line. A deployed ServerApp's run
folder has no `run_state.json`; its state is then inferred from the rounds recorded against the
rounds planned. The ServerApp also keeps `presence.json` (server/presence.py): which sites were
online at its last poll of the SuperLink and when each was last seen; older runs lack it. Every
field a run may lack (DP, central DP, federated probes, the collapse monitor, probe intervals, the
baselines, presence) is None or empty rather than missing, so the page has one shape to draw.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from fedssl.config import ConfigError, Scenario, load_scenario
from fedssl.report import ABSENT, loss_terms, participation_reasons
from fedssl.runfolder import PRESENCE, RoundRecord, RunFolder
from ops.processes import pid_alive

LOG_TAIL_BYTES = 64 * 1024  # the end of Flower's log is searched for the lines that explain a failure
RECENT_ROUNDS = 3  # rounds whose mean wall time estimates the time remaining
# presence.json older than this (plus the longest probe so far) while rounds run: the ServerApp stopped polling
PRESENCE_STALE_SECONDS = 15

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
    times = run_time(folder, rounds, recorded, state, planned)
    presence = presence_view(_json_file(folder.presence, problems), sites, times["started"], state, rounds,
                             planned, problems)
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
        "time": times,
        "presence": presence and {k: presence[k] for k in ("live", "stale_since")},
        "sites": site_view(sites, rounds, scenario, presence),
        "other_nodes": presence["others"] if presence else [],
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


def presence_view(record: dict | None, sites: list[str], started: float | None, state: str,
                  rounds: list[RoundRecord], planned: int | None, problems: list[str]) -> dict | None:
    """presence.json read for the page: per site whether it is online and when it was last seen, and
    the nodes that name no site of the scenario (`others`: not replied yet, or registered under
    another name); None when the run has none (an older run, or the file of an earlier ServerApp in
    this folder: older than this run's start).

    It is `live` while rounds remain to run; afterwards nobody polls and "online" means nothing
    (None). A live file is stale once older than PRESENCE_STALE_SECONDS plus the longest probe so
    far (`stale_since` its time): the ServerApp polls at least once a second while it waits for
    sites or replies, but not while it probes a new global encoder between rounds. Stale, every
    site counts as offline.
    """
    if record is None:
        return None
    try:
        updated = _unix(record["updated"])
        nodes = [{"name": node["site"] or f"node {node['node_id']}", "site": node["site"],
                  "online": bool(node["online"]), "last_seen": _unix(node["last_seen"]), "round": node["round"]}
                 for node in record["nodes"]]
    except (KeyError, TypeError, ValueError) as err:
        problems.append(f"{PRESENCE} is not as the ServerApp writes it ({type(err).__name__}: {err}); left out")
        return None
    if started is not None and updated < started:
        return None
    live = state == RUNNING and (planned is None or not rounds or rounds[-1].round < planned)
    longest_probe = max((r.probe_seconds or 0 for r in rounds), default=0)
    stale = live and time.time() - updated > PRESENCE_STALE_SECONDS + longest_probe
    for node in nodes:
        node["online"] = (node["online"] and not stale) if live else None
        if node["online"]:  # seen now: without its time the view changes only when a site comes or goes
            node["last_seen"] = None
    return {"live": live, "stale_since": updated if stale else None,
            "sites": {site: site_presence([n for n in nodes if n["site"] == site]) for site in sites},
            "others": [n for n in nodes if n["site"] not in sites]}


def site_presence(nodes: list[dict]) -> dict:
    """One site's presence from its nodes (a site that reconnected may have had several): online if
    any is, else last seen when the latest was; never seen: nothing known."""
    if not nodes:
        return {"online": None, "last_seen": None, "round": None}
    online = [node for node in nodes if node["online"]]
    latest = online[0] if online else max(nodes, key=lambda node: node["last_seen"])
    return {key: latest[key] for key in ("online", "last_seen", "round")}


def site_view(sites: list[str], rounds: list[RoundRecord], scenario: Scenario | None,
              presence: dict | None) -> list[dict]:
    """Per site: its part in every round (with the reason of a decline, rejection or error), the last
    round it replied in, whether it is online and when it was last seen (with presence.json), its
    training windows, and the epsilon it spent against its DP budget."""
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
            "last_replied": replied[-1] if replied else None,
            "presence": presence and presence["sites"][site],
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


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None

