"""Synthetic hospitals: determinism, the WFDB files, lead physics, site differences, and that every
condition is recognisable by the simple feature a cardiologist would look at first."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import wfdb
from numpy.lib.stride_tricks import sliding_window_view
from scipy import signal as sps

from fedssl.config import CONDITIONS, SyntheticSiteConfig
from fedssl.data.synthetic import (
    DEFAULT_PREVALENCE,
    RHYTHMS,
    SNOMED,
    draw_conditions,
    generate_record,
    write_synthetic_site,
)
from fedssl.data.windows import STANDARD_LEADS

LEAD = {name: i for i, name in enumerate(STANDARD_LEADS)}
SITE = SyntheticSiteConfig()  # the default hospital: 500 Hz, 10 s, mild noise, 50 Hz mains
FEATURE_RECORDS = 120
REQUIRED_ACCURACY = 0.9


def record(seed: int, spec: SyntheticSiteConfig = SITE) -> tuple[np.ndarray, tuple[str, ...]]:
    return generate_record(spec, np.random.default_rng(seed))


# --- Determinism and the written files --------------------------------------------------------

def test_snomed_codes_cover_exactly_the_configured_conditions():
    assert set(SNOMED) == set(CONDITIONS)
    assert SNOMED["atrial_fibrillation"] == "164889003"
    assert len(set(SNOMED.values())) == len(SNOMED)


def test_same_seed_gives_the_same_record_and_another_seed_does_not():
    signal, conditions = record(7)
    again, conditions_again = record(7)
    other, _ = record(8)
    assert signal.shape == (5000, 12)
    np.testing.assert_array_equal(signal, again)
    assert conditions == conditions_again
    assert not np.allclose(signal, other)


def test_record_length_follows_the_site_sample_rate_and_duration():
    signal, _ = record(1, SyntheticSiteConfig(sample_rate=257, duration_seconds=4.0))
    assert signal.shape == (1028, 12)


def test_limb_leads_obey_einthoven_and_goldberger_noise_included():
    signal, _ = record(3, SyntheticSiteConfig(noise_mv=0.05, mains_mv=0.1))
    lead = {name: signal[:, i] for name, i in LEAD.items()}
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-12)
    np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=1e-12)
    np.testing.assert_allclose(lead["aVL"], lead["I"] - lead["II"] / 2, atol=1e-12)
    np.testing.assert_allclose(lead["aVF"], lead["II"] - lead["I"] / 2, atol=1e-12)


def test_site_gain_scales_the_whole_recording():
    quiet, _ = record(5)
    loud, _ = record(5, dataclasses.replace(SITE, gain=2.0))
    np.testing.assert_allclose(loud, 2.0 * quiet, atol=1e-12)


def test_written_site_round_trips_through_wfdb(tmp_path: Path):
    spec = SyntheticSiteConfig(records=3, sample_rate=250, duration_seconds=4.0,
                               missing_leads=("aVL", "V3"))
    names = write_synthetic_site(tmp_path, spec, seed=11)
    assert names == ["syn00001", "syn00002", "syn00003"]
    kept = [lead for lead in STANDARD_LEADS if lead not in spec.missing_leads]
    for index, name in enumerate(names):
        written = wfdb.rdrecord(str(tmp_path / name))
        expected, conditions = generate_record(spec, np.random.default_rng([11, index]))
        assert written.sig_name == kept
        assert written.units == ["mV"] * len(kept)
        assert written.fs == 250 and written.p_signal.shape == (1000, len(kept))
        expected = expected[:, [LEAD[k] for k in kept]]
        np.testing.assert_allclose(written.p_signal, expected, atol=0.5 / 1000 + 1e-9)  # 1 uV steps
        comments = dict(line.split(": ", 1) for line in written.comments)
        assert comments["Dx"].split(",") == [SNOMED[c] for c in conditions]
        assert comments["Sex"] in {"Male", "Female"} and 18 <= int(comments["Age"]) <= 95
        assert comments["Patient"] == f"s11-{index + 1:05d}"


def test_files_are_what_wfdb_itself_would_write(tmp_path: Path):
    spec = SyntheticSiteConfig(records=1, duration_seconds=3.0, missing_leads=("V1",))
    (name,) = write_synthetic_site(tmp_path / "ours", spec, seed=2)
    signal, _ = generate_record(spec, np.random.default_rng([2, 0]))
    kept = [lead for lead in STANDARD_LEADS if lead != "V1"]
    (tmp_path / "wfdb").mkdir()
    wfdb.wrsamp(name, fs=spec.sample_rate, units=["mV"] * 11, sig_name=kept,
                p_signal=signal[:, [LEAD[k] for k in kept]], fmt=["16"] * 11, adc_gain=[1000] * 11,
                baseline=[0] * 11, comments=wfdb.rdheader(str(tmp_path / "ours" / name)).comments,
                write_dir=str(tmp_path / "wfdb"))
    for suffix in (".hea", ".dat"):
        ours = (tmp_path / "ours" / name).with_suffix(suffix).read_bytes()
        assert ours == (tmp_path / "wfdb" / name).with_suffix(suffix).read_bytes()


def test_same_seed_writes_byte_identical_files(tmp_path: Path):
    spec = SyntheticSiteConfig(records=2, duration_seconds=3.0)
    for folder, seed in (("a", 4), ("b", 4), ("c", 5)):
        write_synthetic_site(tmp_path / folder, spec, seed)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["syn00001.dat", "syn00001.hea", "syn00002.dat", "syn00002.hea"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other_seed = (tmp_path / "c" / "syn00001.dat").read_bytes()
    assert (tmp_path / "a" / "syn00001.dat").read_bytes() != other_seed


def test_unknown_leads_and_conditions_are_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="V7"):
        write_synthetic_site(tmp_path, SyntheticSiteConfig(records=1, missing_leads=("V7",)), 0)
    with pytest.raises(ValueError, match="afib"):
        draw_conditions({"afib": 0.5}, np.random.default_rng(0))


# --- Population and site differences ---------------------------------------------------------

def test_prevalence_is_respected_with_exactly_one_rhythm():
    prevalence = {"atrial_fibrillation": 2.0 / 3.0, "normal_sinus_rhythm": 2.0 / 3.0,
                  "sinus_tachycardia": 0.0, "sinus_bradycardia": 0.0, "st_elevation": 0.5}
    rng = np.random.default_rng(0)
    draws = [draw_conditions(prevalence, rng) for _ in range(2000)]
    assert all(sum(c in d for c in RHYTHMS) == 1 for d in draws)
    share = {c: np.mean([c in d for d in draws]) for c in CONDITIONS}
    assert share["atrial_fibrillation"] == pytest.approx(0.5, abs=0.04)  # rhythms are normalised
    assert share["sinus_tachycardia"] == 0.0
    assert share["st_elevation"] == pytest.approx(0.5, abs=0.04)
    assert share["bundle_branch_block"] == pytest.approx(0.2, abs=0.04)  # the default


def mains_peak_ratio(signal: np.ndarray, fs: float, frequency: float) -> float:
    """Power at `frequency` over the median power within 10 Hz of it, median over the leads: a
    lead between two electrodes that pick mains up in nearly the same phase sees little of it."""
    freqs, power = sps.welch(signal, fs=fs, nperseg=1000, axis=0)
    band = (np.abs(freqs - frequency) <= 10) & (np.abs(freqs - frequency) >= 2)
    return float(np.median(power[np.argmin(np.abs(freqs - frequency))] / np.median(power[band], axis=0)))


@pytest.mark.parametrize("mains_hz, other_hz", [(50.0, 60.0), (60.0, 50.0)])
def test_mains_interference_appears_at_the_site_frequency(mains_hz, other_hz):
    spec = SyntheticSiteConfig(mains_hz=mains_hz, mains_mv=0.05)
    signal, _ = record(2, spec)
    assert mains_peak_ratio(signal, spec.sample_rate, mains_hz) > 100
    assert mains_peak_ratio(signal, spec.sample_rate, other_hz) < 10


def test_a_quiet_site_has_no_noise_wander_or_mains():
    quiet = SyntheticSiteConfig(noise_mv=0.0, baseline_wander_mv=0.0, mains_mv=0.0)
    clean, _ = record(6, quiet)
    noisy, _ = record(6, dataclasses.replace(quiet, noise_mv=0.05, baseline_wander_mv=0.3))
    assert mains_peak_ratio(clean, quiet.sample_rate, 50.0) < 10
    freqs, clean_power = sps.welch(clean[:, LEAD["II"]], fs=500, nperseg=5000)
    _, noisy_power = sps.welch(noisy[:, LEAD["II"]], fs=500, nperseg=5000)
    wander = (freqs >= 0.05) & (freqs <= 0.5)
    high = freqs >= 100
    assert noisy_power[wander].sum() > 3 * clean_power[wander].sum()
    assert noisy_power[high].sum() > 100 * clean_power[high].sum()


# --- Conditions are recognisable by simple features ------------------------------------------

def bandpass(ecg: np.ndarray, fs: float, low: float, high: float) -> np.ndarray:
    sos = sps.butter(2, [low, high], btype="band", fs=fs, output="sos")
    return sps.sosfiltfilt(sos, ecg, axis=0)


def detect_beats(ecg: np.ndarray, fs: float) -> np.ndarray:
    """QRS complexes as peaks of the 5-30 Hz squared slope summed over all leads and integrated
    over 100 ms (Pan-Tompkins style), each placed at the centroid of its slope energy. All leads
    rather than lead II alone because a premature beat's axis can be perpendicular to lead II."""
    slope_energy = (np.gradient(bandpass(ecg, fs, 5.0, 30.0), axis=0) ** 2).sum(axis=1)
    width = int(0.1 * fs)
    integrated = np.convolve(slope_energy, np.ones(width) / width, mode="same")
    peaks, _ = sps.find_peaks(integrated, distance=int(0.25 * fs),
                              height=0.3 * np.percentile(integrated, 90))
    peaks = peaks[(peaks >= width) & (peaks < len(ecg) - width)]
    offsets = np.arange(-width, width)
    weights = slope_energy[peaks[:, None] + offsets]
    return peaks + np.round((weights * offsets).sum(axis=1) / weights.sum(axis=1)).astype(int)


