"""`fedssl dashboard`: the JSON it serves from run folders written here, its access rules, and the
page itself in a real headless Chromium following a run that the test writes round by round."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from dashboard.app import COOKIE, create_app
from dashboard.view import run_view
from fedssl.cli import main
from fedssl.config import FederationConfig, PrivacyConfig, SiteConfig, save_scenario
from server.presence import PresenceFile
from tests.conftest import two_site_scenario

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUDGET_REASON = "declined: this round would take the site past its privacy budget"


def scenario(rounds: int = 4, central_dp: str = "none"):
    """Sites a (DP-SGD, target epsilon 4 per patient), b and c (no DP)."""
    base = two_site_scenario("hybrid", records=4)
    a, b = base.sites
    return dataclasses.replace(
        base, name="dash-test", federation=FederationConfig(rounds=rounds, min_sites=2, strategy="fedavg", central_dp=central_dp),
        sites=(dataclasses.replace(a, privacy=PrivacyConfig(enabled=True, target_epsilon=4.0, unit="patient")),
               b, SiteConfig("c", synthetic=b.synthetic)))


def round_line(r: int, **extra) -> dict:
    """One metrics.jsonl line in the flat form older fedssl wrote (still read): every site trained."""
    line = {"round": r, "loss": 2.0 / r, "generative": 1.5 / r, "contrastive": 1.0 / r,
            "probe_macro_auroc": 0.6 + 0.05 * r, "probe_macro_auroc_ci95": [0.55 + 0.05 * r, 0.65 + 0.05 * r],
            "seconds": 4.0, "compute_seconds": {"a": 2.5, "b": 3.0, "c": 1.0}, "probe_seconds": 1.0, "sites": 3,
            "site_windows": {"a": 10, "b": 12, "c": 8}, "examples": 30, "rejected": [], "epsilon": {"a": 1.0 * r},
            "delta": {"a": 1e-5}, "declined": [], "errors": []}
    return line | extra


def declined_round(r: int) -> dict:
    """Round `r` in which a declines (budget), c's update is rejected and b alone is aggregated."""
    return round_line(r, sites=1, site_windows={"b": 12}, examples=12, epsilon={}, delta={},
                      compute_seconds={"b": 3.0},
                      declined=[{"node_id": 5, "site": "a", "code": 1001, "reason": BUDGET_REASON}],
                      rejected=[{"round": r, "node_id": 7, "site": "c", "reason": "norm 9.1 > 5 x median"}])


