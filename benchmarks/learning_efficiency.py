"""Learning efficiency per encoder x objective: samples/s per core and probe AUROC per CPU second.

Two figures decide which encoder and objective fedssl uses by default:

- **samples/s per core**: training samples per CPU second of one thread (`torch.set_num_threads(1)`),
  forward + backward + optimizer step of the whole objective (two views where it has two), on
  batches of 32 real 10-s windows; arms are measured round-robin, several times, median reported,
  so that the machine's load hits all of them alike.
- **time to quality**: each arm trains for the same CPU-time budget (its step count set from its
  measured speed, the cosine schedule over those steps), and a linear probe of the encoder on a
  real task is fitted after each quarter: macro AUROC over common diagnoses of the CinC 2020/2021
  records, on held-out records (split by record, all windows of a record on one side; these sets
  carry no patient ids). Pretraining uses the probe-train records and LUDB, never a probe-test
  record. The random-init reference is the mean of several inits on the same split.

CPU time is the process's own (`time.process_time`), not wall time, so that other jobs on the
machine slow every arm's clock alike less than wall time would. Each seed changes the split, the
initialisation and the batches; intervals are 95 % percentile bootstraps over seeds.

    PYTHONPATH=$PWD python benchmarks/learning_efficiency.py --data ../shared/data --budget 20 --seeds 3 \
        --speed-seconds 2 --arms st_mem+hybrid resnet1d+simclr conv+simclr conv+cpc conv+jepa --doc out.md

(`--speed-only` stops after the speed measurement, e.g. `--speed-only --speed-repeats 5 --arms st_mem+hybrid
conv+cpc`.)

prints JSON and, with --doc, writes the markdown table (docs/learning_efficiency.md holds it, with the
learning-rate arms and the reading of both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fedssl.config import DataConfig, ModelConfig, ObjectiveConfig, Scenario, SiteConfig, TrainConfig
from fedssl.data.site import load_site
from fedssl.data.windows import RecordInfo, WindowSet
from fedssl.evaluate import linear_probe
from fedssl.monitor import embedding_health
from fedssl.objectives import build_objective
from fedssl.train import reuse_freed_memory, train_local

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BATCH = 32
MIN_POSITIVE_RECORDS = 15  # a diagnosis enters the probe task with at least this many records
TODAY = "st_mem+hybrid"  # the default before this benchmark: the reference of speed and quality


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    model: ModelConfig
    objective: ObjectiveConfig
    learning_rate: float = 1e-3


# conv_transformer arms as they were measured: two transformer blocks (the tiny size's), two token
# convolutions and, for CPC, 12 steps ahead, set here so that the arms do not move with the defaults
CONV = ModelConfig(encoder="conv_transformer", depth=2, local_blocks=2, token_samples=20, mlp_ratio=4)
CPC_ENCODER = dataclasses.replace(CONV, causal=True)
CPC12, CPC6, CPC4 = (ObjectiveConfig(name="cpc", prediction_steps=steps, prediction_stride=1) for steps in (12, 6, 4))
CPC_EVERY3 = dataclasses.replace(CPC12, prediction_stride=3)
ARMS = (
    Arm(TODAY, ModelConfig(encoder="st_mem"), ObjectiveConfig(name="hybrid")),
    Arm("resnet1d+simclr", ModelConfig(encoder="resnet1d"), ObjectiveConfig(name="simclr", view_probability=0.5)),
    Arm("conv+simclr", CONV, ObjectiveConfig(name="simclr", view_probability=0.5)),
    Arm("conv+simclr lr3e-3", CONV, ObjectiveConfig(name="simclr", view_probability=0.5), 3e-3),
    Arm("conv+hybrid", CONV, ObjectiveConfig(name="hybrid")),
    Arm("conv+cpc", CPC_ENCODER, CPC12),
    Arm("conv+cpc lr3e-4", CPC_ENCODER, CPC12, 3e-4),
    Arm("conv+cpc lr3e-3", CPC_ENCODER, CPC12, 3e-3),
    # cheaper CPC: one transformer block instead of two, and/or 6 steps (1.2 s) ahead instead of 12
    Arm("conv+cpc depth1", dataclasses.replace(CPC_ENCODER, depth=1), CPC12),
    Arm("conv+cpc ahead6", CPC_ENCODER, CPC6),
    Arm("conv+cpc depth1 ahead6", dataclasses.replace(CPC_ENCODER, depth=1), CPC6),
    # two blocks kept (one block lost the quickstart's margin over the hospitals alone), fewer steps ahead
    Arm("conv+cpc ahead4", CPC_ENCODER, CPC4),
    Arm("conv+cpc ahead3", CPC_ENCODER, ObjectiveConfig(name="cpc", prediction_steps=3)),
    # ... and one residual convolution over tokens instead of two
    Arm("conv+cpc local1 ahead6", dataclasses.replace(CPC_ENCODER, local_blocks=1), CPC6),
    Arm("conv+cpc local1 ahead4", dataclasses.replace(CPC_ENCODER, local_blocks=1), CPC4),
    # ... or a narrower MLP in the blocks (2 x width instead of 4 x), or tokens of 0.4 s instead of 0.2 s
    # (25 per 10 s; 6 steps ahead reach as far as 12 of 0.2 s)
    Arm("conv+cpc mlp2 ahead4", dataclasses.replace(CPC_ENCODER, mlp_ratio=2), CPC4),
    Arm("conv+cpc tokens40 ahead6", dataclasses.replace(CPC_ENCODER, token_samples=40), CPC6),
    Arm("conv+cpc tokens40 ahead12", dataclasses.replace(CPC_ENCODER, token_samples=40), CPC12),
    # as far ahead (12 steps, 2.4 s) with a third or a quarter of the predictions: k = 3, 6, 9, 12 or 4, 8, 12
    Arm("conv+cpc every3", CPC_ENCODER, CPC_EVERY3),
    Arm("conv+cpc every4", CPC_ENCODER, dataclasses.replace(CPC12, prediction_stride=4)),
    Arm("conv+cpc mlp2 every3", dataclasses.replace(CPC_ENCODER, mlp_ratio=2), CPC_EVERY3),
    Arm("conv+cpc local1 every3", dataclasses.replace(CPC_ENCODER, local_blocks=1), CPC_EVERY3),
    # 12 steps ahead, every one of them, on a smaller encoder
    Arm("conv+cpc local1 mlp2", dataclasses.replace(CPC_ENCODER, local_blocks=1, mlp_ratio=2), CPC12),
    Arm("conv+cpc depth1 local1", dataclasses.replace(CPC_ENCODER, depth=1, local_blocks=1), CPC12),
    Arm("conv+cpc depth1 mlp2", dataclasses.replace(CPC_ENCODER, depth=1, mlp_ratio=2), CPC12),
    Arm("conv+cpc local1 mlp2 ahead6", dataclasses.replace(CPC_ENCODER, local_blocks=1, mlp_ratio=2), CPC6),
    Arm("conv+cpc mlp2 ahead6", dataclasses.replace(CPC_ENCODER, mlp_ratio=2), CPC6),
    Arm("conv+jepa", CONV, ObjectiveConfig(name="jepa")),
)


def scenario(arm: Arm, seed: int) -> Scenario:
    return Scenario(seed=seed, model=arm.model, objective=arm.objective,
                    train=TrainConfig(batch_size=BATCH, learning_rate=arm.learning_rate, threads=1))


def load_data(data_root: Path, cache: Path) -> tuple[WindowSet, WindowSet]:
    """(labelled CinC 2020 + 2021 windows with common diagnoses only, unlabelled LUDB windows)."""
    data = DataConfig()
    sets = {name: load_site(SiteConfig(name, folder=str(data_root / folder)), data, cache, 0)
            for name, folder in (("cinc2020", "cinc2020"), ("cinc2021", "cinc2021"), ("ludb", "ludb/data"))}
    labelled = WindowSet.concat([sets["cinc2020"], sets["cinc2021"]])
    counts = Counter(code for r in labelled.records for code in set(r.labels))
    common = {code for code, n in counts.items() if n >= MIN_POSITIVE_RECORDS}
    records = tuple(RecordInfo(r.record_id, r.patient_id, tuple(c for c in r.labels if c in common))
                    for r in labelled.records)
    return dataclasses.replace(labelled, records=records), sets["ludb"]


def samples_per_second(arm: Arm, windows: WindowSet, seconds: float) -> float:
    """Training samples per CPU second of one thread, forward + backward + step, for `seconds`."""
    reuse_freed_memory()  # as train_local does
    objective = build_objective(scenario(arm, 0)).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=arm.learning_rate, fused=True)  # as train_local's
    x, mask = torch.from_numpy(windows.windows[:BATCH]), torch.from_numpy(windows.lead_mask[:BATCH])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective(x, mask)["loss"].backward()
        optimizer.step()
        objective.after_step()

    step()  # warm-up: allocations, kernel choice
    start, steps = time.process_time(), 0
    while time.process_time() - start < seconds:
        step()
        steps += 1
    return BATCH * steps / (time.process_time() - start)


def probe(encoder: torch.nn.Module, train: WindowSet, test: WindowSet) -> float:
    return linear_probe(encoder, train, test).macro_auroc


def pretrain_curve(arm: Arm, speed: float, budget: float, pool: WindowSet, train: WindowSet, test: WindowSet,
                   seed: int, checkpoints: int = 4) -> list[dict]:
    """Probe AUROC (and the collapse monitor) after each of `checkpoints` equal parts of a training
    run planned to last `budget` CPU seconds at `speed` samples/s."""
    objective = build_objective(scenario(arm, seed))
    cfg = scenario(arm, seed).train
    planned = max(checkpoints, round(budget * speed / BATCH))
    bounds = np.linspace(0, planned, checkpoints + 1).round().astype(int)
    cpu, curve = 0.0, []
    for part, (first, last) in enumerate(zip(bounds[:-1], bounds[1:])):
        start = time.process_time()
        result = train_local(objective, pool, cfg, steps=int(last - first), seed=seed * 100 + part,
                             planned_steps=planned, first_step=int(first))
        cpu += time.process_time() - start
        curve.append({"steps": int(last), "samples": int(last) * BATCH, "cpu_seconds": round(cpu, 2),
                      "loss": round(result.losses["loss"], 4), "auroc": round(probe(objective.encoder, train, test), 4),
                      **{k: round(v, 4) for k, v in embedding_health(objective.encoder, train).items()}})
    return curve


def bootstrap(values: list[float], resamples: int = 10000, seed: int = 0) -> dict:
    """Mean and 95 % percentile-bootstrap interval of the mean."""
    v = np.asarray(values, float)
    means = np.random.default_rng(seed).choice(v, (resamples, len(v))).mean(1)
    return {"mean": round(float(v.mean()), 4), "ci95": [round(float(q), 4) for q in np.percentile(means, [2.5, 97.5])],
            "runs": [round(float(x), 4) for x in v]}


def time_to(curve: list[dict], target: float) -> float | None:
    """CPU seconds until the probe first reached `target` (None: not within the budget)."""
    return next((point["cpu_seconds"] for point in curve if point["auroc"] >= target), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fedssl-learning-efficiency"))
    parser.add_argument("--budget", type=float, default=20.0, help="CPU seconds of pretraining per arm and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--inits", type=int, default=3, help="random inits per encoder and seed")
    parser.add_argument("--speed-seconds", type=float, default=3.0, help="CPU seconds per speed measurement")
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--arms", nargs="*", default=[a.name for a in ARMS])
    parser.add_argument("--doc", type=Path, help="write the markdown table here")
    parser.add_argument("--speed-only", action="store_true",
                        help="measure samples/s per core only (no pretraining, no probe): prints its JSON")
    args = parser.parse_args(argv)
    if not (args.data / "cinc2020").is_dir():
        print(f"no real ECGs at {args.data} (needs cinc2020/, cinc2021/, ludb/)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    arms = [a for a in ARMS if a.name in args.arms]
    labelled, unlabelled = load_data(args.data, args.cache)

    speeds: dict[str, list[float]] = {a.name: [] for a in arms}
    for _ in range(args.speed_repeats):  # round-robin: the machine's load hits every arm alike
        for arm in arms:
            speeds[arm.name].append(samples_per_second(arm, labelled, args.speed_seconds))
    speed = {name: statistics.median(v) for name, v in speeds.items()}
    if args.speed_only:
        print(json.dumps({"batch": BATCH, "speed_seconds": args.speed_seconds, "arms": {
            name: {"samples_per_second": round(speed[name], 1), "speed_runs": [round(s, 1) for s in speeds[name]],
                   "speed_vs_today": round(speed[name] / speed[TODAY], 2) if TODAY in speed else None}
            for name in speed}}, indent=1))
        return 0

    curves: dict[str, list[list[dict]]] = {a.name: [] for a in arms}
    random_init: dict[ModelConfig, list[float]] = {}  # per encoder setting: arms that share it share its inits
    for seed in range(args.seeds):
        train, test = labelled.split_by_patient(0.5, seed)  # by record: these sets carry no patient ids
        pool = WindowSet.concat([train, unlabelled])  # no probe-test record is ever pretrained on
        for arm in arms:
            if len(random_init.get(arm.model, [])) < (seed + 1):
                inits = [probe(build_objective(scenario(arm, 1000 + 10 * seed + i)).encoder, train, test)
                         for i in range(args.inits)]
                random_init.setdefault(arm.model, []).append(float(np.mean(inits)))
            curves[arm.name].append(pretrain_curve(arm, speed[arm.name], args.budget, pool, train, test, seed))
            print(f"seed {seed} {arm.name}: {[p['auroc'] for p in curves[arm.name][-1]]}", file=sys.stderr, flush=True)

    target = float(np.mean([c[-1]["auroc"] for c in curves[TODAY]])) if TODAY in curves else None
    results = {}
    for arm in arms:
        final = [c[-1]["auroc"] for c in curves[arm.name]]
        results[arm.name] = {
            "encoder": dataclasses.asdict(arm.model), "objective": dataclasses.asdict(arm.objective),
            "learning_rate": arm.learning_rate,
            "samples_per_second": round(speed[arm.name], 1), "speed_runs": [round(s, 1) for s in speeds[arm.name]],
            "speed_vs_today": round(speed[arm.name] / speed[TODAY], 2) if TODAY in speed else None,
            "final_auroc": bootstrap(final),
            "minus_random_init": bootstrap([f - r for f, r in zip(final, random_init[arm.model])]),
            "random_init": bootstrap(random_init[arm.model]),
            "cpu_seconds_to_today_final": [time_to(c, target) for c in curves[arm.name]] if target else None,
            "final_embedding_rank": bootstrap([c[-1]["embedding_rank"] for c in curves[arm.name]]),
            "curves": curves[arm.name],
        }
    report = {"budget_cpu_seconds": args.budget, "seeds": args.seeds, "inits": args.inits, "batch": BATCH,
              "probe": {"labelled_records": len(labelled.records), "labelled_windows": len(labelled),
                        "classes": list(labelled.classes()), "unlabelled_windows": len(unlabelled)},
              "today_final_auroc": target, "arms": results}
    print(json.dumps(report, indent=1))
    if args.doc:
        args.doc.write_text(markdown(report, " ".join(["python benchmarks/learning_efficiency.py", *(argv or sys.argv[1:])])))
    return 0


def markdown(report: dict, command: str) -> str:
    def interval(s: dict) -> str:
        return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"

    rows = ["| arm | samples/s per core | x today | probe AUROC at budget | minus random init | random init | "
            "CPU s to today's final AUROC (per seed) | RankMe at end |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["arms"].items():
        reached = ", ".join("-" if t is None else f"{t:.0f}" for t in (r["cpu_seconds_to_today_final"] or []))
        ratio = "-" if r["speed_vs_today"] is None else f"{r['speed_vs_today']:.1f}"
        rows.append(f"| {name} | {r['samples_per_second']:.0f} | {ratio} | {interval(r['final_auroc'])} | "
                    f"{interval(r['minus_random_init'])} | {interval(r['random_init'])} | {reached} | "
                    f"{r['final_embedding_rank']['mean']:.1f} |")
    p = report["probe"]
    return "\n".join([
        "# Learning efficiency: encoder x objective", "",
        f"Command (PYTHONPATH=$PWD, one thread, {report['budget_cpu_seconds']:g} CPU s of pretraining per arm and seed, "
        f"{report['seeds']} seeds, random init = mean of {report['inits']} inits per seed):", "",
        f"```\n{command}\n```", "",
        f"Probe: macro AUROC of a linear probe over {len(p['classes'])} diagnoses ({', '.join(p['classes'])}) of "
        f"{p['labelled_records']} CinC 2020/2021 records ({p['labelled_windows']} windows), split 50/50 by record per "
        f"seed; pretraining on the probe-train records plus {p['unlabelled_windows']} unlabelled LUDB windows. "
        "Intervals: 95 % bootstrap over seeds. \"minus random init\" is paired per seed (same split).", "",
        *rows, ""])


if __name__ == "__main__":
    raise SystemExit(main())