@dataclasses.dataclass(frozen=True)
class Features:
    heart_rate_bpm: float
    rr_irregularity: float  # RMS of successive differences of conducted RR intervals / mean RR
    qrs_width_s: float
    st_elevation_mv: float  # the highest ST level reached by both leads of a contiguous pair
    st_depression_mv: float  # the deepest ST depression reached by both leads of a contiguous pair
    premature_ectopic_beats: int  # early beats whose QRS looks unlike the others
    pr_interval_s: float  # P onset to QRS onset; NaN without a P wave
    late_qrs_mv: dict[str, float]  # per lead, mean 70-110 ms after QRS onset: the late forces
    sokolow_lyon_mv: float  # S in V1 plus the taller R of V5 and V6
    limb_qrs_mv: float  # the largest peak-to-peak QRS of the limb leads


def measure(ecg: np.ndarray, fs: float) -> Features:
    clean = bandpass(ecg, fs, 0.5, 40.0)
    peaks = detect_beats(ecg, fs)
    before, after = int(0.5 * fs), int(0.5 * fs)
    padded = np.pad(clean, ((before, after), (0, 0)), mode="edge")
    beats = np.stack([padded[p : p + before + after] for p in peaks])  # (beats, time, leads)

    # Morphology: correlation of each QRS (+-100 ms, all leads) with the median QRS, at the best
    # alignment within +-40 ms.
    half, shift = int(0.1 * fs), int(0.04 * fs)
    typical_qrs = np.median(beats[:, before - half : before + half], axis=0).ravel()
    typical_qrs = (typical_qrs - typical_qrs.mean()) / typical_qrs.std()
    around_qrs = beats[:, before - half - shift : before + half + shift]
    shifted = sliding_window_view(around_qrs, 2 * half, axis=1)  # (beats, shifts, leads, time)
    shifted = shifted.transpose(0, 1, 3, 2).reshape(len(peaks), 2 * shift + 1, -1)
    shifted = (shifted - shifted.mean(-1, keepdims=True)) / shifted.std(-1, keepdims=True)
    ectopic = (shifted @ typical_qrs / typical_qrs.size).max(axis=1) < 0.8

    rr = np.diff(peaks) / fs
    premature = np.r_[False, rr < 0.85 * np.median(rr)]
    conducted_rr = ~ectopic[:-1] & ~ectopic[1:]
    successive = np.diff(rr)[conducted_rr[:-1] & conducted_rr[1:]]
    irregularity = 0.0
    if successive.size:  # two PVCs in a short record can leave no pair of conducted intervals
        irregularity = np.sqrt(np.mean(successive**2)) / np.mean(rr[conducted_rr])

    # QRS width: the run of the median conducted beat's spatial velocity above 15% of its peak.
    template = np.median(beats[~ectopic], axis=0)
    smooth = int(0.02 * fs)
    velocity = np.convolve(np.linalg.norm(np.gradient(template, axis=0), axis=1),
                           np.ones(smooth) / smooth, mode="same")
    # Onset and end: where it stays below for 20 ms, so that a brief dip between the left and
    # the late right ventricular forces of a bundle branch block does not end the QRS.
    top = before - half + np.argmax(velocity[before - half : before + half])
    quiet_for = int(0.02 * fs)
    low = velocity < 0.15 * velocity[top]
    quiet = np.convolve(low, np.ones(quiet_for), mode="valid") == quiet_for  # low[i : i + 20 ms]
    onset = top - np.argmax(low[top::-1])
    j_point = top + np.argmax(quiet[top:])

    # ST level at J+40..60 ms against the PR segment: at 150 bpm the T wave already rises by J+60.
    ms = fs / 1000.0
    baseline = template[onset - int(40 * ms) : onset - int(10 * ms)].mean(axis=0)
    st = template[j_point + int(40 * ms) : j_point + int(60 * ms)].mean(axis=0) - baseline
    contiguous = [("II", "III"), ("II", "aVF"), ("III", "aVF"),  # inferior wall
                  ("V1", "V2"), ("V2", "V3"), ("V3", "V4")]  # anterior wall
    lateral = [("I", "aVL"), ("I", "V6"), ("V4", "V5"), ("V5", "V6"), ("II", "aVF")]

    qrs = template[onset : j_point + 1] - baseline
    late = template[onset + int(70 * ms) : onset + int(110 * ms)] - baseline
    return Features(
        heart_rate_bpm=60.0 / rr.mean(),
        rr_irregularity=irregularity,
        qrs_width_s=(j_point - onset) / fs,
        st_elevation_mv=max(min(st[LEAD[a]], st[LEAD[b]]) for a, b in contiguous),
        st_depression_mv=max(min(-st[LEAD[a]], -st[LEAD[b]]) for a, b in lateral),
        premature_ectopic_beats=int((ectopic & premature).sum()),
        pr_interval_s=pr_interval(template[:, LEAD["II"]], onset, fs),
        late_qrs_mv={lead: float(late[:, i].mean()) for lead, i in LEAD.items()},
        sokolow_lyon_mv=float(-qrs[:, LEAD["V1"]].min() + qrs[:, [LEAD["V5"], LEAD["V6"]]].max()),
        limb_qrs_mv=float(np.ptp(qrs[:, :6], axis=0).max()),
    )


