"""Real-data benchmark: the real ECG sources of ../shared/data federated as hospitals.

    .venv/bin/python benchmarks/real_data.py [--data DIR] [--scenario simulations/real_sources.yaml]
        [--set key=value ...] [--seeds 3] [--arms ...] [--work DIR] [--reuse] [--docs docs]
    .venv/bin/python benchmarks/real_data.py --render   # rewrite docs/real_data.md from docs/real_data.json

Hospitals are the sources (non-IID by nature: recorder, population, label practice): CPSC2018
(`cinc2020/A*`), CPSC-Extra (`Q*`), Chapman-Shaoxing/Ningbo (`JS*` of cinc2020 and cinc2021),
PTB-XL (`HR*`, both), Georgia (`E*`, both) and LUDB. A fixed share of every source's patients
(`--holdout`, drawn once with `--holdout-seed`) is held out of pretraining and labelled for the
probe task through a labels CSV (`evaluation.labels_csv`): sinus rhythm, atrial fibrillation,
sinus bradycardia, sinus tachycardia and right bundle branch block (SNOMED-CT; LUDB's rhythm
and conduction text mapped to the same codes; a record with none of them is a negative for
all). These sources keep one recording per patient and carry no patient id, so the hold-out and
every probe split are by record, which here is by patient.

Arms, each seed (pretraining seed s and probe split seed s, `seed: s` in the scenario):
- federated: a Flower simulation (`simulations.run.run_scenario`) over the source hospitals;
- centralized: the pooled sources, the same samples seen (`fedssl.baselines.centralized_state`);
- local_only: each source alone with the federation's per-site budget (`local_only_state`);
- random_init: `evaluation.random_inits` untrained encoders;
- federated_small / local_only_small: the same pretraining records cut into small hospitals of
  about `--small-site-records` records (contiguous in source order, so most hold one source).
Every encoder is probed on the same held-out split of its seed (`fedssl.evaluate.ProbeSplits`);
means over seeds carry 95 % bootstrap intervals over seeds and then test patients, differences
paired intervals. Site folders are symlinks into the data folder (nothing is copied).
Writes docs/real_data.{json,md} and prints the JSON.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedssl.baselines import centralized_state, local_only_state, probe_states, random_init_states
from fedssl.config import ConfigError, Scenario, SiteConfig, from_dict, save_scenario, to_dict
from fedssl.check import check_scenario
from fedssl.data.site import load_site
from fedssl.evaluate import ProbeSplits, difference, held_out_set, summarise
from fedssl.runfolder import RunFolder
from simulations.run import run_scenario

TEMPLATE = ROOT / "simulations" / "real_sources.yaml"
DATA = ROOT.parent / "shared" / "data"
DOCS = ROOT / "docs"
# hospital: (dataset folder under the data folder, record-name prefix) of its records
SOURCES = {
    "cpsc2018": (("cinc2020", "A"),),
    "cpsc_extra": (("cinc2020", "Q"),),
    "chapman_ningbo": (("cinc2020", "JS"), ("cinc2021", "JS")),
    "ptb_xl": (("cinc2020", "HR"), ("cinc2021", "HR")),
    "georgia": (("cinc2020", "E"), ("cinc2021", "E")),
    "ludb": (("ludb/data", ""),),
}
# the probe task (SNOMED-CT), and the LUDB header text that names each code
TASK = {
    "426783006": "sinus rhythm",
    "164889003": "atrial fibrillation",
    "426177001": "sinus bradycardia",
    "427084000": "sinus tachycardia",
    "59118001": "right bundle branch block",
}
LUDB_CODES = {
    "Rhythm: Sinus rhythm": "426783006",
    "Rhythm: Atrial fibrillation": "164889003",
    "Rhythm: Sinus bradycardia": "426177001",
    "Rhythm: Sinus tachycardia": "427084000",
    "Complete right bundle branch block": "59118001",
}
ARMS = ("federated", "centralized", "local_only", "random_init", "federated_small", "local_only_small")
# centralized on a share of every source's pretraining records, the same steps: does more data help?
DATA_CURVE = {"centralized_quarter": 0.25, "centralized_half": 0.5}
TARGETS = {"federated - random_init": 0.08, "federated - mean local_only": 0.05, "federated / centralized": 0.97}


def fail(message: str) -> None:
    """Bad input: one line and exit code 2, before anything trains."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# -- records, hold-out, site folders ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceRecord:
    hospital: str
    dataset: str  # folder under the data folder
    header: Path

    @property
    def name(self) -> str:
        """Its path in a site folder: hospital/dataset/record (record names repeat across datasets)."""
        return f"{self.hospital}/{self.dataset.split('/')[0]}/{self.header.stem}"

    def files(self) -> list[Path]:
        """The header and the signal files it names (LUDB's annotation files are not needed)."""
        lines = [line for line in self.header.read_text().splitlines() if line.strip() and not line.startswith("#")]
        signal_files = {line.split()[0] for line in lines[1:]}
        return [self.header] + [self.header.parent / name for name in sorted(signal_files)]


