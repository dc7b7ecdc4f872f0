"""Process bookkeeping shared by the simulation runner and the deployment tests.

Every process a runner starts carries `FEDSSL_FLOWER_RUN=<token>` in its environment. Flower's
SuperLink/SuperNode start SuperExec in a new session, SuperExec starts the app processes (and, in
simulation, Ray), so a run's processes are found by that mark (via /proc) rather than by
parenthood, and stopped by pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

TOKEN_VARIABLE = "FEDSSL_FLOWER_RUN"  # marks every process a runner starts, down to Ray workers


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
