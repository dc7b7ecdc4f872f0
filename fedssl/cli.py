"""The `fedssl` command: simulate a federation, check a site's data, write synthetic hospitals."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedssl.config import ConfigError, DataConfig, SyntheticSiteConfig, load_scenario
from fedssl.data.site import SiteDataError, build_site


def _simulate(args: argparse.Namespace) -> None:
    from simulations.run import FederationError, run_scenario  # the runner drives Flower's CLI

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
