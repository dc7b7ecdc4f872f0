"""Paths: nothing outside a run folder (or the given data folder) is written or removed, an existing
run folder is never cleared, and a run's processes are stopped even when they ignore SIGTERM.
No Flower process is started here."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fedssl.cli import main
from fedssl.config import ConfigError
from fedssl.runfolder import RunFolder, UnsafePathError, inside
from simulations.processes import TOKEN_VARIABLE, pid_alive
from simulations.run import LocalSimulation, prepare_run_folder
from tests.test_bad_scenarios import VALID, no_flower  # noqa: F401 - fixture

EARLIER_RUN = {  # what a finished run leaves, site state included
    "scenario.yaml": "name: old\n",
    "metrics.jsonl": '{"round": 1}\n',
    "encoder.pt": "weights",
    "summary.json": "{}",
    "report.md": "# report",
    "report_loss.png": "png",
    "checkpoints/encoder_round_1.pt": "weights",
    "sites/a/local_heads.pt": "heads",
    "sites/a/privacy_ledger.json": "{}",
    "data/cache/a/windows.npz": "cache",
}


def earlier_run(folder):
    for name, content in EARLIER_RUN.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    return folder


def files(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("base, parts", [
    ("/tmp/run", ("..", "x")),
    ("/tmp/run", ("/etc",)),
    ("/tmp/run", ("sites", "..", "..", "x")),
    ("/tmp/run/data/records", ("",)),  # a site folder that is the whole records folder
    ("/tmp/run/data/records", (".",)),
])
def test_inside_refuses_paths_outside_their_folder(base, parts):
    with pytest.raises(UnsafePathError, match="outside|refused"):
        inside(base, *parts)


def test_run_folder_names_its_files_inside_it(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.site("hospital_a") == tmp_path / "run" / "sites" / "hospital_a"
    assert {run.scenario.name, run.metrics.name, run.encoder.name, run.data.name, run.flower.name} == {
        "scenario.yaml", "metrics.jsonl", "encoder.pt", "data", "flower"}
    for bad in ("", "..", "a/b", "/tmp/x"):
        with pytest.raises(ConfigError, match="not a valid name"):
            run.site(bad)


def test_simulate_refuses_an_existing_run_folder_and_touches_nothing(tmp_path, capsys, no_flower):  # noqa: F811
    run = earlier_run(tmp_path / "run")
    before = files(run)
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(VALID))
    assert main(["simulate", str(scenario), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err, err
    assert files(run) == before  # sites/, checkpoints/, encoder.pt, report.md: all still there


def test_simulate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys, no_flower):  # noqa: F811
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / "flower").mkdir()  # a run would stage its app in flower/app
    (home / "flower" / "app").mkdir()
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(VALID))
    assert main(["simulate", str(scenario), "--out", str(home), "--overwrite"]) == 2
    assert "not empty and not a fedssl run folder (it holds thesis.tex)" in capsys.readouterr().err
    assert sorted(p.name for p in home.rglob("*")) == ["app", "flower", "thesis.tex"]


def test_overwrite_moves_the_earlier_results_aside_and_deletes_nothing(tmp_path):
    run = RunFolder(earlier_run(tmp_path / "run"))
    before = files(run.root)
    prepare_run_folder(run, resume=False, overwrite=True, echo=lambda line: None)
    (earlier,) = (run.root / "earlier").iterdir()
    after = files(run.root)
    moved = {name for name in before if not name.startswith(("data/", "scenario.yaml"))}
    assert {f"earlier/{earlier.name}/{name}": before[name] for name in moved}.items() <= after.items()
    assert not run.earlier_results()  # the new run starts without the old sites' heads or ledgers
    assert after["data/cache/a/windows.npz"] == "cache"  # data caches stay for reuse


@pytest.mark.parametrize("setup, flags, fragment", [
    (lambda p: p.write_text("a file"), {}, "is a file, not a folder"),
    (lambda p: None, {"resume": True}, "does not exist; nothing to continue"),
])
def test_other_run_folders_that_are_refused(tmp_path, setup, flags, fragment):
    target = tmp_path / "run"
    setup(target)
    with pytest.raises(ConfigError, match=fragment):
        prepare_run_folder(RunFolder(target), **{"resume": False, "overwrite": False, **flags}, echo=print)


def test_an_empty_or_data_only_folder_is_used_as_it_is(tmp_path):
    for folder in (tmp_path / "empty", tmp_path / "with-data"):
        folder.mkdir()
    (tmp_path / "with-data" / "data").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "with-data"):
        prepare_run_folder(RunFolder(folder), resume=False, overwrite=False, echo=print)


def test_stop_kills_a_run_process_that_ignores_sigterm(tmp_path):
    """Ray workers may ignore SIGTERM: stop() finds every process marked with the run's token and
    SIGKILLs what is left after the grace period."""
    simulation = LocalSimulation(tmp_path, echo=lambda line: None)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "print('ready', flush=True); time.sleep(120)"],
        env={**os.environ, TOKEN_VARIABLE: simulation.token}, stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on
        simulation.stop()
        deadline = time.monotonic() + 10
        while stubborn.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stubborn.returncode == -9  # SIGKILL
        assert not pid_alive(stubborn.pid)
    finally:
        if stubborn.poll() is None:
            stubborn.kill()


def test_pretrain_never_replaces_an_encoder(tmp_path, capsys):
    run = earlier_run(tmp_path / "run")
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(VALID))
    assert main(["pretrain", str(scenario), "--out", str(run)]) == 2
    assert "already holds an encoder.pt" in capsys.readouterr().err
    assert (run / "encoder.pt").read_text() == "weights"


def flower_processes(home) -> list[int]:
    """Live processes of a run: every one the runner starts has FLWR_HOME=<run>/flower."""
    needle = f"FLWR_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and pid_alive(int(entry.name)):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def ray_started(home) -> bool:
    for pid in flower_processes(home):
        try:
            if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_sigterm_mid_federation_stops_every_process_of_the_run(tmp_path):
    """A real federation (SuperLink, SuperExec, flwr-simulation, Ray) killed with SIGTERM once Ray
    runs: the runner exits 130 and leaves no process of the run behind."""
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump({**VALID, "federation": {"rounds": 50, "min_sites": 2}}))
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    runner = subprocess.Popen([sys.executable, "-m", "simulations", str(scenario), "--out", str(run)],
                              cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in runner.stdout], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 400, []
        while not ray_started(run / "flower") and not any("round 1/50" in line for line in seen):
            assert time.monotonic() < deadline and runner.poll() is None, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert flower_processes(run / "flower")  # the federation is running
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=120) == 130
        assert flower_processes(run / "flower") == []
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in flower_processes(run / "flower"):
            os.kill(pid, signal.SIGKILL)


def test_a_data_folder_linked_by_the_user_is_followed(tmp_path):
    """Benchmarks share one data folder between run folders through a symlink."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "data").symlink_to(tmp_path / "shared", target_is_directory=True)
    run = RunFolder(tmp_path / "run")
    assert run.data == tmp_path / "run" / "data" and run.data.resolve() == tmp_path / "shared"
    prepare_run_folder(run, resume=False, overwrite=False, echo=print)
