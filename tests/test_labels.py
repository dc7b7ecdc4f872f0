"""Where labels and patients come from (`# Dx:`, `# Patient:`, ptbxl_database.csv, a labels CSV)
and that every held-out split keeps a patient's windows on one side, the ServerApp's probe too."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from fedssl.config import DataConfig, EvaluationConfig, SiteConfig, load_scenario
from fedssl.data.records import read_labels_csv, read_record
from fedssl.data.site import SiteDataError, build_site, load_site
from fedssl.data.windows import STANDARD_LEADS
from fedssl.evaluate import ProbeSplits
from tests.conftest import two_site_scenario, write_ptbxl_csv, write_record

CFG = DataConfig(window_seconds=2.0)


def write_labels(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_labels_csv_with_and_without_patients(tmp_path):
    path = write_labels(tmp_path / "labels.csv", "record,labels,patient,notes\n"
                                                 "data/1,426783006; 59118001;,17,seen twice\n"
                                                 "A0002,,,\n"
                                                 "A0003,164889003,12.0,\n")
    entries = read_labels_csv(path)
    assert entries["data/1"].labels == ("426783006", "59118001") and entries["data/1"].patient_id == "17"
    assert entries["A0002"].labels == () and entries["A0002"].patient_id is None
    assert entries["A0003"].patient_id == "12"
    assert read_labels_csv(write_labels(tmp_path / "two.csv", "record,labels\nr,AF\n"))["r"].patient_id is None


@pytest.mark.parametrize("text, message", [
    ("record,dx\nr,AF\n", "no column 'labels'"),
    ("name,labels\nr,AF\n", "no column 'record'"),
    ("record,labels\nr,AF\nr,SR\n", "line 3: record 'r' is listed twice"),
    ("record,labels\n,AF\n", "line 2: empty record name"),
    ("", "no column 'record' or 'labels'"),
])
def test_broken_labels_csv_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ValueError, match=f"cannot read labels CSV .*{message}"):
        read_labels_csv(write_labels(tmp_path / "labels.csv", text))


def test_patient_comment_and_its_precedence(tmp_path):
    header = write_record(tmp_path, "r1", comments=["Patient: p-7", "Dx: 426783006"])
    raw = read_record(header)
    assert raw.patient_id == "p-7" and raw.labels == ("426783006",)
    assert read_record(write_record(tmp_path, "r2", comments=["patient_id: 99"])).patient_id == "99"
    assert read_record(write_record(tmp_path, "r3", comments=["Age: 50"])).patient_id is None
    # a labels CSV replaces the Dx labels of the records it lists; without a patient column the
    # header's patient stays
    catalogue = read_labels_csv(write_labels(tmp_path / "labels.csv", "record,labels\nr1,164889003\n"))
    raw = read_record(header, catalogue=catalogue)
    assert raw.labels == ("164889003",) and raw.patient_id == "p-7"


def write_site(folder: Path) -> Path:
    """Six two-lead records of three patients (two each, `# Patient:`), labels in the headers."""
    for i in range(6):
        write_record(folder / "data", f"{i}", seconds=4.0, comments=[f"Patient: {i // 2}", "Dx: A" if i % 2 else "Dx: B"])
    return folder


def test_site_takes_labels_and_patients_from_its_csv_and_rebuilds_when_it_changes(tmp_path):
    folder = write_site(tmp_path / "site")
    labels = write_labels(tmp_path / "labels.csv", "record,labels,patient\ndata/0,X;Y,q0\n1,Z,\n")
    windows = build_site(folder, CFG, tmp_path / "cache", labels)
    by_record = {r.record_id: r for r in windows.records}
    assert by_record["data/0"].labels == ("X", "Y") and by_record["data/0"].patient_id == "q0"
    assert by_record["data/1"].labels == ("Z",) and by_record["data/1"].patient_id == "0"  # by header name
    assert by_record["data/2"].labels == ("B",) and by_record["data/2"].patient_id == "1"  # not listed: header
    labels.write_text("record,labels\ndata/0,W\n")
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    rebuilt = build_site(folder, CFG, tmp_path / "cache", labels)
    assert {r.record_id: r.labels for r in rebuilt.records}["data/0"] == ("W",)
    with pytest.raises(SiteDataError, match="labels CSV .*missing.csv does not exist"):
        build_site(folder, CFG, tmp_path / "cache", tmp_path / "missing.csv")
    with pytest.raises(SiteDataError, match="no column 'labels'"):
        build_site(folder, CFG, tmp_path / "cache", write_labels(tmp_path / "bad.csv", "record\nx\n"))


def test_ptbxl_patients_and_labels_reach_the_site(tmp_path):
    folder = tmp_path / "ptbxl"
    for ecg in (1, 2):
        write_record(folder, f"{ecg:05d}_lr", leads=STANDARD_LEADS, fs=100, seconds=4)
    write_ptbxl_csv(folder, [(1, "5.0", "{'NORM': 100.0}"), (2, "5.0", "{'IMI': 50.0}")])
    windows = build_site(folder, CFG, tmp_path / "cache")
    assert [(r.patient_id, r.labels) for r in windows.records] == [("5", ("NORM",)), ("5", ("IMI",))]
    train, test = windows.split_by_patient(0.5, seed=0)  # one patient: on one side only
    assert min(len(train), len(test)) == 0


def sides_share_a_patient(data, train_index, test_index) -> bool:
    groups = data.patient_groups()
    return bool(set(groups[train_index]) & set(groups[test_index]))


def test_probe_splits_never_put_a_patient_or_a_record_on_both_sides(tmp_path):
    """The held-out folder has patients with two records and records with several windows; the
    ServerApp's per-round probe and the end-of-run comparison both use `ProbeSplits.of`."""
    folder = write_site(tmp_path / "held_out")
    labels = write_labels(tmp_path / "labels.csv", "record,labels,patient\n"
                          + "".join(f"extra/{i},{'A' if i % 2 else 'B'},\n" for i in range(8)))
    for i in range(8):  # records without a patient id: each its own group
        write_record(folder / "extra", f"{i}", seconds=6.0)
    scenario = dataclasses.replace(two_site_scenario("hybrid", records=8), data=CFG,
                                   evaluation=EvaluationConfig(folder=str(folder), labels_csv=str(labels), seeds=5))
    probe = ProbeSplits.of(scenario, tmp_path / "work")
    records = probe.data.record
    assert np.bincount(records).max() >= 3  # several windows per 6-s record
    assert len(probe.splits) == 5 and len({tuple(test) for _, test in probe.splits}) > 1
    for train, test in probe.splits:
        assert not sides_share_a_patient(probe.data, train, test)
        assert not set(records[train]) & set(records[test])
        assert len(train) + len(test) == len(probe.data)
    patients = {r.patient_id for r in probe.data.records}
    assert patients == {"0", "1", "2", None}

    from fedssl.objectives import build_objective
    from fedssl.runfolder import RoundRecord, RunFolder
    from server.app import GlobalEvaluation  # the ServerApp's per-round probe

    probe = GlobalEvaluation(scenario, RunFolder(tmp_path / "run"))
    record = probe(RoundRecord(scenario.federation.rounds), build_objective(scenario).encoder.state_dict())
    assert record.probe_macro_auroc_ci95[0] <= record.probe_macro_auroc <= record.probe_macro_auroc_ci95[1]


