"""Shared fixtures and helpers: small scenarios that keep the suite fast on two cores, WFDB record
writers, a finished run folder, the real ServerApp and ClientApp federating in this process, the
loopback deployment harness. Test modules import helpers from here, never from each other."""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb
import yaml
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from scipy.io import savemat

from client.app import app as client_app
from client.wire import reply_records
from fedssl.config import (DataConfig, EvaluationConfig, FederationConfig, ModelConfig, ObjectiveConfig, Scenario,
                           SiteConfig, SyntheticSiteConfig, TrainConfig, load_scenario, save_scenario)
from fedssl.data.synthetic import write_synthetic_site
from fedssl.data.windows import STANDARD_LEADS, RecordInfo, WindowSet
from fedssl.export import export_run
from fedssl.objectives import build_objective
from ops.coordinator import flwr, load_coordinator_file
from ops.deploy import OFFLINE_ENV, superlink_unavailable
from ops.processes import TOKEN_VARIABLE, free_port, marked_processes, pid_alive, stop_pids, terminate
from server.app import app as server_app

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# The modules that take longest, longest first: federations of real Flower processes, then the
# heaviest in-process computations (measured with `--durations`)
LONGEST_MODULES = ("test_faults.py", "test_deployment.py", "test_objectives.py", "test_privacy.py",
                   "test_federation.py", "test_bad_paths.py", "test_federated_variants.py", "test_baselines.py")


def pytest_collection_modifyitems(items):
    """Run the longest modules first. xdist (`--dist loadfile --no-loadscope-reorder`) hands whole
    modules to the workers in collection order, so a long module handed out last runs alone while
    the other workers idle: in alphabetical order test_faults.py started two thirds of the way in."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: the other modules, and the tests within each, keep their order


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def stamp_messages_as_run_one(patch: pytest.MonkeyPatch) -> None:
    """flwr 1.41 stamps every new Message with the run, node and task of the Flower process it is
    made in (TaskIdentity); a test that makes Messages outside one gives them all id 1."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_run_id", "_node_id", "_task_id"):
        patch.setattr(TaskIdentity, attribute, 1)


@pytest.fixture
def flower_messages(monkeypatch):
    """New Messages can be made in this test (see `stamp_messages_as_run_one`)."""
    stamp_messages_as_run_one(monkeypatch)


def small_scenario(objective: str = "hybrid", **objective_kwargs) -> Scenario:
    """Two-second windows: 4 patches per lead, 48 tokens, fast enough for many tests."""
    return Scenario(data=DataConfig(window_seconds=2.0),
                    objective=ObjectiveConfig(name=objective, **objective_kwargs))


def two_site_scenario(objective: str, records: int, model: ModelConfig = ModelConfig()) -> Scenario:
    """Two small synthetic sites (50 vs 60 Hz mains), two rounds of two steps, a 40-record probe set."""
    site = SyntheticSiteConfig(records=records, duration_seconds=4.0, sample_rate=250)
    return dataclasses.replace(
        small_scenario(objective), model=model,
        train=TrainConfig(batch_size=4, local_steps=2),
        federation=FederationConfig(rounds=2, min_sites=2),
        evaluation=EvaluationConfig(synthetic=dataclasses.replace(site, records=40)),
        sites=(SiteConfig("a", synthetic=site), SiteConfig("b", synthetic=dataclasses.replace(site, mains_hz=60.0))),
    )


def random_windows(n: int = 16, samples: int = 200, seed: int = 0, missing: tuple[int, ...] = ()) -> WindowSet:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, 12), bool)
    mask[:, list(missing)] = False
    # each record-lead a sum of two sinusoids: structure a model can learn, unlike white noise
    t = np.arange(samples) / 100.0
    freq = rng.uniform(0.5, 8.0, (n, 12, 2, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 12, 2, 1))
    windows = np.sin(2 * np.pi * freq * t + phase).sum(2) + 0.1 * rng.standard_normal((n, 12, samples))
    windows = windows.astype(np.float32) * mask[..., None]
    records = tuple(RecordInfo(f"r{i}", None, ()) for i in range(n))
    return WindowSet(windows, mask, np.arange(n), records)


# -- WFDB records written by hand or with wfdb -------------------------------------------------

