"""Reading and preprocessing single records: well-formed, odd and broken WFDB files.

Every fixture is written with wfdb (or by hand for headers wfdb refuses to write) by the record
writers of conftest.py, which test_site.py and test_labels.py use too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedssl.config import DataConfig
from fedssl.data.leads import lead_layout, standard_lead
from fedssl.data.preprocess import make_windows
from fedssl.data.records import RecordError, read_ptbxl_catalogue, read_record
from fedssl.data.windows import STANDARD_LEADS
from tests.conftest import CFG, GAIN, THREE, ecg_like, edit_header, write_mat_record, write_ptbxl_csv, write_record


def windows_of(header: Path, cfg: DataConfig = CFG):
    raw = read_record(header)
    return raw, make_windows(raw, cfg)


def mask_of(*leads: str) -> np.ndarray:
    return np.array([lead in leads for lead in STANDARD_LEADS])


# --- broken records: each is rejected with a reason of the expected kind -------------------------

def written(**kwargs):
    return lambda folder: write_record(folder, **kwargs)


def header_edited(old: str, new: str):
    return lambda folder: edit_header(write_record(folder), old, new)


def header_replaced_by(content: bytes):
    def make(folder: Path) -> Path:
        header = write_record(folder)
        header.write_bytes(content)
        return header
    return make


def without_signal_file(folder: Path) -> Path:
    header = write_record(folder)
    (folder / "r.dat").unlink()
    return header


def signal_file_cut_to(size: int):
    def make(folder: Path) -> Path:
        header = write_record(folder)
        dat = folder / "r.dat"
        dat.write_bytes(dat.read_bytes()[:size])
        return header
    return make


def written_with(*edits):
    """A two-lead record whose signal is changed by `edits`: (rows, column, value) each."""
    def make(folder: Path) -> Path:
        signal = ecg_like(4, 250, 2)
        for rows, column, value in edits:
            signal[rows, column] = value
        return write_record(folder, leads=("I", "II"), signal=signal)
    return make


PINNED = 32767 / GAIN  # the top of the 16-bit ADC range
BROKEN = {
    "corrupt header": (header_edited("r 3 250 1000", "r three 250 1000"), "unreadable header"),
    "truncated header": (header_replaced_by(b"r 3 250 1000\nr.dat 16 1000.0(0)/mV 16 0 0 0 0 I\n"),
                         "unreadable header"),  # three signals declared, one described
    "empty header": (header_replaced_by(b""), "unreadable header"),
    "binary header": (header_replaced_by(b"\xff\xfe\x00\x81garbage\n"), "unreadable header"),
    "multi-segment record": (header_replaced_by(b"r/2 3 250 2000\nr_1 1000\nr_2 1000\n"),
                             "unsupported record"),
    "missing signal file": (without_signal_file, "missing signal file"),
    "short signal file": (signal_file_cut_to(1000), "signal file too short"),
    "header claims more samples": (header_edited("r 3 250 1000", "r 3 250 2000"), "signal file too short"),
    "no samples": (header_edited("r 3 250 1000", "r 3 250 0"), "too short"),
    "zero sampling rate": (header_edited("r 3 250 ", "r 3 0 "), "unsupported sampling rate"),
    "negative sampling rate": (header_edited("r 3 250 ", "r 3 -250 "), "unsupported sampling rate"),
    "absurd sampling rate": (header_edited("r 3 250 ", "r 3 100000 "), "unsupported sampling rate"),
    "rate too low for the band": (written(fs=50), "unsupported sampling rate"),
    "too short": (written(seconds=1.5), "too short"),
    "unknown lead names only": (written(leads=("lead a", "-aVR", "X")), "no standard ECG lead"),
    "non-ECG signals only": (written(leads=("ABP", "PLETH", "RESP")), "no standard ECG lead"),
    "unsupported units": (written(units="mmHg"), "unsupported units"),
    "all leads flat": (written(signal=np.full((1000, 3), 0.3)), "all leads flat"),
    "all leads saturated": (written_with((slice(200, 800), slice(None), PINNED)), "all leads saturated"),
    # a few invalid samples: too short a run to count as saturation
    "all leads non-finite": (written_with((slice(100, 110), slice(None), np.nan)), "all leads non-finite"),
    "flat and non-finite": (written_with((slice(None), 0, 0.25), (slice(100, 110), 1, np.nan)),
                            "no usable lead"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_record_is_rejected_with_its_reason(tmp_path, case):
    make, kind = BROKEN[case]
    header = make(tmp_path)
    with pytest.raises(RecordError) as err:
        windows_of(header)
    assert err.value.kind == kind, err.value.reason
    assert len(err.value.reason) < 200


# --- odd but usable records ----------------------------------------------------------------------

def test_well_formed_record(tmp_path):
    raw, result = windows_of(write_record(tmp_path, comments=["Dx: 426783006, 164934002", "Sex: M"]))
    assert raw.sample_rate == 250 and raw.signal.shape == (12, 1000) and raw.notes == ()
    assert raw.labels == ("426783006", "164934002") and raw.patient_id is None
    assert result.windows.shape == (2, 12, 200) and result.windows.dtype == np.float32
    np.testing.assert_array_equal(result.lead_mask, mask_of(*THREE))
    assert not result.windows[:, ~result.lead_mask].any()  # missing leads are zeros, never invented
    assert result.notes == ()


def test_lower_case_and_upper_case_leads(tmp_path):
    for name, leads in [("lower", ("i", "ii", "avr", "v6")), ("upper", ("I", "II", "AVR", "V6"))]:
        raw = read_record(write_record(tmp_path, name, leads=leads))
        np.testing.assert_array_equal(raw.lead_mask, mask_of("I", "II", "aVR", "V6"))


def test_extra_and_inverted_leads_are_ignored(tmp_path):
    signal = ecg_like(4, 250, 5)
    raw = read_record(write_record(tmp_path, leads=("I", "vx", "-aVR", "V2", "vz"), signal=signal))
    np.testing.assert_array_equal(raw.lead_mask, mask_of("I", "V2"))
    np.testing.assert_allclose(raw.signal[STANDARD_LEADS.index("V2")], signal[:, 3], atol=1e-3)
    assert raw.notes == ("extra signals ignored: vx, -aVR, vz",)


def test_duplicated_lead_keeps_the_first(tmp_path):
    signal = ecg_like(4, 250, 3)
    header = edit_header(write_record(tmp_path, signal=signal), " V1\n", " II\n")
    raw = read_record(header)
    np.testing.assert_array_equal(raw.lead_mask, mask_of("I", "II"))
    np.testing.assert_allclose(raw.signal[1], signal[:, 1], atol=1e-3)
    assert raw.notes == ("duplicated leads, kept the first: II",)


def test_modified_limb_lead_maps_to_the_limb_lead(tmp_path):
    raw = read_record(write_record(tmp_path, leads=("MLII", "V5"), fs=360))
    np.testing.assert_array_equal(raw.lead_mask, mask_of("II", "V5"))


def test_microvolt_units_are_converted_to_millivolts(tmp_path):
    signal = ecg_like(4, 250, 3)
    raw = read_record(write_record(tmp_path, signal=signal * 1000, units="uV", gain=1.0))
    np.testing.assert_allclose(raw.signal[[0, 1, 6]].T, signal, atol=1e-3)


def test_flat_lead_becomes_a_missing_lead(tmp_path):
    signal = ecg_like(4, 250, 3)
    signal[:, 1] = 0.4  # a disconnected electrode: constant offset
    raw, result = windows_of(write_record(tmp_path, signal=signal))
    assert raw.lead_mask[1] and not result.lead_mask[1]
    np.testing.assert_array_equal(result.lead_mask, mask_of("I", "V1"))
    assert not result.windows[:, 1].any()
    assert result.notes == ("flat leads dropped: II",)


def test_saturated_lead_becomes_a_missing_lead(tmp_path):
    signal = ecg_like(4, 250, 3)
    signal[400:700, 2] = PINNED  # 1.2 s pinned at the ADC limit
    raw, result = windows_of(write_record(tmp_path, signal=signal))
    assert raw.saturated.tolist() == [lead == "V1" for lead in STANDARD_LEADS]
    np.testing.assert_array_equal(result.lead_mask, mask_of("I", "II"))
    assert result.notes == ("saturated leads dropped: V1",)


def test_peaks_touching_the_adc_limit_are_not_saturation(tmp_path):
    signal = ecg_like(4, 250, 1)
    signal[::200] = PINNED  # single samples at the limit
    raw = read_record(write_record(tmp_path, leads=("II",), signal=signal))
    assert not raw.saturated.any()


def test_lead_with_invalid_samples_is_dropped(tmp_path):
    signal = ecg_like(4, 250, 3)
    signal[10:12, 0] = np.nan
    raw, result = windows_of(write_record(tmp_path, signal=signal))
    assert np.isnan(raw.signal[0]).sum() == 2
    np.testing.assert_array_equal(result.lead_mask, mask_of("II", "V1"))
    assert np.isfinite(result.windows).all()
    assert result.notes == ("non-finite leads dropped: I",)


def test_infinite_values_drop_the_lead(tmp_path):
    raw = read_record(write_record(tmp_path))
    signal = raw.signal.copy()
    signal[6, 5] = np.inf
    result = make_windows(dataclasses.replace(raw, signal=signal), CFG)
    np.testing.assert_array_equal(result.lead_mask, mask_of("I", "II"))


def test_header_shorter_than_signal_file_reads_what_the_header_says(tmp_path):
    header = edit_header(write_record(tmp_path, seconds=4), "r 3 250 1000", "r 3 250 600")
    raw = read_record(header)
    assert raw.signal.shape == (12, 600)
    assert raw.notes == ("signal file longer than its header says: r.dat, extra samples ignored",)


def test_cinc_mat_record(tmp_path):
    raw, result = windows_of(write_mat_record(tmp_path, "E00001", dx="426783006,164934002"))
    assert raw.sample_rate == 500 and raw.lead_mask.all()
    assert raw.labels == ("426783006", "164934002")
    np.testing.assert_allclose(raw.signal[:, :4000].T, ecg_like(4, 500, 12), atol=1e-3)
    assert result.windows.shape == (2, 12, 200)


def test_ptbxl_labels_and_patient_from_the_catalogue(tmp_path):
    header = write_record(tmp_path, "00007_lr", leads=STANDARD_LEADS, fs=100, seconds=4)
    csv_path = write_ptbxl_csv(tmp_path, [(7, "15709.0", "{'NORM': 100.0, 'SR': 0.0}"),
                                          (8, "123.0", "{'IMI': 50.0}")])
    catalogue = read_ptbxl_catalogue(csv_path)
    assert set(catalogue) == {"00007_lr", "00007_hr", "00008_lr", "00008_hr"}
    raw = read_record(header, catalogue=catalogue)
    assert raw.labels == ("NORM", "SR") and raw.patient_id == "15709"
    assert read_record(header).labels == ()  # no catalogue, no Dx comment: unlabelled


def test_broken_catalogue_is_a_clear_error(tmp_path):
    path = tmp_path / "ptbxl_database.csv"
    path.write_text("ecg_id,patient_id,scp_codes,filename_lr\n1,2,{'NORM': 100.0,x\n")
    with pytest.raises(ValueError, match="PTB-XL catalogue"):
        read_ptbxl_catalogue(path)
    path.write_text("ecg_id,filename_lr\n1,a\n")
    with pytest.raises(ValueError, match="no column 'patient_id'"):
        read_ptbxl_catalogue(path)


# --- preprocessing -------------------------------------------------------------------------------

def test_resampling_windows_and_standardisation(tmp_path):
    raw, result = windows_of(write_record(tmp_path, fs=360, seconds=6.0))
    assert result.windows.shape == (3, 12, 200)
    present = result.windows[:, result.lead_mask]  # (3, 3, 200): standardised over the record
    assert abs(present.mean()) < 0.05 and abs(present.std() - 1) < 0.05


def test_long_record_is_capped_with_windows_spread_evenly(tmp_path):
    header = write_record(tmp_path, fs=100, seconds=60.0)
    _, result = windows_of(header, DataConfig(window_seconds=2.0, max_windows_per_record=4))
    assert result.windows.shape == (4, 12, 200)
    assert result.notes == ("windows capped: kept 4 of 30",)
    _, full = windows_of(header, DataConfig(window_seconds=2.0, max_windows_per_record=30))
    np.testing.assert_array_equal(result.windows, full.windows[[0, 10, 19, 29]])


def test_lead_names():
    assert [standard_lead(n) for n in ("i", " II ", "AVR", "avl", "aVF", "v6", "MLII", "DIII")] == \
        ["I", "II", "aVR", "aVL", "aVF", "V6", "II", "III"]
    assert standard_lead("-aVR") is None and standard_lead("vx") is None
    layout = lead_layout(["V1", "v1", "ABP", "I"])
    assert layout.channels[STANDARD_LEADS.index("V1")] == 0 and layout.channels[0] == 3
    assert layout.extra == ("ABP",) and layout.duplicates == ("v1",)
