"""Federated linear-probe AUROC against each site's DP-SGD budget epsilon, all arms on one budget.

    .venv/bin/python benchmarks/dp_utility.py [--objectives generative,hybrid_byol] [--epsilons 1,4,8,inf]
                                              [--rounds 5] [--local-steps 10] [--batch 32] [--out runs/dp_utility]
                                              [--reuse]

Every arm is the quickstart scenario (simulations/quickstart.yaml: three synthetic hospitals, the
tiny ST-MEM encoder, the probe population) with one DP-safe objective and one epsilon, run as a
federation on Flower's simulation engine through `simulations.run.run_scenario`. All arms share
the training budget (rounds, local steps, (expected) batch size, learning rate) and the seed; with
a finite epsilon every site trains with DP-SGD (record-level, noise calibrated so that all rounds
spend exactly epsilon), `inf` is the same federation without DP. The metric is the final global
encoder's linear-probe macro AUROC on held-out labelled windows (plus the random-init encoder's,
the floor that training must beat). Writes docs/privacy_utility.md and .json; prints the JSON.
The issue's target: epsilon 8 within 0.05 AUROC of the non-DP federation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedssl.config import PrivacyConfig, Scenario, load_scenario, save_scenario
from fedssl.privacy import LEDGER_FILE
from simulations.run import run_scenario

TARGET_GAP = 0.05  # AUROC at epsilon 8 within this of the non-DP federation


def arm_scenario(base: Scenario, objective: str, epsilon: float, args: argparse.Namespace) -> Scenario:
    """The quickstart federation with `objective`, DP-SGD at `epsilon` at every site (inf: no DP)."""
    label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    return dataclasses.replace(
        base, name=f"dp-utility-{objective}-eps{label}",
        objective=dataclasses.replace(base.objective, name=objective, view_probability=0.5),  # as measured
        train=dataclasses.replace(base.train, batch_size=args.batch, local_steps=args.local_steps),
        federation=dataclasses.replace(base.federation, rounds=args.rounds),
        evaluation=dataclasses.replace(base.evaluation, every_round=False, local_baselines=False),
        privacy=PrivacyConfig() if math.isinf(epsilon) else PrivacyConfig(enabled=True, target_epsilon=epsilon),
    )


def run_arm(scenario: Scenario, out: Path, timeout: float, reuse: bool = False) -> dict:
    """One federation; its run folder's data is a link to `out/data`, which all arms share (the
    sites, seed and data settings are the same, so they would generate the same records). With
    `reuse`, a finished run of the same scenario in `out` is read instead of run again."""
    folder, run_dir = out / scenario.name, out / scenario.name / "run"
    finished = (run_dir / "summary.json").is_file() and (folder / "scenario.yaml").is_file()
    if not (reuse and finished and load_scenario(folder / "scenario.yaml") == scenario):
        run_dir.mkdir(parents=True, exist_ok=True)
        (out / "data").mkdir(exist_ok=True)
        if not (run_dir / "data").exists():
            (run_dir / "data").symlink_to(out / "data", target_is_directory=True)
        save_scenario(scenario, folder / "scenario.yaml")
        run_scenario(folder / "scenario.yaml", run_dir, timeout=timeout, overwrite=True, echo=lambda line: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    noise = {}
    for site in summary["sites"]:
        ledger = run_dir / "sites" / site / LEDGER_FILE
        if ledger.is_file():
            entries = json.loads(ledger.read_text())["entries"]
            noise[site] = round(entries[-1]["noise_multiplier"], 3)
    return {
        "macro_auroc": round(summary["encoders"]["federated"]["macro_auroc"], 4),
        "random_init_macro_auroc": round(summary["encoders"]["random_init"]["macro_auroc"], 4),
        "epsilon_spent": {site: round(values[-1], 3) for site, values in summary["epsilon_by_site"].items()},
        "noise_multiplier": noise,
        "declined": sorted({s for r in summary["declined_by_round"] for s in r}),
        "final_loss": summary["final_loss"],
        "seconds": summary["wall_seconds"],
        "run_dir": str(run_dir),
    }


def markdown(report: dict, command: str) -> str:
    epsilons = report["epsilons"]
    head = " | ".join(f"epsilon {e}" for e in epsilons)
    lines = [
        "# Utility of DP-SGD: linear-probe AUROC against epsilon",
        "",
        "Written by `benchmarks/dp_utility.py` (see its docstring); measured with",
        "",
        f"```bash\n{command}\n```",
        "",
        (f"Quickstart federation (3 synthetic hospitals, tiny ST-MEM encoder), {report['rounds']} rounds x "
         f"{report['local_steps']} local steps, (expected) batch {report['batch']}, the same seed for every arm; "
         f"DP-SGD at every site, record-level, max_grad_norm {report['max_grad_norm']}, delta "
         f"min(1e-5, 1/(10 units)), noise calibrated so that all rounds spend epsilon. Metric: the final global "
         f"encoder's linear-probe macro AUROC on the held-out {report['probe_test_fraction']:g} of "
         f"{report['probe_records']} labelled synthetic records of seven conditions (never seen in pretraining)."),
        "",
        f"| objective | {head} | random init | gap at epsilon 8 |",
        "|---|" + "---|" * (len(epsilons) + 2),
    ]
    for name, arms in report["objectives"].items():
        cells = [f"{arms[e]['macro_auroc']:.3f}" if e in arms else "not run" for e in epsilons]
        random_init = next(iter(arms.values()))["random_init_macro_auroc"]
        gap = report["gap_at_8"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {random_init:.3f} | "
                     + ("n/a" if gap is None else f"{gap:+.3f}") + " |")
    lines += ["", "Noise multiplier per site (hospital_a / clinic_b / cardiology_c) and wall seconds per arm:", "",
              "| objective | epsilon | noise multipliers | epsilon spent (max) | seconds |", "|---|---|---|---|---|"]
    for name, arms in report["objectives"].items():
        for e, arm in arms.items():
            sigmas = " / ".join(f"{s:g}" for s in arm["noise_multiplier"].values()) or "no DP"
            spent = max(arm["epsilon_spent"].values()) if arm["epsilon_spent"] else "-"
            lines.append(f"| {name} | {e} | {sigmas} | {spent} | {arm['seconds']} |")
    missing = [name for name in report.get("requested_objectives", []) if name not in report["objectives"]]
    missing += [f"{name} at epsilon {e}" for name, arms in report["objectives"].items() for e in epsilons if e not in arms]
    if missing:
        lines += ["", f"Not measured (the run was stopped before these arms): {', '.join(missing)}."]
    lines += ["", f"Total wall time: {report['wall_seconds']} s on the project's shared 2-core machine.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", default="generative,hybrid_byol")
    parser.add_argument("--epsilons", default="1,4,8,inf")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "dp_utility")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per federation")
    parser.add_argument("--reuse", action="store_true", help="read arms already finished in --out")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/privacy_utility.md/.json")
    args = parser.parse_args()
    base = load_scenario(ROOT / "simulations" / "quickstart.yaml")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    started = time.perf_counter()
    labels = ["inf" if math.isinf(e) else f"{e:g}" for e in sorted(epsilons)]  # table order
    results: dict[str, dict[str, dict]] = {}
    for objective in args.objectives.split(","):
        results[objective] = {}
        for epsilon in sorted(epsilons, reverse=True):  # no DP and epsilon 8 first: the target's arms
            label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
            results[objective][label] = run_arm(arm_scenario(base, objective, epsilon, args), args.out, args.timeout, args.reuse)
            print(f"{objective} epsilon {label}: {results[objective][label]['macro_auroc']}", file=sys.stderr)
            report = summarise(results, labels, base, args, time.perf_counter() - started)
            if not args.no_docs:  # after every arm: an interrupted run keeps what it measured
                command = " ".join([".venv/bin/python benchmarks/dp_utility.py", *sys.argv[1:]])
                (ROOT / "docs" / "privacy_utility.json").write_text(json.dumps(report, indent=2) + "\n")
                (ROOT / "docs" / "privacy_utility.md").write_text(markdown(report, command))
    print(json.dumps(report, indent=2))


def summarise(results: dict, labels: list[str], base: Scenario, args: argparse.Namespace, seconds: float) -> dict:
    gap = {name: round(arms["8"]["macro_auroc"] - arms["inf"]["macro_auroc"], 4)
           for name, arms in results.items() if "8" in arms and "inf" in arms}
    return {
        "requested_objectives": args.objectives.split(","), "epsilons": labels, "rounds": args.rounds, "local_steps": args.local_steps, "batch": args.batch,
        "max_grad_norm": PrivacyConfig().max_grad_norm,
        "probe_records": base.evaluation.synthetic.records, "probe_test_fraction": base.evaluation.test_fraction,
        "objectives": results, "gap_at_8": gap, "target_gap": TARGET_GAP,
        "target_met": {name: g >= -TARGET_GAP for name, g in gap.items()},
        "wall_seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
