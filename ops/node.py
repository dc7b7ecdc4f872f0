"""The hospital's node: `fedssl node SITE.yaml` and its bookkeeping commands.

`fedssl node SITE.yaml` is the hospital's client daemon. It reads the site file
(fedssl/sitefile.py), checks what a round will need before anything connects (the node key; the
coordinator's CA certificate and, if the SuperLink answers, that its certificate verifies for the
address; the site's records, as `fedssl check-site` reads them), then runs Flower's SuperNode (and, with
`worker: true`, the warm training worker) in the foreground until it is stopped (SIGTERM, Ctrl-C)
or the SuperNode exits. The SuperNode is given the site file as node config (`site-file`), so the
ClientApp reads the site's folders and policy from the file the hospital wrote, and no scenario
file is needed at the hospital: the plan comes with each round's message.

Everything the node and its children print goes to the site log file (`log:` in the site file,
default `<state>/node.log`) and to standard output. A SuperNode that exits ends the node with the
SuperNode's exit status and one line saying why in words (e.g. a key the coordinator has not
registered).

`fedssl node approve SITE.yaml [FINGERPRINT]` lists the plans waiting for the hospital's approval
(`policy.manual_approval`) or approves one; `fedssl node audit SITE.yaml` prints the site's audit
log (every message the site answered, what it trained and what it sent) as a table.
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from rich.table import Table

from client.approval import approve, pending_plans
from client.audit import read_audit
from fedssl.config import ConfigError, DataConfig
from fedssl.data.site import check_site
from fedssl.plan import SHORT, Plan
from fedssl.sitefile import SiteFile, load_site_file
from ops.deploy import (BIN, check_ca_certificate, check_host, check_node_key, check_superlink_tls,
                        flower_environment)
from ops.processes import Supervisor

WORKER_SECRET = "superexec.secret"  # in the state folder: lets the worker, and no one else, take the node's tasks
CHECK_CACHE = "check"  # in the work folder: the windows of the start's data check
FLWR_HOME = "flwr-home"  # in the state folder: where the SuperNode unpacks the apps it runs
FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")  # how Flower names why it exits (its status is only 1)


class SiteLog:
    """The node's log: every line appended to the site log file and echoed on standard output;
    the last lines kept to explain an exit."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")
        self.path = path
        self.recent: collections.deque[str] = collections.deque(maxlen=200)
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.recent.append(line)
            self.file.write(line + "\n")
            self.file.flush()
            print(line, flush=True)

    def note(self, message: str) -> None:
        """A line of the node's own, time-stamped as Flower's are not."""
        self(f"{datetime.now():%Y-%m-%d %H:%M:%S} fedssl node | {message}")

    def close(self) -> None:
        self.file.close()


def check_node(site: SiteFile) -> Iterator[str]:
    """What the node checks before it starts, line by line for the log as each check passes, the
    quick ones first; a ValueError (ConfigError, KeyMaterialError, SiteDataError) names what is wrong."""
    if site.node_key is None or site.ca_certificate is None:
        missing = [k for k in ("node_key", "ca_certificate") if getattr(site, k) is None]
        raise ConfigError(f"{', '.join(missing)}: required: a node connects over TLS (ca_certificate: the "
                          "coordinator's ca.crt) with its registered key (node_key: from `fedssl node-key`)")
    check_host(site.superlink.rpartition(":")[0].strip("[]"))
    yield f"node key {site.node_key}: {check_node_key(site.node_key)} (the fingerprint the coordinator registered)"
    yield f"CA certificate {site.ca_certificate}: {check_ca_certificate(site.ca_certificate)}"
    yield check_superlink_tls(site.superlink, site.ca_certificate)
    labels = Path(site.labels_csv) if site.labels_csv else None
    # with the default data settings, in a cache of its own: the rounds' cache, built with the plan's
    # settings, is never replaced by a restart, and a restart reads this one back in seconds
    _, summary = check_site(Path(site.records), DataConfig(), Path(site.work) / CHECK_CACHE, labels)
    yield f"data: {summary}"


def supernode_command(site: SiteFile, site_path: Path) -> list[str]:
    """The `flower-supernode` command of the site: TLS with the coordinator's CA, authenticated
    by the node key, the site file as node config. (A SuperNode installs no app dependencies at
    run time unless `--allow-runtime-dependency-installation` is given: they come from the venv.)"""
    if "'" in str(site_path):  # Flower's --node-config quotes values with '
        raise ConfigError(f"{site_path} contains a quote ('), which Flower's node config cannot carry; "
                          "choose a path without one")
    # with a worker, the SuperNode leaves its tasks to it (`process`) instead of starting a process per message
    isolation = ["--isolation", "process", "--superexec-auth-secret-file", str(worker_secret(site))] if site.worker else []
    return [str(BIN / "flower-supernode"),
            "--superlink", site.superlink,
            "--root-certificates", str(site.ca_certificate),
            "--auth-supernode-private-key", str(site.node_key),
            "--node-config", f"site-file='{site_path}'",
            *isolation,
            "--host", "127.0.0.1", "--port", str(site.port)]


def worker_command(site: SiteFile, site_path: Path) -> list[str]:
    """The warm worker (client/worker.py) that runs the site's ClientApp in one long-lived process."""
    return [sys.executable, "-m", "client.worker", "--runtime-api-address", f"127.0.0.1:{site.port}",
            "--superexec-auth-secret-file", str(worker_secret(site)), "--site-file", str(site_path)]


