"""The site's warm worker (client/worker.py): the process that runs the node's ClientApp tasks.

Against a real `flower-supernode --isolation process` (no SuperLink needed: its Runtime API serves
the worker either way), the worker with the SuperNode's secret serves until SIGTERM, and one with
another secret stops at once with one line. One task, with Flower's Runtime API calls replaced:
the reply and the outcome pushed for an answer, a ClientApp that raises, and a run of another app.
That the workers answer real rounds over TLS, with the audit log matching what the server
received, is tests/test_deployment.py. A process keeps the windows of the site it answered last;
the per-message ClientApp imports no torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode, SubStatus

import client.worker as worker
from client import site_round
from fedssl.config import Scenario, SiteConfig
from ops.processes import free_port, terminate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def supernode(tmp_path_factory):
    """A SuperNode in `process` isolation with a secret (its SuperLink never answers): (its Runtime
    API address, the secret file)."""
    home = tmp_path_factory.mktemp("supernode")
    secret = home / "secret"
    secret.write_bytes(os.urandom(32))
    address = f"127.0.0.1:{free_port()}"
    host, port = address.split(":")
    with (home / "supernode.log").open("w") as log_file:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{free_port()}",
             "--isolation", "process", "--superexec-auth-secret-file", str(secret), "--host", host, "--port", port],
            env={**os.environ, "FLWR_HOME": str(home / "flwr-home")}, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    yield address, secret
    terminate(process, grace=10)


def start_worker(address: str, secret: Path, log_path: Path) -> subprocess.Popen:
    with log_path.open("w") as log_file:
        return subprocess.Popen([sys.executable, "-m", "client.worker", "--runtime-api-address", address,
                                 "--superexec-auth-secret-file", str(secret)], cwd=ROOT, stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_a_worker_with_the_secret_serves_until_sigterm(supernode, tmp_path):
    address, secret = supernode
    process = start_worker(address, secret, tmp_path / "worker.log")
    deadline = time.monotonic() + 120
    while "ready for the SuperNode" not in (tmp_path / "worker.log").read_text():
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
        time.sleep(0.2)
    time.sleep(3)  # long enough to ask the SuperNode for tasks many times
    assert process.poll() is None, (tmp_path / "worker.log").read_text()
    process.terminate()
    assert process.wait(timeout=30) == 0
    log = (tmp_path / "worker.log").read_text()
    assert "site worker stopped" in log and "ERROR" not in log, log


def test_a_worker_with_another_secret_stops_with_one_line(supernode, tmp_path):
    address, _ = supernode
    (tmp_path / "other").write_bytes(os.urandom(32))
    result = subprocess.run([sys.executable, "-m", "client.worker", "--runtime-api-address", address,
                             "--superexec-auth-secret-file", str(tmp_path / "other")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"fedssl worker: the SuperNode at {address} refused the worker's secret: give both the same "
        "--superexec-auth-secret-file")
    assert "Traceback" not in result.stderr


def test_a_bad_site_file_stops_the_worker_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "client.worker", "--runtime-api-address", "127.0.0.1:1",
                             "--site-file", str(tmp_path / "missing.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"fedssl worker: cannot read site file {tmp_path / 'missing.yaml'}")


class FakeRun:
    def __init__(self, fab_id: str) -> None:
        self.fab_id = fab_id


@pytest.fixture
def one_task(monkeypatch, flower_messages):
    """run_task with the Runtime API replaced: it pulls a train message of run 7 from `fab_id`'s
    run; returns what was pushed ({"reply": Message, "outcome": (status, details)})."""
    pushed: dict = {}
    message = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=21, message_type="train")
    context = Context(run_id=7, node_id=21, state=RecordDict(), node_config={}, run_config={})

    class Idle:
        def __init__(self, *args) -> None: ...
        start = stop = close = __init__

    monkeypatch.setattr(worker, "runtime_client", lambda *args: Idle())
    monkeypatch.setattr(worker, "HeartbeatSender", Idle)
    monkeypatch.setattr(worker, "push_message", lambda client, reply, ctx: pushed.update(reply=reply))
    monkeypatch.setattr(worker, "push_task_output",
                        lambda client, ctx, status, details: pushed.update(outcome=(status, details)))

    def run(app, fab_id=worker.APP_ID):
        monkeypatch.setattr(worker, "pull_task_input", lambda client: (message, context, FakeRun(fab_id), None))
        worker.run_task("127.0.0.1:1", "token", app, threading.Lock())
        return pushed
    return run


def test_a_task_pushes_the_apps_reply_then_its_outcome(one_task):
    pushed = one_task(lambda message, context: Message(RecordDict({"metrics": ConfigRecord({"x": 1})}),
                                                       reply_to=message))
    assert pushed["reply"].content["metrics"]["x"] == 1
    assert pushed["outcome"] == (SubStatus.COMPLETED, "")


def test_a_clientapp_that_raises_is_an_error_reply_and_a_failed_task(one_task):
    def broken(message, context):
        raise RuntimeError("boom")
    pushed = one_task(broken)
    assert pushed["reply"].has_error() and pushed["reply"].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert pushed["reply"].error.reason == "the ClientApp raised RuntimeError (details in the site's log)"
    assert pushed["outcome"] == (SubStatus.FAILED, pushed["reply"].error.reason)


def test_a_run_of_another_app_is_refused_without_running_it(one_task):
    def never(message, context):
        raise AssertionError("the ClientApp ran for another app")
    pushed = one_task(never, fab_id="someone/else")
    assert pushed["reply"].has_error() and "runs fedssl/fedssl only, not someone/else" in pushed["reply"].error.reason
    assert pushed["outcome"][0] == SubStatus.FAILED


def test_a_process_keeps_the_windows_of_the_site_it_answered_last(monkeypatch):
    loads = []
    monkeypatch.setattr(site_round, "load_site", lambda *key: loads.append(key) or object())
    monkeypatch.setattr(site_round, "last_windows", None)
    node = site_round.Node(SiteConfig("a", folder="/records"), Path("/work"), Path("/state"))
    first = site_round.site_windows(Scenario(seed=0), node)
    assert site_round.site_windows(Scenario(seed=0), node) is first and len(loads) == 1
    assert site_round.site_windows(Scenario(seed=1), node) is not first and len(loads) == 2


def test_the_per_message_clientapp_imports_no_torch():
    code = "import sys, client.app; assert 'torch' not in sys.modules, 'client.app imports torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
