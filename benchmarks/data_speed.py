"""Data pipeline speed: windows/s on the first pass (read + preprocess WFDB records, write the cache)
against later passes (from the cache), and how long training waits for data.

    .venv/bin/python benchmarks/data_speed.py [--records 200] [--passes 5] [--steps 20]

Sites: a synthetic site of `--records` generated 10-s, 500-Hz, 12-lead WFDB records (format 16),
and the real PhysioNet samples of ../shared/data when present (CinC 2021 `.mat`, PTB-XL, PTB
Diagnostic and MIT-BIH `.dat`). Each site is built once with `fedssl.data.site.build_site` into a
fresh cache, then loaded `--passes` times more from that cache; the target is >= 20x more
windows/s from the cache. Then `train_local` runs `--steps` steps of the default objective on the
synthetic site's windows and reports the fraction of its time spent waiting for batches
(`TrainResult.data_seconds`) and in the augmentations (which run on the training thread, as part
of the objective). Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import Timed

from fedssl.config import DataConfig, Scenario, SyntheticSiteConfig
from fedssl.data.site import build_site
from fedssl.data.synthetic import write_synthetic_site
from fedssl.data.windows import WindowSet
from fedssl.objectives import build_objective
from fedssl.train import train_local

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def site_speed(folder: Path, cfg: DataConfig, cache_dir: Path, passes: int) -> tuple[dict, WindowSet]:
    """Windows/s of the first build of `folder` and of `passes` later loads from its cache."""
    start = time.perf_counter()
    windows = build_site(folder, cfg, cache_dir)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(passes):
        cached = build_site(folder, cfg, cache_dir)
    later = (time.perf_counter() - start) / passes
    assert (cached.windows == windows.windows).all(), "the cache must give back the same windows"
    first_rate, cached_rate = len(windows) / first, len(windows) / later
    return {"records": len(windows.records), "windows": len(windows),
            "first_pass_seconds": round(first, 3), "cached_pass_seconds": round(later, 4),
            "first_pass_windows_per_second": round(first_rate, 1),
            "cached_windows_per_second": round(cached_rate, 1),
            "speedup": round(cached_rate / first_rate, 1), "meets_target": cached_rate / first_rate >= 20}, windows


def data_wait(scenario: Scenario, data: WindowSet, steps: int) -> dict:
    """Fractions of `train_local`'s time spent waiting for batches and in the augmentations."""
    torch.set_num_threads(scenario.train.threads)
    objective = build_objective(scenario)
    augment = objective.augment = Timed(objective.augment) if hasattr(objective, "augment") else None
    result = train_local(objective, data, scenario.train, steps=steps, seed=scenario.seed)
    return {"objective": scenario.objective.name, "steps": steps, "batch_size": scenario.train.batch_size,
            "step_seconds": round(result.seconds / steps, 4),
            "data_wait_fraction": round(result.data_seconds / result.seconds, 5),
            "augment_fraction": round((augment.seconds if augment else 0.0) / result.seconds, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--passes", type=int, default=5, help="cached loads timed after the first build")
    parser.add_argument("--steps", type=int, default=20, help="train_local steps for the data-wait fraction")
    args = parser.parse_args()
    scenario = Scenario()
    result = {"data": dataclasses.asdict(scenario.data), "sites": {}}
    with tempfile.TemporaryDirectory(prefix="fedssl-data-speed-") as tmp:
        records = Path(tmp) / "synthetic"
        write_synthetic_site(records, SyntheticSiteConfig(records=args.records, sample_rate=500), seed=0)
        result["sites"]["synthetic"], synthetic = site_speed(records, scenario.data, Path(tmp) / "cache-synthetic",
                                                             args.passes)
        if SHARED_DATA.is_dir():
            result["sites"]["physionet_samples"], _ = site_speed(SHARED_DATA, scenario.data, Path(tmp) / "cache-real",
                                                                 args.passes)
        result["train_local"] = data_wait(scenario, synthetic, args.steps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
