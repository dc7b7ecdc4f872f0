"""Time the README's quickstart federation and print its evaluation table as JSON.

    .venv/bin/python benchmarks/quickstart.py [--out DIR]

Backs two README claims: the quickstart finishes within 5 minutes on 2 CPU cores, and the
federated encoder beats the random-init encoder (and, on average, the local-only ones).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from simulations.run import run_scenario

QUICKSTART = Path(__file__).resolve().parents[1] / "simulations" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="run folder (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedssl-quickstart-"))
    start = time.perf_counter()
    result = run_scenario(QUICKSTART, out_dir=out, echo=lambda line: None)
    wall = time.perf_counter() - start
    auroc = {name: e["macro_auroc"] for name, e in result.summary["encoders"].items()}
    local = [v for k, v in auroc.items() if k.startswith("local_only/")]
    print(json.dumps({
        "wall_seconds": round(wall, 1),
        "within_5_minutes": wall <= 300,
        "macro_auroc": {k: round(v, 4) for k, v in auroc.items()},
        "federated_minus_random_init": round(auroc["federated"] - auroc["random_init"], 4),
        "federated_minus_mean_local_only": round(auroc["federated"] - sum(local) / len(local), 4) if local else None,
        "run_dir": str(result.run_dir),
    }, indent=2))


if __name__ == "__main__":
    main()