def worker_secret(site: SiteFile) -> Path:
    """Where the secret shared by the SuperNode and its worker lies: the site's state folder."""
    return Path(site.state) / WORKER_SECRET


def make_worker_secret(site: SiteFile) -> None:
    """The secret shared by the SuperNode and its worker: made once, mode 0600."""
    path = worker_secret(site)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
            file.write(secrets.token_bytes(32))


def exit_reason(status: int, output: list[str], site: SiteFile, log: Path) -> str:
    """Why the SuperNode exited, in one line that says what to do."""
    codes = [int(m.group(1)) for line in output if (m := FLOWER_EXIT.search(line))]
    code = codes[-1] if codes else status
    text = "\n".join(output)
    if code == 305 and "Failed to activate SuperNode" in text:
        public_key = Path(f"{site.node_key}.pub").name
        return (f"key not registered: ask the coordinator to run `fedssl register {public_key} --site {site.site}` "
                "(and check its fingerprint with them)")
    if code == 305:
        return (f"could not connect to the SuperLink at {site.superlink}: check the address, the network and that "
                f"{site.ca_certificate} is the coordinator's ca.crt")
    if code == 302:
        return f"the SuperNode cannot use the node key {site.node_key}: make one with `fedssl node-key`"
    return f"the SuperNode exited with code {code}; see {log}"


def run_node(site_path: Path, environ: dict[str, str]) -> int:
    """Check the site, then run its SuperNode (and worker) in the foreground until stopped: 0, or
    the exit status of a SuperNode that exited by itself (the reason on stderr and in the log)."""
    site_path = site_path.resolve()
    site = load_site_file(site_path)
    commands = {"supernode": supernode_command(site, site_path)}
    if site.worker:
        commands = {"worker": worker_command(site, site_path), **commands}
    log = SiteLog(site.log_file)
    try:
        log.note(f"site {site.site} from {site_path}; log {log.path}")
        try:
            for line in check_node(site):
                log.note(line)
        except ValueError as err:  # the same one line on stderr (fedssl/cli.py), and in the site's log
            log.note(f"not started: {err}")
            raise
        if site.worker:
            make_worker_secret(site)
        env = flower_environment(environ, Path(site.state) / FLWR_HOME)
        supervisor = Supervisor(log)
        for name, command in commands.items():
            supervisor.start(name, command, env)
        log.note(f"started the SuperNode for {site.superlink}{' and the training worker' if site.worker else ''}")
        exited = supervisor.wait()
        if exited is None:
            log.note("stopping (signal)")
        left = supervisor.stop()
        if left:
            log.note(f"processes still running after the stop: {left}")
        if exited is None:
            log.note("stopped")
            return 0
        name, status = exited
        reason = (exit_reason(status, list(log.recent), site, log.path) if name == "supernode"
                  else f"the training worker exited with code {status}; see {log.path}")
        log.note(reason)
        print(f"fedssl node: {reason}", file=sys.stderr)
        return status or 1
    finally:
        log.close()


def plan_summary(plan: dict, site: str) -> str:
    """The plan a hospital is asked to approve, in one line: what `site` would train, how long,
    with which privacy, and what would leave it."""
    scenario = Plan.from_json(json.dumps(plan)).scenario()
    privacy = scenario.privacy_of(scenario.site(site)) if site in {s.name for s in scenario.sites} else scenario.privacy
    dp = f"DP-SGD to epsilon {privacy.target_epsilon:g}" if privacy.enabled else "no DP-SGD"
    return (f"{scenario.name}: objective {scenario.objective.name}, encoder {scenario.model.encoder} "
            f"{scenario.model.size}, {scenario.federation.rounds} rounds of {scenario.train.local_steps} local "
            f"steps, {dp}, shares {scenario.federation.share}")


def pending_table(site: SiteFile) -> Table | None:
    """The plans waiting for the hospital's approval, as a rich Table (None if there are none)."""
    pending = pending_plans(Path(site.state))
    if not pending:
        return None
    table = Table(title=f"plans waiting for approval at {site.site}")
    table.add_column("fingerprint", no_wrap=True)
    table.add_column("plan")
    for fingerprint, plan in sorted(pending.items()):
        table.add_row(fingerprint, plan_summary(plan, site.site))
    return table


def approve_plan(site: SiteFile, fingerprint: str) -> str:
    """Approve the pending plan whose fingerprint starts with `fingerprint`; its full fingerprint
    (ValueError if none or several match)."""
    return approve(Path(site.state), fingerprint)


AUDIT_COLUMNS = ("time", "run", "round", "message", "plan", "outcome", "reason", "records", "windows", "steps",
                 "examples", "epsilon", "sent")


def audit_table(site: SiteFile) -> Table:
    """The site's audit log as a rich Table: one row per message the site answered."""
    table = Table(title=f"audit log of {site.site} ({Path(site.state)})")
    for column in AUDIT_COLUMNS:
        table.add_column(column, overflow="fold")
    for entry in read_audit(Path(site.state)):
        sent = entry.get("sent")
        cells = {**entry,
                 "plan": str(entry.get("plan") or "")[:SHORT],
                 "sent": f"{sent['bytes']} B sha256 {sent['sha256'][:SHORT]}" if sent else "nothing"}
        table.add_row(*("" if cells.get(c) is None else str(cells[c]) for c in AUDIT_COLUMNS))
    return table
