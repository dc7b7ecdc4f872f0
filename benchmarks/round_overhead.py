"""Flower's round overhead: (round wall time - slowest site's compute) / slowest site's compute.

    .venv/bin/python benchmarks/round_overhead.py [--sizes tiny small]
        [--engines simulation deployment deployment-warm deployment-flower-defaults]
        [--sites 2] [--rounds 3] [--local-steps 30 [6]] [--batch-size 16]

Runs the same small federation (synthetic sites, hybrid objective, st_mem encoder of each size)
on Flower's simulation engine (`flower-superlink --simulation`, the sites in Ray actors) and on
the deployment engine on loopback (a plain `flower-superlink` and one real `flower-supernode`
per site, insecure: TLS is not what is measured) with fedssl's `FAST_POLLING_ENV`: cold
(`deployment`: each message's `flwr-clientapp` process does the site's whole work) and warm
(`deployment-warm`: each SuperNode runs with `--isolation process` and its site's worker,
`python -m client.worker`, runs every message's ClientApp in one long-lived process),
and (`deployment-flower-defaults`) cold with Flower's default SuperExec poll of 1 s. A round's
wall time is the ServerApp's `seconds` in metrics.jsonl (sending the global model, the sites'
work, the replies, validation and aggregation; the probe is not in it) and each site's compute
is its `compute_seconds` (its training loop alone), so the overhead is everything else:
process start-up, imports, site set-up, (de)serialisation and polling. Round 1 also pays
one-off costs (app install, Ray start-up), so the summary is the median over the later rounds.

The same run measures where the overhead goes: the phases of each deployed round from the
SuperNodes' time-stamped logs, a fresh ClientApp process's imports, the site's set-up before
training (scenario, cached windows, objective, received weights) and (de)serialising the shared
weights in a warm process, and the mean waits that the polling intervals imply. Prints JSON.
Start it with few other processes running: the sites need one core each.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.runfolder import RoundRecord, RunFolder
from fedssl.sitefile import SiteFile, save_site_file
from ops.deploy import FAST_POLLING_ENV
from ops.processes import free_port
from server.presence import REPLY_POLL_SECONDS
from simulations.run import LocalSimulation, materialise_data

# What fedssl recommends (FAST_POLLING_ENV); Flower's other intervals (a SuperNode polls the
# SuperLink every 3 s when idle and its ClientApp's reply every 0.5 s) are constants, not settings.
TUNED_ENV = FAST_POLLING_ENV
FLOWER_DEFAULT_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}
SUPERNODE_IDLE_POLL, CLIENTAPP_REPLY_POLL, SUPEREXEC_DEFAULT_POLL, GRID_DEFAULT_POLL = 3.0, 0.5, 1.0, 3.0  # Flower 1.41

SCENARIO = """
name: round-overhead-{size}
seed: 0
model: {{encoder: st_mem, size: {size}}}
objective: {{name: hybrid, mask_ratio: 0.5}}
train: {{batch_size: {batch_size}, local_steps: {local_steps}, threads: 1}}
federation: {{rounds: {rounds}, min_sites: {sites}, connect_timeout: 300}}
evaluation:
  synthetic: {{records: 40, sample_rate: 250}}
  every_round: false
  bootstrap: 100  # the final probe is not timed: a cheap interval keeps the ServerApp short
  local_baselines: false