CFG = DataConfig(window_seconds=2.0)  # 2-s windows keep the test records small


GAIN = 1000.0  # adu per mV, as in CinC 2021: far from the ADC limits for ECG amplitudes


THREE = ("I", "II", "V1")


def ecg_like(seconds: float, fs: float, leads: int, seed: int = 0) -> np.ndarray:
    """(T, leads) in mV: 75-bpm R waves over a slow wave, scaled per lead, with a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * fs)) / fs
    wave = np.exp(-(((t % 0.8) - 0.3) ** 2) / (2 * 0.01**2)) + 0.2 * np.sin(2 * np.pi * 1.25 * t)
    return wave[:, None] * rng.uniform(0.5, 1.5, leads) + 0.01 * rng.standard_normal((len(t), leads))


def write_record(folder: Path, name: str = "r", leads=THREE, fs: float = 250, seconds: float = 4.0,
                 signal: np.ndarray | None = None, units: str = "mV", comments=(),
                 gain: float = GAIN) -> Path:
    """Write a 16-bit WFDB record (NaN becomes WFDB's invalid sample) and return its header."""
    if signal is None:
        signal = ecg_like(seconds, fs, len(leads))
    digital = np.where(np.isnan(signal), -32768, np.round(np.nan_to_num(signal) * gain)).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=[units] * len(leads), sig_name=list(leads), d_signal=digital,
                fmt=["16"] * len(leads), adc_gain=[gain] * len(leads), baseline=[0] * len(leads),
                comments=list(comments), write_dir=str(folder))
    return folder / f"{name}.hea"


def edit_header(header: Path, old: str, new: str, count: int = 1) -> Path:
    text = header.read_text()
    assert old in text, f"{old!r} not in {text!r}"
    header.write_text(text.replace(old, new, count))
    return header


def write_mat_record(folder: Path, name: str, dx: str, fs: int = 500, seconds: float = 4.0) -> Path:
    """A CinC 2021 record: WFDB header naming a MATLAB v4 file that holds `val` (12, T) int16."""
    val = np.round(ecg_like(seconds, fs, 12).T * GAIN).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    savemat(folder / f"{name}.mat", {"val": val}, format="4")
    lines = [f"{name} 12 {fs} {val.shape[1]}"]
    lines += [f"{name}.mat 16x1+24 1000.0(0)/mV 16 0 {val[i, 0]} 0 0 {lead}"
              for i, lead in enumerate(STANDARD_LEADS)]
    lines += ["# Age: 64", "# Sex: Female", f"# Dx: {dx}", "# Rx: Unknown"]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.hea"


def write_ptbxl_csv(folder: Path, rows: list[tuple[int, str, str]]) -> Path:
    """rows: (ecg_id, patient_id, scp_codes) for records `<ecg_id:05d>_lr`."""
    path = folder / "ptbxl_database.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["ecg_id", "patient_id", "age", "scp_codes", "filename_lr", "filename_hr"])
        for ecg_id, patient, codes in rows:
            writer.writerow([ecg_id, patient, 60, codes, f"records100/00000/{ecg_id:05d}_lr",
                             f"records500/00000/{ecg_id:05d}_hr"])
    return path


# -- a small valid scenario and changes to it; Flower must not start ---------------------------

SITE = {"records": 4, "duration_seconds": 4.0, "sample_rate": 250}


VALID = {
    "name": "bad-input",
    "data": {"window_seconds": 2.0},
    "train": {"batch_size": 4, "local_steps": 2},
    "federation": {"rounds": 2, "min_sites": 2},
    "evaluation": {"synthetic": {**SITE, "records": 20}},
    "sites": [{"name": "a", "synthetic": dict(SITE)}, {"name": "b", "synthetic": dict(SITE)}],
}


UNSET = object()


def changed(changes: dict) -> dict:
    """VALID with `changes` applied: {"a.b": value} sets, {"a.b": UNSET} removes."""
    scenario = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = scenario
        for part in parents:
            name, _, index = part.partition("[")
            node = node.setdefault(name, {})
            if index:
                node = node[int(index.rstrip("]"))]
        if value is UNSET:
            node.pop(last, None)
        else:
            node[last] = value
    return scenario


