"""Deployment: key material (fast) and a real federation of separate processes on loopback.

The integration test starts one `flower-superlink` with TLS, SuperNode authentication and a
sqlite state database, registers three hospitals' public keys with `flwr supernode register`,
starts three `flower-supernode` processes (own key, own data folder, own state folder; the first
hospital's messages answered by its warm worker, `python -m client.worker`), checks
that a SuperNode with an unregistered key and a plaintext SuperNode are refused, and runs two
rounds of the hybrid objective with `flwr run`. Every process carries an environment marker and
is stopped by pid. Run it (like everything that starts Flower) under the shared lock:

    flock /tmp/fedssl-flower.lock .venv/bin/python -m pytest tests/test_deployment.py
"""

from __future__ import annotations

import math
import re
import sqlite3
import ssl
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import VerificationError

from client.worker import SOCKET_KEY
from fedssl.cli import main
from fedssl.runfolder import RunFolder
from ops.deploy import make_certificates, make_node_key, verify_server_certificate
from tests.conftest import CONNECTION, SITES, Deployment, flwr_json, hospitals


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
  bootstrap: 100  # replicates of the probe's interval: enough for one, and cheap
  local_baselines: false
sites:
{sites}
"""


# -- key material -------------------------------------------------------------------------------

def load_node_key(private_key: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load a node private key as flower-supernode does (OpenSSH, EC); raise ValueError otherwise."""
    key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{private_key}: not an EC private key")
    return key


def load_node_public_key(public_key: str | Path) -> ec.EllipticCurvePublicKey:
    """Load a node public key as `flwr supernode register` does (OpenSSH, NIST EC curve)."""
    key = serialization.load_ssh_public_key(Path(public_key).read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{public_key}: not an EC public key")
    if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ValueError(f"{public_key}: curve {key.curve.name} is not a NIST curve")
    return key


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
    assert main(["certs", str(tmp_path / "c"), "--host", "lead.example.org"]) == 0
    verify_server_certificate(tmp_path / "c" / "server.pem", tmp_path / "c" / "ca.crt", "lead.example.org")
    assert main(["node-key", str(tmp_path / "k"), "--site", "clinic_b"]) == 0
    load_node_key(tmp_path / "k" / "clinic_b.key")
    assert "flwr supernode register" in capsys.readouterr().out


# -- a real federation on loopback ----------------------------------------------------------------


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
        worker_socket = root / "hospitals" / SITES[0] / "worker.sock"
        d.start(f"worker-{SITES[0]}", [sys.executable, "-m", "client.worker", "--socket", str(worker_socket)])
        deadline = time.monotonic() + 120  # it listens before its imports: messages wait for them there
        while not worker_socket.exists():
            assert time.monotonic() < deadline, d.log(f"worker-{SITES[0]}")
            time.sleep(0.2)
        for site in SITES:  # each hospital its own Flower home, cache and state folder
            d.start_hospital(site, keys[site], root / "hospitals" / site, certs.ca_cert,
                             node_config=f"{SOCKET_KEY}='{worker_socket}'" if site == SITES[0] else "")

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


def test_two_rounds_over_tls_with_authenticated_sites(deployment):
    run_dir = deployment["run_dir"]
    assert deployment["flwr_run"].returncode == 0, deployment["flwr_run"].stdout[-3000:]
    assert "fedssl | done:" in deployment["flwr_run"].stdout
    rounds = RunFolder(run_dir).rounds()
    assert [r.round for r in rounds] == [1, 2]
    assert all(math.isfinite(r.losses["loss"]) and r.sites == 3 for r in rounds)
    for name in ("checkpoints/encoder_round_1.pt", "checkpoints/encoder_round_2.pt", "encoder.pt"):
        assert (run_dir / name).is_file()
    run = flwr_json(deployment["ls"])["runs"][0]
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


def test_the_first_hospital_answered_through_its_worker(deployment):
    worker_log = (deployment["root"] / "logs" / f"worker-{SITES[0]}.log").read_text()
    assert worker_log.count("fedssl | site worker: train message of run") == 2, worker_log[-3000:]
    node_log = (deployment["root"] / "logs" / f"supernode-{SITES[0]}.log").read_text()
    assert "no site worker at" not in node_log  # no message fell back to the per-message process


def test_registered_nodes_and_refused_connections(deployment):
    nodes = flwr_json(deployment["nodes"])["nodes"]
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
