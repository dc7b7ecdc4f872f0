"""The `fedssl` command: check a scenario, simulate a federation, pretrain centrally, evaluate an
encoder, check a site's data, write synthetic hospitals, report on a run, export its encoder, embed
records, follow a run in the browser, make a real federation's key material, and run one: the
hospital's node (`node`), the coordinator's SuperLink (`coordinator`), its registrations
(`register`), runs (`launch`) and their state (`status`).

This module is the project's one entry point, so it is the one module of `fedssl` that reaches
outside the science core: the runner (`simulations`), the dashboard and the operations tooling
(`ops`) are imported inside the subcommand that uses them, never when the module is imported
(tests/test_layout.py checks it).

Bad input (a scenario, a folder, a file) ends a command with one line on stderr and exit code 2:
the errors of fedssl's checks are ValueErrors (ConfigError, SiteDataError, RunFolderError, ...) or
OSErrors; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedssl.config import ConfigError, DataConfig, SyntheticSiteConfig, load_scenario
from fedssl.data.site import check_site
from fedssl.sitefile import load_site_file


def _check(args: argparse.Namespace) -> None:
    """Every check that `simulate` and `launch` run before they generate data or start Flower."""
    from simulations.run import check

    scenario = load_scenario(args.scenario)
    check(scenario)
    print(f"{args.scenario}: scenario {scenario.name!r} is valid ({len(scenario.sites)} sites, "
          f"{scenario.model.encoder} {scenario.model.size}, objective {scenario.objective.name}, "
          f"{scenario.federation.rounds} rounds of {scenario.federation.strategy})")


def _simulate(args: argparse.Namespace) -> None:
    from simulations.run import (  # the runner drives Flower's CLI
        FederationError,
        run_scenario,
    )

    try:
        run_scenario(Path(args.scenario), out_dir=Path(args.out) if args.out else None, verbose=args.verbose,
                     resume=args.resume, overwrite=args.overwrite)
    except FederationError as err:
        raise RuntimeError(err) from None


def _check_site(args: argparse.Namespace) -> None:
    """Read a site's records and print what training would use; nothing is sent anywhere."""
    data = load_scenario(args.scenario).data if args.scenario else DataConfig()
    cache = Path(args.cache) if args.cache else Path(args.folder) / ".fedssl-cache"
    report, summary = check_site(Path(args.folder), data, cache)
    print(json.dumps(report, indent=2))
    print(summary)


def _synthesize(args: argparse.Namespace) -> None:
    from fedssl.data.synthetic import write_synthetic_site

    try:
        spec = SyntheticSiteConfig(records=args.records, sample_rate=args.sample_rate, mains_hz=args.mains_hz)
    except ConfigError as err:  # named as the option that set it
        raise ConfigError(f"--{str(err).replace('_', '-')}") from None
    names = write_synthetic_site(Path(args.folder), spec, seed=args.seed)
    print(f"wrote {len(names)} synthetic WFDB records to {args.folder}")


def _pretrain(args: argparse.Namespace) -> None:
    """Centralized pretraining on the pooled sites with the federation's budget in samples seen."""
    import torch

    from fedssl.baselines import centralized_state
    from fedssl.check import check_scenario
    from fedssl.runfolder import RunFolder
    from fedssl.storage import atomic_torch_save

    scenario = load_scenario(args.scenario)
    check_scenario(scenario)
    out = RunFolder(args.out)
    if out.encoder.exists():  # e.g. a federated run's encoder: never replaced by a baseline
        raise ConfigError(f"--out {out.root} already holds an {out.encoder.name}; choose another --out")
    out.root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(scenario.train.threads)
    state, result = centralized_state(scenario, Path(args.data) if args.data else out.data)
    atomic_torch_save(state, out.encoder)
    out.keep_scenario(scenario, args.scenario)
    summary = {"scenario": str(args.scenario), "sites": len(scenario.sites), "steps": result.steps,
               "samples_seen": result.examples, "batch_size": scenario.train.batch_size,
               "losses": result.losses, "seconds": round(result.seconds, 1), "encoder": str(out.encoder)}
    out.path("pretrain.json").write_text(json.dumps(summary, indent=2))
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

    from fedssl.check import check_scenario
    from fedssl.evaluate import label_efficiency, probe_data, results_table
    from fedssl.export import check_state, load_state_file
    from fedssl.objectives import build_objective

    scenario = load_scenario(args.scenario)
    check_scenario(scenario)
    torch.set_num_threads(scenario.train.threads)
    encoder = build_objective(scenario).encoder
    state = load_state_file(args.encoder)
    check_state(encoder, state, args.encoder)
    encoder.load_state_dict(state)
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