def write_run(folder: Path, rounds: list[dict], *, state: dict | None = None, summary: dict | None = None,
              **scenario_kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_scenario(scenario(**scenario_kwargs), folder / "scenario.yaml")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    if state is not None:
        (folder / "run_state.json").write_text(json.dumps(state))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def running_state(**extra) -> dict:
    """The runner's record of a run in progress, by a process that is alive (this one)."""
    return {"state": "running", "started": time.time() - 60, "pid": os.getpid(), "host": socket.gethostname()} | extra


SUMMARY = {  # as simulations/run.py writes it: random init the mean over 3 initialisations x 2 probe splits
    "encoders": {"random_init": {"macro_auroc": 0.58, "ci95": [0.55, 0.61], "runs": [0.56, 0.57, 0.58, 0.58, 0.59, 0.6],
                                 "per_class": {"AF": 0.6}, "federated_minus": {"mean": 0.22, "ci95": [0.18, 0.26]}},
                 "federated": {"macro_auroc": 0.80, "ci95": [0.76, 0.84], "runs": [0.79, 0.81]},
                 "local_only/a": {"macro_auroc": 0.70}},
    "evaluation": {"splits": 2, "random_inits": 3}}


# -- the JSON served ------------------------------------------------------------------------------

def test_empty_folder_is_waiting_with_nothing_to_draw(tmp_path):
    view = run_view(tmp_path)
    assert (view["state"], view["round"], view["rounds"], view["sites"]) == ("waiting", 0, None, [])
    assert view["losses"] == {} and view["probe"]["auroc"] == [] and view["probe"]["random_init"] is None
    assert view["collapse"] is None and view["central_dp"] is None and view["problems"] == []
    json.dumps(view, allow_nan=False)  # what the page receives is strict JSON


def test_running_run_counts_rounds_and_estimates_the_time_left(tmp_path):
    write_run(tmp_path, [round_line(1), round_line(2)], state=running_state())
    view = run_view(tmp_path)
    assert (view["state"], view["error"], view["round"], view["rounds"]) == ("running", None, 2, 4)
    assert view["time"]["remaining_seconds"] == pytest.approx(2 * (4.0 + 1.0))  # 2 rounds left of 5 s each
    assert view["time"]["ended"] is None and view["time"]["started"] < view["now"]
    assert view["losses"] == {"loss": [2.0, 1.0], "contrastive": [1.0, 0.5], "generative": [1.5, 0.75]}
    assert view["probe"]["auroc"] == pytest.approx([0.65, 0.70])
    assert view["probe"]["ci95"] == [pytest.approx([0.6, 0.7]), pytest.approx([0.65, 0.75])]
    assert view["wall"]["compute"] == [3.0, 3.0] and view["wall"]["overhead"] == [1.0, 1.0]  # slowest site: b
    assert view["collapse"] is None  # the run does not record the monitor


def test_a_half_written_last_line_waits_and_a_broken_line_is_named(tmp_path):
    write_run(tmp_path, [round_line(1)], state=running_state())
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write("not json\n" + json.dumps(round_line(3))[:40])  # the tracker caught mid-write
    view = run_view(tmp_path)
    assert view["round_numbers"] == [1]
    assert view["problems"] == ["metrics.jsonl line 2 is not a round's metrics; left out"]


def test_declines_rejections_and_privacy_spent_per_site(tmp_path):
    rounds = [round_line(1), round_line(2), declined_round(3),
              round_line(4, errors=[{"node_id": 9, "site": "c", "code": 1002, "reason": "site c: OSError"}],
                         site_windows={"a": 10, "b": 12}, epsilon={"a": 3.9})]
    write_run(tmp_path, rounds, state=running_state())
    sites = {s["name"]: s for s in run_view(tmp_path)["sites"]}
    a, b, c = sites["a"], sites["b"], sites["c"]
    assert [cell["state"] for cell in a["cells"]] == ["trained", "trained", "declined", "trained"]
    assert a["cells"][2]["reason"] == BUDGET_REASON
    assert [(cell["state"], cell["reason"]) for cell in c["cells"][2:]] == [
        ("rejected", "norm 9.1 > 5 x median"), ("error", "site c: OSError")]
    assert (a["dp"], a["budget"], a["unit"], a["epsilon"], a["delta"]) == (True, 4.0, "patient", 3.9, 1e-5)
    assert a["epsilon_by_round"] == [1.0, 2.0, None, 3.9]
    assert (b["dp"], b["budget"], b["epsilon"]) == (False, None, None)
    assert [s["last_replied"] for s in (a, b, c)] == [4, 4, 4]  # an error reply is a reply
    assert (a["windows"], c["windows"]) == (10, 8)


def test_without_presence_a_site_that_stops_replying_is_known_by_its_last_reply(tmp_path):
    """A run folder without presence.json (an older ServerApp): no online state, the last reply only."""
    write_run(tmp_path, [round_line(1), round_line(2, site_windows={"a": 10, "b": 12}, sites=2)],
              state=running_state())
    view = run_view(tmp_path)
    sites = {s["name"]: s for s in view["sites"]}
    assert (sites["a"]["last_replied"], sites["c"]["last_replied"]) == (2, 1)
    assert sites["c"]["cells"][1]["state"] == "-"
    assert view["presence"] is None and view["other_nodes"] == [] and sites["c"]["presence"] is None


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def record_presence(folder: Path, start: float) -> PresenceFile:
    """presence.json as the ServerApp's PresenceFile writes it: nodes 11-13 and 99 online in round 1,
    11-13 named a, b, c by their replies; 30 s later, in round 2, c's node is gone. Written now."""
    clock = Clock(start)
    presence = PresenceFile(folder / "presence.json", clock=clock)
    presence.round = 1
    presence.polled([(11, ""), (12, ""), (13, ""), (99, "")])
    for node, site in ((11, "a"), (12, "b"), (13, "c")):
        presence.name(node, site)
    clock.now, presence.round = start + 30, 2
    presence.polled([(11, ""), (12, ""), (99, "")])
    clock.now = time.time()
    presence.write()
    return presence


def test_presence_shows_who_is_online_and_when_an_offline_site_was_last_seen(tmp_path):
    write_run(tmp_path, [round_line(1)], state=running_state())
    start = time.time() - 40
    record_presence(tmp_path, start)
    view = run_view(tmp_path)
    sites = {s["name"]: s["presence"] for s in view["sites"]}
    assert view["presence"] == {"live": True, "stale_since": None}
    # online: seen now (no time, so the view changes only when a site comes or goes)
    assert sites["a"] == sites["b"] == {"online": True, "last_seen": None, "round": 2}
    assert sites["c"] == {"online": False, "last_seen": pytest.approx(start, abs=1e-3), "round": 1}
    # a node that has not replied yet is shown by its id
    assert view["other_nodes"] == [{"name": "node 99", "site": None, "online": True, "last_seen": None, "round": 2}]


def test_stale_presence_counts_every_site_offline_and_a_finished_run_has_no_online_state(tmp_path):
    write_run(tmp_path, [round_line(1)], state=running_state(started=time.time() - 600))
    stale = time.time() - 17  # the limit: 15 s + the longest probe so far (1 s)
    presence = record_presence(tmp_path, stale - 30)
    presence.clock.now = stale
    presence.write()
    view = run_view(tmp_path)
    assert view["presence"] == {"live": True, "stale_since": pytest.approx(stale, abs=1e-3)}
    assert [s["presence"]["online"] for s in view["sites"]] == [False, False, False]
    assert view["sites"][0]["presence"]["last_seen"] == pytest.approx(stale, abs=1e-3)

    presence.clock.now = time.time() - 14  # within the limit: live again
    presence.write()
    assert [s["presence"]["online"] for s in run_view(tmp_path)["sites"]] == [True, True, False]

    write_run(tmp_path, [round_line(r) for r in (1, 2, 3, 4)], state=running_state())  # every round is done
    view = run_view(tmp_path)  # nobody polls any more: last seen, but not online or offline
    assert view["presence"]["live"] is False and [s["presence"]["online"] for s in view["sites"]] == [None] * 3
    assert view["sites"][2]["presence"]["last_seen"] == pytest.approx(stale - 30, abs=1e-3)


def test_presence_of_an_earlier_serverapp_or_not_its_own_is_left_out(tmp_path):
    presence = record_presence(tmp_path, time.time() - 100)
    presence.clock.now = time.time() - 60
    presence.write()
    write_run(tmp_path, [], state=running_state(started=time.time() - 10))  # a new run started since
    assert run_view(tmp_path)["presence"] is None
    (tmp_path / "presence.json").write_text(json.dumps({"updated": "yesterday", "nodes": []}))
    view = run_view(tmp_path)
    assert view["presence"] is None and view["problems"] == [
        "presence.json is not as the ServerApp writes it (ValueError: Invalid isoformat string: 'yesterday'); left out"]


def test_finished_run_has_the_random_init_reference_and_the_encoders(tmp_path):
    state = running_state(state="finished", ended=time.time())
    write_run(tmp_path, [round_line(r) for r in (1, 2, 3, 4)], state=state, summary=SUMMARY)
    view = run_view(tmp_path)
    assert (view["state"], view["round"], view["time"]["remaining_seconds"]) == ("finished", 4, None)
    assert view["time"]["ended"] == pytest.approx(state["ended"])
    assert view["probe"]["random_init"] == {"macro_auroc": 0.58, "ci95": [0.55, 0.61], "inits": 3}
    assert view["encoders"] == {
        "random_init": {"macro_auroc": 0.58, "ci95": [0.55, 0.61],
                        "federated_minus": {"mean": 0.22, "ci95": [0.18, 0.26]}},
        "federated": {"macro_auroc": 0.80, "ci95": [0.76, 0.84], "federated_minus": None},
        "local_only/a": {"macro_auroc": 0.70, "ci95": None, "federated_minus": None}}


def test_a_deployed_run_without_the_runners_record_is_judged_by_its_rounds(tmp_path):
    write_run(tmp_path, [round_line(1), round_line(2)])
    assert run_view(tmp_path)["state"] == "running"
    write_run(tmp_path, [round_line(r) for r in (1, 2, 3, 4)])
    assert run_view(tmp_path)["state"] == "finished"


def test_failed_run_shows_the_error_line_and_flowers_errors(tmp_path):
    state = running_state(state="failed", ended=time.time(),
                          error="FederationError: Flower run 42 ended as finished:failed")
    write_run(tmp_path, [round_line(1)], state=state)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "flower.log").write_text(
        "INFO : round 1\n" + "ERROR : ServerApp raised an exception\nERROR : NoSiteReplied: round 2\nINFO : bye\n")
    view = run_view(tmp_path)
    assert (view["state"], view["error"]) == ("failed", "FederationError: Flower run 42 ended as finished:failed")
    assert view["log_errors"] == ["ERROR : ServerApp raised an exception", "ERROR : NoSiteReplied: round 2"]


