"""Malformed records in a site folder: each is a skipped record whose reason names its real fault,
the site's other records still train, and `check-site` and `embed` report them (exit code 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fedssl.cli import main
from fedssl.config import Scenario, from_dict
from fedssl.data.site import SiteDataError, build_site
from fedssl.export import embed_folder
from simulations.run import materialise_data
from tests.test_bad_scenarios import UNSET, changed
from tests.test_export import exported, run_dir  # noqa: F401 - fixtures
from tests.test_records import CFG, write_record


def no_signals(folder):
    (folder / "x.hea").write_text("x 0 500 5000\n")


def another_records_signal(folder):
    header = write_record(folder, name="thief")
    header.write_text(header.read_text().replace("thief.dat", "good.dat"))


def all_nan(folder):
    write_record(folder, name="bad_all_nan", signal=np.full((1000, 3), np.nan))


def garbled_gain(folder):
    header = write_record(folder, name="garbled")
    header.write_text(header.read_text().replace("1000.0(0)/mV", "abc(0)/mV"))


def signal_file_elsewhere(folder):
    header = write_record(folder, name="elsewhere")
    header.write_text(header.read_text().replace("elsewhere.dat 16", "../elsewhere.dat 16"))


# record id -> (writer, reason kind, fragment of the reason)
BAD_RECORDS = {
    "x": (no_signals, "no signals", "declares 0 signals"),
    "thief": (another_records_signal, "signal file of another record", "good.dat belongs to record good"),
    "bad_all_nan": (all_nan, "all leads non-finite", "I, II, V1"),
    "garbled": (garbled_gain, "unreadable header", "gain, units or ADC fields cannot be parsed"),
    "elsewhere": (signal_file_elsewhere, "unreadable header", "invalid syntax in signal line"),
}


def site_with(folder, *bad: str):
    write_record(folder, name="good")
    for record in bad:
        BAD_RECORDS[record][0](folder)
    return folder


@pytest.mark.parametrize("record", BAD_RECORDS)
def test_a_bad_record_is_skipped_with_its_reason(record, tmp_path):
    folder = site_with(tmp_path / "site", record)
    windows = build_site(folder, CFG, tmp_path / "cache")
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    _, kind, fragment = BAD_RECORDS[record]
    assert [r.record_id for r in windows.records] == ["good"]  # the same signal is never counted twice
    (skipped,) = report["skipped_records"]
    assert skipped["record_id"] == record and skipped["reason"].startswith(kind + ":") and fragment in skipped["reason"]
    assert report["skipped_by_reason"] == {kind: 1}
    assert report["used_records"] == [{"record_id": "good", "windows": 2, "leads": 3}]


def test_check_site_reports_every_record_and_notes_with_ids(tmp_path, capsys):
    folder = site_with(tmp_path / "site", *BAD_RECORDS)
    signal = np.random.default_rng(0).standard_normal((1000, 3))
    signal[:, 2] = 0.3  # V1 flat: a note on an otherwise usable record
    write_record(folder, name="flat_v1", signal=signal)
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(changed({})))  # 2-s windows, as CFG
    assert main(["check-site", str(folder), "--scenario", str(scenario), "--cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[:out.rindex("}") + 1])
    assert sorted(r["record_id"] for r in report["skipped_records"]) == sorted(BAD_RECORDS)
    assert [r["record_id"] for r in report["used_records"]] == ["flat_v1", "good"]
    assert report["noted_records"] == {"flat leads dropped": ["flat_v1"]}


def test_embed_reports_bad_records_and_embeds_the_rest(exported, tmp_path):  # noqa: F811
    folder = site_with(tmp_path / "records", *BAD_RECORDS)
    result = embed_folder(exported, folder, progress=False)
    assert set(result.record_ids) == {"good"}
    assert dict(result.skipped).keys() == BAD_RECORDS.keys()
    assert np.isfinite(result.windows).all()


def test_mat_files_without_headers_say_what_was_found_and_what_is_expected(tmp_path, capsys):
    folder = tmp_path / "cpsc2018"
    folder.mkdir()
    for name in ("A0001", "A0002", "A0003"):
        (folder / f"{name}.mat").write_bytes(b"MATLAB 5.0")
    (folder / "REFERENCE.csv").write_text("Recording,First_label\n")
    with pytest.raises(SiteDataError) as err:
        build_site(folder, CFG, tmp_path / "cache")
    message = str(err.value)
    assert "found 3 .mat, 1 .csv but no .hea header" in message
    assert "<name>.hea header with its signal file (<name>.dat or <name>.mat)" in message
    assert main(["check-site", str(folder), "--cache", str(tmp_path / "cache")]) == 2
    assert "found 3 .mat" in capsys.readouterr().err


def test_a_folder_site_with_one_record_is_refused_before_flower(tmp_path):
    folder = tmp_path / "one"
    write_record(folder, name="only", seconds=2.0)  # one 2-s window
    values = changed({"sites[0].synthetic": UNSET, "sites[0].folder": str(folder)})
    with pytest.raises(ValueError, match="site a: 1 usable window\\(s\\) from 1 record\\(s\\); training needs at least 2"):
        materialise_data(from_dict(Scenario, values), tmp_path / "data", echo=lambda line: None)