def pr_interval(lead_ii: np.ndarray, qrs_onset: int, fs: float) -> float:
    """P onset (where lead II last rises through 20 % of the P wave's height above the PR segment)
    to QRS onset, in the median beat; the P wave is the highest point 50-330 ms before the QRS."""
    ms = fs / 1000.0
    segment = lead_ii[qrs_onset - int(330 * ms) : qrs_onset - int(50 * ms)]
    peak = int(np.argmax(segment))
    level = lead_ii[qrs_onset - int(30 * ms) : qrs_onset - int(10 * ms)].mean()
    height = segment[peak] - level
    if height < 0.05:  # no P wave worth the name
        return float("nan")
    below = segment[: peak + 1] < level + 0.2 * height
    if not below.any():
        return float("nan")
    p_onset = peak - np.argmax(below[::-1])
    return (len(segment) - p_onset + int(50 * ms)) / fs


def rhythm_from(features: Features) -> str:
    if features.rr_irregularity > 0.1:
        return "atrial_fibrillation"
    if features.heart_rate_bpm > 100:
        return "sinus_tachycardia"
    if features.heart_rate_bpm < 60:
        return "sinus_bradycardia"
    return "normal_sinus_rhythm"


@pytest.fixture(scope="module")
def population() -> list[tuple[tuple[str, ...], Features]]:
    records = [record(1000 + i) for i in range(FEATURE_RECORDS)]
    return [(conditions, measure(signal, SITE.sample_rate)) for signal, conditions in records]