def _report(args: argparse.Namespace) -> None:
    from fedssl.report import write_report

    print(f"report: {write_report(Path(args.run_dir))}")


def _export(args: argparse.Namespace) -> None:
    from fedssl.export import CARD, export_run

    out = export_run(Path(args.run_dir), Path(args.out))
    print(f"exported the encoder of {args.run_dir} to {out} (model card: {out / CARD})")


def _embed(args: argparse.Namespace) -> None:
    from fedssl.export import embed_folder, skipped_summary

    result = embed_folder(Path(args.model_dir), Path(args.records_dir), progress=not args.quiet)
    path = result.save(Path(args.out))
    records = len(set(result.record_ids))
    print(f"embedded {len(result.windows)} windows of {records} records ({result.windows.shape[1]} dimensions) "
          f"into {path}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unusable records ({skipped_summary(result.skipped)}); "
              "their ids and reasons are in skipped_records / skipped_reasons")


def _certs(args: argparse.Namespace) -> None:
    from ops.deploy import DEFAULT_HOSTS, make_certificates, verify_server_certificate

    hosts = list(DEFAULT_HOSTS) + list(args.host or [])
    out = make_certificates(args.folder, hosts, days=args.days, overwrite=args.force)
    verify_server_certificate(out.server_cert, out.ca_cert, hosts[0])
    print(f"CA: {out.ca_cert} (give this file to every hospital), {out.ca_key} (keep offline)")
    print(f"SuperLink: {out.server_cert}, {out.server_key} for {', '.join(dict.fromkeys(hosts))}")
    print(f"start it: `fedssl coordinator coordinator.yaml` with `certificates: {out.ca_cert.parent}` in the file")


def _node_key(args: argparse.Namespace) -> None:
    from ops.deploy import check_node_key, make_node_key

    out = make_node_key(args.folder, args.site, overwrite=args.force)  # an invalid name: ValueError, exit 2
    print(f"private key: {out.private_key} (stays here: `node_key:` in the site file)")
    print(f"public key:  {out.public_key}, fingerprint {check_node_key(out.private_key)} (send the file to the "
          f"coordinator, who runs `fedssl register {out.public_key.name} --site {args.site}`; read them the "
          "fingerprint over the phone)")


NODE_USAGE = "fedssl node SITE.yaml | fedssl node approve SITE.yaml [FINGERPRINT] | fedssl node audit SITE.yaml"


def _node(args: argparse.Namespace) -> int:
    """The hospital's node in the foreground, or its plans waiting for approval, or its audit log."""
    from ops.node import approve_plan, audit_table, pending_table, run_node

    action = args.words[0] if args.words[0] in ("approve", "audit") else None
    rest = args.words[1:] if action else args.words
    if not (len(rest) == 1 or (action == "approve" and len(rest) == 2)):
        raise ConfigError(f"expected {NODE_USAGE}")
    if action is None:
        return run_node(Path(rest[0]), dict(os.environ))
    site = load_site_file(rest[0])
    if action == "audit":
        _print_tables(audit_table(site))
    elif len(rest) == 2:
        print(f"{site.site}: approved plan {approve_plan(site, rest[1])}; its rounds will train here")
    elif (table := pending_table(site)) is not None:
        _print_tables(table)
    else:
        print(f"{site.site}: no plan is waiting for approval")
    return 0


def _print_tables(*tables) -> None:
    """Rich tables on standard output; as wide as they need when it is not a terminal (a log, a pipe)."""
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=240)
    for table in tables:
        console.print(table)


def _coordinator(args: argparse.Namespace) -> int:
    from ops.coordinator import run_coordinator

    return run_coordinator(Path(args.coordinator_file), dict(os.environ))