class FlowerStarted(BaseException):
    """Raised where the runner would start Flower: not an Exception, so no handler turns it into exit code 2."""


@pytest.fixture
def no_flower(monkeypatch):
    """Starting Flower fails the test at once (a check that comes too late would otherwise cost a
    minute, or hang forever as `fraction_train: 2` did)."""
    import simulations.run

    def start(self):
        raise FlowerStarted(f"Flower was started in {self.run_dir}")

    monkeypatch.setattr(simulations.run.LocalSimulation, "start", start)


# -- a finished run folder, its export, records to embed ---------------------------------------

RECORDS = SyntheticSiteConfig(records=3, duration_seconds=4.0, sample_rate=250)


@pytest.fixture
def run_dir(tmp_path):
    """A finished two-site run: its scenario, two rounds of metrics and a trained-looking encoder."""
    scenario = two_site_scenario("generative", records=4)
    run = tmp_path / "run"
    run.mkdir()
    save_scenario(scenario, run / "scenario.yaml")
    encoder = build_objective(scenario).encoder
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in encoder.state_dict().items()}
    torch.save(state, run / "encoder.pt")
    rounds = [{"round": r, "loss": 1.0 / r, "probe_macro_auroc": 0.6 + 0.1 * r, "seconds": 1.0, "probe_seconds": 0.1,
               "sites": 2, "site_windows": {"a": 8, "b": 6}, "examples": 14, "rejected": [], "epsilon": {},
               "delta": {}, "declined": [], "errors": []} for r in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    return run


@pytest.fixture
def exported(run_dir, tmp_path):
    return export_run(run_dir, tmp_path / "export")


def write_records(folder):
    """Three synthetic records (two 2-s windows each) and one broken header."""
    write_synthetic_site(folder, RECORDS, seed=3)
    (folder / "broken.hea").write_text("broken 12 500 5000\n")
    return folder


# -- a tiny two-site federation and the Grid its strategies sample -----------------------------

TINY = """
name: tiny-federation
seed: 3
data: {window_seconds: 2.0}
model: {size: tiny}
train: {batch_size: 8, local_steps: 3, threads: 1}
federation: {rounds: 2, min_sites: 2}
evaluation:
  synthetic: {records: 24, sample_rate: 250, duration_seconds: 4.0}
  every_round: false
  bootstrap: 100  # replicates of the probe's interval: enough for one, and cheap
  local_baselines: false
sites:
  - name: north
    synthetic: {records: 6, sample_rate: 250, duration_seconds: 4.0}
  - name: south
    synthetic: {records: 6, sample_rate: 500, duration_seconds: 4.0, mains_hz: 60.0,
                missing_leads: [V4, V5, V6]}
"""


class NodeGrid:
    """The part of a Grid that strategies use to sample nodes: these node ids."""

    def __init__(self, nodes=(11, 12)) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def play_round(strategy, arrays: dict[str, torch.Tensor], replies: list, server_round: int = 1,
               nodes=(11, 12)):
    """Round `server_round` of a `FedSSLStrategy` as Flower's start loop plays it, the sites' part
    replaced by `replies` (the i-th from node `nodes[i]`: a RecordDict or an Error): configure,
    aggregate, finish, so the round's record and checkpoints are written. The aggregated ArrayRecord."""
    from flwr.app import ArrayRecord, ConfigRecord, Message

    sent = strategy.configure_train(server_round, ArrayRecord(arrays), ConfigRecord(), NodeGrid(nodes))
    reply_of = dict(zip(nodes, replies, strict=True))
    answers = [Message(reply_of[m.metadata.dst_node_id], reply_to=m) for m in sent]
    aggregated, _ = strategy.aggregate_train(server_round, answers)
    strategy.aggregate_evaluate(server_round, [])
    strategy.finish_round(server_round, aggregated)
    return aggregated


def site_reply(arrays: dict[str, torch.Tensor], metrics: dict, dtype: str = "float32") -> RecordDict:
    """A site's reply as client/site_round.py builds it: `arrays` packed in `dtype`, and `metrics`."""
    return RecordDict({**reply_records(arrays, dtype), "metrics": MetricRecord(metrics)})


def training_reply(arrays: dict[str, torch.Tensor], **metrics) -> RecordDict:
    """A site's training reply: its update and its metrics (`num_examples` for `num-examples`)."""
    return site_reply(arrays, {k.replace("_", "-"): v for k, v in metrics.items()})


def load_scenario_text(folder):
    (folder / "tiny.yaml").write_text(TINY)
    return load_scenario(folder / "tiny.yaml")


# -- labelled windows with one linearly separable class ----------------------------------------

def labelled(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    windows = rng.standard_normal((n, 12, 50)).astype(np.float32)
    windows[:, 0] += labels[:, None] * 2.0  # class A shifts lead I
    records = tuple(RecordInfo(f"r{i}", None, ("A",) if y else ("B",)) for i, y in enumerate(labels))
    return WindowSet(windows, np.ones((n, 12), bool), np.arange(n), records)


# -- the real ServerApp and ClientApp federating in this process -------------------------------

FIRST_NODE_ID = 101  # the InProcessGrid's nodes are 101, 102, ... (partition ids 0, 1, ...)


class ServerKilled(RuntimeError):
    """Stands in for the ServerApp process dying (InProcessGrid's `kill_server_at`)."""


def over_the_wire(message: Message) -> Message:
    """`message` as its receiver gets it from Flower: deflated into the bytes of its objects (the
    message, its records, each array), inflated from them, and identified by its object id."""
    contents = {object_id: part.deflate() for object_id, part in get_all_nested_objects(message).items()}
    received = inflate_object_from_contents(message.object_id, contents)
    received.metadata.__dict__["_message_id"] = message.object_id
    return received


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are the real ClientApp (`client.app.app`) called in this process.

    Flower's simulation engine spends ~40 s starting its processes (SuperLink, SuperExec, Ray) for
    a federation of seconds. On this grid the same ServerApp and ClientApp exchange the same
    Messages, each carried both ways as Flower carries it (`over_the_wire`), and each node keeps one
    Context for the run as a simulated SuperNode does (node config `partition-id`, `num-partitions`),
    or, for the partitions in `site_files`, as a deployed one does (node config `site-file` only).
    The ClientApps' run config has no `scenario`: a site knows the run from the plan in its messages.
    `sent` and `replies` hold every Message as its receiver got it. With `kill_server_at` the
    ServerApp dies (ServerKilled) as it sends that round's training instructions.
    """

    def __init__(self, run_config: dict, num_sites: int, kill_server_at: int | None = None,
                 site_files: dict[int, Path] | None = None) -> None:
        site_run_config = {k: v for k, v in run_config.items() if k != "scenario"}
        site_files = site_files or {}

        def node_config(partition: int) -> dict:
            if partition in site_files:
                return {"site-file": str(site_files[partition])}
            return {"partition-id": partition, "num-partitions": num_sites}

        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=site_run_config,
                                       node_config=node_config(node - FIRST_NODE_ID))
                         for node in range(FIRST_NODE_ID, FIRST_NODE_ID + num_sites)}
        self.kill_server_at = kill_server_at
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._unpulled: dict[str, Message] = {}  # by the id of the instruction they answer
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def server_round(self, message: Message) -> int:
        """The `server-round` of an instruction this grid carried, or of the one a reply answers."""
        answered = {m.metadata.message_id: m for m in self.sent}.get(message.metadata.reply_to_message_id, message)
        return int(answered.content["config"]["server-round"])

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Each node's ClientApp answers its instruction at once; the reply waits to be pulled."""
        messages = list(messages)
        for message in messages:  # as Flower's grid does
            message.metadata.__dict__["_message_id"] = message.object_id
        rounds = {int(m.content["config"]["server-round"]) for m in messages if m.metadata.message_type == "train"}
        if self.kill_server_at in rounds:
            raise ServerKilled(f"the ServerApp died as it sent round {self.kill_server_at}")
        for message in messages:  # the records kept here are copies: the receivers may change theirs
            self.sent.append(over_the_wire(message))
            reply = client_app(over_the_wire(message), self.contexts[message.metadata.dst_node_id])
            self.replies.append(over_the_wire(reply))
            self._unpulled[message.metadata.message_id] = over_the_wire(reply)
        return [message.metadata.message_id for message in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._unpulled.pop(i) for i in message_ids if i in self._unpulled]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def serve(scenario: Path, run_dir: Path, *, resume: bool = False, kill_server_at: int | None = None,
          site_files: dict[int, Path] | None = None) -> InProcessGrid:
    """Run the real ServerApp (`server.app.app`) to its end over an InProcessGrid of the scenario's
    sites (the i-th from its site file `site_files[i]` if given), writing its run folder `run_dir`;
    the grid, with every message it carried."""
    run_config = {"scenario": str(scenario), "run-dir": str(run_dir), "resume": resume}
    grid = InProcessGrid(run_config, len(load_scenario(scenario).sites), kill_server_at, site_files)
    with pytest.MonkeyPatch.context() as patch:
        stamp_messages_as_run_one(patch)
        server_app(grid, Context(run_id=1, node_id=0, state=RecordDict(), node_config={}, run_config=run_config))
    return grid


class InProcessSimulation:
    """Stands in for `simulations.run.LocalSimulation` (Flower's simulation engine in child
    processes): the runner's federation runs through `serve`. Everything else `run_scenario` does
    (checks, site data, baselines, summary, report) runs as it does for real."""

    def __init__(self, run_dir: Path, *, grids: list[InProcessGrid], echo=print, verbose: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / "logs" / "flower.log"
        self.seen_pids: set[int] = set()
        self.grids = grids

    def __enter__(self) -> "InProcessSimulation":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, scenario_path: Path, *, num_sites: int, timeout: float | None = None, resume: bool = False) -> int:
        self.grids.append(serve(scenario_path, self.run_dir, resume=resume))
        return 1  # the Flower run id


@contextmanager
def flower_in_process() -> Iterator[list[InProcessGrid]]:
    """Within it, `simulations.run` federates in this process (`InProcessSimulation`); yields the
    grids its runs ran on."""
    import simulations.run

    grids: list[InProcessGrid] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulations.run, "LocalSimulation", functools.partial(InProcessSimulation, grids=grids))
        yield grids


def simulate_in_process(scenario_text: str, folder: Path):
    """The runner's `run_scenario` of `scenario_text` (saved as folder/scenario.yaml) into
    folder/run, federating in this process: its RunResult and the InProcessGrid it ran on."""
    from simulations.run import run_scenario

    (folder / "scenario.yaml").write_text(scenario_text)
    with flower_in_process() as grids:
        result = run_scenario(folder / "scenario.yaml", folder / "run", echo=lambda line: None)
    (grid,) = grids
    return result, grid


@pytest.fixture(scope="session")
def finished_federation(tmp_path_factory):
    """TINY through the real runner, federating in this process: its RunResult and InProcessGrid.
    Shared by the tests of what crossed the wire and of the tools that read run folders (on what
    the server writes; the hand-made `run_dir` pins their exact output). Read it; do not change it."""
    return simulate_in_process(TINY, tmp_path_factory.mktemp("finished-run"))


@pytest.fixture(scope="session")
def finished_run(finished_federation) -> Path:
    """The run folder of `finished_federation`, as `fedssl simulate` leaves it."""
    return finished_federation[0].run_dir


# -- a real federation of separate processes on loopback ---------------------------------------

SITES = ("hospital_a", "clinic_b", "cardiology_c")


STOP_LIMIT = 60  # s a stop may take before a process still running counts as left behind


BIN = Path(sys.executable).parent


def fedssl_command(*argv: object) -> list[str]:
    """The command line of this installation's `fedssl argv`."""
    return [str(BIN / "fedssl"), *map(str, argv)]


class Deployment:
    """The processes of one loopback deployment run with fedssl's commands; all carry
    `FEDSSL_FLOWER_RUN=<token>`. The coordinator's folder is `root/coordinator` (its
    coordinator.yaml names this deployment's port and the certificates in `certs/`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = uuid.uuid4().hex
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.coordinator = root / "coordinator"
        self.ca = self.coordinator / "certs" / "ca.crt"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.seen: set[int] = set()
        self.env = {
            **os.environ,
            TOKEN_VARIABLE: self.token,
            # for a raw Flower command (fedssl's commands set their own): offline, flower-superexec on PATH
            **OFFLINE_ENV,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(root / "flwr-home"),
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }
        self.env.pop("RAY_ADDRESS", None)

    def coordinator_file(self) -> Path:
        """`root/coordinator/coordinator.yaml`: the SuperLink on this deployment's loopback port."""
        path = self.coordinator / "coordinator.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"host: 127.0.0.1\nport: {self.port}\ncertificates: certs\n")
        return path

    def start(self, name: str, command: list[str], cwd: Path | None = None, **env: str) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(command, env={**self.env, **env}, cwd=cwd or self.root, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        self.seen.add(process.pid)
        return process

    def run(self, name: str, command: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a command to completion (killed by pid at the timeout); output in logs/<name>.log."""
        return self.finish(name, self.start(name, command, cwd), timeout)

    def finish(self, name: str, process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate(process, grace=5)
        return subprocess.CompletedProcess(process.args, process.returncode, self.log(name))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def watch(self) -> None:
        self.seen |= set(marked_processes(self.token))

    def start_coordinator(self, command: list[str], **env: str) -> subprocess.Popen:
        """`command` (a `fedssl coordinator`) in the coordinator's folder, once its SuperLink answers."""
        process = self.start("coordinator", command, cwd=self.coordinator, **env)
        wait_for(lambda: superlink_unavailable(self.superlink, self.ca, timeout=1) is None, "the SuperLink", 120,
                 [process])
        self.watch()
        return process

    def online(self) -> int:
        """How many SuperNodes the SuperLink counts online."""
        nodes = flwr(load_coordinator_file(self.coordinator / "coordinator.yaml"), "supernode", "ls",
                     environ=self.env)["nodes"]
        return sum(n["status"] == "online" for n in nodes)

    def stop(self) -> list[int]:
        """Stop every process by pid (the last started first: nodes before the coordinator); return survivors.

        Survivors are the processes still running after `STOP_LIMIT` s of stopping that carry
        the deployment's mark or that it started: not every pid in `seen`, which by then may be
        another user's process (pids are reused) or a killed process the kernel is still tearing
        down (slow on a loaded machine; its environment, and so its mark, is already gone).
        """
        self.watch()
        for process in reversed(self.processes):
            if process.poll() is None:
                terminate(process, grace=30)
        deadline = time.monotonic() + STOP_LIMIT
        while (left := self.running()) and time.monotonic() < deadline:
            self.seen |= set(left)
            stop_pids(left)
        return left

    def running(self) -> list[int]:
        """Pids of this deployment's processes that still run."""
        marked = {p for p in marked_processes(self.token) if pid_alive(p)}
        return sorted(marked | {p.pid for p in self.processes if p.poll() is None})


def hospital_records(home: Path, seed: int) -> None:
    """Six 10-s WFDB records in `home/records`, as a 12-lead cart writes them (`fedssl node` checks
    a site's records with the default 10-s windows before it starts)."""
    write_synthetic_site(home / "records", SyntheticSiteConfig(records=6, sample_rate=250 * (1 + seed % 3),
                                                               duration_seconds=10.0), seed=seed)


def write_site_file(home: Path, site: str, superlink: str, ca: Path, **changes) -> Path:
    """`home/site.yaml` of a hospital whose records, work and state folders and key are under
    `home` (`changes` replace or add values, e.g. a policy); its path."""
    values = {"site": site, "records": "records", "work": "work", "state": "state", "superlink": superlink,
              "ca_certificate": str(ca), "node_key": f"keys/{site}.key", "port": free_port(), **changes}
    (home / "site.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return home / "site.yaml"


# s between checks that run the flwr CLI (`Deployment.online`, `fedssl status`): each costs about a
# second of CPU, which the other test workers need more than the wait needs promptness
CLI_POLL = 3.0


def wait_for(condition: Callable[[], bool], what: str, limit: float, alive: Iterable[subprocess.Popen] = (),
             every: float = 0.5) -> float:
    """Seconds until `condition()` (checked every `every` s), while the `alive` processes run;
    `limit` s only guards against a hang."""
    started = time.monotonic()
    while not condition():
        for process in alive:
            assert process.poll() is None, f"{process.args[:3]} exited while waiting for {what}"
        assert time.monotonic() - started < limit, f"no {what} within {limit:.0f} s: hung"
        time.sleep(every)
    return time.monotonic() - started
