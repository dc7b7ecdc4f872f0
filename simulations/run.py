"""Run a scenario end to end on Flower's simulation engine, offline, on this machine.

    python -m simulations simulations/quickstart.yaml [--out RUN_DIR] [--verbose] [--resume | --overwrite]

(`--resume`: continue the run in RUN_DIR after its last checkpointed round, e.g. after a crash;
`--overwrite`: start again in RUN_DIR, its earlier results moved to RUN_DIR/earlier/<time>/. Without
either an existing RUN_DIR that holds anything but data caches is refused: nothing is ever deleted.)

1. load and check the scenario (fedssl.check, the strategy), create the run folder and save the
   scenario used in it;
2. materialise every site's data and the probe data up front (errors surface before Flower
   starts, and the simulated sites find a warm cache);
3. start a private `flower-superlink --simulation` on a free loopback port (a child process of
   this runner, with its own FLWR_HOME inside the run folder), submit a staged copy of the app
   with `flwr run <run-dir>/flower/app fedssl-local --stream`, forward the ServerApp's progress
   lines, and stop the SuperLink and everything it spawned (SuperExec, flwr-simulation, Ray) at
   the end, also on error, timeout, Ctrl-C or SIGTERM;
4. compare the federated encoder with the baselines and write `summary.json`.

Run folder: `scenario.yaml`, `data/` (site records and window caches, probe data),
`sites/<site>/` (site-local heads), `metrics.jsonl`, `checkpoints/`, `encoder.pt`,
`summary.json`, `report.md` with `report_*.png` (fedssl/report.py), `logs/` (Flower's full
output) and `flower/` (the FLWR_HOME of the run).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from rich import box
from rich.console import Console
from rich.table import Table

from fedssl.config import ConfigError
from fedssl.report import epsilon_by_site, write_report
from fedssl.runfolder import RunFolder
from ops.bundle import stage_app
from ops.deploy import FAST_POLLING_ENV
from ops.processes import TOKEN_VARIABLE, free_port, marked_processes, pid_alive, stop_pids, terminate

CONNECTION = "fedssl-local"  # the SuperLink connection written to the run's FLWR_HOME
PROGRESS_MARK = "fedssl |"  # log lines of the fedssl ServerApp/ClientApp shown to the user
DONE_MARK = "fedssl | done:"  # the ServerApp's last line
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTUP_SECONDS = 300.0  # on top of the scenario's own timeouts: Flower, Ray and the first probe starting
EXIT_SECONDS = 60.0  # for `flwr run` to exit once its output has ended

Echo = Callable[[str], None]


class FederationError(RuntimeError):
    """The federation did not complete; the message says where to look."""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    flower_pids: list[int] = field(default_factory=list)  # every Flower process of the run


# -- the run's state for `fedssl dashboard` ------------------------------------------------------

_run_state: ContextVar[tuple[Path, dict] | None] = ContextVar("run_state", default=None)


def recorded_outcome(run: Callable[..., RunResult]) -> Callable[..., RunResult]:
    """`run` (run_scenario) recording its outcome in the run folder's RUN_STATE for `fedssl dashboard`:
    finished, or failed with the error's first line. The run folder alone cannot tell a failed run
    from a slow one: a failure leaves no other trace there. The folder is known only once the
    scenario is read and checked, so `run` names it by calling `record_start`."""

    @functools.wraps(run)
    def recorded(*args, **kwargs) -> RunResult:
        token = _run_state.set(None)
        outcome = {"state": "failed", "error": "interrupted (Ctrl-C or SIGTERM)"}
        try:
            result = run(*args, **kwargs)
            outcome = {"state": "finished"}
            return result
        except Exception as err:
            outcome["error"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            raise
        finally:
            started = _run_state.get()
            _run_state.reset(token)
            if started is not None:  # a run refused before it had a folder leaves none
                path, record = started
                write_json(path, {**record, **outcome, "ended": time.time()})

    return recorded


def record_start(run_dir: Path) -> None:
    """Record the run in `run_dir` as running, with this process's id and host (a runner killed
    without a chance to record its outcome can then be told apart from one still running)."""
    record = {"state": "running", "started": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
    path = RunFolder(run_dir).run_state
    write_json(path, record)
    _run_state.set((path, record))


def write_json(path: Path, value: dict) -> None:
    """Write `value` whole or not at all (a reader polling the file never sees half of it)."""
    from fedssl.storage import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(value).encode() + b"\n"))


@recorded_outcome
def run_scenario(path: str | Path, out_dir: str | Path | None = None, *, verbose: bool = False,
                 timeout: float | None = None, resume: bool = False, overwrite: bool = False,
                 echo: Echo = print) -> RunResult:
    """Run the scenario at `path` in `out_dir` (default `runs/<name>-<timestamp>`).

    With `resume` the results already in `out_dir` are kept and the ServerApp continues after the
    last round checkpointed there (server/checkpoint.py); with `overwrite` they are moved to
    `out_dir/earlier/<time>/` first. `timeout` (default: the scenario's connect timeout plus its
    rounds' timeouts plus STARTUP_SECONDS) bounds the federation.
    """
    from fedssl.baselines import compare
    from fedssl.config import load_scenario, save_scenario
    from server.checkpoint import ServerCheckpoint

    if resume and out_dir is None:
        raise FederationError("resume needs the run folder to continue (--out RUN_DIR)")
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite starts it again: give one")
    started = time.perf_counter()
    scenario = load_scenario(path)
    check(scenario)  # refuse before any data is generated or a folder is created
    run = RunFolder(out_dir or Path("runs") / f"{scenario.name}-{datetime.now():%Y%m%d-%H%M%S}")
    prepare_run_folder(run, resume=resume, overwrite=overwrite, echo=echo)
    if resume:  # a checkpoint of another fedssl version is refused here, not by the ServerApp under Flower
        ServerCheckpoint.load(run.root)
    run_dir = run.root
    scenario_path = run.scenario
    save_scenario(scenario, scenario_path)
    echo(f"run folder: {run_dir}")
    record_start(run.root)

    data_dir = run.data
    materialise_data(scenario, data_dir, echo)
    data_done = time.perf_counter()

    fed = scenario.federation
    if timeout is None:
        timeout = fed.connect_timeout + fed.rounds * fed.round_timeout + STARTUP_SECONDS
    with LocalSimulation(run_dir, echo=echo, verbose=verbose) as simulation:
        run_id = simulation.run(scenario_path, num_sites=len(scenario.sites), timeout=timeout, resume=resume)
    federation_done = time.perf_counter()

    rounds = run.rounds()
    if len(rounds) != scenario.federation.rounds or not run.encoder.exists():
        raise FederationError(f"Flower run {run_id} finished but {run_dir} holds {len(rounds)} of "
                              f"{scenario.federation.rounds} rounds; see {simulation.log_path}")

    import torch

    echo("comparing encoders (linear probe) ...")
    encoders = compare(scenario, data_dir, torch.load(run.encoder, weights_only=True))
    summary = {
        "scenario": scenario.name,
        "run_dir": str(run_dir),
        "sites": [s.name for s in scenario.sites],
        "rounds": len(rounds),
        "strategy": scenario.federation.strategy,
        "objective": scenario.objective.name,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "data_seconds": round(data_done - started, 1),
        "federation_seconds": round(federation_done - data_done, 1),  # incl. Flower/Ray start-up
        "baseline_seconds": round(time.perf_counter() - federation_done, 1),
        "final_loss": rounds[-1].losses.get("loss"),
        "probe_macro_auroc_by_round": [r.probe_macro_auroc for r in rounds],
        "probe_macro_auroc_ci95_by_round": [r.probe_macro_auroc_ci95 for r in rounds],
        # DP sites' epsilon spent after each round (null: the site sent no update that round)
        "epsilon_by_site": epsilon_by_site(rounds),
        # site-level (federation.central_dp) epsilon after each round, all rounds composed
        **({"central_epsilon_by_round": [r.central_epsilon for r in rounds]}
           if any(r.central_epsilon is not None for r in rounds) else {}),
        "declined_by_round": [[d.get("site") or d.get("node_id") for d in r.declined] for r in rounds],
        # per encoder: macro_auroc (mean over the probe's patient-level splits and, for random_init,
        # over its initialisations), ci95 [low, high] (bootstrap over splits, then test patients),
        # runs (each probe's macro AUROC), per_class, and federated_minus (paired difference)
        "encoders": encoders,
        "evaluation": {"splits": scenario.evaluation.seeds, "test_fraction": scenario.evaluation.test_fraction,
                       "random_inits": scenario.evaluation.random_inits,
                       "bootstrap_replicates": scenario.evaluation.bootstrap},
        "flower_run_id": run_id,
    }
    run.write_summary(summary)
    write_report(run_dir)  # the ServerApp wrote it already; now with the baseline table of summary.json
    echo(summary_table(summary))
    return RunResult(run_dir, summary, sorted(simulation.seen_pids))


def check(scenario, *, site_folders: bool = True) -> None:
    """Everything that can be refused before data or Flower: the scenario (fedssl.check) and the
    federation against the ServerApp's strategies. `site_folders` False: the sites' records are
    on the hospitals' machines (`fedssl launch`), not here."""
    from fedssl.check import check_scenario
    from server.strategy import check_federation

    check_scenario(scenario, site_folders=site_folders)
    check_federation(scenario.federation, len(scenario.sites))


def prepare_run_folder(run: RunFolder, *, resume: bool, overwrite: bool, echo: Echo) -> None:
    """Create the run folder, or refuse one whose earlier results a new run would mix with or
    replace. An existing folder is used as it is only if it holds nothing but data caches;
    `overwrite` moves an earlier run's results (site state included) aside, never deletes them."""
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(f"--out {run.root} is a file, not a folder")
    if not run.root.exists():
        if resume:
            raise ConfigError(f"--resume: {run.root} does not exist; nothing to continue")
        run.root.mkdir(parents=True)
        return
    if resume:
        echo(f"resuming the run in {run.root}")
        return
    foreign = run.foreign_entries()
    earlier = run.earlier_results()
    if foreign:
        raise ConfigError(f"--out {run.root} is not empty and not a fedssl run folder (it holds "
                          f"{', '.join(p.name for p in foreign[:5])}{' ...' if len(foreign) > 5 else ''}); "
                          "choose a new or empty folder")
    if earlier and not overwrite:
        raise ConfigError(f"--out {run.root} holds an earlier run ({', '.join(p.name for p in earlier)}); "
                          "use --resume to continue it, --overwrite to start again (its results are moved to "
                          "earlier/, nothing is deleted), or choose another --out")
    if overwrite:
        archived = run.archive_results()
        if archived:
            echo(f"moved the results of the earlier run to {archived}")


def materialise_data(scenario, data_dir: Path, echo: Echo) -> None:
    """Load every site once (and the probe data) so that failures happen before Flower starts."""
    from fedssl.check import MIN_SITE_WINDOWS
    from fedssl.data.site import load_site
    from fedssl.evaluate import probe_data, usable_classes

    for site in scenario.sites:
        echo(f"site {site.name}: preparing data ...")
        windows = load_site(site, scenario.data, data_dir, scenario.seed)
        if len(windows) < MIN_SITE_WINDOWS:
            raise ConfigError(f"site {site.name}: {len(windows)} usable window(s) from {len(windows.records)} "
                              f"record(s); training needs at least {MIN_SITE_WINDOWS}")
        echo(f"site {site.name}: {len(windows.records)} records, {len(windows)} windows")
    train, test = probe_data(scenario, data_dir)
    try:
        usable_classes(train, test)
    except ValueError as err:
        raise ConfigError(f"evaluation: the held-out set cannot be probed ({len(train)} train / {len(test)} test "
                          f"windows): {err}; give more records or another evaluation.test_fraction") from None
    echo(f"probe data: {len(train)} train / {len(test)} test windows")


class LocalSimulation:
    """A private SuperLink in simulation mode whose whole process tree this object owns.

    Every process started here carries `FEDSSL_FLOWER_RUN=<token>` in its environment; Flower's
    SuperLink starts SuperExec in a new session, SuperExec starts flwr-simulation, which starts Ray,
    so the process tree is found by that mark (via /proc) rather than by parenthood.
    """

    superlink_options: tuple[str, ...] = ("--simulation",)  # the SuperLink runs the SuperNodes itself

    def __init__(self, run_dir: Path, *, echo: Echo = print, verbose: bool = False) -> None:
        self.folder = RunFolder(run_dir)
        self.run_dir = self.folder.root
        self.home = self.folder.flower
        self.log_path = self.folder.flower_log
        self.echo, self.verbose = echo, verbose
        self.token = uuid.uuid4().hex
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.cli: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        bin_dir = Path(sys.executable).parent  # flower-superlink spawns `flower-superexec` via PATH
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            TOKEN_VARIABLE: self.token,
            "FLWR_DISABLE_UPDATE_CHECK": "1",  # offline: no version look-ups
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            **FAST_POLLING_ENV,  # SuperExec starts the simulation ~0.5 s sooner
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",  # show every site's line, not "repeated 2x across cluster"
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("RAY_ADDRESS", None)  # never join someone else's Ray cluster
        for variable in ("NO_PROXY", "no_proxy"):  # the SuperLink is on loopback: no HTTP proxy
            self.env[variable] = ",".join(filter(None, [os.environ.get(variable), "127.0.0.1", "localhost"]))

    def executable(self, name: str) -> str:
        path = Path(sys.executable).parent / name
        found = str(path) if path.exists() else shutil.which(name)
        if not found:
            raise FederationError(f"`{name}` not found; install the project with `pip install -e .`")
        return found

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "LocalSimulation":
        self._previous_sigterm = _raise_on_sigterm()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        command = [
            self.executable("flower-superlink"),
            "--insecure",  # loopback only
            *self.superlink_options,
            "--disable-runtime-dependency-installation",  # offline: never `uv sync` the app
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]
        with self.folder.superlink_log.open("ab") as log_file:
            self.superlink = subprocess.Popen(command, env=self.env, cwd=self.run_dir, stdout=log_file,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True)  # Ctrl-C is handled here
        self.seen_pids.add(self.superlink.pid)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.superlink.poll() is not None:
                raise FederationError(f"flower-superlink exited with code {self.superlink.returncode}; "
                                      f"see {self.folder.superlink_log}")
            if time.monotonic() > deadline:
                raise FederationError("flower-superlink did not become ready within 60s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the CLI, the SuperLink and every process they started; verify none is left."""
        if self.cli is not None and self.cli.poll() is None:
            terminate(self.cli, grace=5)
        if self.superlink is not None and self.superlink.poll() is None:
            self.seen_pids |= set(marked_processes(self.token))
            terminate(self.superlink, grace=15)  # SIGTERM: it stops its SuperExec itself
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        left = marked_processes(self.token)
        if left:  # e.g. flwr-simulation or Ray processes orphaned by a crash
            self.seen_pids |= set(left)
            stop_pids(left)
        marked = set(marked_processes(self.token))
        survivors = sorted(p for p in self.seen_pids if p in marked and pid_alive(p))
        if survivors:
            self.echo(f"warning: Flower processes still running: {survivors}")
        if getattr(self, "_previous_sigterm", None) is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}/health", timeout=0.5) as response:
                return response.status == 200
        except OSError:
            return False

    def _watch(self) -> None:
        while not self._stop_watch.wait(1.0):
            self.seen_pids |= set(marked_processes(self.token))

    # -- running the app ------------------------------------------------------------------------

    def run(self, scenario_path: Path, *, num_sites: int, timeout: float | None = None, resume: bool = False) -> int:
        """Submit the app with `flwr run --stream`, forward progress, return the finished run id."""
        overrides = self.home / "run_config.toml"
        overrides.write_text(f"scenario = {json.dumps(str(scenario_path))}\n"
                             f"run-dir = {json.dumps(str(self.run_dir))}\n"
                             f"resume = {json.dumps(resume)}\n")
        app_dir = stage_app(self.home / "app")
        command = [self.executable("flwr"), "run", str(app_dir), CONNECTION, "--stream",
                   "--run-config", str(overrides), *self.federation_options(num_sites)]
        run_id, finished = None, False
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.log_path.open("a") as log_file:
            log_file.write("$ " + " ".join(command) + "\n")
            self.cli = subprocess.Popen(command, env=self.env, cwd=self.run_dir, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                        errors="replace", bufsize=1)
            self.seen_pids.add(self.cli.pid)
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_pump, args=(self.cli.stdout, lines), daemon=True).start()
            while True:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise FederationError(f"the federation did not finish within {timeout:.0f}s; "
                                          f"see {self.log_path}")
                try:
                    line = lines.get(timeout=1.0 if wait is None else min(wait, 1.0))
                except queue.Empty:
                    continue
                if line is None:
                    break
                plain = ANSI.sub("", line.rstrip("\n"))
                log_file.write(plain + "\n")
                if (match := re.search(r"Successfully started run (\d+)", plain)) and run_id is None:
                    run_id = int(match.group(1))
                finished = finished or DONE_MARK in plain
                if self.verbose:
                    self.echo(line.rstrip("\n"))
                elif PROGRESS_MARK in plain or " ERROR " in f" {plain} " or "ERROR :" in plain:
                    self.echo(plain.split(PROGRESS_MARK, 1)[-1].strip() if PROGRESS_MARK in plain else plain)
            try:
                self.cli.wait(timeout=EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                raise FederationError(f"`flwr run` did not exit within {EXIT_SECONDS:.0f}s of its output ending; "
                                      f"see {self.log_path}") from None
        if run_id is None:
            raise FederationError(f"`flwr run` did not start a run (exit code {self.cli.returncode}):\n"
                                  + tail(self.log_path))
        if not finished:  # the ServerApp did not reach its last line: ask the SuperLink why
            status, details = self.status(run_id)
            raise FederationError(f"Flower run {run_id} ended as {status} {details}\n" + tail(self.log_path))
        return run_id

    def federation_options(self, num_sites: int) -> list[str]:
        """`flwr run` options of the simulation engine: one simulated SuperNode per site."""
        cpus = max(1, min(num_sites, _usable_cpus()))
        federation = (f"num-supernodes={num_sites} client-resources-num-cpus=1 "
                      f"client-resources-num-gpus=0.0 init-args-num-cpus={cpus}")
        self.echo(f"federation: {num_sites} simulated sites on {cpus} CPU(s), Flower log: {self.log_path}")
        return ["--federation-config", federation]

    def status(self, run_id: int) -> tuple[str, str]:
        """The run's status (e.g. `finished:completed`) and details, as `flwr ls` reports them."""
        out = subprocess.run([self.executable("flwr"), "ls", CONNECTION, "--run-id", str(run_id),
                              "--format", "json"], env=self.env, cwd=self.run_dir, capture_output=True,
                             text=True, timeout=60)
        try:
            run = json.loads(out.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError):
            return "unknown", f"(`flwr ls` said: {out.stdout.strip()} {out.stderr.strip()})"
        return run.get("status", "unknown"), run.get("status-details", "")


# -- processes ----------------------------------------------------------------------------------

def _raise_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so that cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- results ------------------------------------------------------------------------------------

def summary_table(summary: dict) -> str:
    """Macro AUROC with its 95 % interval per encoder, and federated minus each other encoder, as
    plain text (it goes to `echo`, which may be a log rather than a terminal)."""
    def interval(value, ci95, sign: str = "") -> str:
        if value is None:
            return "-"
        return f"{value:{sign}.3f} [{ci95[0]:{sign}.3f}, {ci95[1]:{sign}.3f}]" if ci95 else f"{value:{sign}.3f}"

    table = Table("encoder", "macro AUROC [95 % CI]", "federated minus this", box=box.SIMPLE_HEAD,
                  caption=f"{summary['rounds']} rounds, {len(summary['sites'])} sites, {summary['wall_seconds']:.0f}s; "
                          f"summary: {RunFolder(summary['run_dir']).summary}", caption_justify="left")
    for name, e in summary["encoders"].items():
        minus = e.get("federated_minus")
        table.add_row(name, interval(e["macro_auroc"], e.get("ci95")),
                      interval(minus["mean"], minus["ci95"], "+") if minus else "")
    console = Console(width=120, color_system=None, force_terminal=False, file=io.StringIO())
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines()).strip("\n")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f"last lines of {path}:\n" + "\n".join(text[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default=str(Path(__file__).parent / "quickstart.yaml"))
    parser.add_argument("--out", help="run folder (default: runs/<scenario name>-<timestamp>)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's full log")
    parser.add_argument("--timeout", type=float, help="stop the federation after this many seconds")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out after its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an existing --out (its earlier results are moved to earlier/)")
    args = parser.parse_args(argv)
    try:
        run_scenario(args.scenario, args.out, verbose=args.verbose, timeout=args.timeout, resume=args.resume,
                     overwrite=args.overwrite)
    except (FederationError, ValueError, OSError) as err:  # ConfigError, SiteDataError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; Flower processes stopped", file=sys.stderr)
        return 130
    return 0
