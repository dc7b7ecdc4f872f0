"""A site is a folder of WFDB records, turned once into a cached `WindowSet`.

Real folders hold broken and odd records; each unusable one is skipped with its reason in the
site's report instead of stopping the run, and only a site with nothing usable is an error.
The cache (`windows.npz`, `index.json`, `report.json`) is reused while the data settings and
every file's name, size and modification time are unchanged.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from fedssl.config import DataConfig, SiteConfig, to_dict
from fedssl.data.preprocess import RecordWindows, make_windows
from fedssl.data.records import (CatalogueEntry, RawRecord, RecordError, read_labels_csv,
                                 read_ptbxl_catalogue, read_record, reason_kind)
from fedssl.data.synthetic import write_synthetic_site
from fedssl.data.windows import STANDARD_LEADS, WindowSet
from fedssl.runfolder import inside

log = logging.getLogger("fedssl.data")

CACHE_VERSION = 2  # bump when preprocessing changes, so that older caches are rebuilt
PTBXL_CATALOGUE = "ptbxl_database.csv"
SYNTHETIC_STAMP = "synthetic.json"  # what a materialised synthetic site was generated from


class SiteDataError(ValueError):
    """A site that yields no training data; the message names the folder and why."""


def load_site(site: SiteConfig, data: DataConfig, workdir: Path, seed: int) -> WindowSet:
    """The site's windows, generating (synthetic sites) and caching them on first use.

    A lock per site makes concurrent callers (a runner and its simulated sites, two processes
    sharing a workdir) wait for one build instead of racing on half-written files.
    """
    workdir = Path(workdir)
    # the site's paths, refused unless they are its own folders inside the workdir
    cache = inside(workdir / "cache", site.name)
    lock = inside(workdir / "cache", f".{site.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if site.synthetic is not None:
            folder = inside(workdir / "records", site.name)
            _materialise_synthetic(site, folder, seed_for(site.name, seed))
        else:
            folder = Path(site.folder)
        labels_csv = Path(site.labels_csv) if site.labels_csv else None
        return build_site(folder, data, cache, labels_csv)


def seed_for(name: str, seed: int) -> int:
    """A site's own seed, stable across processes (unlike `hash`), different for every site."""
    return zlib.crc32(f"{name}:{seed}".encode())


def build_site(folder: Path, cfg: DataConfig, cache_dir: Path, labels_csv: Path | None = None) -> WindowSet:
    """The windows of every usable record in `folder`; labels (and patients) from `labels_csv`
    where it lists a record, else from the folder's ptbxl_database.csv or the headers."""
    folder, cache_dir = Path(folder), Path(cache_dir)
    files = _list_files(folder, cache_dir)
    headers = [f for f in files if f.suffix == ".hea"]
    if not headers:
        raise SiteDataError(no_header_message(folder, files))
    if labels_csv is not None and not labels_csv.is_file():
        raise SiteDataError(f"labels CSV {labels_csv} does not exist or is not a file")
    fingerprint = _fingerprint(folder, files, cfg, labels_csv)
    cached = _load_cache(cache_dir, fingerprint)
    if cached is not None:
        windows, report = cached
        log.info("%s (cached)", _summary(report))
        return windows

    catalogue = _catalogue([f for f in files if f.name == PTBXL_CATALOGUE], labels_csv)
    index, used = [], []  # used: (info, windows) of each usable record
    for header in headers:
        entry, result, raw = _process(header, folder, catalogue, cfg)
        index.append(entry)
        if result is not None:
            used.append((raw.info, result))
    report = _report(folder, index)
    report_path = cache_dir / "report.json"
    if not used:
        _write_json(report_path, report)
        _write_json(cache_dir / "index.json", {"fingerprint": None, "records": index})
        raise SiteDataError(f"no usable ECG record in {folder}: {len(index)} skipped "
                            f"({_reasons_text(report)}); see {report_path}")

    windows = WindowSet(
        np.concatenate([r.windows for _, r in used]),
        np.concatenate([np.repeat(r.lead_mask[None], len(r.windows), 0) for _, r in used]),
        np.concatenate([np.full(len(r.windows), i, np.int64) for i, (_, r) in enumerate(used)]),
        tuple(info for info, _ in used),
    )
    windows.save(cache_dir / "windows.npz")
    _write_json(report_path, report)
    # last, because a matching fingerprint in the index is what makes the cache valid
    _write_json(cache_dir / "index.json", {"fingerprint": fingerprint, "records": index})
    log.info(_summary(report))
    return windows


