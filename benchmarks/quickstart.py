"""Time the README's quickstart federation and print its evaluation as JSON.

    .venv/bin/python benchmarks/quickstart.py [--out DIR]

Backs the README's quickstart claims: the run finishes within 5 minutes on 2 CPU cores, and the
federated encoder's linear probe beats the random-init reference and every hospital trained alone
by more than the reported interval (the paired 95 % interval of the difference lies above 0,
where the evaluation reports one). Also prints the per-class AUROC, since a macro mean can hide
a class that no encoder learns.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from simulations.run import run_scenario

QUICKSTART = Path(__file__).resolve().parents[1] / "simulations" / "quickstart.yaml"


def verdict(encoders: dict) -> dict:
    """Federated minus each baseline, and whether it is above it beyond the interval."""
    federated = encoders["federated"]["macro_auroc"]
    out = {}
    for name, entry in encoders.items():
        if name == "federated":
            continue
        paired = entry.get("federated_minus")
        out[name] = {"difference": round(federated - entry["macro_auroc"], 4)}
        if paired:
            out[name] |= {"ci95": [round(v, 4) for v in paired["ci95"]],
                          "above_beyond_interval": paired["ci95"][0] > 0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="run folder (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedssl-quickstart-"))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = run_scenario(QUICKSTART, out_dir=out, echo=lambda line: None)
    wall = time.perf_counter() - start
    encoders = result.summary["encoders"]
    print(json.dumps({
        "wall_seconds": round(wall, 1),
        "within_5_minutes": wall <= 300,
        "load_average_1min": {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)},
        "cores": os.cpu_count(),
        "macro_auroc": {name: round(e["macro_auroc"], 4) for name, e in encoders.items()},
        "ci95": {name: [round(v, 4) for v in e["ci95"]] for name, e in encoders.items() if "ci95" in e},
        "per_class_auroc": {name: {c: round(v, 4) for c, v in e["per_class"].items()}
                            for name, e in encoders.items()},
        "federated_minus": verdict(encoders),
        "run_dir": str(result.run_dir),
    }, indent=2))


if __name__ == "__main__":
    main()
