"""The site's warm worker (client/worker.py) and the per-message ClientApp that forwards to it.

A real worker process (`python -m client.worker`) answers TINY's first site's train and evaluate
messages exactly as the ClientApp answers them in its own process (same seeds, same arrays) and
keeps serving; without a worker the ClientApp answers in its own process; a worker that dies or
hangs mid-message is an Error reply, not a hang. The ClientApp's own process imports no torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.app import app as client_app
from client.worker import SOCKET_KEY, receive_frame
from fedssl.config import load_scenario
from fedssl.plan import Plan
from fedssl.federated import shared_state
from fedssl.objectives import build_objective
from fedssl.protocol import COMPUTE_SECONDS_KEY, PLAN_KEY, SITE_ERROR_CODE
from ops.processes import terminate
from server.strategy import on_the_wire
from tests.conftest import TINY, NodeGrid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_dir():
    """A folder with a short path: a Unix socket's path must fit in 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="fedssl-w-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def worker(short_dir):
    """A worker process serving short_dir/w.sock: (socket path, process, its log file)."""
    path, log_path = short_dir / "w.sock", short_dir / "worker.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "client.worker", "--socket", str(path)], cwd=ROOT,
                                   stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while "ready at" not in log_path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    yield path, process, log_path
    terminate(process, grace=10)


def node(tmp_path: Path, name: str, socket_path: Path, run_config: dict) -> Context:
    """TINY's first site as a simulated node with its own run folder (so its own state folder),
    answering through `socket_path`."""
    node_config = {"partition-id": 0, "num-partitions": 2, SOCKET_KEY: str(socket_path)}
    return Context(run_id=1, node_id=21, state=RecordDict(), node_config=node_config,
                   run_config={**run_config, "run-dir": str(tmp_path / name)})


def instructions(tmp_path: Path) -> tuple[dict, list[Message]]:
    """TINY's run config and the messages the server sends its first site: train in rounds 1 and 2
    and a federated evaluation, each with the global model packed."""
    (tmp_path / "scenario.yaml").write_text(TINY)
    scenario = load_scenario(tmp_path / "scenario.yaml")
    arrays = ArrayRecord(shared_state(build_objective(scenario), "encoder"))
    strategy = FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    grid = NodeGrid([21])
    plan = Plan.of(scenario).text  # what the ServerApp adds to every message
    messages = [*strategy.configure_train(1, arrays, ConfigRecord({"num-rounds": 2, PLAN_KEY: plan}), grid),
                *strategy.configure_train(2, arrays, ConfigRecord({"num-rounds": 2, PLAN_KEY: plan}), grid),
                *strategy.configure_evaluate(1, arrays, ConfigRecord({PLAN_KEY: plan}), grid)]
    return {"run-dir": str(tmp_path / "run")}, on_the_wire(messages,
                                                                                                 "float32")


def test_the_worker_answers_every_message_as_the_clientapp_would_in_its_own_process(
        worker, tmp_path, flower_messages, caplog):
    path, _, log_path = worker
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # only the site's own user can connect
    run_config, messages = instructions(tmp_path)
    warm = node(tmp_path, "warm", path, run_config)
    cold = node(tmp_path, "cold", tmp_path / "no-worker.sock", run_config)
    for msg in messages:
        caplog.clear()
        by_worker = client_app(msg, warm)
        assert "answering" not in caplog.text  # the worker took it
        in_process = client_app(msg, cold)
        assert "no site worker at" in caplog.text and "answering the" in caplog.text  # the fallback said so
        assert not by_worker.has_error() and not in_process.has_error(), (by_worker, in_process)
        assert set(by_worker.content) == set(in_process.content)
        for name, record in by_worker.content.array_records.items():
            for key, array in record.items():
                assert np.array_equal(array.numpy(), in_process.content[name][key].numpy()), key
        timing = {COMPUTE_SECONDS_KEY}
        assert ({k: v for k, v in by_worker.content["metrics"].items() if k not in timing}
                == {k: v for k, v in in_process.content["metrics"].items() if k not in timing})
    answered = log_path.read_text()
    assert answered.count("train message of run 1 answered") == 2
    assert answered.count("evaluate message of run 1 answered") == 1


def test_a_second_worker_on_the_socket_is_refused_and_sigterm_stops_the_first(worker):
    path, process, _ = worker
    second = subprocess.run([sys.executable, "-m", "client.worker", "--socket", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and second.stderr.strip() == f"fedssl worker: another worker already serves {path}"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not path.exists()  # the socket went with it


def test_a_bad_site_file_stops_the_worker_with_one_line(short_dir):
    result = subprocess.run([sys.executable, "-m", "client.worker", "--socket", str(short_dir / "x.sock"),
                             "--site-file", str(short_dir / "missing.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"fedssl worker: cannot read site file {short_dir / 'missing.yaml'}")
    assert not (short_dir / "x.sock").exists()


def fake_worker(path: Path, hang: bool) -> threading.Event:
    """A worker that reads one request and never replies: it closes the connection at once (it
    died) or, with `hang`, once the returned event is set."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    release = threading.Event()

    def serve():
        connection, _ = listener.accept()
        receive_frame(connection), receive_frame(connection)
        if hang:
            release.wait(30)
        connection.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return release


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_a_worker_failing_mid_message_is_an_error_reply(failure, short_dir, tmp_path, flower_messages):
    path = short_dir / f"{failure}.sock"
    release = fake_worker(path, hang=failure == "hangs")
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=21, message_type="train",
                  ttl=2.0)
    context = node(tmp_path, "state", path, {"run-dir": str(tmp_path)})
    started = time.monotonic()
    reply = client_app(msg, context)
    release.set()
    assert reply.has_error() and reply.error.code == SITE_ERROR_CODE
    expected = "TimeoutError" if failure == "hangs" else "ConnectionResetError"
    assert reply.error.reason == f"site worker: {expected} (details in the site's log)"
    assert time.monotonic() - started < 30  # the message's time to live bounds the wait


def test_the_per_message_clientapp_imports_no_torch():
    code = "import sys, client.app; assert 'torch' not in sys.modules, 'client.app imports torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
