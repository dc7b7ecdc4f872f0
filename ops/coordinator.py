"""The coordinator: `fedssl coordinator`, `fedssl register`, `fedssl launch` and `fedssl status`.

One file, `coordinator.yaml`, says where everything of the coordinator lives; relative paths are
resolved against the file's folder:

    host: 0.0.0.0                   # where the SuperLink listens (SuperNodes, the flwr CLI, the ServerApp)
    port: 9091
    certificates: certs             # ca.crt, server.pem and server.key from `fedssl certs`
    state: /srv/fedssl              # default: this file's folder
    database: null                  # registered nodes, runs and their logs (default <state>/state.db)
    log: null                       # the SuperLink's log file (default <state>/superlink.log)
    runs: null                      # run folders of `fedssl launch` (default <state>/runs)

(or, instead of `certificates`, the three files: `ca_certificate`, `server_certificate`,
`server_key`). `fedssl coordinator` runs Flower's SuperLink with TLS, SuperNode authentication and
the state database in the foreground. The other commands talk to it through Flower's `flwr` CLI,
with a connection `fedssl` kept in `<state>/flwr-home` (never the user's ~/.flwr), on this machine:
over loopback unless the SuperLink listens on one particular address.

The coordinator's own records, beside the database: `<state>/sites.json` (each site registered
with `fedssl register`: node id and key fingerprint; Flower's CLI does not show a node's name) and
`<state>/launches.jsonl` (each run `fedssl launch` submitted: run id, run folder, scenario).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.x509.verification import VerificationError
from rich.table import Table

from fedssl.config import ConfigError, check_name, from_dict, read_yaml
from fedssl.runfolder import RoundRecord, RunFolder
from fedssl.storage import atomic_write
from ops.bundle import stage_app
from ops.deploy import (BIN, check_ca_certificate, check_host, flower_environment, public_key_fingerprint,
                        superlink_unavailable, verify_server_certificate)
from ops.processes import COLOUR, Supervisor

CONNECTION = "fedssl"  # the flwr CLI's name for this coordinator's SuperLink
WILDCARDS = ("0.0.0.0", "::", "127.0.0.1", "localhost")  # listening here: the CLI connects over loopback
SITES_FILE = "sites.json"
LAUNCHES_FILE = "launches.jsonl"
COMPLETED = "finished:completed"
STREAM_MARK = "fedssl | "  # the ServerApp's own log lines (server/app.py, server/strategy.py)
FLWR_TIMEOUT = 60  # s for one flwr CLI call other than a run


@dataclass(frozen=True)
class CoordinatorFile:
    """`coordinator.yaml` (see the module docstring); paths are absolute once loaded."""

    state: str = "."
    host: str = "0.0.0.0"
    port: int = 9091
    certificates: str | None = None
    ca_certificate: str | None = None
    server_certificate: str | None = None
    server_key: str | None = None
    database: str | None = None
    log: str | None = None
    runs: str | None = None

    def __post_init__(self) -> None:
        given = [f is not None for f in (self.ca_certificate, self.server_certificate, self.server_key)]
        if not (all(given) if self.certificates is None else not any(given)):
            raise ConfigError("certificates: give either `certificates` (the folder `fedssl certs` wrote) or all "
                              "three of ca_certificate, server_certificate, server_key")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: must be a TCP port, got {self.port}")

    def _in_state(self, value: str | None, default: str) -> Path:
        return Path(value) if value else Path(self.state) / default

    @property
    def ca(self) -> Path:
        return Path(self.ca_certificate) if self.ca_certificate else Path(self.certificates) / "ca.crt"

    @property
    def server_pem(self) -> Path:
        return Path(self.server_certificate) if self.server_certificate else Path(self.certificates) / "server.pem"

    @property
    def server_private_key(self) -> Path:
        return Path(self.server_key) if self.server_key else Path(self.certificates) / "server.key"

    @property
    def database_file(self) -> Path:
        return self._in_state(self.database, "state.db")

    @property
    def log_file(self) -> Path:
        return self._in_state(self.log, "superlink.log")

    @property
    def runs_folder(self) -> Path:
        return self._in_state(self.runs, "runs")

    @property
    def address(self) -> str:
        """Where the flwr CLI on this machine reaches the SuperLink."""
        host = "127.0.0.1" if self.host in WILDCARDS else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def load_coordinator_file(path: str | Path) -> CoordinatorFile:
    """Read and check a coordinator file; a ConfigError names the file and the key."""
    path = Path(path)
    values = read_yaml(path, "coordinator file")
    try:
        coordinator = from_dict(CoordinatorFile, values)
        check_host(coordinator.host)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    paths = ("state", "certificates", "ca_certificate", "server_certificate", "server_key", "database", "log", "runs")
    resolved = {k: str((path.parent / getattr(coordinator, k)).resolve())
                for k in paths if getattr(coordinator, k) is not None}
    coordinator = dataclasses.replace(coordinator, **resolved)
    if not coordinator.ca.is_file():  # every command's connection to the SuperLink is verified with it
        raise ConfigError(f"{path}: CA certificate {coordinator.ca} does not exist; make it with `fedssl certs`")
    return coordinator


def environment(coordinator: CoordinatorFile, environ: dict[str, str]) -> dict[str, str]:
    """`environ` for Flower's commands, with the coordinator's own flwr CLI home."""
    return flower_environment(environ, cli_home(coordinator))


def cli_home(coordinator: CoordinatorFile) -> Path:
    """The flwr CLI's home for this coordinator, with its one connection `fedssl` (written anew on
    every use: it follows the coordinator file)."""
    home = Path(coordinator.state) / "flwr-home"
    config = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
              f'address = {json.dumps(coordinator.address)}\nroot-certificates = {json.dumps(str(coordinator.ca))}\n')
    atomic_write(home / "config.toml", lambda f: f.write(config.encode()))  # whole, for commands run side by side
    return home


def superlink_command(coordinator: CoordinatorFile) -> list[str]:
    """`flower-superlink` with TLS, SuperNode authentication, the state database and its log file."""
    return [str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(coordinator.ca),
            "--ssl-certfile", str(coordinator.server_pem),
            "--ssl-keyfile", str(coordinator.server_private_key),
            "--enable-supernode-auth",
            "--database", str(coordinator.database_file),
            "--disable-runtime-dependency-installation",
            "--host", coordinator.host, "--port", str(coordinator.port),
            "--log-file", str(coordinator.log_file)]


def run_coordinator(path: Path, environ: dict[str, str]) -> int:
    """Check the certificates, then run the SuperLink in the foreground until stopped: 0, or the
    exit status of a SuperLink that exited by itself."""
    coordinator = load_coordinator_file(path)
    print(f"CA certificate {coordinator.ca}: {check_ca_certificate(coordinator.ca)}")
    try:  # the flwr CLI of `fedssl register/launch/status` connects on this host name
        verify_server_certificate(coordinator.server_pem, coordinator.ca, coordinator.address.rpartition(":")[0].strip("[]"))
    except (VerificationError, ValueError, OSError) as err:
        raise ConfigError(f"server certificate {coordinator.server_pem} does not verify with {coordinator.ca} for "
                          f"{coordinator.address}: {err}; make both with `fedssl certs`") from None
    for folder in (coordinator.database_file.parent, coordinator.log_file.parent, coordinator.runs_folder):
        folder.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(lambda line: print(line, flush=True))
    supervisor.start("superlink", superlink_command(coordinator), environment(coordinator, environ), prefix=False)
    print(f"SuperLink on {coordinator.host}:{coordinator.port} (database {coordinator.database_file}, "
          f"log {coordinator.log_file})", flush=True)
    exited = supervisor.wait()
    supervisor.stop()
    if exited is None:
        return 0
    print(f"fedssl coordinator: the SuperLink exited with code {exited[1]}; see {coordinator.log_file}", file=sys.stderr)
    return exited[1] or 1


# -- the flwr CLI ----------------------------------------------------------------------------------

def flwr(coordinator: CoordinatorFile, *args: str, environ: dict[str, str]) -> dict:
    """The JSON answer of `flwr <args> fedssl --format json`; RuntimeError with Flower's message if
    it fails, or at once if the SuperLink does not answer."""
    require_superlink(coordinator)
    command = [str(BIN / "flwr"), *args, CONNECTION, "--format", "json"]
    try:
        result = subprocess.run(command, env=environment(coordinator, environ), capture_output=True, text=True,
                                timeout=FLWR_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`flwr {' '.join(args)}` did not answer within {FLWR_TIMEOUT} s: is the SuperLink "
                           f"at {coordinator.address} running (`fedssl coordinator`)?") from None
    try:
        answer = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        answer = {"success": False, "error-message": (result.stdout + result.stderr).strip()[-500:]}
    if not answer.get("success", result.returncode == 0):
        message = " ".join(str(answer.get("error-message", "")).split())
        raise RuntimeError(f"`flwr {' '.join(args)}` failed: {message}")
    return answer


def require_superlink(coordinator: CoordinatorFile) -> None:
    """RuntimeError at once if the SuperLink does not answer (the flwr CLI would retry for a minute)."""
    unavailable = superlink_unavailable(coordinator.address, coordinator.ca)
    if unavailable:
        raise RuntimeError(f"the SuperLink at {coordinator.address} does not answer ({unavailable}): is "
                           "`fedssl coordinator` running?")


def registered_sites(coordinator: CoordinatorFile) -> dict[str, dict]:
    """The sites `fedssl register` registered: {site: {node_id, fingerprint, registered}}."""
    path = Path(coordinator.state) / SITES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def register(coordinator: CoordinatorFile, public_key: Path, site: str, environ: dict[str, str]) -> tuple[int, str]:
    """Register a hospital's public key under its site name; its node id and key fingerprint."""
    check_name(site, "--site")
    fingerprint = public_key_fingerprint(public_key)
    known = registered_sites(coordinator).get(site)
    if known:
        raise ConfigError(f"--site {site} is already registered (node {known['node_id']}, key {known['fingerprint']}); "
                          "a site has one key")
    answer = flwr(coordinator, "supernode", "register", str(public_key), "--name", site, environ=environ)
    node_id = int(answer["node-id"])
    path = Path(coordinator.state) / SITES_FILE
    with (path.parent / f".{SITES_FILE}.lock").open("w") as lock:  # two registrations at once both stay
        fcntl.flock(lock, fcntl.LOCK_EX)
        sites = registered_sites(coordinator)
        sites[site] = {"node_id": node_id, "fingerprint": fingerprint, "registered": utc_now()}
        atomic_write(path, lambda f: f.write(json.dumps(sites, indent=2).encode() + b"\n"))
    return node_id, fingerprint


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- launching a run --------------------------------------------------------------------------------

