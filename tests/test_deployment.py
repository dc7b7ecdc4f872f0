"""Deployment: key material (fast) and a real federation of separate processes on loopback.

The integration test starts one `flower-superlink` with TLS, SuperNode authentication and a
sqlite state database, registers three hospitals' public keys with `flwr supernode register`,
starts three `flower-supernode` processes (own key, own data folder, own state folder), checks
that a SuperNode with an unregistered key and a plaintext SuperNode are refused, and runs two
rounds of the hybrid objective with `flwr run`. Every process carries an environment marker and
is stopped by pid. Run it (like everything that starts Flower) under the shared lock:

    flock /tmp/fedssl-flower.lock .venv/bin/python -m pytest tests/test_deployment.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from cryptography.x509.verification import VerificationError

from fedssl.config import SyntheticSiteConfig
from fedssl.data.synthetic import write_synthetic_site
from fedssl.deploy import (Certificates, NodeKey, load_node_key, load_node_public_key, make_certificates,
                           make_node_key, register, verify_server_certificate)
from simulations.processes import TOKEN_VARIABLE, free_port, marked_processes, pid_alive, stop_pids, terminate
from simulations.run import stage_app

SITES = ("hospital_a", "clinic_b", "cardiology_c")
CONNECTION = "fedssl-deploy"
STOP_LIMIT = 60  # s a stop may take before a process still running counts as left behind
BIN = Path(sys.executable).parent

SCENARIO = """
name: deployment-test
seed: 1
data: {{window_seconds: 2.0}}
model: {{size: tiny}}
objective: {{name: hybrid}}
train: {{batch_size: 8, local_steps: 2, threads: 1}}
federation: {{rounds: 2, min_sites: 3}}
evaluation:
  synthetic: {{records: 24, sample_rate: 250, duration_seconds: 4.0}}
  every_round: false
  local_baselines: false