def _register(args: argparse.Namespace) -> None:
    from ops.coordinator import load_coordinator_file, register

    node_id, fingerprint = register(load_coordinator_file(args.coordinator), Path(args.public_key), args.site,
                                    dict(os.environ))
    print(f"registered {args.site} as node {node_id} (key {fingerprint}: the fingerprint the hospital's "
          "`fedssl node` prints at start)")


def _launch(args: argparse.Namespace) -> int:
    """The checks of `fedssl check` (the sites' folders are theirs), then the run at the SuperLink."""
    from ops.coordinator import launch, load_coordinator_file
    from simulations.run import check

    coordinator = load_coordinator_file(args.coordinator)
    scenario = load_scenario(args.scenario)
    check(scenario, site_folders=False)
    run_dir = Path(args.run_dir) if args.run_dir else coordinator.runs_folder / scenario.name
    return launch(coordinator, Path(args.scenario), run_dir, resume=args.resume, environ=dict(os.environ),
                  echo=lambda line: print(line, flush=True))


def _status(args: argparse.Namespace) -> None:
    from ops.coordinator import load_coordinator_file, status_tables

    _print_tables(*status_tables(load_coordinator_file(args.coordinator), Path(args.run_dir) if args.run_dir else None,
                                 dict(os.environ)))