def check_site(folder: Path, cfg: DataConfig, cache_dir: Path, labels_csv: Path | None = None) -> tuple[dict, str]:
    """What `fedssl check-site` and `fedssl node` report before any training: the site's windows
    built into `cache_dir`, the data report and a one-line summary."""
    windows = build_site(folder, cfg, cache_dir, labels_csv)
    report = json.loads((cache_dir / "report.json").read_text())
    return report, (f"{len(windows)} windows of {windows.window_samples} samples from {len(windows.records)} "
                    f"records ({report['skipped']} skipped{': ' + _reasons_text(report) if report['skipped'] else ''}); "
                    f"cache and report in {cache_dir}")


def no_header_message(folder: Path, files: list[Path]) -> str:
    """Why a folder holds no record: what it does hold, and what a record needs."""
    found = Counter(f.suffix.lower() or f.name for f in files)
    what = ", ".join(f"{n} {suffix}" for suffix, n in found.most_common(4)) or "no files"
    hint = ""
    if found.get(".mat"):
        hint = ("; .mat signal files are read only with a WFDB header (.hea) beside each, as PhysioNet/CinC 2020-2021 "
                "ship them: a .mat-only release (e.g. the original CPSC 2018) needs its headers, which "
                "the CinC 2020 copy of the same data provides")
    return (f"no WFDB record in site folder {folder}: found {what} but no .hea header; a record is a "
            f"<name>.hea header with its signal file (<name>.dat or <name>.mat){hint}")


def _process(header: Path, folder: Path, catalogue: dict[str, CatalogueEntry], cfg: DataConfig
             ) -> tuple[dict, RecordWindows | None, RawRecord | None]:
    """One record's index entry, and its windows if it is usable."""
    record_id = header.relative_to(folder).with_suffix("").as_posix()
    raw = result = reason = None
    try:
        raw = read_record(header, record_id, catalogue)
        result = make_windows(raw, cfg)
    except RecordError as err:
        reason = err.reason
    except (ValueError, TypeError, IndexError, KeyError, OSError) as err:  # wfdb's many ways to fail
        raw, reason = None, f"unreadable record: {type(err).__name__}: {err}"
    return _index_entry(record_id, raw, result, reason), result, raw


def _index_entry(record_id: str, raw: RawRecord | None, result: RecordWindows | None,
                 reason: str | None) -> dict:
    mask = result.lead_mask if result else raw.lead_mask if raw else np.zeros(len(STANDARD_LEADS), bool)
    return {
        "record_id": record_id,
        "patient_id": raw.patient_id if raw else None,
        "source_rate": raw.sample_rate if raw else None,
        "source_leads": list(raw.source_leads) if raw else [],
        "leads": [lead for lead, present in zip(STANDARD_LEADS, mask) if present],
        "seconds": raw.duration_seconds if raw else None,
        "labels": list(raw.labels) if raw else [],
        "status": "used" if result else "skipped",
        "reason": reason,
        "windows": len(result.windows) if result else 0,
        "notes": [*(raw.notes if raw else ()), *(result.notes if result else ())],
    }