def test_scenario_paths_of_labels_and_held_out_folder_are_resolved_against_the_file(tmp_path):
    (tmp_path / "s").mkdir()
    path = tmp_path / "s" / "scenario.yaml"
    path.write_text("sites:\n  - {name: a, folder: ../a, labels_csv: ../a.csv}\n"
                    "evaluation: {folder: ../held, labels_csv: held.csv, seeds: 2, random_inits: 4, bootstrap: 50}\n")
    scenario = load_scenario(path)
    assert scenario.sites[0].labels_csv == str(tmp_path / "a.csv")
    assert scenario.evaluation.folder == str(tmp_path / "held")
    assert scenario.evaluation.labels_csv == str(tmp_path / "s" / "held.csv")
    assert (scenario.evaluation.seeds, scenario.evaluation.random_inits, scenario.evaluation.bootstrap) == (2, 4, 50)


def test_load_site_uses_the_sites_labels_csv(tmp_path):
    folder = write_site(tmp_path / "site")
    labels = write_labels(tmp_path / "labels.csv", "record,labels\ndata/3,Q\n")
    windows = load_site(SiteConfig("h", folder=str(folder), labels_csv=str(labels)), CFG, tmp_path / "work", 0)
    assert {r.record_id: r.labels for r in windows.records}["data/3"] == ("Q",)