sites:
{site_list}
"""


class LoopbackDeployment(LocalSimulation):
    """The deployment engine on loopback: a SuperLink without `--simulation` and one insecure
    `flower-supernode` per site, each with its own FLWR_HOME, all carrying the run's marker. With
    `workers`, each site's warm worker is started (and has imported what it needs) first."""

    superlink_options = ()

    def __init__(self, run_dir: Path, sites: list[str], *, workers: bool = False, **kwargs) -> None:
        super().__init__(run_dir, **kwargs)
        self.sites, self.workers = sites, workers

    def start(self) -> None:
        super().start()
        run = RunFolder(self.run_dir)
        for site in self.sites:
            home = self.run_dir / "hospitals" / site
            home.mkdir(parents=True, exist_ok=True)
            # the site's records as the runner materialised them, its cache and state where simulation keeps them
            site_file = save_site_file(SiteFile(site=site, records=str(run.data / "records" / site), work=str(run.data),
                                                state=str(run.site(site))), home / "site.yaml")
            runtime_port = free_port()
            isolation = ["--isolation", "process"] if self.workers else []
            command = [self.executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                       "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", f"site-file='{site_file}'",
                       *isolation]
            if self.workers:
                self.start_worker(site, f"127.0.0.1:{runtime_port}", home)
            self.start_logged(site, command, home, FLWR_HOME=str(home / "flwr-home"))

    def start_worker(self, site: str, runtime_api_address: str, home: Path) -> None:
        """Start the site's worker and wait until it is ready (imports done), as `fedssl node` does."""
        worker = self.start_logged(site, [sys.executable, "-m", "client.worker", "--runtime-api-address",
                                          runtime_api_address], home)
        deadline = time.monotonic() + 300
        while "site worker ready for" not in self.site_log(site).read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker of {site} did not start; see {self.site_log(site)}")
            time.sleep(0.2)

    def start_logged(self, site: str, command: list[str], cwd: Path, **env: str) -> subprocess.Popen:
        """Start one of the site's processes, its output time-stamped into the site's log."""
        process = subprocess.Popen(command, env={**self.env, **env}, cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                   text=True, errors="replace")
        self.seen_pids.add(process.pid)
        self.site_log(site).parent.mkdir(parents=True, exist_ok=True)
        self.site_log(site).touch()  # there before the process writes to it: start_worker reads it
        threading.Thread(target=stamp_lines, args=(process.stdout, self.site_log(site)), daemon=True).start()
        return process

    def site_log(self, site: str) -> Path:
        return self.run_dir / "logs" / f"supernode-{site}.log"

    def federation_options(self, num_sites: int) -> list[str]:
        return []  # the SuperNodes are real processes: no simulation settings


def stamp_lines(stream, path: Path) -> None:
    """Copy a SuperNode's output (its SuperExec's and ClientApps' too) or a worker's to `path`, each
    line prefixed with the wall-clock time it arrived: Flower's log lines carry no time."""
    with path.open("a") as log_file:
        for line in stream:
            log_file.write(f"{time.time():.3f} {line}")
            log_file.flush()


def site_phases(log_path: Path) -> dict[int, dict[str, float]]:
    """{round: times} of one site, from its time-stamped SuperNode log: when its SuperNode got the
    train message and when it had downloaded its weights, when its ClientApp process logged its
    start (after SuperExec's poll, the process spawn and Flower's imports) or its worker took the
    message, when training started
    (app, torch and data loaded, model built) and ended, when the SuperNode began sending the
    reply and when it had uploaded it."""
    rounds: dict[int, dict[str, float]] = {}
    current: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        stamp, _, text = line.partition(" ")
        if "Receiving: train message" in text:
            current = {"received": float(stamp)}
        elif "Received successfully" in text and current:
            current["downloaded"] = float(stamp)
        elif ("Start `flwr-clientapp` process" in text or re.search(r"site worker: train message .* taken", text)) and current:
            current["clientapp_started"] = float(stamp)
        elif (match := re.search(r"fedssl \| site \S+ round (\d+): .*\(([\d.]+)s[,)]", text)) and current:
            current["trained"], current["round"] = float(stamp), int(match.group(1))
            current["training_started"] = current["trained"] - float(match.group(2))
        elif "Sending: train message" in text and "round" in current:
            current["sending"] = float(stamp)
        elif "Sent successfully" in text and "round" in current:
            current["sent"] = float(stamp)
            rounds[int(current.pop("round"))] = current
            current = {}
    return rounds