def accuracy(predicted: list, truth: list) -> float:
    return float(np.mean(np.array(predicted) == np.array(truth)))


def test_population_holds_every_condition(population):
    present = {c for conditions, _ in population for c in conditions}
    assert present == set(CONDITIONS)


def test_heart_rate_and_irregularity_recognise_the_rhythm(population):
    predicted = [rhythm_from(f) for _, f in population]
    truth = [next(c for c in conditions if c in RHYTHMS) for conditions, _ in population]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY


def test_rr_irregularity_flags_atrial_fibrillation(population):
    predicted = [f.rr_irregularity > 0.1 for _, f in population]
    truth = ["atrial_fibrillation" in conditions for conditions, _ in population]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY


BUNDLE_BRANCH_BLOCKS = ("bundle_branch_block", "right_bundle_branch_block")  # left, right


def test_qrs_width_flags_bundle_branch_block(population):
    predicted = [f.qrs_width_s >= 0.12 for _, f in population]
    truth = [any(b in conditions for b in BUNDLE_BRANCH_BLOCKS) for conditions, _ in population]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY


def test_late_forces_tell_right_from_left_bundle_branch_block(population):
    """RBBB: the right ventricle activates last, towards V1 (R' in V1, wide S in I and V6).
    LBBB: the left ventricle activates last, away from V1 (QS in V1, broad R in I and V6)."""
    blocked = [(c, f) for c, f in population if any(b in c for b in BUNDLE_BRANCH_BLOCKS)]
    assert sum("right_bundle_branch_block" in c for c, _ in blocked) >= 10
    assert sum("bundle_branch_block" in c for c, _ in blocked) >= 10
    predicted = [f.late_qrs_mv["V1"] > 0 and f.late_qrs_mv["I"] + f.late_qrs_mv["V6"] < 0
                 for _, f in blocked]
    truth = ["right_bundle_branch_block" in c for c, _ in blocked]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY


