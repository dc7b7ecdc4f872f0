"""Deployment: key material (fast), the refusals of `fedssl node` and `fedssl launch` (fast), and a
real federation of separate processes on loopback run with the commands of docs/deployment.md.

The integration test runs the runbook. The coordinator: `fedssl certs`, `fedssl coordinator`
(SuperLink with TLS, SuperNode authentication and its state database, from coordinator.yaml),
`fedssl register` of three hospitals' keys, `fedssl launch` of two rounds of the hybrid objective
(`min_sites: 2`), `fedssl status`. Each hospital: `fedssl node-key`, its own site.yaml (records,
work and state folders; no scenario file) and `fedssl node site.yaml`; cardiology_c's policy
accepts only simclr, so it declines every round with its reason and the run goes on with the
other two. Alongside: a node whose key was never registered (`fedssl node` exits saying so), a
plaintext SuperNode (refused by the TLS SuperLink), a launch with `--resume` and nothing to resume,
and the approval of a plan waiting at a site (`fedssl node approve`). After the run one node is
killed (SIGKILL to its whole process group, as a machine that dies) and `fedssl status` is asked
until it shows the node offline; the others are stopped with SIGTERM, as systemd stops them.

Every `fedssl` command the module runs is recorded (`RAN`); the last test checks that every
`fedssl` command line of the runbook's bash blocks was run (subcommand and option names). Every
process carries an environment marker and is stopped by pid. Run it (like everything that starts
Flower) under the shared lock:

    flock /tmp/fedssl-flower.lock .venv/bin/python -m pytest tests/test_deployment.py
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import VerificationError

from client.approval import is_approved, request_approval
from client.audit import read_audit
from fedssl.cli import main
from fedssl.config import load_scenario
from fedssl.plan import Plan
from fedssl.runfolder import RunFolder
from ops.coordinator import StreamFilter
from ops.deploy import make_certificates, make_node_key, verify_server_certificate
from ops.processes import free_port
from tests.conftest import (BIN, CLI_POLL, SITES, Deployment, fedssl_command, hospital_records, wait_for,
                            write_site_file)

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "deployment.md"
DECLINING = SITES[2]  # cardiology_c: its policy accepts simclr only
TRAINING = tuple(site for site in SITES if site != DECLINING)
KILLED = DECLINING  # and its machine dies after its last reply
OFFLINE_LIMIT = 150  # s; Flower marks a node offline 2 heartbeats (30 s each) after its last one

SCENARIO = """
name: deployment-test
seed: 1
data: {window_seconds: 2.0}
model: {size: tiny}
objective: {name: hybrid}
train: {batch_size: 8, local_steps: 2, threads: 1}
federation: {rounds: 2, min_sites: 2}
evaluation:
  synthetic: {records: 24, sample_rate: 250, duration_seconds: 4.0}
  every_round: false
  bootstrap: 100  # replicates of the probe's interval: enough for one, and cheap
  local_baselines: false
sites:  # each hospital's records are where its site file says, on its machine
  - {name: hospital_a, folder: at-the-hospital}
  - {name: clinic_b, folder: at-the-hospital}
  - {name: cardiology_c, folder: at-the-hospital}
