"""Process bookkeeping shared by the simulation runner and the deployment tests.

Every process a runner starts carries `FEDSSL_FLOWER_RUN=<token>` in its environment. Flower's
SuperLink/SuperNode start SuperExec in a new session, SuperExec starts the app processes (and, in
simulation, Ray), so a run's processes are found by that mark (via /proc) rather than by
parenthood, and stopped by pid.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

TOKEN_VARIABLE = "FEDSSL_FLOWER_RUN"  # marks every process a runner starts, down to Ray workers
SUPERVISED_VARIABLE = "FEDSSL_SUPERVISED"  # marks the processes of one `fedssl node` / `fedssl coordinator`
COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its console lines even into a pipe


def marked_processes(token: str, variable: str = TOKEN_VARIABLE) -> list[int]:
    """Pids of live processes whose environment carries `variable=token` (Linux /proc)."""
    needle = f"{variable}={token}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return [p for p in pids if p != os.getpid()]


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        if not Path("/proc").is_dir():
            try:
                os.kill(pid, 0)
                return True
            except OSError:
                return False
        return False


def terminate(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM `process`, SIGKILL it after `grace` seconds, and reap it."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def stop_pids(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM `pids`, SIGKILL those alive after `grace` seconds; return any still alive."""
    for pid in pids:
        send_signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (pids := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        send_signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2
    while (pids := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervisor:
    """Long-running children in the foreground of this process (`fedssl node`, `fedssl coordinator`).

    Each child's output is handed line by line to `echo` (prefixed with the child's name, if
    given; without colour codes) from a reader thread. `wait` returns when a child exits or SIGTERM/SIGINT arrive (a
    systemd stop, Ctrl-C); `stop` then stops every child and everything they started, found by the
    mark `FEDSSL_SUPERVISED=<token>` in their environment, since Flower starts its SuperExec in a
    new session: a dead supervisor leaves nothing behind that keeps training or holds a port.
    """

    def __init__(self, echo: Callable[[str], None], grace: float = 15.0) -> None:
        self.echo, self.grace = echo, grace
        self.token = uuid.uuid4().hex
        self.children: dict[str, subprocess.Popen] = {}
        self._readers: list[threading.Thread] = []
        self._signalled = threading.Event()

    def start(self, name: str, command: list[str], env: dict[str, str], prefix: bool = True) -> subprocess.Popen:
        process = subprocess.Popen(command, env={**env, SUPERVISED_VARIABLE: self.token}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                   bufsize=1)
        self.children[name] = process
        label = f"{name} | " if prefix else ""
        reader = threading.Thread(target=self._relay, args=(process, label), daemon=True)
        reader.start()
        self._readers.append(reader)
        return process

    def _relay(self, process: subprocess.Popen, label: str) -> None:
        for line in process.stdout:
            self.echo(label + COLOUR.sub("", line.rstrip("\n")))

    def wait(self) -> tuple[str, int] | None:
        """Block until a child exits, its (name, exit status), or a stop signal arrives (None)."""
        previous = {sig: signal.signal(sig, lambda *_: self._signalled.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._signalled.wait(0.2):
                for name, process in self.children.items():
                    if process.poll() is not None:
                        return name, process.returncode
            return None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> list[int]:
        """Stop the children (SIGTERM, SIGKILL after `grace` s), then anything they left that
        carries this supervisor's mark; the pids still alive (none, normally)."""
        for process in reversed(self.children.values()):
            if process.poll() is None:
                terminate(process, self.grace)
        left = stop_pids(marked_processes(self.token, SUPERVISED_VARIABLE), self.grace)
        for reader in self._readers:  # the last lines of the children's output
            reader.join(timeout=5)
        return left