def read_against_a_normal_qrs(population: list) -> list:
    """Records whose ST segment is read for ischaemia: a bundle branch block or hypertrophy shifts
    it by itself (secondary repolarisation), and low voltage damps it along with every wave."""
    confounders = (*BUNDLE_BRANCH_BLOCKS, "left_ventricular_hypertrophy", "low_qrs_voltage")
    return [(c, f) for c, f in population if not any(x in c for x in confounders)]


def test_st_level_flags_st_elevation(population):
    readable = read_against_a_normal_qrs(population)
    predicted = [f.st_elevation_mv >= 0.1 for _, f in readable]
    truth = ["st_elevation" in conditions for conditions, _ in readable]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY


def test_st_level_flags_st_depression():
    """At least 0.1 mV in two contiguous lateral or inferior leads, in a population where half
    the records have it (an ST elevation's reciprocal depression is read as the elevation)."""
    spec = dataclasses.replace(SITE, prevalence={
        **DEFAULT_PREVALENCE, "st_depression": 0.5, "st_elevation": 0.0, "bundle_branch_block": 0.0,
        "right_bundle_branch_block": 0.0, "left_ventricular_hypertrophy": 0.0, "low_qrs_voltage": 0.0})
    readable = [(c, measure(signal, spec.sample_rate))
                for signal, c in (record(2000 + i, spec) for i in range(40))]
    assert sum("st_depression" in c for c, _ in readable) >= 10
    predicted = [f.st_depression_mv >= 0.1 for _, f in readable]
    truth = ["st_depression" in conditions for conditions, _ in readable]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY


def test_pr_interval_flags_first_degree_av_block(population):
    """PR > 200 ms, read in sinus rhythm below 100 bpm where the P wave stands clear of the
    previous T wave, and at normal voltage where it stands clear of the noise."""
    readable = [(c, f) for c, f in population
                if c[0] in ("normal_sinus_rhythm", "sinus_bradycardia") and "low_qrs_voltage" not in c]
    assert sum("first_degree_av_block" in c for c, _ in readable) >= 5
    predicted = [f.pr_interval_s > 0.2 for _, f in readable]
    truth = ["first_degree_av_block" in conditions for conditions, _ in readable]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY
    normal = [f.pr_interval_s for c, f in readable if "first_degree_av_block" not in c]
    assert 0.12 <= np.nanmedian(normal) <= 0.2


def test_sokolow_lyon_index_flags_left_ventricular_hypertrophy(population):
    assert sum("left_ventricular_hypertrophy" in c for c, _ in population) >= 10
    predicted = [f.sokolow_lyon_mv >= 3.5 for _, f in population]
    truth = ["left_ventricular_hypertrophy" in conditions for conditions, _ in population]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY


def test_limb_lead_voltage_flags_low_qrs_voltage(population):
    assert sum("low_qrs_voltage" in c for c, _ in population) >= 10
    predicted = [f.limb_qrs_mv < 0.5 for _, f in population]
    truth = ["low_qrs_voltage" in conditions for conditions, _ in population]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY


def test_early_odd_beats_flag_premature_ventricular_beats(population):
    predicted = [f.premature_ectopic_beats > 0 for _, f in population]
    truth = ["premature_ventricular_beats" in conditions for conditions, _ in population]
    assert accuracy(predicted, truth) >= REQUIRED_ACCURACY

