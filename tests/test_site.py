"""Sites: folders of records become a cached WindowSet with a report of what was skipped and why."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fedssl.config import DataConfig, SiteConfig, SyntheticSiteConfig
from fedssl.data import site as site_module
from fedssl.data.site import SiteDataError, build_site, load_site, seed_for
from fedssl.data.windows import STANDARD_LEADS
from test_records import CFG, edit_header, ecg_like, write_mat_record, write_ptbxl_csv, write_record


def mixed_site(folder: Path) -> Path:
    """Three usable records (one in a subfolder) and three broken ones."""
    write_record(folder, "good", comments=["Dx: 426783006"])
    write_mat_record(folder / "hospital_b", "E00001", dx="164934002")
    write_record(folder, "two_leads", leads=("MLII", "V5"), fs=360)
    write_record(folder, "short", seconds=1.0)
    edit_header(write_record(folder, "fast"), "fast 3 250 ", "fast 3 1000000 ")
    write_record(folder, "nodat")
    (folder / "nodat.dat").unlink()
    return folder


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_mixed_site(tmp_path):
    windows = build_site(mixed_site(tmp_path / "site"), CFG, tmp_path / "cache")

    assert [r.record_id for r in windows.records] == ["good", "hospital_b/E00001", "two_leads"]
    assert [r.labels for r in windows.records] == [("426783006",), ("164934002",), ()]
    assert windows.windows.shape == (6, 12, 200) and np.isfinite(windows.windows).all()
    assert windows.record.tolist() == [0, 0, 1, 1, 2, 2]
    assert windows.lead_mask[-1].tolist() == [lead in ("II", "V5") for lead in STANDARD_LEADS]

    report = read_json(tmp_path / "cache" / "report.json")
    assert (report["records"], report["used"], report["skipped"], report["windows"]) == (6, 3, 3, 6)
    assert report["skipped_by_reason"] == {"too short": 1, "unsupported sampling rate": 1,
                                           "missing signal file": 1}
    assert {r["record_id"]: r["reason"].split(":")[0] for r in report["skipped_records"]} == {
        "short": "too short", "fast": "unsupported sampling rate", "nodat": "missing signal file"}

    index = {e["record_id"]: e for e in read_json(tmp_path / "cache" / "index.json")["records"]}
    assert index["two_leads"] == {
        "record_id": "two_leads", "patient_id": None, "source_rate": 360.0,
        "source_leads": ["MLII", "V5"], "leads": ["II", "V5"], "seconds": 4.0, "labels": [],
        "status": "used", "reason": None, "windows": 2, "notes": []}
    assert index["short"]["status"] == "skipped" and index["short"]["windows"] == 0
    assert index["nodat"]["source_rate"] is None  # never read


def test_notes_are_reported(tmp_path):
    signal = ecg_like(4, 250, 3)
    signal[:, 2] = 0.0
    write_record(tmp_path / "site", "flat_v1", signal=signal)
    write_record(tmp_path / "site", "frank", leads=("I", "II", "vx"))
    windows = build_site(tmp_path / "site", CFG, tmp_path / "cache")
    assert not windows.lead_mask[:2, STANDARD_LEADS.index("V1")].any()
    report = read_json(tmp_path / "cache" / "report.json")
    assert report["notes"] == {"flat leads dropped": 1, "extra signals ignored": 1}


def test_site_without_a_usable_record(tmp_path):
    folder = tmp_path / "site"
    write_record(folder, "a", seconds=1.0)
    write_record(folder, "b", leads=("ABP", "RESP"))
    with pytest.raises(SiteDataError) as err:
        build_site(folder, CFG, tmp_path / "cache")
    message = str(err.value)
    assert str(folder) in message and "too short: 1" in message and "no standard ECG lead: 1" in message
    report = read_json(tmp_path / "cache" / "report.json")
    assert [r["record_id"] for r in report["skipped_records"]] == ["a", "b"]
    assert not (tmp_path / "cache" / "windows.npz").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "no headers", "a file"])
def test_folder_without_records(tmp_path, case):
    folder = tmp_path / "site"
    if case == "empty":
        folder.mkdir()
    elif case == "no headers":
        folder.mkdir()
        (folder / "notes.txt").write_text("records arrive next week")
    elif case == "a file":
        folder.write_text("")
    with pytest.raises(SiteDataError, match=str(folder)):
        build_site(folder, CFG, tmp_path / "cache")


# Linux capabilities (linux/capability.h) that let root past file permission checks
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
_CAPABILITY_VERSION_3 = 0x20080522


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilitySet(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_permission_override() -> None:
    """Remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the calling thread, for good.

    capset(2) changes the capabilities of the calling thread only, so the rest of the test
    process keeps its own; for a user without these capabilities nothing changes.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    header, sets = _CapabilityHeader(_CAPABILITY_VERSION_3, 0), (_CapabilitySet * 2)()
    override = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)
    if libc.capget(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for kind in ("effective", "permitted", "inheritable"):
        setattr(sets[0], kind, getattr(sets[0], kind) & ~override)
    if libc.capset(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def build_where_permissions_apply(folder: Path, cache: Path) -> dict:
    """Build the site where file permissions bind, also when the tests run as root (CI, containers).

    Root passes permission checks through two capabilities, not through its user id: the build
    runs in a thread of its own that drops both first (Linux capabilities belong to a thread, and
    this one ends with the build). An unreadable file is then unreadable to the build exactly as
    to any user, with no second user, no interpreter or package it would need to reach, and no
    permission changed outside the test's own files.
    """
    if sys.platform != "linux" and os.geteuid() == 0:
        pytest.skip("root on a system without Linux capabilities: file permissions do not apply to it")

    def build() -> dict:
        if sys.platform == "linux":
            drop_permission_override()
        try:
            build_site(folder, CFG, cache)
        except SiteDataError as err:
            return {"error": str(err)}
        return json.loads((cache / "report.json").read_text())

    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(build).result()


@pytest.mark.parametrize("locked", ["subfolder", "header"])
def test_unreadable_files(tmp_path, locked):
    folder = tmp_path / "site"
    write_record(folder, "good")
    header = write_record(folder / "sub", "r")
    path = header.parent if locked == "subfolder" else header
    path.chmod(0)
    try:
        outcome = build_where_permissions_apply(folder, tmp_path / "cache")
    finally:
        path.chmod(0o755)
    if locked == "subfolder":
        assert outcome["error"].startswith(f"cannot read site folder {path}")
    else:
        assert outcome["skipped_records"] == [
            {"record_id": "sub/r", "reason": "unreadable header: Permission denied"}]


def test_cache_is_reused_until_a_file_or_the_config_changes(tmp_path, monkeypatch, caplog):
    folder = mixed_site(tmp_path / "site")
    reads = []
    read_record = site_module.read_record

    def counted(*args, **kwargs):
        reads.append(args[0])
        return read_record(*args, **kwargs)

    monkeypatch.setattr(site_module, "read_record", counted)
    first = build_site(folder, CFG, tmp_path / "cache")
    assert len(reads) == 6

    with caplog.at_level(logging.INFO, logger="fedssl.data"):
        cached = build_site(folder, CFG, tmp_path / "cache")
    assert len(reads) == 6  # nothing read again
    np.testing.assert_array_equal(cached.windows, first.windows)
    assert cached.records == first.records
    assert caplog.messages == [f"site {folder}: 3 records used, 3 skipped (unsupported sampling rate: 1, "
                               f"missing signal file: 1, too short: 1), 6 windows (cached)"]

    os.utime(folder / "good.dat", ns=(0, 0))  # same name and size, another modification time
    build_site(folder, CFG, tmp_path / "cache")
    assert len(reads) == 12
    write_record(folder, "short", seconds=2.0)  # the too-short record replaced by a usable one
    assert len(build_site(folder, CFG, tmp_path / "cache").records) == 4
    one_window = DataConfig(window_seconds=2.0, max_windows_per_record=1)
    assert len(build_site(folder, one_window, tmp_path / "cache")) == 4
    assert len(reads) == 24


def test_cache_inside_the_site_folder(tmp_path, monkeypatch):
    folder = mixed_site(tmp_path / "site")
    build_site(folder, CFG, folder / ".cache")
    monkeypatch.setattr(site_module, "read_record", None)  # reading again would fail
    assert len(build_site(folder, CFG, folder / ".cache").records) == 3


def test_damaged_cache_is_rebuilt(tmp_path):
    folder = mixed_site(tmp_path / "site")
    first = build_site(folder, CFG, tmp_path / "cache")
    (tmp_path / "cache" / "windows.npz").write_bytes(b"not a zip file")
    np.testing.assert_array_equal(build_site(folder, CFG, tmp_path / "cache").windows, first.windows)


def test_ptbxl_catalogue_in_the_site_folder(tmp_path):
    folder = tmp_path / "ptbxl"
    folder.mkdir()
    write_ptbxl_csv(folder, [(1, "15709.0", "{'NORM': 100.0, 'SR': 0.0}")])
    write_record(folder / "records100" / "00000", "00001_lr", leads=STANDARD_LEADS, fs=100)
    write_record(folder / "records100" / "00000", "00002_lr", leads=STANDARD_LEADS, fs=100)
    windows = build_site(folder, CFG, tmp_path / "cache")
    assert [(r.record_id, r.patient_id, r.labels) for r in windows.records] == [
        ("records100/00000/00001_lr", "15709", ("NORM", "SR")),
        ("records100/00000/00002_lr", None, ())]


def test_broken_catalogue_is_a_site_error(tmp_path):
    folder = tmp_path / "ptbxl"
    write_record(folder, "00001_lr")
    (folder / "ptbxl_database.csv").write_text("ecg_id\n1\n")
    with pytest.raises(SiteDataError, match="PTB-XL catalogue"):
        build_site(folder, CFG, tmp_path / "cache")


def fake_synthetic(monkeypatch) -> list[tuple[Path, int]]:
    """Stand in for fedssl.data.synthetic: two records per site; returns the calls made."""
    calls = []

    def write_synthetic_site(folder: Path, spec: SyntheticSiteConfig, seed: int) -> list[str]:
        calls.append((folder, seed))
        return [write_record(folder, f"s{i}", fs=spec.sample_rate).stem for i in range(2)]

    monkeypatch.setattr(site_module, "write_synthetic_site", write_synthetic_site)
    return calls


def test_synthetic_site_is_written_once(tmp_path, monkeypatch):
    calls = fake_synthetic(monkeypatch)
    site = SiteConfig("a", synthetic=SyntheticSiteConfig(records=2, sample_rate=250))
    windows = load_site(site, CFG, tmp_path, seed=3)
    assert len(windows.records) == 2
    assert calls[0][1] == seed_for("a", 3) and calls[0][0].parent == tmp_path / "records"
    assert calls[0][0] != tmp_path / "records" / "a"  # written elsewhere, then renamed
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["a"]
    assert (tmp_path / "cache" / "a" / "windows.npz").exists()

    load_site(site, CFG, tmp_path, seed=3)
    assert len(calls) == 1
    load_site(site, CFG, tmp_path, seed=4)  # another seed is another population
    assert len(calls) == 2 and calls[1][1] == seed_for("a", 4)


def test_crash_while_writing_leaves_no_site(tmp_path, monkeypatch):
    def crash(folder, spec, seed):
        write_record(folder, "s0")
        raise RuntimeError("disk full")

    monkeypatch.setattr(site_module, "write_synthetic_site", crash)
    with pytest.raises(RuntimeError):
        load_site(SiteConfig("a", synthetic=SyntheticSiteConfig()), CFG, tmp_path, seed=0)
    assert list((tmp_path / "records").iterdir()) == []


def test_seed_for_is_stable_and_distinct():
    assert seed_for("hospital_a", 0) == seed_for("hospital_a", 0) == 3935836676  # zlib.crc32(b"hospital_a:0")
    assert len({seed_for(name, seed) for name in ("a", "b") for seed in (0, 1)}) == 4


def test_folder_site(tmp_path):
    folder = mixed_site(tmp_path / "data")
    windows = load_site(SiteConfig("h", folder=str(folder)), CFG, tmp_path / "work", seed=0)
    assert len(windows.records) == 3 and (tmp_path / "work" / "cache" / "h" / "report.json").exists()


def test_real_synthetic_writer_if_present(tmp_path):
    pytest.importorskip("fedssl.data.synthetic")
    site = SiteConfig("s", synthetic=SyntheticSiteConfig(records=3, sample_rate=250, missing_leads=("V1",)))
    windows = load_site(site, CFG, tmp_path, seed=0)
    assert len(windows.records) == 3 and np.isfinite(windows.windows).all()
    assert not windows.lead_mask[:, STANDARD_LEADS.index("V1")].any()
