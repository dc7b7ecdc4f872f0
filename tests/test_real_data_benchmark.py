"""The real-data benchmark's data plumbing (benchmarks/real_data.py): which records are which
hospital, the held-out cut, the small hospitals, the probe task's labels and the template's
overrides. No training here; skipped where ../shared/data is absent."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from fedssl.config import ConfigError, DataConfig
from fedssl.data.site import build_site

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# benchmarks/ is a folder of scripts, not a package (and site-packages may hold an unrelated one)
spec = importlib.util.spec_from_file_location("real_data_benchmark", ROOT / "benchmarks" / "real_data.py")
real_data = sys.modules.setdefault("real_data_benchmark", importlib.util.module_from_spec(spec))
spec.loader.exec_module(real_data)

needs_data = pytest.mark.skipif(not (DATA / "cinc2020").is_dir(), reason=f"no real records at {DATA}")


def test_template_overrides_and_their_errors():
    template = real_data.load_template(real_data.TEMPLATE, ["model.encoder=resnet1d", "federation.rounds=7",
                                                            "objective.view_probability=0.5"])
    assert (template.model.encoder, template.federation.rounds, template.objective.view_probability) == \
        ("resnet1d", 7, 0.5)
    assert template.evaluation.random_inits >= 3 and not template.sites
    with pytest.raises(ConfigError, match="expected key=value"):
        real_data.load_template(real_data.TEMPLATE, ["federation.rounds"])
    with pytest.raises(ConfigError, match="unknown key"):
        real_data.load_template(real_data.TEMPLATE, ["federation.round=3"])


@needs_data
def test_hospitals_hold_out_and_small_sites_partition_the_records():
    records = real_data.source_records(DATA)
    by_hospital = {h: sum(r.hospital == h for r in records) for h in real_data.SOURCES}
    assert by_hospital == {"cpsc2018": 151, "cpsc_extra": 29, "chapman_ningbo": 40, "ptb_xl": 22,
                           "georgia": 30, "ludb": 200}
    pretraining, held = real_data.hold_out(records, 0.4, seed=0)
    names = lambda rs: {r.name for r in rs}  # noqa: E731
    assert not names(pretraining) & names(held) and len(names(pretraining) | names(held)) == len(records)
    assert all(abs(sum(r.hospital == h for r in held) - 0.4 * n) <= 0.5 for h, n in by_hospital.items())
    assert names(real_data.hold_out(records, 0.4, seed=0)[1]) == names(held)  # drawn once, reproducibly
    sites = real_data.small_sites(pretraining, 40)
    assert all(30 <= len(part) <= 60 for part in sites.values())
    assert sorted(r.name for part in sites.values() for r in part) == sorted(names(pretraining))


@needs_data
def test_held_out_folder_reads_with_the_task_labels_csv(tmp_path):
    records = real_data.source_records(DATA)
    sample = [r for r in records if r.header.stem in ("A0001", "A0002", "JS20000", "1", "14")]
    folder = real_data.symlink_folder(tmp_path / "held_out", sample)
    labels = tmp_path / "labels.csv"
    positives = real_data.write_task_csv(labels, sample, real_data.ludb_codes(DATA))
    assert all(path.is_symlink() for path in folder.rglob("*.hea"))
    rows = {row["record"]: row["labels"] for row in csv.DictReader(labels.open())}
    assert rows["cpsc2018/cinc2020/A0001"] == "59118001"  # RBBB
    assert rows["cpsc2018/cinc2020/A0002"] == "426783006"  # sinus rhythm
    assert rows["ludb/ludb/1"] == "426177001"  # LUDB "Rhythm: Sinus bradycardia."
    assert sum(positives.values()) == sum(len(v.split(";")) for v in rows.values() if v)
    windows = build_site(folder, DataConfig(), tmp_path / "cache", labels)
    assert {r.record_id: r.labels for r in windows.records}["ludb/ludb/1"] == ("426177001",)
    assert len(windows.records) == len(sample)


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["real_data.py", "--data", str(tmp_path / "absent"), "--work", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        real_data.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "absent has no cinc2020/" in err[0]