sites:
{sites}
"""


# -- key material -------------------------------------------------------------------------------

def test_certificate_chain_verifies_for_loopback_only(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    for host in ("127.0.0.1", "localhost"):
        verify_server_certificate(certs.server_cert, certs.ca_cert, host)
    with pytest.raises(VerificationError):
        verify_server_certificate(certs.server_cert, certs.ca_cert, "10.1.2.3")
    other = make_certificates(tmp_path / "other")
    with pytest.raises(VerificationError):  # signed by a different CA
        verify_server_certificate(certs.server_cert, other.ca_cert)
    assert (certs.ca_key.stat().st_mode & 0o777) == 0o600 == (certs.server_key.stat().st_mode & 0o777)
    with pytest.raises(FileExistsError):
        make_certificates(tmp_path / "certs")
    # the TLS stack Flower's SuperLink uses accepts the pair
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certs.server_cert, certs.server_key)


def test_extra_host_in_certificate(tmp_path):
    certs = make_certificates(tmp_path, ["127.0.0.1", "localhost", "superlink.example.org", "10.0.0.5"])
    verify_server_certificate(certs.server_cert, certs.ca_cert, "superlink.example.org")
    verify_server_certificate(certs.server_cert, certs.ca_cert, "10.0.0.5")


def test_node_key_loads_as_flower_expects(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key = make_node_key(tmp_path, "hospital_a")
    private = load_node_key(key.private_key)
    public = load_node_public_key(key.public_key)
    assert private.curve.name == "secp384r1" and (key.private_key.stat().st_mode & 0o777) == 0o600
    assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    # exactly what `flwr supernode register` sends, derived from what the SuperNode loads
    assert try_load_public_key(key.public_key) == public_key_to_bytes(private.public_key())
    assert public_key_to_bytes(public) == public_key_to_bytes(private.public_key())
    with pytest.raises(FileExistsError):
        make_node_key(tmp_path, "hospital_a")
    with pytest.raises(ValueError):
        make_node_key(tmp_path, "../escape")


def test_cli_subcommands(tmp_path, capsys):
    top = argparse.ArgumentParser(prog="fedssl")
    register(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(["certs", str(tmp_path / "c"), "--host", "lead.example.org"])
    args.run(args)
    verify_server_certificate(tmp_path / "c" / "server.pem", tmp_path / "c" / "ca.crt", "lead.example.org")
    args = top.parse_args(["node-key", str(tmp_path / "k"), "--site", "clinic_b"])
    args.run(args)
    load_node_key(tmp_path / "k" / "clinic_b.key")
    assert "flwr supernode register" in capsys.readouterr().out


# -- a real federation on loopback ----------------------------------------------------------------

class Deployment:
    """The processes of one loopback deployment; all carry `FEDSSL_FLOWER_RUN=<token>`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = uuid.uuid4().hex
        self.port = free_port()
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.seen: set[int] = set()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperExec is found via PATH
            "FLWR_HOME": str(root / "flwr-home"),
            TOKEN_VARIABLE: self.token,
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }
        self.env.pop("RAY_ADDRESS", None)

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

    def flwr(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(name, [str(BIN / "flwr"), *args], timeout)

    def watch(self) -> None:
        self.seen |= set(marked_processes(self.token))

    def configure_cli(self, ca_cert: Path) -> None:
        """The `flwr` CLI's connection (FLWR_HOME/config.toml) to this deployment's SuperLink."""
        (self.root / "flwr-home").mkdir(exist_ok=True)
        (self.root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{ca_cert}"\n')

    def start_superlink(self, certs: Certificates, database: Path, **env: str) -> subprocess.Popen:
        """`flower-superlink` with TLS, node authentication and a state database; waits until healthy."""
        superlink = self.start("superlink", [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(certs.ca_cert),
            "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key),
            "--enable-supernode-auth",
            "--database", str(database),
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
        ], cwd=database.parent, **env)
        deadline = time.monotonic() + 60
        while not _healthy(self.port, certs.ca_cert):
            assert superlink.poll() is None, self.log("superlink")
            assert time.monotonic() < deadline, "SuperLink not healthy within 60 s\n" + self.log("superlink")
            time.sleep(0.3)
        self.watch()
        return superlink

    def register(self, site: str, key: NodeKey) -> int:
        """`flwr supernode register <site>.key.pub --name <site>`; the node id."""
        result = self.flwr(f"register-{site}", "supernode", "register", str(key.public_key), CONNECTION,
                           "--name", site, "--format", "json")
        assert result.returncode == 0, result.stdout
        return int(_json(result)["node-id"])

    def supernode(self, *extra: str, key: Path | None, site: str, cwd: Path, node_config: str = "") -> list[str]:
        """A `flower-supernode` command for `site`, with its window cache and state under `cwd`."""
        command = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                   "--port", str(free_port()), "--host", "127.0.0.1", *extra, "--node-config",
                   f"site='{site}' data-folder='{cwd / 'cache'}' state-folder='{cwd / 'state'}' {node_config}".strip()]
        return command + (["--auth-supernode-private-key", str(key)] if key else [])

    def start_hospital(self, site: str, key: NodeKey, home: Path, ca_cert: Path, node_config: str = "",
                       **env: str) -> subprocess.Popen:
        """The SuperNode of the hospital at `home` (its own FLWR_HOME, cache and state folder)."""
        command = self.supernode("--root-certificates", str(ca_cert), key=key.private_key, site=site, cwd=home,
                                 node_config=node_config)
        return self.start(f"supernode-{site}", command, cwd=home, FLWR_HOME=str(home / "flwr-home"), **env)

    def submit(self, name: str, run_config: dict) -> subprocess.Popen:
        """Start `flwr run --stream` of a staged copy of the app with `run_config` (logs/<name>.log)."""
        app = self.root / "coordinator" / "app"
        if not app.exists():
            stage_app(app)
        overrides = self.root / "coordinator" / f"{name}.toml"
        overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
        return self.start(name, [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream",
                                 "--run-config", str(overrides)])

    def flwr_run(self, name: str, run_config: dict, timeout: float) -> subprocess.CompletedProcess:
        """`flwr run` to its end (killed at `timeout`)."""
        return self.finish(name, self.submit(name, run_config), timeout)

    def stop(self) -> list[int]:
        """Stop every process by pid (SuperNodes first, then the SuperLink); return survivors.

        Survivors are the processes still running after `STOP_LIMIT` s of stopping that carry
        the deployment's mark or that it started: not every pid in `seen`, which by then may be
        another user's process (pids are reused) or a killed process the kernel is still tearing
        down (slow on a loaded machine; its environment, and so its mark, is already gone).
        """
        self.watch()
        for process in reversed(self.processes):
            if process.poll() is None:
                terminate(process, grace=15)
        deadline = time.monotonic() + STOP_LIMIT
        while (left := self.running()) and time.monotonic() < deadline:
            self.seen |= set(left)
            stop_pids(left)
        return left

    def running(self) -> list[int]:
        """Pids of this deployment's processes that still run."""
        marked = {p for p in marked_processes(self.token) if pid_alive(p)}
        return sorted(marked | {p.pid for p in self.processes if p.poll() is None})


def hospitals(root: Path, scenario_text: str) -> tuple[dict[str, NodeKey], Path]:
    """Each site's key pair and WFDB folder under root/hospitals/<site>; the scenario naming them."""
    keys, sites = {}, []
    for index, site in enumerate(SITES):
        home = root / "hospitals" / site
        keys[site] = make_node_key(home / "keys", site)
        write_synthetic_site(home / "records", SyntheticSiteConfig(records=6, sample_rate=250 * (index + 1),
                                                                   duration_seconds=4.0), seed=index)
        sites.append(f"  - name: {site}\n    folder: {home / 'records'}")
    scenario_path = root / "coordinator" / "scenario.yaml"
    scenario_path.parent.mkdir(parents=True, exist_ok=True)
    scenario_path.write_text(scenario_text.format(sites="\n".join(sites)))
    return keys, scenario_path


def _healthy(port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(f"https://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    started = time.monotonic()

    # coordinator: CA + SuperLink certificate; hospitals: key pairs and WFDB folders
    certs = make_certificates(root / "coordinator" / "certs")
    keys, scenario_path = hospitals(root, SCENARIO)
    rogue = make_node_key(root / "rogue", "rogue")
    run_dir = root / "coordinator" / "run"

    d = Deployment(root)
    d.configure_cli(certs.ca_cert)
    outcome: dict = {"root": root, "run_dir": run_dir, "scenario": scenario_path, "database": root / "coordinator" / "state.db"}
    try:
        d.start_superlink(certs, outcome["database"])
        supernode = d.supernode

        # refused (checked after the run; they run alongside it): a key the coordinator never
        # registered, and a plaintext connection to the TLS SuperLink
        refused = {
            "rogue": d.start("rogue", supernode("--root-certificates", str(certs.ca_cert), "--max-retries", "2",
                                                "--max-wait-time", "20", key=rogue.private_key, site=SITES[0],
                                                cwd=root / "rogue"), FLWR_HOME=str(root / "rogue" / "flwr-home")),
            "plaintext": d.start("plaintext", supernode("--insecure", "--max-retries", "2", "--max-wait-time", "20",
                                                        key=None, site=SITES[0], cwd=root / "rogue"),
                                 FLWR_HOME=str(root / "rogue" / "flwr-home")),
        }

        outcome["registered"] = {site: d.register(site, keys[site]) for site in SITES}
        for site in SITES:  # each hospital its own Flower home, cache and state folder
            d.start_hospital(site, keys[site], root / "hospitals" / site, certs.ca_cert)

        outcome["flwr_run"] = d.flwr_run("flwr-run", {"scenario": str(scenario_path), "run-dir": str(run_dir)},
                                         timeout=300)
        d.watch()
        match = re.search(r"Successfully started run (\d+)", outcome["flwr_run"].stdout)
        assert match, outcome["flwr_run"].stdout[-3000:]
        run_id = match.group(1)
        outcome["ls"] = d.flwr("ls", "ls", CONNECTION, "--run-id", run_id, "--format", "json")
        outcome["nodes"] = d.flwr("nodes", "supernode", "ls", CONNECTION, "--format", "json")
        outcome["log"] = d.flwr("log", "log", run_id, CONNECTION, "--show")
        for name, process in refused.items():
            outcome[name] = d.finish(name, process, timeout=30)
    finally:
        outcome["survivors"] = d.stop()
        outcome["seen"] = sorted(d.seen)
        outcome["seconds"] = time.monotonic() - started
        print(f"deployment test: {outcome['seconds']:.0f} s, {len(d.seen)} processes")
    return outcome


def _json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_two_rounds_over_tls_with_authenticated_sites(deployment):
    run_dir = deployment["run_dir"]
    assert deployment["flwr_run"].returncode == 0, deployment["flwr_run"].stdout[-3000:]
    assert "fedssl | done:" in deployment["flwr_run"].stdout
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["sites"] == 3 for r in rounds)
    for name in ("checkpoints/encoder_round_1.pt", "checkpoints/encoder_round_2.pt", "encoder.pt"):
        assert (run_dir / name).is_file()
    run = _json(deployment["ls"])["runs"][0]
    assert run["status"] == "finished:completed", run
    assert "fedssl | done:" in deployment["log"].stdout  # `flwr log --show` replays the ServerApp log


def test_sites_keep_their_state_and_data_locally(deployment):
    root = deployment["root"]
    for site in SITES:
        home = root / "hospitals" / site
        assert any((home / "state").iterdir()), f"{site}: no local heads in its state folder"
        assert (home / "cache").is_dir()
    assert not (deployment["run_dir"] / "sites").exists()  # nothing site-local at the coordinator
    assert deployment["database"].is_file()


def test_registered_nodes_and_refused_connections(deployment):
    nodes = _json(deployment["nodes"])["nodes"]
    assert {int(n["node-id"]) for n in nodes} == {int(i) for i in deployment["registered"].values()}, nodes
    assert {n["status"] for n in nodes} == {"online"}, nodes
    # `--name` is kept in the state database; the ServerApp sees it in grid.get_nodes() (server/presence.py)
    with sqlite3.connect(deployment["database"]) as db:
        assert sorted(name for (name,) in db.execute("SELECT name FROM node")) == sorted(SITES)
    rogue, plaintext = deployment["rogue"], deployment["plaintext"]
    assert rogue.returncode not in (0, None) and "Failed to activate SuperNode" in rogue.stdout, rogue.stdout[-2000:]
    assert plaintext.returncode not in (0, None) and "SuperNode ID" not in plaintext.stdout, plaintext.stdout[-2000:]


def test_no_process_left(deployment):
    assert len(deployment["seen"]) >= 5  # SuperLink, 3 SuperNodes, SuperExecs, app processes, CLI
    assert deployment["survivors"] == []