def deployment_breakdown(run_dir: Path, sites: list[str], rounds: list[RoundRecord]) -> dict:
    """Median seconds per phase over the rounds after the first, for the site that replied last;
    the phases follow each other except the download, which overlaps the ClientApp's start.
    `server_and_polling` is the rest of the round (the SuperNode noticing the message, the
    ServerApp noticing the reply, (de)serialisation and aggregation at the server)."""
    phases = {site: site_phases(run_dir / "logs" / f"supernode-{site}.log") for site in sites}
    rows = []
    for r in rounds[1:] or rounds:
        marks = [phases[site][r.round] for site in sites if r.round in phases[site]]
        if not marks:
            continue
        last = max(marks, key=lambda m: m["sent"])
        rows.append({
            "download_weights": last["downloaded"] - last["received"],  # SuperExec starts the ClientApp meanwhile
            "clientapp_process_start": last["clientapp_started"] - last["received"],
            "clientapp_setup": last["training_started"] - last["clientapp_started"],
            "reply_to_supernode": last["sending"] - last["trained"],
            "upload_reply": last["sent"] - last["sending"],
            "server_and_polling": r.seconds - (last["sent"] - min(m["received"] for m in marks)),
        })
    return {phase: round(statistics.median(row[phase] for row in rows), 3) for phase in rows[0]} if rows else {}


def write_scenario(folder: Path, size: str, local_steps: int, args: argparse.Namespace) -> Path:
    sites = "\n".join(f"  - name: site_{i}\n    synthetic: {{records: 30, sample_rate: 250}}" for i in range(args.sites))
    path = folder / f"{size}.yaml"
    path.write_text(SCENARIO.format(size=size, batch_size=args.batch_size, local_steps=local_steps,
                                    rounds=args.rounds, sites=args.sites, site_list=sites))
    return path


def run_federation(engine: str, scenario_path: Path, run_dir: Path, flower_env: dict[str, str]) -> list[RoundRecord]:
    """Run the scenario on `engine` (an --engines name) with `flower_env` in every Flower process;
    its rounds' records."""
    from fedssl.config import load_scenario, save_scenario

    scenario = load_scenario(scenario_path)
    run_dir.mkdir(parents=True)
    run = RunFolder(run_dir)
    saved = run.scenario
    save_scenario(scenario, saved)
    materialise_data(scenario, run.data, echo=lambda line: None)  # warm caches, as `fedssl simulate`
    if engine == "simulation":
        federation = LocalSimulation(run_dir, echo=lambda line: None)
    else:
        federation = LoopbackDeployment(run_dir, [s.name for s in scenario.sites], workers=engine == "deployment-warm",
                                        echo=lambda line: None)
    federation.env.update(flower_env)
    with federation:
        federation.run(saved, num_sites=len(scenario.sites), timeout=1800)
    rounds = run.rounds()
    if len(rounds) != scenario.federation.rounds:
        raise RuntimeError(f"{engine}: {len(rounds)} of {scenario.federation.rounds} rounds; see {run.logs}")
    return rounds


def overhead(rounds: list[RoundRecord]) -> dict:
    """Per round: wall time, slowest site's compute, overhead seconds and ratio; medians after round 1."""
    rows = []
    for r in rounds:
        compute = max(r.compute_seconds.values())
        rows.append({"round": r.round, "wall_seconds": r.seconds, "slowest_compute_seconds": compute,
                     "overhead_seconds": round(r.seconds - compute, 3),
                     "overhead_ratio": round((r.seconds - compute) / compute, 3)})
    later = rows[1:] or rows
    return {"rounds": rows,
            "median_overhead_seconds": round(statistics.median(r["overhead_seconds"] for r in later), 3),
            "median_overhead_ratio": round(statistics.median(r["overhead_ratio"] for r in later), 3),
            "median_compute_seconds": round(statistics.median(r["slowest_compute_seconds"] for r in later), 3)}


def import_seconds(repeats: int = 2) -> float:
    """Wall time of a fresh Python process that imports the ClientApp (what every round pays in deployment)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.app"], check=True)
        times.append(time.perf_counter() - start)
    return round(min(times), 3)


def site_work_seconds(scenario_path: Path, data_dir: Path) -> dict:
    """What a ClientApp does around its training loop, timed in this (warm) process: set-up (scenario,
    cached windows, objective, received weights) and (de)serialising the packed shared weights."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from client.wire import received_state, reply_records

    from fedssl.config import load_scenario
    from fedssl.data.site import load_site
    from fedssl.federated import shared_state
    from fedssl.objectives import build_objective

    start = time.perf_counter()
    scenario = load_scenario(scenario_path)
    site = scenario.sites[0]
    load_site(site, scenario.data, data_dir, scenario.seed)
    objective = build_objective(scenario)
    state = shared_state(objective, scenario.federation.share)
    objective.load_state_dict(state, strict=False)
    setup = time.perf_counter() - start

    start = time.perf_counter()
    content = RecordDict(reply_records(state, "float32"))  # the weights as a message carries them: packed
    objects = get_all_nested_objects(content)
    payload = sum(len(obj.deflate()) for obj in objects.values())
    received_state(content)
    serialise = time.perf_counter() - start
    return {"site_setup_seconds": round(setup, 3), "serialise_seconds": round(serialise, 3),
            "parameters": sum(v.numel() for v in state.values()), "message_bytes": payload,
            "message_objects": len(objects)}