def source_records(data: Path) -> list[SourceRecord]:
    records = []
    for hospital, parts in SOURCES.items():
        for dataset, prefix in parts:
            pattern = re.compile(rf"{prefix}\d+$")
            records += [SourceRecord(hospital, dataset, header) for header in sorted((data / dataset).glob("*.hea"))
                        if pattern.match(header.stem)]
    if not records:
        fail(f"no source records under {data} (expected cinc2020/, cinc2021/, ludb/)")
    return records


def task_labels(record: SourceRecord, ludb: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The record's probe-task codes: CinC `# Dx:` codes, or LUDB's diagnoses mapped to codes."""
    if record.hospital == "ludb":
        return tuple(code for code in ludb.get(record.header.stem, ()) if code in TASK)
    codes = []
    for line in record.header.read_text().splitlines():
        key, _, value = line.lstrip("#").partition(":")
        if line.startswith("#") and key.strip().lower() == "dx":
            codes += [code.strip() for code in value.split(",")]
    return tuple(code for code in TASK if code in codes)


def ludb_codes(data: Path) -> dict[str, tuple[str, ...]]:
    """LUDB record number -> SNOMED codes, from `ludb/labels_from_headers.csv` (its diagnoses column
    lists the header's statements, separated by `|`)."""
    with (data / "ludb" / "labels_from_headers.csv").open(newline="") as file:
        return {Path(row["record"]).name: tuple(LUDB_CODES[d.strip()] for d in row["diagnoses"].split("|")
                                                if d.strip() in LUDB_CODES)
                for row in csv.DictReader(file)}


def hold_out(records: list[SourceRecord], fraction: float, seed: int) -> tuple[list[SourceRecord], list[SourceRecord]]:
    """(pretraining, held-out): `fraction` of every hospital's records (= patients here), at random."""
    rng = np.random.default_rng(seed)
    pretraining, held = [], []
    for hospital in SOURCES:
        own = [r for r in records if r.hospital == hospital]
        order = rng.permutation(len(own))
        cut = int(round(fraction * len(own)))
        held += [own[i] for i in sorted(order[:cut])]
        pretraining += [own[i] for i in sorted(order[cut:])]
    return pretraining, held


def share_of(records: list[SourceRecord], fraction: float) -> list[SourceRecord]:
    """The first `fraction` of `records` (at least one) in a fixed shuffled order: nested shares."""
    order = np.random.default_rng(0).permutation(len(records))
    return [records[i] for i in sorted(order[: max(1, int(round(fraction * len(records))))])]


def small_sites(records: list[SourceRecord], per_site: int) -> dict[str, list[SourceRecord]]:
    """The records cut into sites of about `per_site`, contiguous in source order (most sites hold
    one source, as a small hospital would; the cuts where sources meet mix two)."""
    count = max(2, int(round(len(records) / per_site)))
    return {f"small_{i:02d}": [records[j] for j in part]
            for i, part in enumerate(np.array_split(np.arange(len(records)), count))}


def symlink_folder(folder: Path, records: list[SourceRecord], strip: str = "") -> Path:
    """A fresh `folder` of symlinks to the records' files under their `name` (minus `strip`)."""
    if folder.exists():
        shutil.rmtree(folder)
    for record in records:
        target = folder / record.name.removeprefix(strip)
        target.parent.mkdir(parents=True, exist_ok=True)
        for source in record.files():
            (target.parent / source.name).symlink_to(source.resolve())
    return folder


def write_task_csv(path: Path, records: list[SourceRecord], ludb: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """The held-out records' task labels as a labels CSV (`record,labels`); positives per class."""
    rows = [(r.name, ";".join(task_labels(r, ludb))) for r in records]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["record", "labels"])
        writer.writerows(rows)
    return {f"{code} {TASK[code]}": sum(code in labels.split(";") for _, labels in rows) for code in TASK}


# -- scenarios --------------------------------------------------------------------------------------

def load_template(path: Path, overrides: list[str]) -> Scenario:
    """The template scenario with `key=value` overrides (dotted keys, YAML values) applied."""
    values = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"--set {override!r}: expected key=value")
        *parents, last = key.strip().split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(text)
    return from_dict(Scenario, values)


def arm_scenario(template: Scenario, name: str, seed: int, sites: dict[str, Path], held_out: Path,
                 labels_csv: Path) -> Scenario:
    return dataclasses.replace(
        template, name=f"{template.name}-{name}", seed=seed,
        sites=tuple(SiteConfig(site, folder=str(folder)) for site, folder in sites.items()),
        federation=dataclasses.replace(template.federation, min_sites=len(sites)),
        evaluation=dataclasses.replace(template.evaluation, folder=str(held_out), synthetic=None,
                                       labels_csv=str(labels_csv), local_baselines=False))


def samples_seen(scenario: Scenario, windows: dict[str, int]) -> dict[str, int]:
    """Windows seen by the federation (every site: rounds x local steps x its batch) and by the
    centralized encoder (as many steps of the same batch on the pool)."""
    steps, batch = scenario.federation.rounds * scenario.train.local_steps, scenario.train.batch_size
    return {"federated": sum(steps * min(batch, n) for n in windows.values()),
            "centralized": len(windows) * steps * min(batch, sum(windows.values())),
            "local_only_per_site": {site: steps * min(batch, n) for site, n in windows.items()}}


# -- arms -------------------------------------------------------------------------------------------

class Benchmark:
    """Trains (or, with `reuse`, reloads) every arm's encoders of every seed in `work`, then probes them."""

    def __init__(self, template: Scenario, data: Path, work: Path, *, holdout: float, holdout_seed: int,
                 small_site_records: int, reuse: bool) -> None:
        self.template, self.work, self.reuse = template, work, reuse
        # encoders are kept per template settings: --reuse never returns encoders of other settings
        self.settings = hashlib.sha256(json.dumps(to_dict(template), sort_keys=True).encode()).hexdigest()[:12]
        records = source_records(data)
        ludb = ludb_codes(data)
        pretraining, held = hold_out(records, holdout, holdout_seed)
        self.held_out = symlink_folder(work / "held_out", held)
        self.labels_csv = work / "held_out_labels.csv"
        self.positives = write_task_csv(self.labels_csv, held, ludb)
        self.sources = {h: symlink_folder(work / "sites" / h, [r for r in pretraining if r.hospital == h], f"{h}/")
                        for h in SOURCES}
        cut = small_sites(pretraining, small_site_records)
        self.small = {name: symlink_folder(work / "small_sites" / name, part) for name, part in cut.items()}
        self.curve = {arm: {h: symlink_folder(work / "curve" / arm / h, share_of([r for r in pretraining if r.hospital == h],
                                                                                   fraction), f"{h}/")
                            for h in SOURCES} for arm, fraction in DATA_CURVE.items()}
        self.records = {"held_out": len(held), "pretraining": len(pretraining),
                        "sources": {h: sum(r.hospital == h for r in pretraining) for h in SOURCES},
                        "held_out_by_source": {h: sum(r.hospital == h for r in held) for h in SOURCES},
                        "small_sites": {name: len(part) for name, part in cut.items()}}
        self.data_dir = work / "data"  # one window cache for every arm and seed (the folders do not change)
        self.seconds: dict[str, float] = {}

    def scenario(self, arm: str, seed: int) -> Scenario:
        sites = self.small if arm.endswith("_small") else self.curve.get(arm, self.sources)
        return arm_scenario(self.template, arm, seed, sites, self.held_out, self.labels_csv)

    def states(self, arm: str, seed: int) -> dict[str, dict[str, torch.Tensor]]:
        """{encoder name: weights} of the arm at `seed`, trained once and kept in the work folder."""
        path = self.work / "states" / self.settings / f"seed{seed}" / f"{arm}.pt"
        if self.reuse and path.exists():
            log(f"seed {seed} {arm}: reused {path}")
            return torch.load(path, weights_only=True)
        started = time.perf_counter()
        scenario = self.scenario(arm, seed)
        if arm.startswith("federated"):
            states = {arm: self.federated(scenario, self.run_dir(arm, seed))}
        elif arm.startswith("centralized"):
            states = {arm: centralized_state(scenario, self.data_dir)[0]}
        elif arm.startswith("local_only"):
            states = {f"{arm}/{site.name}": local_only_state(scenario, i, self.data_dir)[0]
                      for i, site in enumerate(scenario.sites)}
        else:  # random_init: other inits for every seed
            inits = dataclasses.replace(scenario, seed=seed * scenario.evaluation.random_inits)
            states = {f"random_init/{i}": state for i, state in enumerate(random_init_states(inits))}
        self.seconds[f"seed{seed}/{arm}"] = round(time.perf_counter() - started, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(states, path)
        log(f"seed {seed} {arm}: {len(states)} encoder(s) in {self.seconds[f'seed{seed}/{arm}']:.0f}s")
        return states

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.work / "runs" / self.settings / f"seed{seed}" / arm

    def federated(self, scenario: Scenario, run_dir: Path) -> dict[str, torch.Tensor]:
        """A real Flower simulation of the scenario; its run folder shares the benchmark's window cache."""
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "data").exists():
            (run_dir / "data").symlink_to(self.data_dir.resolve(), target_is_directory=True)
        path = run_dir.with_suffix(".yaml")
        save_scenario(scenario, path)
        run_scenario(path, out_dir=run_dir, echo=lambda line: log(f"  {scenario.name}: {line}"))
        return torch.load(run_dir / "encoder.pt", weights_only=True)

    def by_round(self, arm: str, seed: int) -> list[dict]:
        rounds = RunFolder(self.run_dir(arm, seed)).rounds()
        return [{"round": r.round, "probe_macro_auroc": r.probe_macro_auroc,
                 "probe_macro_auroc_ci95": r.probe_macro_auroc_ci95, "loss": r.losses.get("loss")} for r in rounds]


def evaluate(bench: Benchmark, seeds: list[int], arms: list[str]) -> dict:
    """Every arm's encoders of every seed probed on that seed's held-out split; means, intervals,
    paired differences and the targets."""
    base = bench.scenario("federated", seeds[0])
    held = held_out_set(base, bench.data_dir)
    results: dict[str, list] = {}  # encoder (or group of encoders) -> probe results over seeds
    for seed in seeds:
        probe = ProbeSplits.from_windows(held, base.evaluation.test_fraction, 1, seed, base.evaluation.probe_l2)
        for arm in arms:
            for name, state in bench.states(arm, seed).items():
                (result,) = probe_states(base, probe, [state])
                if arm == "random_init":  # the inits of a seed: one reference, their mean
                    results.setdefault(arm, []).append(result)
                    continue
                results.setdefault(name, []).append(result)
                if arm.startswith("local_only"):  # each hospital alone, and their mean
                    results.setdefault(f"mean {arm}", []).append(result)
    replicates = base.evaluation.bootstrap
    encoders = {name: summarise(runs, replicates) for name, runs in results.items()}
    pairs = [("federated", "random_init"), ("federated", "mean local_only"), ("federated", "centralized"),
             ("federated_small", "random_init"), ("federated_small", "mean local_only_small"),
             ("federated_small", "federated"), ("centralized", "random_init"),
             *((arm, "random_init") for arm in DATA_CURVE)]
    differences = {f"{a} - {b}": difference(results[a], results[b], replicates)
                   for a, b in pairs if a in results and b in results}
    targets = {}
    for key, target in TARGETS.items():
        if key in differences:
            targets[key] = {"value": differences[key]["mean"], "ci95": differences[key]["ci95"], "target": target,
                            "met": differences[key]["mean"] >= target}
    if "federated" in encoders and "centralized" in encoders:
        ratio = encoders["federated"]["macro_auroc"] / encoders["centralized"]["macro_auroc"]
        targets["federated / centralized"] = {"value": ratio, "target": TARGETS["federated / centralized"],
                                              "met": ratio >= TARGETS["federated / centralized"]}
    windows = {arm: {site.name: len(load_site(site, base.data, bench.data_dir, base.seed))
                     for site in bench.scenario(arm, seeds[0]).sites}
               for arm in ("federated", "federated_small") if arm in arms}
    return {"encoders": encoders, "differences": differences, "targets": targets,
            "probe": {"held_out_windows": len(held), "test_fraction": base.evaluation.test_fraction,
                      "classes": {c: TASK[c] for c in TASK if c in held.classes()}},
            "by_round": {arm: {str(s): bench.by_round(arm, s) for s in seeds} for arm in arms
                         if arm.startswith("federated")},
            "windows": windows, "samples_seen": {arm: samples_seen(base, w) for arm, w in windows.items()}}


def budget(scenario: Scenario) -> dict:
    return {"encoder": f"{scenario.model.encoder} {scenario.model.size}", "objective": scenario.objective.name,
            "rounds": scenario.federation.rounds, "local_steps": scenario.train.local_steps,
            "batch_size": scenario.train.batch_size, "learning_rate": scenario.train.learning_rate,
            "strategy": scenario.federation.strategy, "window_seconds": scenario.data.window_seconds,
            "sample_rate": scenario.data.sample_rate}


# -- report -----------------------------------------------------------------------------------------

def interval(summary: dict, key: str = "macro_auroc") -> str:
    return f"{summary[key]:.3f} [{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}]"


def render(report: dict) -> str:
    """docs/real_data.md from the JSON report."""
    e, d = report["encoders"], report["differences"]
    order = ["federated", "centralized", *DATA_CURVE, "mean local_only", "random_init", "federated_small",
             "mean local_only_small"]
    labels = {"federated": f"federated ({len(report['records']['sources'])} source hospitals)",
              "centralized": "centralized (pooled, same samples seen)",
              "mean local_only": "local-only, mean over the source hospitals",
              "random_init": f"random init (mean of {report['random_inits']} inits per seed)",
              "federated_small": f"federated, {len(report['records']['small_sites'])} small hospitals",
              "mean local_only_small": "local-only, mean over the small hospitals",
              **{arm: f"centralized on {share:.0%} of every source's pretraining records, same steps"
                 for arm, share in DATA_CURVE.items()}}
    b = report["budget"]
    task = ", ".join(f"{name} ({report['positives'][code + ' ' + name]} held-out positives)"
                     for code, name in report["task"].items())
    sources = ", ".join(f"{h} {n}" for h, n in report["records"]["sources"].items())
    lines = [
        "# Real-data benchmark: federated across real ECG sources",
        "",
        (f"Produced by `{report['command']}` on {report['date']} ({report['machine']}), "
         f"{report['seconds'] / 60:.0f} min of arm wall time. Raw numbers (every run, per class, per round): "
         "[real_data.json](real_data.json); re-render with `python benchmarks/real_data.py --render`."),
        "",
        (f"**Data.** {report['records']['pretraining'] + report['records']['held_out']} real 12-lead records of "
         f"../shared/data in six source hospitals ({sources} "
         f"records for pretraining). {report['records']['held_out']} records "
         f"({report['holdout']:.0%} of every source, drawn once) are held out of pretraining for the probe. "
         "The sources keep one recording per patient and no patient id, so the hold-out and every probe split "
         "are by record, that is by patient."),
        "",
        (f"**Probe task.** Linear probe (frozen encoder, L2 logistic regression), macro AUROC over "
         f"{task}; "
         "SNOMED-CT codes from the CinC `# Dx:` lines, LUDB's header text mapped to the same codes, written as the "
         "held-out folder's labels CSV. Each seed draws its own half of the held-out patients as the probe's "
         "test side."),
        "",
        (f"**Budget.** {b['encoder']}, {b['objective']}; {b['rounds']} rounds x {b['local_steps']} local steps x "
         f"batch {b['batch_size']} ({b['strategy']}); centralized sees as many samples as the whole federation, "
         "each local-only hospital as many as it trained in the federation. Seeds "
         f"{', '.join(map(str, report['seeds']))} (pretraining seed and probe split)."),
        "",
        "| encoder | macro AUROC, mean of seeds [95 % interval] | runs |",
        "|---|---|---|",
    ]
    lines += [f"| {labels[name]} | {interval(e[name])} | {len(e[name]['runs'])} |" for name in order if name in e]
    lines += ["", "| difference | mean [95 % paired interval] | target | met |", "|---|---|---|---|"]
    targets = report["targets"]
    for name, diff in d.items():
        target = targets.get(name)
        lines.append(f"| {name} | {diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] | "
                     f"{'>= +' + format(target['target'], '.2f') if target else ''} | "
                     f"{('yes' if target['met'] else 'no') if target else ''} |")
    if "federated / centralized" in targets:
        t = targets["federated / centralized"]
        lines.append(f"| federated / centralized | {t['value']:.3f} | >= {t['target']:.2f} | {'yes' if t['met'] else 'no'} |")
    lines += ["", ("Intervals: 2.5 / 97.5 percentiles of a two-level bootstrap (seeds, then held-out test "
                   "patients), 1000 replicates; a difference is paired (both encoders resampled with the same "
                   "patients). A difference whose interval contains 0 is no difference."), ""]
    per_site = [(name, s) for name, s in e.items() if name.startswith("local_only")]
    if per_site:
        lines += ["| local-only hospital | macro AUROC [95 % interval] |", "|---|---|"]
        lines += [f"| {name.split('/', 1)[1]} | {interval(s)} |" for name, s in per_site]
        lines.append("")
    lines += by_round_table(report)
    lines += ["## Notes", ""] + [line for note in report.get("notes", []) + NOTES for line in (note, "")]
    return "\n".join(lines).rstrip() + "\n"


def by_round_table(report: dict) -> list[str]:
    """The server's per-round probe of the global encoder, mean over seeds (every seed's in the JSON)."""
    arms = {arm: seeds for arm, seeds in report.get("by_round", {}).items() if seeds}
    if not arms:
        return []
    rounds = max(len(rows) for seeds in arms.values() for rows in seeds.values())
    lines = ["## Probe of the global encoder per round", "",
             ("Macro AUROC of the ServerApp's per-round probe (`probe_macro_auroc` in each run's metrics.jsonl), "
              "mean over seeds; random init for reference: "
              f"{report['encoders']['random_init']['macro_auroc']:.3f}." if "random_init" in report["encoders"]
              else "Macro AUROC of the ServerApp's per-round probe, mean over seeds."), "",
             "| round | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for r in range(rounds):
        cells = []
        for seeds in arms.values():
            values = [rows[r]["probe_macro_auroc"] for rows in seeds.values()
                      if len(rows) > r and rows[r]["probe_macro_auroc"] is not None]
            cells.append(f"{np.mean(values):.3f}" if values else "-")
        lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
    return lines + [""]


NOTES = [
    ("**A hospital's own labels.** The probe's labels reach fedssl as a labels CSV "
     "(`evaluation.labels_csv`, or `labels_csv` of a site): a header row naming `record` and `labels`, "
     "optionally `patient`; `record` is the record's path in its folder without suffix (`ludb/ludb/1`) or its "
     "header's name; `labels` its codes separated by `;`; `patient` its patient id, by which every split and "
     "every bootstrap then groups the records. Listed records take their labels from the CSV instead of "
     "`# Dx:` or ptbxl_database.csv; a `# Patient:` header comment gives the patient where the CSV does not."),
    ("**Rerun after changing the defaults.** `model`, `objective` and `federation.strategy` are not set in "
     "simulations/real_sources.yaml, so a run without `--set model.*` / `--set objective.*` / "
     "`--set federation.strategy=...` measures the project's defaults; `--reuse --work DIR` re-probes "
     "encoders already trained in DIR."),
]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__}, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="the shared data folder (cinc2020/, cinc2021/, ludb/)")
    parser.add_argument("--scenario", default=str(TEMPLATE), help="template scenario (model, objective, budget)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a template key, e.g. model.encoder=resnet1d (repeatable)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: pretraining seed and probe split")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=[*ARMS, *DATA_CURVE],
                        help=f"arms to run; {', '.join(DATA_CURVE)}: centralized on a share of the records")
    parser.add_argument("--holdout", type=float, default=0.4, help="share of every source held out for the probe")
    parser.add_argument("--holdout-seed", type=int, default=0)
    parser.add_argument("--small-site-records", type=int, default=40, help="records per small hospital")
    parser.add_argument("--work", help="work folder (symlink folders, caches, runs, encoders); default: a temp one")
    parser.add_argument("--reuse", action="store_true", help="reuse encoders already trained in --work")
    parser.add_argument("--docs", default=str(DOCS), help="where real_data.{json,md} go")
    parser.add_argument("--render", action="store_true", help="only rewrite real_data.md from real_data.json")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the doc's notes (repeatable)")
    args = parser.parse_args()
    docs = Path(args.docs)
    if args.render:
        (docs / "real_data.md").write_text(render(json.loads((docs / "real_data.json").read_text())))
        return
    data = Path(args.data)
    if not (data / "cinc2020").is_dir() or not (data / "ludb").is_dir():
        fail(f"{data} has no cinc2020/ and ludb/ (the shared real ECG data); pass --data")
    try:
        template = load_template(Path(args.scenario), args.set)
    except (ConfigError, OSError, yaml.YAMLError) as err:
        fail(str(err))
    torch.set_num_threads(template.train.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fedssl-real-data-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder: {work}")
    bench = Benchmark(template, data, work, holdout=args.holdout, holdout_seed=args.holdout_seed,
                      small_site_records=args.small_site_records, reuse=args.reuse)
    try:  # every arm's scenario refused in seconds, before anything trains
        for arm in args.arms:
            check_scenario(bench.scenario(arm, 0))
    except ConfigError as err:
        fail(str(err))
    log(f"records: {json.dumps(bench.records)}; held-out positives: {json.dumps(bench.positives)}")
    seeds = list(range(args.seeds))
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--note" and (i == 0 or sys.argv[i] != "--note")]
    report = {"command": "python " + " ".join(["benchmarks/real_data.py", *argv]),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "machine": machine(),
              "seeds": seeds, "holdout": args.holdout, "holdout_seed": args.holdout_seed,
              "random_inits": template.evaluation.random_inits, "budget": budget(template),
              "scenario": to_dict(dataclasses.replace(template, sites=())), "task": TASK,
              "positives": bench.positives, "records": bench.records,
              **evaluate(bench, seeds, args.arms), "notes": args.note}
    report["arm_seconds"] = bench.seconds
    report["seconds"] = round(sum(bench.seconds.values()), 1)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "real_data.json").write_text(json.dumps(report, indent=2) + "\n")
    (docs / "real_data.md").write_text(render(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
