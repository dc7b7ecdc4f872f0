"""Scale: one round of 3, 10, 30 and 100 simulated sites: wall time and peak memory of the whole run.

    .venv/bin/python benchmarks/scale.py [--sites 3 10 30 100] [--records 8] [--local-steps 2]

Each federation is `python -m simulations <scenario> --out <dir>` (the runner `fedssl simulate`
uses) with small synthetic sites, the default tiny encoder and one round of a few local steps.
The runner is started with a marker variable in its environment that every process it starts
inherits (SuperLink, SuperExec, flwr-simulation, Ray's raylet, GCS and workers), so the run's
process tree is found via /proc as ops/processes.py does; it is sampled every
`--interval` seconds. Peak memory is reported as the largest sum over the tree of RSS (pages
shared between processes, e.g. torch's libraries in every Ray worker, counted once per process:
an upper bound) and of PSS (shared pages split between their processes: what the tree really
occupies). The 100-site run must stay under 8 GB. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.runfolder import RunFolder
from ops.processes import marked_processes, stop_pids, terminate

MARKER = "FEDSSL_SCALE_BENCHMARK"  # inherited by every process of the measured run
MEMORY_LIMIT_GB = 8.0

SCENARIO = """
name: scale-{sites}
seed: 0
model: {{encoder: st_mem, size: tiny}}
objective: {{name: hybrid, mask_ratio: 0.5}}
train: {{batch_size: 8, local_steps: {local_steps}, threads: 1}}
federation: {{rounds: 1, min_sites: {sites}}}
evaluation:
  synthetic: {{records: 40, sample_rate: 250}}
  every_round: false
  local_baselines: false
sites:
{site_list}
"""


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of `pid` in kB from /proc/<pid>/smaps_rollup; (0, 0) if it is gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("Rss", 0), values.get("Pss", 0)


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def run_sites(sites: int, args: argparse.Namespace, out: Path) -> dict:
    """Run one federation of `sites` sites, sampling its process tree; wall time and peaks."""
    site_list = "\n".join(f"  - name: site_{i:03d}\n    synthetic: {{records: {args.records}, sample_rate: 250}}"
                          for i in range(sites))
    scenario = out / f"scale-{sites}.yaml"
    scenario.write_text(SCENARIO.format(sites=sites, local_steps=args.local_steps, site_list=site_list))
    run_dir = out / f"scale-{sites}"
    token = uuid.uuid4().hex
    peak = {"rss_kb": 0, "pss_kb": 0, "processes": 0, "open_files": 0}
    log_path = out / f"scale-{sites}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        runner = subprocess.Popen([sys.executable, "-m", "simulations", str(scenario), "--out", str(run_dir),
                                   "--timeout", str(args.timeout)], env={**os.environ, MARKER: token},
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        while runner.poll() is None:
            pids = marked_processes(token, MARKER)  # the runner itself carries the marker too
            usage = [memory_kb(pid) for pid in pids]
            peak["rss_kb"] = max(peak["rss_kb"], sum(rss for rss, _ in usage))
            peak["pss_kb"] = max(peak["pss_kb"], sum(pss for _, pss in usage))
            peak["processes"] = max(peak["processes"], len(pids))
            peak["open_files"] = max(peak["open_files"], sum(open_files(pid) for pid in pids))
            time.sleep(args.interval)
    finally:
        if runner.poll() is None:  # interrupted: the runner stops its Flower processes on SIGTERM
            terminate(runner, grace=30)
        stop_pids(marked_processes(token, MARKER))
    wall = time.perf_counter() - started
    if runner.returncode != 0:
        raise RuntimeError(f"{sites} sites: the runner exited with {runner.returncode}; see {log_path}")
    run = RunFolder(run_dir)
    summary, first_round = run.read_summary(), run.rounds()[0]
    return {
        "sites": sites,
        "wall_seconds": round(wall, 1),
        "data_seconds": summary["data_seconds"],  # generating + windowing every site's records, probe data
        "federation_seconds": summary["federation_seconds"],  # Flower + Ray start-up, the round, shutdown
        "round_seconds": first_round.seconds,
        "sites_replied": first_round.sites,
        "peak_rss_gb": round(peak["rss_kb"] / 2**20, 2),
        "peak_pss_gb": round(peak["pss_kb"] / 2**20, 2),
        "peak_processes": peak["processes"],
        "peak_open_files": peak["open_files"],
    }


def per_site(rows: list[dict], key: str) -> float | None:
    """Slope of `key` against the number of sites between the smallest and largest run."""
    first, last = rows[0], rows[-1]
    if last["sites"] == first["sites"]:
        return None
    return round((last[key] - first[key]) / (last["sites"] - first["sites"]), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30, 100])
    parser.add_argument("--records", type=int, default=8, help="synthetic 10-s records per site")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--timeout", type=float, default=3600, help="per federation")
    parser.add_argument("--out", help="folder for the run folders (default: a temporary one)")
    args = parser.parse_args()
    if min(args.sites) < 1 or args.records < 1 or args.local_steps < 1:
        parser.error("--sites, --records and --local-steps must be >= 1")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedssl-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sites in sorted(args.sites):
        rows.append(run_sites(sites, args, out))
        print(json.dumps(rows[-1]), file=sys.stderr)
    largest = rows[-1]
    print(json.dumps({
        "runs": rows,
        "per_added_site": {key: per_site(rows, key) for key in
                           ("wall_seconds", "data_seconds", "round_seconds", "peak_pss_gb", "peak_rss_gb")},
        "memory_limit_gb": MEMORY_LIMIT_GB,
        "largest_within_limit": {"pss": largest["peak_pss_gb"] <= MEMORY_LIMIT_GB,
                                 "rss": largest["peak_rss_gb"] <= MEMORY_LIMIT_GB},
        "cpus": len(os.sched_getaffinity(0)),
        "out": str(out),
    }, indent=2))


if __name__ == "__main__":
    main()