def expected_polling_seconds(task_poll: float, reply_poll: float) -> dict:
    """Mean waits per round implied by the polling intervals (a uniform phase in each)."""
    waits = {"supernode_pulls_message": SUPERNODE_IDLE_POLL / 2, "superexec_starts_clientapp": task_poll / 2,
             "supernode_collects_reply": CLIENTAPP_REPLY_POLL / 2, "serverapp_collects_replies": reply_poll / 2}
    return {**waits, "total": sum(waits.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--engines", nargs="+", default=["simulation", "deployment", "deployment-warm"],
                        choices=["simulation", "deployment", "deployment-warm", "deployment-flower-defaults"])
    parser.add_argument("--sites", type=int, default=2, help="sites (one core each; this machine has 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, nargs="+", default=[30],
                        help="local steps per round: one for every size, or one per size in --sizes' order")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="folder for the run folders (default: a temporary one)")
    args = parser.parse_args()
    if args.rounds < 2 or args.sites < 1 or min(args.local_steps) < 1:
        parser.error("--rounds must be >= 2 (round 1 is a warm-up), --sites and --local-steps >= 1")
    if len(args.local_steps) not in (1, len(args.sizes)):
        parser.error("--local-steps: one value, or one per size")
    steps = args.local_steps * len(args.sizes) if len(args.local_steps) == 1 else args.local_steps
    local_steps = dict(zip(args.sizes, steps))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedssl-round-overhead-"))
    out.mkdir(parents=True, exist_ok=True)

    result = {"sites": args.sites, "rounds": args.rounds, "local_steps": local_steps,
              "batch_size": args.batch_size, "tuned_env": TUNED_ENV,
              "clientapp_import_seconds": import_seconds(),
              # fedssl: FAST_POLLING_ENV and PatientGrid's reply polling; Flower alone: 1 s and its Grid's 3 s
              "expected_polling_seconds": {
                  "fedssl": expected_polling_seconds(float(TUNED_ENV["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]),
                                                     REPLY_POLL_SECONDS),
                  "flower_alone": expected_polling_seconds(SUPEREXEC_DEFAULT_POLL, GRID_DEFAULT_POLL)},
              "sizes": {}}
    for size in args.sizes:
        scenario_path = write_scenario(out, size, local_steps[size], args)
        entry = {}
        for engine in args.engines:
            flower_env = FLOWER_DEFAULT_ENV if engine.endswith("flower-defaults") else TUNED_ENV
            started = time.perf_counter()
            run_dir = out / f"{size}-{engine}"
            rounds = run_federation(engine.removesuffix("-flower-defaults"), scenario_path, run_dir, flower_env)
            entry[engine] = {**overhead(rounds), "federation_seconds": round(time.perf_counter() - started, 1)}
            if engine.startswith("deployment"):
                sites = [f"site_{i}" for i in range(args.sites)]
                entry[engine]["median_phase_seconds"] = deployment_breakdown(run_dir, sites, rounds)
            print(f"{size} {engine}: overhead ratio {entry[engine]['median_overhead_ratio']} "
                  f"({entry[engine]['median_overhead_seconds']} s per round)", file=sys.stderr)
        entry["site_work"] = site_work_seconds(scenario_path, out / f"{size}-{args.engines[0]}" / "data")
        result["sizes"][size] = entry
    result["target_deployment_ratio"], result["target_deployment_seconds"] = 0.10, 5.0
    result["out"] = str(out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