def test_a_runner_killed_before_recording_its_outcome_is_failed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_run(tmp_path, [round_line(1)], state=running_state(pid=dead.pid))
    view = run_view(tmp_path)
    assert view["state"] == "failed" and f"process {dead.pid}" in view["error"]


def test_central_dp_and_collapse_monitor_when_recorded(tmp_path):
    rounds = [round_line(r, central_epsilon=0.5 * r, central_delta=1e-5, embedding_rank=40.0 - r, embedding_std=0.3)
              for r in (1, 2)]
    write_run(tmp_path, rounds, state=running_state(), central_dp="server")
    view = run_view(tmp_path)
    assert view["central_dp"] == {"central_epsilon": [0.5, 1.0], "central_delta": [1e-5, 1e-5]}
    assert view["collapse"] == {"embedding_rank": [39.0, 38.0], "embedding_std": [0.3, 0.3]}
    assert set(view["losses"]) == {"loss", "generative", "contrastive"}  # epsilon and rank are not loss terms
    assert view["scenario"]["central_dp"] == "server"


def test_undefined_numbers_are_served_as_null_not_nan(tmp_path):
    write_run(tmp_path, [round_line(1, probe_macro_auroc=float("nan"), probe_macro_auroc_ci95=None,
                                    epsilon={"a": float("inf")})],
              state=running_state(), summary={"encoders": {"random_init": {"macro_auroc": float("nan")}}})
    view = run_view(tmp_path)
    assert view["probe"]["auroc"] == [None] and view["probe"]["ci95"] == [None]
    assert view["sites"][0]["epsilon"] is None and view["encoders"]["random_init"]["macro_auroc"] is None
    json.dumps(view, allow_nan=False)