def _dashboard(args: argparse.Namespace) -> None:
    from dashboard.app import serve  # the web server is operations, not the science core: imported on use

    serve(Path(args.run_dir), host=args.host, port=args.port, token=args.token)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedssl", description=__doc__)
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="check a scenario without running it",
                       description="Check every setting of a scenario YAML and every combination that cannot "
                                   "work, build its model once on a dummy window, and say what is wrong with "
                                   "the dotted key and what would work (exit code 2), in seconds. `simulate` "
                                   "runs the same checks first.")
    p.add_argument("scenario", help="scenario YAML")
    p.set_defaults(run=_check)

    p = sub.add_parser("simulate", help="run a federation scenario in Flower's simulation engine",
                       description="Run a scenario YAML through Flower's simulation engine, then "
                                   "compare the federated encoder with random init and local-only training.")
    p.add_argument("scenario", help="scenario YAML, e.g. simulations/quickstart.yaml")
    p.add_argument("--out", help="run folder (default: runs/<scenario>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out after its last completed round (after a crash or kill)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an existing --out; its earlier results (site state included) are "
                        "moved to --out/earlier/<time>/, never deleted")
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

    p = sub.add_parser("report", help="write a run folder's report (report.md with plots) again",
                       description="Regenerate RUN_DIR/report.md and its PNG plots (loss terms, probe AUROC, "
                                   "epsilon per site, round wall time, participation) from the run's files.")
    p.add_argument("run_dir", help="run folder (scenario.yaml, metrics.jsonl, ...)")
    p.set_defaults(run=_report)

    p = sub.add_parser("export", help="export a run's encoder as safetensors with a model card",
                       description="Write the run's final global encoder as OUT/encoder.safetensors, the "
                                   "config that rebuilds it (encoder_config.json) and OUT/MODEL_CARD.md.")
    p.add_argument("run_dir", help="run folder (scenario.yaml, metrics.jsonl, encoder.pt)")
    p.add_argument("--out", required=True, help="export folder")
    p.set_defaults(run=_export)

    p = sub.add_parser("embed", help="embed a folder of WFDB records with an exported encoder",
                       description="Read every WFDB record under RECORDS_DIR with the encoder's training "
                                   "preprocessing and write each window's embedding, its record id and window "
                                   "index, each record's mean embedding and the skipped records with reasons "
                                   "to an .npz file.")
    p.add_argument("model_dir", help="folder written by `fedssl export`")
    p.add_argument("records_dir", help="folder of WFDB records (.hea with .dat or .mat)")
    p.add_argument("--out", default="embeddings.npz", help="output .npz file (default embeddings.npz)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_embed)

    p = sub.add_parser("dashboard", help="follow a run folder live in the browser (read-only)",
                       description="Serve a live web page of RUN_DIR: run state, rounds, per-site participation "
                                   "and privacy spent, loss terms, probe AUROC, round wall time. It only reads "
                                   "the run folder; another address than loopback needs --token.")
    p.add_argument("run_dir", help="run folder (of `fedssl simulate`, or the ServerApp's run-dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050; 0: any free port)")
    p.add_argument("--token", default=os.environ.get("FEDSSL_DASHBOARD_TOKEN"),
                   help="secret every request must carry (required off loopback; default $FEDSSL_DASHBOARD_TOKEN)")
    p.set_defaults(run=_dashboard)

    p = sub.add_parser("certs", help="make a CA and the SuperLink's TLS certificate",
                       description="Write ca.crt/ca.key and server.pem/server.key (valid for "
                                   "127.0.0.1, localhost and every --host) to FOLDER.")
    p.add_argument("folder")
    p.add_argument("--host", action="append", help="extra IP or DNS name of the SuperLink (repeatable)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(run=_certs)

    p = sub.add_parser("node-key", help="make a hospital's SuperNode authentication key pair",
                       description="Write SITE.key (OpenSSH EC P-384 private key) and "
                                   "SITE.key.pub (to register at the SuperLink) to FOLDER.")
    p.add_argument("folder")
    p.add_argument("--site", required=True, help="the site's name in the scenario")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.set_defaults(run=_node_key)

    p = sub.add_parser("node", help="the hospital's node: run it, approve plans, print its audit log",
                       usage=NODE_USAGE.replace(" | ", "\n       "),
                       description="`node SITE.yaml` checks the site's data, node key and CA certificate, then "
                                   "runs the site's SuperNode (and training worker) in the foreground until "
                                   "stopped, logging to the site log. `node approve SITE.yaml` lists the plans "
                                   "waiting for approval (policy.manual_approval), `node approve SITE.yaml "
                                   "FINGERPRINT` approves one (a unique prefix will do). `node audit SITE.yaml` "
                                   "prints the site's audit log.")
    p.add_argument("words", nargs="+", help=argparse.SUPPRESS)
    p.set_defaults(run=_node)

    coordinator_option = {"default": "coordinator.yaml", "help": "coordinator file (default coordinator.yaml)"}
    p = sub.add_parser("coordinator", help="run the coordinator's SuperLink in the foreground",
                       description="Run Flower's SuperLink with TLS, SuperNode authentication and its state "
                                   "database, all from COORDINATOR.yaml, until stopped.")
    p.add_argument("coordinator_file", metavar="COORDINATOR.yaml")
    p.set_defaults(run=_coordinator)

    p = sub.add_parser("register", help="register a hospital's public key at the SuperLink",
                       description="Register SITE.key.pub (from the hospital's `fedssl node-key`) under the "
                                   "site's name; prints the node id and the key's fingerprint to check with "
                                   "the hospital over a second channel.")
    p.add_argument("public_key", metavar="KEY.pub")
    p.add_argument("--site", required=True, help="the site's name (as in the scenario and its site file)")
    p.add_argument("--coordinator", **coordinator_option)
    p.set_defaults(run=_register)

    p = sub.add_parser("launch", help="submit a scenario's run to the SuperLink and follow it",
                       description="Check the scenario (as `fedssl check`), stage the app, submit the run and "
                                   "print the ServerApp's `fedssl | ...` lines until it ends; exit code 0 "
                                   "only if it completed.")
    p.add_argument("scenario", help="scenario YAML (read on this machine only)")
    p.add_argument("--coordinator", **coordinator_option)
    p.add_argument("--run-dir", help="run folder (default: <runs>/<scenario name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir after its last checkpoint")
    p.set_defaults(run=_launch)

    p = sub.add_parser("status", help="sites registered / online, and a run's state",
                       description="Every registered site (online or offline, since when, last seen by the run, "
                                   "rounds trained, epsilon, declines) and the state of RUN_DIR's run (default: "
                                   "the last launched): its round and last probe AUROC.")
    p.add_argument("run_dir", nargs="?", help="run folder (default: the last `fedssl launch`)")
    p.add_argument("--coordinator", **coordinator_option)
    p.set_defaults(run=_status)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.run(args) or 0  # a command that ran may end nonzero (a failed run, a SuperNode that exited)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as err:  # ConfigError, SiteDataError, RunFolderError, ...
        print(f"fedssl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