"""

RAN: list[list[str]] = []  # the arguments of every `fedssl` command this module ran


def fedssl(*argv: object) -> list[str]:
    """The command line of `fedssl argv` (recorded: the runbook check below)."""
    RAN.append([str(a) for a in argv])
    return fedssl_command(*argv)


def fedssl_here(*argv: object) -> int:
    """`fedssl argv` in this process (recorded); its exit code."""
    RAN.append([str(a) for a in argv])
    return main(RAN[-1])


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


def test_key_fingerprint_is_the_one_ssh_keygen_prints(tmp_path, capsys):
    assert fedssl_here("node-key", tmp_path, "--site", "clinic_b") == 0
    out = capsys.readouterr().out
    load_node_key(tmp_path / "clinic_b.key")
    listed = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "clinic_b.key.pub")], capture_output=True,
                            text=True, check=True).stdout.split()[1]
    assert listed.startswith("SHA256:") and listed in out  # what the coordinator reads out over the phone


# -- refusals in seconds, before any process starts ---------------------------------------------------

@pytest.fixture
def hospital(tmp_path):
    """A hospital's folder with records, a key, the coordinator's CA, and a site file for them."""
    certs = make_certificates(tmp_path / "certs")
    make_node_key(tmp_path / "keys", "hospital_a")
    hospital_records(tmp_path, seed=0)
    return tmp_path, certs, write_site_file(tmp_path, "hospital_a", f"127.0.0.1:{free_port()}", certs.ca_cert)


@pytest.mark.parametrize("problem, expected", [
    ("no CA", "ca_certificate: required"),
    ("key readable by others", "can be read by others (mode 644): chmod 600"),
    ("server certificate as CA", "is not a CA certificate: give the coordinator's ca.crt"),
    ("no records", "no .hea header"),
    ("no such superlink host", "is neither an IP address nor a host name"),
])
def test_node_refuses_what_would_not_work_in_one_line(hospital, capsys, problem, expected):
    home, certs, path = hospital
    values = yaml.safe_load(path.read_text())
    if problem == "no CA":
        del values["ca_certificate"]
    elif problem == "key readable by others":
        os.chmod(home / "keys" / "hospital_a.key", 0o644)
    elif problem == "server certificate as CA":
        values["ca_certificate"] = str(certs.server_cert)
    elif problem == "no records":
        values["records"] = str(home / "keys")
    else:
        values["superlink"] = "bad_host!:9091"
    path.write_text(yaml.safe_dump(values))
    started = time.monotonic()
    assert fedssl_here("node", path) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl node: ") and expected in err and err.count("\n") == 1, err
    assert time.monotonic() - started < 30
    assert expected.split(":")[0] in (home / "state" / "node.log").read_text()  # the site's log says it too


def test_coordinator_commands_refuse_what_would_not_work_in_seconds(tmp_path, capsys):
    scenario, coordinator = tmp_path / "scenario.yaml", tmp_path / "coordinator.yaml"
    scenario.write_text(SCENARIO)
    coordinator.write_text("certificates: certs\nserver_key: other.key\n")
    assert fedssl_here("launch", scenario, "--coordinator", coordinator) == 2
    assert "give either `certificates`" in capsys.readouterr().err
    coordinator.write_text("certificates: certs\n")
    assert fedssl_here("status", "--coordinator", coordinator) == 2
    assert "ca.crt does not exist; make it with `fedssl certs`" in capsys.readouterr().err
    make_certificates(tmp_path / "certs")
    coordinator.write_text(f"certificates: certs\nport: {free_port()}\n")
    started = time.monotonic()
    assert fedssl_here("status", "--coordinator", coordinator) == 2  # no SuperLink there
    assert "does not answer (Connection refused): is `fedssl coordinator` running?" in capsys.readouterr().err
    assert time.monotonic() - started < 30  # Flower's CLI alone would retry for a minute
    assert fedssl_here("launch", scenario, "--coordinator", coordinator, "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl launch: --resume:") and "holds no checkpoint" in err
    assert not (tmp_path / "app").exists()  # refused before anything was staged or submitted
    make_certificates(tmp_path / "other")  # a SuperLink certificate of another CA
    coordinator.write_text("ca_certificate: certs/ca.crt\nserver_certificate: other/server.pem\n"
                           "server_key: other/server.key\n")
    assert fedssl_here("coordinator", coordinator) == 2
    assert "does not verify with" in capsys.readouterr().err
    coordinator.write_text(f"certificates: certs\nport: {free_port()}\n")
    (tmp_path / "rsa.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ fedssl-x\n")
    assert fedssl_here("register", tmp_path / "rsa.pub", "--site", "x", "--coordinator", coordinator) == 2
    assert "is not an OpenSSH public key" in capsys.readouterr().err


def test_launch_shows_the_serverapps_lines_and_the_exception_that_ended_a_run():
    shown: list[str] = []
    stream = StreamFilter(shown.append)
    for line in ["INFO :      [ROUND 1/2]", "\x1b[92mINFO \x1b[0m:      fedssl | round 1/2 | loss 2.69",
                 "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception", "Traceback (most recent call last):",
                 '  File "server/presence.py", line 163, in get_node_ids', "    raise SitesMissing(...)",
                 "server.presence.SitesMissing: only 2 of the 3 sites needed", "INFO :      Run finished"]:
        stream(line + "\n")
    assert shown == ["fedssl | round 1/2 | loss 2.69", "ERROR :     ServerApp raised an exception",
                     "server.presence.SitesMissing: only 2 of the 3 sites needed"]


# -- a real federation on loopback ----------------------------------------------------------------

def site_row(status: str, site: str) -> str:
    """The line of `fedssl status`'s sites table that names `site` ('' if none)."""
    return next((line for line in status.splitlines() if re.search(rf"│ {site}\s+│", line)), "")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    started = time.monotonic()
    d = Deployment(root)
    coordinator = d.coordinator
    assert fedssl_here("certs", coordinator / "certs", "--host", "localhost") == 0
    d.coordinator_file()
    (coordinator / "scenario.yaml").write_text(SCENARIO)
    homes = {site: root / "hospitals" / site for site in (*SITES, "rogue", "approver")}
    for seed, (site, home) in enumerate(homes.items()):
        assert fedssl_here("node-key", home / "keys", "--site", site) == 0
        hospital_records(home, seed)
        # the sites that train answer through their warm workers (the default), the others in each
        # message's own process; cardiology_c's policy accepts simclr only
        changes = {} if site in TRAINING else {"worker": False}
        if site == DECLINING:
            changes["policy"] = {"objectives": ["simclr"]}
        write_site_file(home, site, d.superlink, d.ca, **changes)
    out: dict = {"root": root, "homes": homes, "coordinator": coordinator,
                 "run_dir": coordinator / "runs" / "deployment-test"}
    try:
        d.start_coordinator(fedssl("coordinator", "coordinator.yaml"))

        # refused alongside the run: a key the coordinator never registered, a plaintext SuperNode
        refused = {"rogue": d.start("rogue", fedssl("node", homes["rogue"] / "site.yaml"), cwd=homes["rogue"]),
                   "plaintext": d.start("plaintext", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                                      d.superlink, "--max-retries", "2", "--max-wait-time", "20",
                                                      "--host", "127.0.0.1", "--port", str(free_port())],
                                        FLWR_HOME=str(homes["rogue"] / "plaintext-flwr-home"))}
        registering = {site: d.start(f"register-{site}", fedssl("register", f"../hospitals/{site}/keys/{site}.key.pub",
                                                                 "--site", site), cwd=coordinator) for site in SITES}
        out["register"] = {site: d.finish(f"register-{site}", p, timeout=120) for site, p in registering.items()}
        nodes = {site: d.start(f"node-{site}", fedssl("node", "site.yaml"), cwd=homes[site]) for site in SITES}
        # a resume with nothing to resume is refused at once, while the nodes start
        out["resume"] = d.run("resume", fedssl("launch", "scenario.yaml", "--resume"), timeout=120, cwd=coordinator)
        wait_for(lambda: d.online() == 3, "3 nodes online", 180, nodes.values(), every=CLI_POLL)

        launch = d.start("launch", fedssl("launch", "scenario.yaml"), cwd=coordinator)
        # meanwhile: the federation as the coordinator sees it once the ServerApp runs, and at a site
        # that approves plans by hand, a plan that waits, is listed and is approved
        wait_for(lambda: "fedssl | scenario" in d.log("launch"), "the ServerApp", 400, [launch])
        out["status"] = d.run("status", fedssl("status"), timeout=120, cwd=coordinator)
        plan = Plan.of(load_scenario(coordinator / "scenario.yaml"))
        request_approval(homes["approver"] / "state", plan.fingerprint, plan.values)
        out["plan"] = plan
        out["pending"] = d.run("pending", fedssl("node", "approve", "site.yaml"), timeout=60, cwd=homes["approver"])
        out["approve"] = d.run("approve", fedssl("node", "approve", "site.yaml", plan.short), timeout=60,
                               cwd=homes["approver"])
        # the declining hospital's machine dies once its reply to round 2 is sent (its node, SuperNode
        # and app processes at once), so Flower's wait for its heartbeats overlaps the rest of the run
        wait_for(lambda: d.log(f"node-{KILLED}").count("Sent successfully") == 2, f"{KILLED}'s second reply", 400,
                 [launch, nodes[KILLED]])
        os.killpg(nodes[KILLED].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out["launch"] = d.finish("launch", launch, timeout=400)
        d.watch()
        out["audit"] = d.run("audit", fedssl("node", "audit", "site.yaml"), timeout=60, cwd=homes[SITES[0]])
        polls = iter(range(1000))

        def shows_offline() -> bool:
            status = d.run(f"status-{next(polls)}", fedssl("status", "runs/deployment-test"), timeout=120,
                           cwd=coordinator).stdout
            out["status_after_kill"] = status
            return "offline" in site_row(status, KILLED)

        wait_for(shows_offline, f"{KILLED} offline in `fedssl status`", OFFLINE_LIMIT, every=CLI_POLL)
        out["offline_after"] = time.monotonic() - killed_at
        out["refused"] = {name: d.finish(name, process, timeout=60) for name, process in refused.items()}
    finally:
        out["survivors"] = d.stop()
        out["node_logs"] = {site: d.log(f"node-{site}") for site in SITES if (d.logs / f"node-{site}.log").exists()}
        out["seen"] = sorted(d.seen)
        out["seconds"] = time.monotonic() - started
        print(f"deployment test: {out['seconds']:.0f} s, {len(d.seen)} processes; "
              f"`fedssl status` showed the killed node offline after {out.get('offline_after', math.nan):.0f} s")
    return out


def test_launched_run_completes_with_the_sites_that_accept_its_plan(deployment):
    launch = deployment["launch"]
    assert launch.returncode == 0, launch.stdout[-3000:]
    lines = launch.stdout.splitlines()
    assert all(line.startswith("fedssl | ") for line in lines), lines  # only the ServerApp's own lines
    assert re.search(r"fedssl \| run \d+: finished:completed", launch.stdout)
    rounds = RunFolder(deployment["run_dir"]).rounds()
    assert [r.round for r in rounds] == [1, 2]
    assert all(math.isfinite(r.losses["loss"]) and sorted(r.site_windows) == sorted(TRAINING) for r in rounds)
    assert (deployment["run_dir"] / "encoder.pt").is_file()


def test_a_site_whose_policy_forbids_the_plan_declines_with_its_reason(deployment):
    reason = "objective hybrid is not accepted (policy.objectives: simclr)"
    for record in RunFolder(deployment["run_dir"]).rounds():
        assert [(d["site"], d["reason"]) for d in record.declined] == [(DECLINING, reason)], record.declined
    assert reason in deployment["launch"].stdout
    audit = read_audit(deployment["homes"][DECLINING] / "state")
    assert {(e["outcome"], e["reason"], e["sent"]) for e in audit if e["message"] == "train"} == {("declined", reason, None)}


def test_each_sites_audit_log_holds_the_hash_the_coordinator_received(deployment):
    rounds = {r.round: r for r in RunFolder(deployment["run_dir"]).rounds()}
    for site in TRAINING:
        sent = {e["round"]: e["sent"]["sha256"] for e in read_audit(deployment["homes"][site] / "state")
                if e["message"] == "train" and e["outcome"] == "trained"}
        assert sent == {r: record.received[site] for r, record in rounds.items()}, site
    audit = deployment["audit"]
    assert audit.returncode == 0 and "audit log of hospital_a" in audit.stdout
    for record in rounds.values():  # `fedssl node audit` shows each round's hash
        assert record.received["hospital_a"][:12] in audit.stdout


def test_hospitals_keep_their_data_and_state_and_read_no_scenario(deployment):
    for site in SITES:
        home = deployment["homes"][site]
        assert (home / "state" / "audit.jsonl").is_file() and (home / "state" / "node.log").is_file()
        assert not list(home.rglob("scenario.yaml"))  # the plan came with the messages
    assert not (deployment["run_dir"] / "sites").exists()  # nothing site-local at the coordinator
    log = (deployment["homes"][SITES[0]] / "state" / "node.log").read_text()
    assert "fedssl node | data: " in log and "certificate verifies" in log


def test_status_lists_the_sites_and_shows_a_killed_node_offline(deployment):
    status = deployment["status"]  # during the run
    assert status.returncode == 0, status.stdout
    for site in SITES:
        assert re.search(r"│ \d+ +│ online", site_row(status.stdout, site)), status.stdout
    assert re.search(r"│ running +│ [01]/2 ", status.stdout), status.stdout
    after = deployment["status_after_kill"]  # the run over, one machine dead
    assert "offline" in site_row(after, KILLED)
    assert all("online" in site_row(after, site) for site in SITES if site != KILLED), after
    assert "objective hybrid is not accepted" in site_row(after, DECLINING)
    assert re.search(r"│ finished:completed │ 2/2 +│ \d\.\d{3} \[", after), after  # with the last probe AUROC
    assert deployment["offline_after"] < OFFLINE_LIMIT


def test_unregistered_key_plaintext_node_and_resume_without_checkpoint_are_refused(deployment):
    rogue, plaintext = deployment["refused"]["rogue"], deployment["refused"]["plaintext"]
    assert rogue.returncode not in (0, None), rogue.stdout[-2000:]
    assert "key not registered: ask the coordinator to run `fedssl register rogue.key.pub --site rogue`" in rogue.stdout
    # it gave up by itself (not stopped by the test) and never got a node id
    assert plaintext.returncode > 0 and "SuperNode ID" not in plaintext.stdout, plaintext.stdout[-2000:]
    resume = deployment["resume"]
    assert resume.returncode == 2 and "--resume" in resume.stdout and "holds no checkpoint" in resume.stdout


def test_registrations_name_the_sites(deployment):
    for site, result in deployment["register"].items():
        assert result.returncode == 0 and re.search(rf"registered {site} as node \d+ \(key SHA256:", result.stdout)
    node_ids = {re.search(r"as node (\d+)", r.stdout).group(1) for r in deployment["register"].values()}
    assert len(node_ids) == len(SITES)


def test_a_plan_waiting_for_approval_is_listed_and_approved(deployment):
    plan, homes = deployment["plan"], deployment["homes"]
    pending = deployment["pending"].stdout
    assert plan.fingerprint in pending and "objective hybrid, encoder" in pending and "2 rounds of 2 local steps" in pending
    assert f"approved plan {plan.fingerprint}" in deployment["approve"].stdout
    assert is_approved(homes["approver"] / "state", plan.fingerprint)


def test_the_training_sites_answer_through_their_warm_workers(deployment):
    for site in TRAINING:
        log = deployment["node_logs"][site]
        assert "worker | " in log and len(re.findall(r"site worker: train message of run \d+ answered", log)) == 2, site
        assert "answering the train message in this process" not in log, site


def test_nodes_stop_cleanly_and_leave_no_process(deployment):
    for site, log in deployment["node_logs"].items():
        assert site == KILLED or "fedssl node | stopped" in log, log[-2000:]
    assert deployment["survivors"] == []


def normalised(argv: list[str]) -> tuple[str, ...]:
    """A `fedssl` command as the runbook check compares it: subcommand (with `node`'s action) and
    option names, not their values or the positional arguments."""
    command = argv[:2] if argv[0] == "node" and argv[1:2] in (["approve"], ["audit"]) else argv[:1]
    return (*command, *sorted({a.split("=")[0] for a in argv if a.startswith("--")}))


def runbook_commands() -> list[list[str]]:
    """Every `fedssl` command line of the runbook's ```bash blocks (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", RUNBOOK.read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.strip().startswith("fedssl ")]


def test_every_fedssl_command_of_the_runbook_was_run(deployment):
    documented = runbook_commands()
    assert len(documented) >= 10, documented
    ran = {normalised(argv) for argv in RAN}
    missing = [" ".join(argv) for argv in documented if normalised(argv) not in ran]
    assert missing == [], f"runbook commands no test ran: {missing}"
