"""The `fedssl` command: simulate a federation, pretrain centrally, evaluate an encoder, check a
site's data, write synthetic hospitals."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedssl import deploy
from fedssl.config import ConfigError, DataConfig, SyntheticSiteConfig, load_scenario
from fedssl.data.site import SiteDataError, build_site


def _simulate(args: argparse.Namespace) -> None:
    from simulations.run import (  # the runner drives Flower's CLI
        FederationError,
        run_scenario,
    )

    try:
        run_scenario(Path(args.scenario), out_dir=Path(args.out) if args.out else None, verbose=args.verbose)
    except FederationError as err:
        raise RuntimeError(err) from None


def _check_site(args: argparse.Namespace) -> None:
    """Read a site's records and print what training would use; nothing is sent anywhere."""
    data = load_scenario(args.scenario).data if args.scenario else DataConfig()
    cache = Path(args.cache) if args.cache else Path(args.folder) / ".fedssl-cache"
    windows = build_site(Path(args.folder), data, cache)
    report = json.loads((cache / "report.json").read_text())
    print(json.dumps(report, indent=2))
    print(f"{len(windows)} windows of {windows.window_samples} samples from "
          f"{len(windows.records)} records; cache and report in {cache}")


def _synthesize(args: argparse.Namespace) -> None:
    from fedssl.data.synthetic import write_synthetic_site

    spec = SyntheticSiteConfig(records=args.records, sample_rate=args.sample_rate, mains_hz=args.mains_hz)
    names = write_synthetic_site(Path(args.folder), spec, seed=args.seed)
    print(f"wrote {len(names)} synthetic WFDB records to {args.folder}")


def _pretrain(args: argparse.Namespace) -> None:
    """Centralized pretraining on the pooled sites with the federation's budget in samples seen."""
    import torch

    from fedssl.baselines import centralized_state
    from fedssl.config import save_scenario
    from fedssl.storage import atomic_torch_save

    scenario = load_scenario(args.scenario)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(scenario.train.threads)
    state, result = centralized_state(scenario, Path(args.data) if args.data else out / "data")
    atomic_torch_save(state, out / "encoder.pt")
    save_scenario(scenario, out / "scenario.yaml")
    summary = {"scenario": str(args.scenario), "sites": len(scenario.sites), "steps": result.steps,
               "samples_seen": result.examples, "batch_size": scenario.train.batch_size,
               "losses": result.losses, "seconds": round(result.seconds, 1), "encoder": str(out / "encoder.pt")}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
    return values


def _evaluate(args: argparse.Namespace) -> None:
    """Linear probe (and fine-tuning) of a saved encoder with label efficiency over seeds."""
    import torch

    from fedssl.evaluate import label_efficiency, probe_data, results_table
    from fedssl.objectives import build_objective

    scenario = load_scenario(args.scenario)
    torch.set_num_threads(scenario.train.threads)
    encoder = build_objective(scenario).encoder
    try:
        encoder.load_state_dict(torch.load(args.encoder, map_location="cpu", weights_only=True))
    except (RuntimeError, KeyError) as err:  # wrong architecture for this scenario
        raise ConfigError(f"encoder {args.encoder} does not fit the scenario's model: {err}") from None
    out = Path(args.out) if args.out else Path(args.encoder).parent
    out.mkdir(parents=True, exist_ok=True)
    train, test = probe_data(scenario, Path(args.data) if args.data else out / "data")
    try:
        results = label_efficiency(encoder, train, test, fractions=args.label_fractions, seeds=args.seeds,
                                   finetune=args.finetune, l2=scenario.evaluation.probe_l2, seed=scenario.seed,
                                   finetune_kwargs={"epochs": args.epochs})
    except ValueError as err:
        raise RuntimeError(err) from None
    report = {"scenario": str(args.scenario), "encoder": str(args.encoder), "seeds": args.seeds, **results}
    path = out / "evaluation.json"
    path.write_text(json.dumps(report, indent=2))
    print(results_table(results))
    print(f"per-class AUROC and every seed's result in {path}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedssl", description=__doc__)
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a federation scenario in Flower's simulation engine",
                       description="Run a scenario YAML through Flower's simulation engine, then "
                                   "compare the federated encoder with random init and local-only training.")
    p.add_argument("scenario", help="scenario YAML, e.g. simulations/quickstart.yaml")
    p.add_argument("--out", help="run folder (default: runs/<scenario>-<time>)")
    p.set_defaults(run=_simulate)

    p = sub.add_parser("pretrain", help="centralized pretraining on a scenario's pooled sites",
                       description="Train the scenario's objective on all sites' windows pooled, with the "
                                   "federation's budget (sites x rounds x local_steps steps of the same "
                                   "batch size), and save the encoder as OUT/encoder.pt.")
    p.add_argument("scenario", help="scenario YAML")
    p.add_argument("--out", required=True, help="output folder (encoder.pt, pretrain.json)")
    p.add_argument("--data", help="folder for materialised sites and caches (default: OUT/data)")
    p.set_defaults(run=_pretrain)

    p = sub.add_parser("evaluate", help="linear probe / fine-tuning of an encoder with label efficiency",
                       description="Linear probe (and with --finetune, end-to-end fine-tuning) of a saved "
                                   "encoder on the scenario's held-out labelled set: macro and per-class "
                                   "AUROC on 1/10/100%% of the labelled records, mean ± std over seeds. "
                                   "Prints a table and writes evaluation.json.")
    p.add_argument("scenario", help="scenario YAML (model and evaluation settings)")
    p.add_argument("--encoder", required=True, help="encoder state dict, e.g. RUN/encoder.pt")
    p.add_argument("--seeds", type=int, default=3, help="repetitions with different label subsets (default 3)")
    p.add_argument("--label-fractions", type=_fractions, default=(0.01, 0.1, 1.0),
                   help="comma-separated fractions of labelled records (default 0.01,0.1,1.0)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune encoder + linear head end to end")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    p.add_argument("--out", help="folder for evaluation.json (default: the encoder's folder)")
    p.add_argument("--data", help="folder for the materialised evaluation set (default: OUT/data)")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("check-site", help="read a folder of WFDB records and report what would be used",
                       description="Build a site's window cache and print its data report "
                                   "(used and skipped records with reasons). Nothing leaves the machine.")
    p.add_argument("folder", help="folder of WFDB records (.hea with .dat or .mat)")
    p.add_argument("--scenario", help="scenario YAML whose data settings to use (default: built-in)")
    p.add_argument("--cache", help="cache folder (default: FOLDER/.fedssl-cache)")
    p.set_defaults(run=_check_site)

    p = sub.add_parser("synthesize", help="write a synthetic hospital as WFDB files",
                       description="Write seeded synthetic 12-lead ECGs with SNOMED labels as WFDB records.")
    p.add_argument("folder")
    p.add_argument("--records", type=int, default=60)
    p.add_argument("--sample-rate", type=int, default=500)
    p.add_argument("--mains-hz", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synthesize)
    deploy.register(sub)  # fedssl certs, fedssl node-key
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        args.run(args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, SiteDataError, OSError, RuntimeError) as err:
        print(f"fedssl {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