def _report(folder: Path, index: list[dict]) -> dict:
    skipped = [e for e in index if e["status"] == "skipped"]
    return {
        "folder": str(folder),
        "records": len(index),
        "used": len(index) - len(skipped),
        "skipped": len(skipped),
        "windows": sum(e["windows"] for e in index),
        "skipped_by_reason": dict(Counter(reason_kind(e["reason"]) for e in skipped).most_common()),
        "notes": dict(Counter(reason_kind(n) for e in index for n in e["notes"]).most_common()),
        "skipped_records": [{"record_id": e["record_id"], "reason": e["reason"]} for e in skipped],
        "used_records": [{"record_id": e["record_id"], "windows": e["windows"], "leads": len(e["leads"])}
                         for e in index if e["status"] == "used"],
        # each note with the records it applies to, so that a reviewer can open them
        "noted_records": {kind: [e["record_id"] for e in index if any(reason_kind(n) == kind for n in e["notes"])]
                          for kind in dict.fromkeys(reason_kind(n) for e in index for n in e["notes"])},
    }


def _reasons_text(report: dict) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in report["skipped_by_reason"].items())


def _summary(report: dict) -> str:
    skipped = f" ({_reasons_text(report)})" if report["skipped"] else ""
    return (f"site {report['folder']}: {report['used']} records used, {report['skipped']} skipped"
            f"{skipped}, {report['windows']} windows")


def _list_files(folder: Path, cache_dir: Path) -> list[Path]:
    """Every file of the site, except a cache kept inside it (it would change the fingerprint)."""
    if not folder.is_dir():
        raise SiteDataError(f"site folder {folder} does not exist or is not a folder")

    def unreadable(err: OSError) -> None:
        raise SiteDataError(f"cannot read site folder {err.filename}: {err.strerror}")

    files = []
    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs[:] = [d for d in dirs if (Path(root) / d).resolve() != cache_dir.resolve()]
        files += [Path(root) / name for name in names]
    return sorted(files)


def _fingerprint(folder: Path, files: list[Path], cfg: DataConfig, labels_csv: Path | None) -> str:
    stats = [(f.relative_to(folder).as_posix(), f.stat()) for f in files]
    labels = labels_csv.stat() if labels_csv else None
    content = {
        "version": CACHE_VERSION,
        "data": dataclasses.asdict(cfg),
        "files": [(name, s.st_size, s.st_mtime_ns) for name, s in stats],
        "labels_csv": [str(labels_csv.resolve()), labels.st_size, labels.st_mtime_ns] if labels else None,
    }
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _load_cache(cache_dir: Path, fingerprint: str) -> tuple[WindowSet, dict] | None:
    try:
        if json.loads((cache_dir / "index.json").read_text())["fingerprint"] != fingerprint:
            return None
        report = json.loads((cache_dir / "report.json").read_text())
        return WindowSet.load(cache_dir / "windows.npz"), report
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # no cache, or a damaged one: rebuild


def _catalogue(ptbxl: list[Path], labels_csv: Path | None) -> dict[str, CatalogueEntry]:
    """What is known of the records beyond their headers; the labels CSV, given explicitly, wins."""
    catalogue = {}
    try:
        for path in ptbxl:
            catalogue |= read_ptbxl_catalogue(path)
        if labels_csv is not None:
            catalogue |= read_labels_csv(labels_csv)
    except ValueError as err:
        raise SiteDataError(str(err)) from None
    return catalogue


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)


def _materialise_synthetic(site: SiteConfig, folder: Path, seed: int) -> None:
    """Write the synthetic site's records once; into a temporary folder first, so that a crash
    never leaves half a site behind to be mistaken for a whole one."""
    stamp = json.dumps({"spec": to_dict(site.synthetic), "seed": seed}, sort_keys=True)
    marker = folder / SYNTHETIC_STAMP
    if marker.is_file() and marker.read_text() == stamp:
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_synthetic_site(tmp, site.synthetic, seed=seed)
        (tmp / SYNTHETIC_STAMP).write_text(stamp)
        if folder.exists():
            shutil.rmtree(folder)  # generated from another spec or seed
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