def launch(coordinator: CoordinatorFile, scenario: Path, run_dir: Path, *, resume: bool, environ: dict[str, str],
           echo=print) -> int:
    """Submit the scenario's run to the SuperLink and follow it: `echo` gets the ServerApp's
    `fedssl | ...` and error lines as they come and the run's final state. 0 if the run completed,
    1 if not.

    The app is staged fresh into `<state>/app` (the code this installation runs); the run config
    names the scenario and the run folder on this machine. Everything `flwr run` printed is kept in
    the run folder's `logs/launch.log`.
    """
    run = RunFolder(run_dir)
    if resume and not run.server_checkpoint.is_file():
        raise ConfigError(f"--resume: {run.root} holds no checkpoint to continue from")
    if not resume and run.root.exists() and run.earlier_results():
        raise ConfigError(f"--run-dir {run.root} holds an earlier run: --resume to continue it, or choose another "
                          "--run-dir")
    require_superlink(coordinator)
    app = stage_app(Path(coordinator.state) / "app")
    run.logs.mkdir(parents=True, exist_ok=True)
    run.launch_config.write_text(f"scenario = {json.dumps(str(scenario.resolve()))}\n"
                                 f"run-dir = {json.dumps(str(run.root))}\nresume = {str(resume).lower()}\n")
    command = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", str(run.launch_config)]
    run_id, shown = None, StreamFilter(echo)
    with run.launch_log.open("a") as log, subprocess.Popen(
            command, env=environment(coordinator, environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1) as flwr_run:
        for line in flwr_run.stdout:
            log.write(line)
            if run_id is None and (words := line.split("Successfully started run ")[1:]):
                run_id = int(words[0].split()[0])
                record_launch(coordinator, run_id, run.root, scenario)
                echo(f"{STREAM_MARK}run {run_id} submitted; run folder {run.root}")
            else:
                shown(line)
    if run_id is None:
        last = [line for line in run.launch_log.read_text(errors="replace").splitlines() if line.strip()][-3:]
        raise RuntimeError(f"`flwr run` did not start the run: {' '.join(' '.join(last).split())} "
                           f"(all of its output: {run.launch_log})")
    state = run_state(coordinator, run_id, environ)
    echo(f"{STREAM_MARK}run {run_id}: {state}; run folder {run.root}")
    return 0 if state == COMPLETED else 1


class StreamFilter:
    """What `fedssl launch` shows of `flwr run --stream`'s output: the ServerApp's own `fedssl | ...`
    lines, Flower's error lines and the last line of a traceback (the exception that ended the run,
    e.g. the sites that were missing), never the rest."""

    def __init__(self, echo) -> None:
        self.echo = echo
        self._in_traceback = False

    def __call__(self, line: str) -> None:
        plain = COLOUR.sub("", line).rstrip()
        if STREAM_MARK in plain:
            self.echo(plain[plain.index(STREAM_MARK):])
        elif plain.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
        elif self._in_traceback and plain and not plain.startswith(" "):  # the exception, after the frames
            self._in_traceback = False
            self.echo(plain)
        elif "ERROR :" in plain:
            self.echo(plain)


def record_launch(coordinator: CoordinatorFile, run_id: int, run_dir: Path, scenario: Path) -> None:
    with (Path(coordinator.state) / LAUNCHES_FILE).open("a") as f:
        f.write(json.dumps({"run_id": run_id, "run_dir": str(run_dir), "scenario": str(scenario.resolve()),
                            "submitted": utc_now()}) + "\n")


def launches(coordinator: CoordinatorFile) -> list[dict]:
    path = Path(coordinator.state) / LAUNCHES_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_state(coordinator: CoordinatorFile, run_id: int, environ: dict[str, str]) -> str:
    """Flower's state of the run, e.g. `running` or `finished:completed`."""
    runs = flwr(coordinator, "ls", "--run-id", str(run_id), environ=environ)["runs"]
    return runs[0]["status"] if runs else "unknown"


# -- status -------------------------------------------------------------------------------------------

def status_tables(coordinator: CoordinatorFile, run_dir: Path | None, environ: dict[str, str]) -> list[Table]:
    """Rich tables of the federation: every registered site (Flower's status of its node, when
    the run last saw it, what it trained, spent and declined) and the run of `run_dir`, or of the
    last launch without it (its state at the SuperLink, its round and its last probe AUROC)."""
    submitted = [l for l in launches(coordinator) if run_dir is None or Path(l["run_dir"]) == run_dir.resolve()]
    run_dir = run_dir or (Path(submitted[-1]["run_dir"]) if submitted else None)
    run_id = submitted[-1]["run_id"] if submitted else None
    with ThreadPoolExecutor(2) as pool:  # each flwr call is a few seconds of start-up: both at once
        nodes = pool.submit(flwr, coordinator, "supernode", "ls", environ=environ)
        state = pool.submit(run_state, coordinator, run_id, environ) if run_id is not None else None
        nodes = nodes.result()["nodes"]
        state = state.result() if state else "-"
    run = RunFolder(run_dir) if run_dir else None
    rounds = run.rounds() if run and run.metrics.is_file() else []
    presence = json.loads(run.presence.read_text()) if run and run.presence.is_file() else {}
    seen = {int(n["node_id"]): n for n in presence.get("nodes", [])}
    names = {info["node_id"]: site for site, info in registered_sites(coordinator).items()}

    sites = Table(title=f"sites of {coordinator.address}")
    for column in ("site", "node id", "status", "since", "seen by the run", "rounds trained", "epsilon", "declined"):
        sites.add_column(column)
    for node in sorted(nodes, key=lambda n: names.get(int(n["node-id"]), "~")):
        node_id = int(node["node-id"])
        site = names.get(node_id) or seen.get(node_id, {}).get("site") or "-"
        since = {"online": node["online-at"], "offline": node["offline-at"]}.get(node["status"], node["created-at"])
        last_seen = seen.get(node_id)
        epsilon = next((r.epsilon[site] for r in reversed(rounds) if site in r.epsilon), None)
        declined = next((f"round {r.round}: {d['reason']}" for r in reversed(rounds) for d in r.declined
                         if d.get("site") == site), "")
        sites.add_row(site, str(node_id), node["status"], since,
                      f"{last_seen['last_seen'][:19].replace('T', ' ')}Z (round {last_seen['round']})" if last_seen else "",
                      str(sum(site in r.site_windows for r in rounds)),
                      "" if epsilon is None else f"{epsilon:.2f}", declined)
    return [sites] if run is None else [sites, run_table(run, rounds, run_id, state)]


def run_table(run: RunFolder, rounds: list[RoundRecord], run_id: int | None, state: str) -> Table:
    table = Table(title=f"run {run.root}")
    for column in ("run id", "state", "round", "last probe macro AUROC"):
        table.add_column(column)
    planned = run.load_scenario().federation.rounds if run.scenario.is_file() else "?"
    probed = next((r for r in reversed(rounds) if r.probe_macro_auroc is not None), None)
    auroc = ""
    if probed:
        interval = probed.probe_macro_auroc_ci95
        auroc = f"{probed.probe_macro_auroc:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
        auroc += f" (round {probed.round})"
    table.add_row("-" if run_id is None else str(run_id), state, f"{rounds[-1].round if rounds else 0}/{planned}", auroc)
    return table