def test_a_finished_run_as_the_runner_and_the_server_wrote_it(finished_run):
    view = run_view(finished_run)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert (view["state"], view["error"], view["round"], view["rounds"]) == ("finished", None, 2, 2)
    assert [(s["name"], [cell["state"] for cell in s["cells"]]) for s in view["sites"]] == [
        ("north", ["trained", "trained"]), ("south", ["trained", "trained"])]
    assert view["encoders"]["federated"]["macro_auroc"] == summary["encoders"]["federated"]["macro_auroc"]
    assert view["problems"] == [] and view["collapse"] is not None  # the server records the monitor
    json.dumps(view, allow_nan=False)


def test_the_runner_records_running_then_finished_or_failed_with_the_first_error_line(tmp_path):
    from simulations.run import FederationError, record_start, recorded_outcome

    @recorded_outcome
    def run(folder: Path, error: BaseException | None = None) -> None:  # run_scenario's part in this
        if folder.name == "refused":
            raise FederationError("refused before the run had a folder")
        record_start(folder)
        assert run_view(folder)["state"] == "running"
        if error is not None:
            raise error

    run(tmp_path)
    assert (run_view(tmp_path)["state"], run_view(tmp_path)["error"]) == ("finished", None)
    with pytest.raises(FederationError):
        run(tmp_path, FederationError("Flower run 3 ended as finished:failed\nlast lines of flower.log: ..."))
    view = run_view(tmp_path)
    assert (view["state"], view["error"]) == ("failed", "FederationError: Flower run 3 ended as finished:failed")
    assert view["time"]["ended"] >= view["time"]["started"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, KeyboardInterrupt())
    assert run_view(tmp_path)["error"] == "interrupted (Ctrl-C or SIGTERM)"
    with pytest.raises(FederationError):
        run(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


# -- the server ------------------------------------------------------------------------------------

def test_api_serves_the_view_with_an_etag_and_changes_nothing(tmp_path):
    write_run(tmp_path, [round_line(1)], state=running_state())
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    client = TestClient(create_app(tmp_path), base_url="http://127.0.0.1")
    first = client.get("/api/run")
    assert first.status_code == 200 and first.json()["round"] == 1
    assert client.get("/api/run", headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(round_line(2)) + "\n")
    after = client.get("/api/run", headers={"If-None-Match": first.headers["etag"]})
    assert after.status_code == 200 and after.json()["round"] == 2
    assert client.post("/api/run").status_code == 405  # read-only
    page = client.get("/")
    assert page.status_code == 200 and 'src="/vendor/plotly.min.js"' in page.text and "http" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/vendor/plotly.min.js").text.lstrip().startswith("/**\n* plotly.js")
    assert client.get("/static/dashboard.js").status_code == 200
    before[tmp_path / "metrics.jsonl"] = (tmp_path / "metrics.jsonl").stat().st_mtime_ns  # the test's own append
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_loopback_dashboard_refuses_foreign_host_names(tmp_path):
    client = TestClient(create_app(tmp_path), base_url="http://127.0.0.1")
    assert client.get("/api/run").status_code == 200
    # a page elsewhere that points its own DNS name at 127.0.0.1 must not read the run
    assert client.get("/api/run", headers={"Host": "attacker.example"}).status_code == 400


def test_with_a_token_every_request_needs_it(tmp_path):
    write_run(tmp_path, [round_line(1)], state=running_state())
    client = TestClient(create_app(tmp_path, token="s3cret"), base_url="http://10.1.2.3")
    for path in ("/", "/api/run", "/vendor/plotly.min.js", "/static/dashboard.js"):
        assert client.get(path).status_code == 401, path
    assert client.get("/api/run", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/run?token=wrong").status_code == 401
    assert client.get("/api/run", headers={"Authorization": "Bearer s3cret"}).json()["round"] == 1
    opened = client.get("/?token=s3cret", follow_redirects=False)  # the link given once
    assert opened.status_code == 303 and opened.headers["location"] == "/"  # the token leaves the address bar
    assert "httponly" in opened.headers["set-cookie"].lower()
    assert client.cookies.get(COOKIE) == "s3cret"
    assert client.get("/api/run").status_code == 200  # the page's own requests carry the cookie


def test_cli_refuses_an_exposed_address_without_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDSSL_DASHBOARD_TOKEN", raising=False)
    assert main(["dashboard", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--token" in err and "0.0.0.0" in err
    assert main(["dashboard", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_dashboard_imports_no_flower():
    check = ("import sys, dashboard.app, dashboard.view; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=120,
                         cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.stdout.strip() == "[]"


# -- the page in a real browser -------------------------------------------------------------------

def no_browser(reason: str):
    """Skip the browser test, saying why; in CI (CI=true) fail instead: there it must run."""
    (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of Debian's chromium and its chromedriver, installed with apt-get when missing and
    this is root (CI is)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        no_browser("selenium is not installed (pip install -e '.[test]')")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found) and os.geteuid() == 0 and shutil.which("apt-get"):
        install = "apt-get update -q && apt-get install -y -q chromium chromium-driver"
        result = subprocess.run(["sh", "-c", install], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if result.returncode != 0:
            no_browser(f"`{install}` failed: {(result.stderr.strip().splitlines() or [''])[-1]}")
        found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        no_browser("no chromium and chromedriver on PATH, and apt-get cannot install them here (not root)")
    return found


@pytest.fixture
def browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1360,1180", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=chromium[1]), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def start_dashboard():
    """Start `fedssl dashboard RUN ARGS...` as a user does, on a free loopback port; return its URL.
    Every dashboard started is stopped at the end of the test."""
    processes = []

    def start(run: Path, *args: str) -> str:
        process = subprocess.Popen([sys.executable, "-m", "fedssl.cli", "dashboard", str(run), "--port", "0", *args],
                                   cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
        deadline = time.monotonic() + 60
        while not any("http://" in line for line in lines):
            assert process.poll() is None, f"fedssl dashboard exited: {lines}"
            assert time.monotonic() < deadline, f"fedssl dashboard printed no address within 60 s: {lines}"
            time.sleep(0.05)
        return re.search(r"http://127\.0\.0\.1:\d+/", "".join(lines)).group(0)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_page_follows_a_run_round_by_round(browser, start_dashboard, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = tmp_path / "run"
    run.mkdir()
    url = start_dashboard(run)
    wait = WebDriverWait(browser, 15)
    browser.get(url)
    wait.until(lambda d: d.find_element(By.ID, "state").text == "waiting")

    rounds = [round_line(1), round_line(2), declined_round(3), round_line(4, epsilon={"a": 3.9})]
    write_run(run, [], state=running_state())
    for r, line in enumerate(rounds, start=1):
        with (run / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        wait.until(lambda d: d.find_element(By.ID, "round-counter").text == str(r))
        assert browser.find_element(By.ID, "round-total").text == "4"
        assert browser.find_element(By.ID, "state").text == "running"
        # every round's AUROC is a drawn marker of the chart's global-encoder trace (plotly classes a
        # trace's group `trace<uid>`)
        wait.until(lambda d: d.execute_script(
            "return document.querySelectorAll('#auroc .traceauroc-main .points path.point').length") == r,
            message=f"the AUROC chart does not show {r} points")
        if r == 3:  # while rounds remain, presence.json says who is online: c's node went away in round 2
            record_presence(run, time.time() - 40)
            offline = re.compile(r"offline \d+ s ago \(round 1\)")  # last seen then
            wait.until(lambda d: offline.fullmatch(d.find_element(By.CSS_SELECTOR, 'tr[data-site="c"] .presence').text),
                       message="c is not shown offline")
            assert browser.find_element(By.CSS_SELECTOR, 'tr[data-site="a"] .presence').text == "online"
            assert browser.find_element(By.CSS_SELECTOR, 'tr[data-node="node 99"]').text.startswith("node 99 online")
    # every round is done: nobody polls the SuperLink any more, so no badge, only when c was last seen
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#sites .badge"))
    last_seen = browser.find_element(By.CSS_SELECTOR, 'tr[data-site="c"] .presence').text
    assert re.fullmatch(r"\d+ s ago \(round 1\)", last_seen), last_seen

    declined = browser.find_element(By.CSS_SELECTOR, '.cell.declined[data-site="a"][data-round="3"]')
    assert BUDGET_REASON in declined.get_attribute("title")
    assert browser.find_element(By.CSS_SELECTOR, '.cell.rejected[data-site="c"][data-round="3"]')
    assert "3.90 / 4 per patient" in browser.find_element(By.CSS_SELECTOR, 'tr[data-site="a"]').text

    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "run_state.json").write_text(json.dumps(running_state(state="finished", ended=time.time())))
    wait.until(lambda d: d.find_element(By.ID, "state").text == "finished")
    wait.until(lambda d: "random init (mean of 3 inits)" in d.find_element(By.ID, "auroc").text)
    assert "0.220 [0.180, 0.260]" in browser.find_element(By.ID, "encoders").text  # federated minus random init
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) == {url.rstrip("/")}  # nothing loaded from anywhere else: no CDN
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []  # no script error, no CSP violation
    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 20_000


def test_the_page_behind_a_token_works_once_opened_with_it(browser, start_dashboard, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = write_run(tmp_path / "run", [round_line(1), declined_round(2)], state=running_state())
    url = start_dashboard(run, "--token", "s3cret")
    browser.get(url)
    assert "needs its token" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(url + "?token=s3cret")
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "round-counter").text == "2")
    assert browser.current_url == url  # the token left the address bar; the page's requests carry the cookie
    assert browser.find_element(By.CSS_SELECTOR, '.cell.declined[data-site="a"][data-round="2"]')
