"""Real PhysioNet records from ../shared/data (see its README): the formats, lead spellings,
rates and lengths that synthetic fixtures only imitate. Skipped where the folder is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedssl.config import DataConfig
from fedssl.data.preprocess import make_windows
from fedssl.data.records import read_record
from fedssl.data.site import build_site
from fedssl.data.windows import STANDARD_LEADS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no real records at {DATA}")


def test_cinc2021_mat_record():
    raw = read_record(DATA / "cinc2021" / "E07500.hea")
    assert raw.sample_rate == 500 and raw.signal.shape == (12, 5000) and raw.lead_mask.all()
    assert raw.labels == ("67741000119109", "426177001")
    assert np.isfinite(raw.signal).all() and 0.01 < np.abs(raw.signal).max() < 20  # mV


def test_cinc2021_lower_case_units_and_many_labels():
    assert read_record(DATA / "cinc2021" / "HR06000.hea").labels == ("164934002", "426783006")
    assert len(read_record(DATA / "cinc2021" / "JS20017.hea").labels) == 8


def test_cinc2021_zero_leads_are_dropped_as_flat():
    result = make_windows(read_record(DATA / "cinc2021" / "JS20004.hea"), DataConfig())
    assert result.lead_mask.tolist() == [lead not in ("V2", "V4", "V6") for lead in STANDARD_LEADS]
    assert result.notes == ("flat leads dropped: V2, V4, V6",)


def test_ptb_diagnostic_lower_case_leads_and_frank_leads():
    raw = read_record(DATA / "ptb-diagnostic" / "s0010_re.hea")
    assert raw.sample_rate == 1000 and raw.lead_mask.all() and raw.signal.shape == (12, 38400)
    assert raw.source_leads[-3:] == ("vx", "vy", "vz")
    assert raw.notes == ("extra signals ignored: vx, vy, vz",)
    assert make_windows(raw, DataConfig()).windows.shape == (3, 12, 1000)


def test_ptbxl_low_rate_upper_case_leads():
    raw = read_record(DATA / "ptb-xl" / "00001_lr.hea")
    assert raw.sample_rate == 100 and raw.lead_mask.all() and raw.labels == ()
    assert raw.source_leads[3:6] == ("AVR", "AVL", "AVF")
    assert make_windows(raw, DataConfig()).windows.shape == (1, 12, 1000)


def test_mit_bih_two_leads_capped_windows():
    raw = read_record(DATA / "mit-bih" / "100.hea")
    assert raw.sample_rate == 360 and raw.source_leads == ("MLII", "V5")
    assert raw.lead_mask.tolist() == [lead in ("II", "V5") for lead in STANDARD_LEADS]
    assert raw.duration_seconds == pytest.approx(1805.6, abs=0.1)
    result = make_windows(raw, DataConfig())
    assert result.windows.shape == (12, 12, 1000)
    assert result.notes == ("windows capped: kept 12 of 180",)
    assert not result.windows[:, ~raw.lead_mask].any()


def test_cinc2021_site(tmp_path):
    windows = build_site(DATA / "cinc2021", DataConfig(), tmp_path / "cache")
    assert windows.windows.shape == (50, 12, 1000) and np.isfinite(windows.windows).all()
    assert len(windows.records) == 50 and all(r.labels for r in windows.records)
    assert "426783006" in windows.classes()  # sinus rhythm


def test_ludb_labels_from_a_labels_csv_and_patient_level_probe_split(tmp_path):
    """LUDB keeps its rhythm in free-text header comments; a hospital would hand over such labels
    as a CSV. A symlinked 30-record slice keeps the test fast without copying data."""
    import csv

    from fedssl.evaluate import ProbeSplits

    rows = list(csv.DictReader((DATA / "ludb" / "labels_from_headers.csv").open()))[:30]
    folder = tmp_path / "ludb" / "data"
    folder.mkdir(parents=True)
    for row in rows:
        for suffix in (".hea", ".dat"):
            name = Path(row["record"]).name + suffix
            (folder / name).symlink_to(DATA / "ludb" / "data" / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("record,labels\n" + "".join(f"{r['record']},{r['rhythm'].strip()}\n" for r in rows))
    windows = build_site(tmp_path / "ludb", DataConfig(), tmp_path / "cache", labels)
    assert len(windows.records) == 30 and windows.windows.shape[1:] == (12, 1000)
    assert {r.record_id: r.labels for r in windows.records}["data/1"] == ("Sinus bradycardia",)
    assert "Sinus rhythm" in windows.classes() and all(r.patient_id is None for r in windows.records)
    probe = ProbeSplits.from_windows(windows, test_fraction=0.5, seeds=3, seed=0, l2=1e-3)
    for train, test in probe.splits:  # one window per 10-s record: records, hence patients, never on both sides
        assert not set(windows.record[train]) & set(windows.record[test]) and len(test) == 15


def test_cinc2020_sources_keep_their_dx_labels(tmp_path):
    windows = build_site(DATA / "cinc2020", DataConfig(), tmp_path / "cache")
    sources = {r.record_id.rstrip("0123456789") for r in windows.records}
    assert sources == {"A", "Q", "JS", "HR", "E"}
    af = [r for r in windows.records if "164889003" in r.labels]  # atrial fibrillation
    assert len(af) == 29 and len(windows.records) == 222
