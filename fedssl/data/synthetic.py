"""Synthetic 12-lead ECG hospitals, seeded and grounded in cardiac electrophysiology.

Federated pretraining needs many sites that differ the way hospitals do (recorder, noise,
population, missing leads) while every label is known, and tests need ECGs without downloads.

The model, top to bottom:
1. Conditions: exactly one rhythm and any of the morphologies, drawn from the site's prevalence.
2. Beat times: sinus rhythm with heart-rate variability (respiratory sinus arrhythmia plus a
   0.1 Hz Mayer wave), or the irregularly irregular ventricular response of atrial fibrillation.
   Premature ventricular beats replace sinus beats early; the sinus node is not reset, so the
   next beat keeps its time and leaves a compensatory pause.
3. The heart vector: every beat is a sum of bumps (P, septal Q, R, S, T, and the injury-current
   plateau of ST elevation) in a 3-D frame, McSharry's ECGSYN extended to a vectorcardiogram.
   A per-record rotation and scaling vary the electrical axis and the amplitudes.
4. Electrodes: the potential at each of the nine electrodes is a projection of the heart vector
   (limb electrodes on Einthoven's equilateral triangle, chest electrodes along approximate 3-D
   directions) plus what the electrode picks up: white and muscle noise, baseline wander, mains.
5. Leads: the 12 standard leads are electrode differences (Einthoven, Goldberger, Wilson), so
   III = II - I and aVR + aVL + aVF = 0 hold exactly, noise included.

Heart frame: x points to the patient's left, y to the feet, z to the front (anterior).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedssl.config import CONDITIONS, SyntheticSiteConfig
from fedssl.data.windows import STANDARD_LEADS

SNOMED = {
    "normal_sinus_rhythm": "426783006",
    "sinus_tachycardia": "427084000",
    "sinus_bradycardia": "426177001",
    "atrial_fibrillation": "164889003",
    "bundle_branch_block": "164909002",  # the SNOMED concept is left bundle branch block
    "st_elevation": "164931005",
    "premature_ventricular_beats": "427172004",
    "first_degree_av_block": "270492004",
    "right_bundle_branch_block": "59118001",
    "st_depression": "429622005",
    "low_qrs_voltage": "251146004",
    "left_ventricular_hypertrophy": "164873001",
}
RHYTHMS = ("normal_sinus_rhythm", "sinus_tachycardia", "sinus_bradycardia", "atrial_fibrillation")
MORPHOLOGIES = ("bundle_branch_block", "st_elevation", "premature_ventricular_beats",
                "first_degree_av_block", "right_bundle_branch_block", "st_depression",
                "low_qrs_voltage", "left_ventricular_hypertrophy")
# One heart has at most one member of a pair: the left and the right bundle blocked at once is
# complete heart block; the injury current of ischaemia points either at the wall (transmural:
# elevation) or at the cavity (subendocardial: depression), and two would cancel; hypertrophy's
# tall QRS and low voltage are opposite ends of one scale. Each pair is drawn with one uniform
# number, so both keep their own prevalence.
EXCLUSIVE = (("bundle_branch_block", "right_bundle_branch_block"),
             ("st_elevation", "st_depression"),
             ("left_ventricular_hypertrophy", "low_qrs_voltage"))

# Balanced rather than epidemiological, so that a few hundred records hold every class;
# rhythm weights are normalised, morphology values are independent probabilities.
DEFAULT_PREVALENCE = {
    "normal_sinus_rhythm": 0.4,
    "sinus_tachycardia": 0.2,
    "sinus_bradycardia": 0.2,
    "atrial_fibrillation": 0.2,
    "bundle_branch_block": 0.2,
    "st_elevation": 0.2,
    "premature_ventricular_beats": 0.2,
    "first_degree_av_block": 0.15,
    "right_bundle_branch_block": 0.15,
    "st_depression": 0.15,
    "low_qrs_voltage": 0.15,
    "left_ventricular_hypertrophy": 0.15,
}
# Drawn uniformly, a few bpm inside the clinical 60 and 100 bpm limits so that every label is
# unambiguous; for AF the mean ventricular response.
HEART_RATE_BPM = {
    "normal_sinus_rhythm": (63.0, 95.0),
    "sinus_tachycardia": (102.0, 150.0),
    "sinus_bradycardia": (40.0, 57.0),
    "atrial_fibrillation": (70.0, 130.0),
}
SHORTEST_RR_S = 0.3  # the ventricles are refractory: no beat, premature or in AF, comes sooner
# PR interval (P onset to QRS onset), s: normal conduction and first-degree AV block (> 200 ms),
# each a little inside the 200 ms limit so that every label is unambiguous
PR_INTERVAL_S = {"normal": (0.14, 0.19), "first_degree_av_block": (0.23, 0.34)}
# Voltage criteria, mV. Low QRS voltage: peak-to-peak QRS below 0.5 mV in every limb lead.
# LVH (Sokolow-Lyon): S in V1 plus the taller R of V5/V6 at least 3.5 mV. Records without the
# label are kept clear of the limit by a margin.
LOW_VOLTAGE_LIMB_MV = (0.25, 0.45)
NORMAL_LIMB_MIN_MV = 0.6
SOKOLOW_LYON_LVH_MV = (3.7, 5.0)
SOKOLOW_LYON_NORMAL_MAX_MV = 3.0
ADC_UNITS_PER_MV = 1000  # 1 uV resolution; format 16 then holds +-32.7 mV
RECORDER_RANGE_MV = 32.0


def _unit(x: float, y: float, z: float) -> np.ndarray:
    vector = np.array([x, y, z], dtype=float)
    return vector / np.linalg.norm(vector)


# --- Electrodes and leads -------------------------------------------------------------------

ELECTRODES = ("RA", "LA", "LL", "V1", "V2", "V3", "V4", "V5", "V6")


def _frontal(angle_degrees: float) -> np.ndarray:
    """Direction in the frontal plane on the hexaxial clock (0 = left, +90 = feet)."""
    angle = np.radians(angle_degrees)
    return np.array([np.cos(angle), np.sin(angle), 0.0])


# Limb electrodes sit on Einthoven's equilateral triangle; the 1/sqrt(3) makes lead I read the
# x component exactly and lead II the projection on +60 degrees.
_LIMB_ELECTRODES = np.array([_frontal(210.0), _frontal(-30.0), _frontal(90.0)]) / np.sqrt(3.0)
# Chest electrodes: direction from the heart and a proximity gain (V2-V4 lie closest).
_CHEST_ELECTRODES = np.array([
    1.0 * _unit(-0.45, 0.05, 0.89),  # V1: 4th intercostal space, right sternal border
    1.4 * _unit(0.0, 0.05, 1.0),  # V2: left sternal border
    1.4 * _unit(0.4, 0.1, 0.9),  # V3
    1.3 * _unit(0.7, 0.15, 0.7),  # V4: 5th intercostal space, midclavicular line
    1.1 * _unit(0.9, 0.15, 0.4),  # V5: anterior axillary line
    0.9 * _unit(1.0, 0.15, 0.0),  # V6: midaxillary line
])
# (9, 3): the potential at each electrode per mV of heart vector.
ELECTRODE_VECTORS = np.vstack([_LIMB_ELECTRODES, _CHEST_ELECTRODES])


def _lead_montage() -> np.ndarray:
    """(12, 9) matrix turning electrode potentials into the standard leads."""
    electrode = {name: row for name, row in zip(ELECTRODES, np.eye(len(ELECTRODES)))}
    ra, la, ll = electrode["RA"], electrode["LA"], electrode["LL"]
    wilson = (ra + la + ll) / 3.0
    leads = {
        "I": la - ra,
        "II": ll - ra,
        "III": ll - la,
        "aVR": ra - (la + ll) / 2.0,
        "aVL": la - (ra + ll) / 2.0,
        "aVF": ll - (ra + la) / 2.0,
        **{name: electrode[name] - wilson for name in ("V1", "V2", "V3", "V4", "V5", "V6")},
    }
    return np.array([leads[name] for name in STANDARD_LEADS])


LEAD_MONTAGE = _lead_montage()


# --- Conditions -----------------------------------------------------------------------------

def draw_conditions(prevalence: dict[str, float], rng: np.random.Generator) -> tuple[str, ...]:
    """One rhythm (weights normalised) and each morphology independently (the members of an
    `EXCLUSIVE` pair never together), in CONDITIONS order."""
    unknown = sorted(set(prevalence) - set(SNOMED))
    if unknown:
        raise ValueError(f"prevalence: unknown condition(s) {unknown}; known: {list(CONDITIONS)}")
    chances = {**DEFAULT_PREVALENCE, **prevalence}
    if any(not 0.0 <= p <= 1.0 for p in chances.values()):
        raise ValueError(f"prevalence values must lie in [0, 1], got {prevalence}")
    for pair in EXCLUSIVE:
        if sum(chances[c] for c in pair) > 1.0:
            raise ValueError(f"prevalence: {' and '.join(pair)} exclude each other, "
                             f"so their probabilities must add up to at most 1")
    rhythm_weights = np.array([chances[r] for r in RHYTHMS])
    if rhythm_weights.sum() <= 0.0:
        raise ValueError("prevalence: at least one rhythm needs a positive probability")
    rhythm = RHYTHMS[rng.choice(len(RHYTHMS), p=rhythm_weights / rhythm_weights.sum())]
    paired = {c for pair in EXCLUSIVE for c in pair}
    present = {rhythm} | {m for m in MORPHOLOGIES if m not in paired and rng.random() < chances[m]}
    for first, second in EXCLUSIVE:
        u = rng.random()
        present |= {first} if u < chances[first] else {second} if u < chances[first] + chances[second] else set()
    return tuple(c for c in CONDITIONS if c in present)


# --- Beat times -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Respiration:
    """Breathing drives sinus arrhythmia, QRS amplitude modulation and baseline wander alike."""

    rate_hz: float
    phase: float

    def __call__(self, t: np.ndarray | float) -> np.ndarray:
        return np.sin(2.0 * np.pi * self.rate_hz * np.asarray(t) + self.phase)


def _sinus_beat_times(rate_bpm: float, until: float, breathing: Respiration,
                      rng: np.random.Generator) -> np.ndarray:
    """Sinus node firing: RR modulated by breathing (RSA) and the 0.1 Hz Mayer wave."""
    mean_rr = 60.0 / rate_bpm
    sinus_arrhythmia = rng.uniform(0.01, 0.04)
    mayer, mayer_phase = rng.uniform(0.01, 0.03), rng.uniform(0.0, 2.0 * np.pi)
    times = [-rng.uniform(0.0, mean_rr)]
    while times[-1] < until:
        t = times[-1]
        modulation = (sinus_arrhythmia * breathing(t)
                      + mayer * np.sin(2.0 * np.pi * 0.1 * t + mayer_phase)
                      + 0.005 * rng.standard_normal())
        times.append(t + mean_rr * (1.0 + modulation))
    return np.array(times)


def _fibrillation_beat_times(rate_bpm: float, until: float, rng: np.random.Generator) -> np.ndarray:
    """AF: the AV node passes random f-waves, so RR intervals are independent (irregularly
    irregular), log-normal around the mean, and never shorter than the refractory period."""
    mean_rr = 60.0 / rate_bpm
    spread = rng.uniform(0.15, 0.25)
    count = int(np.ceil((until + mean_rr) / (0.5 * mean_rr)))
    rr = mean_rr * np.exp(spread * rng.standard_normal(count) - spread**2 / 2.0)
    rr = np.maximum(rr, SHORTEST_RR_S)
    times = -rng.uniform(0.0, mean_rr) + np.concatenate([[0.0], np.cumsum(rr)])
    return times[: np.searchsorted(times, until) + 1]


def _premature_ventricular_beats(times: np.ndarray, duration: float,
                                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace some beats by earlier ectopic ones; returns (times, is_ectopic).

    Only beats after a normal or long interval qualify (in AF too, so an ectopic beat is always
    clearly early), never two in a row, never before the ventricles have recovered from the last
    beat, and always after a recorded beat so that the prematurity is visible. The following beat
    keeps its time: a compensatory pause.
    """
    intervals = np.diff(times)
    typical_rr = np.median(intervals)
    first = 1 + rng.integers(2)
    candidates = [k for k in range(first, len(times) - 1, 2)
                  if 0.0 < times[k - 1] and times[k] < duration - 0.5
                  and intervals[k - 1] >= 0.9 * typical_rr]
    is_ectopic = np.zeros(len(times), dtype=bool)
    if not candidates:
        return times, is_ectopic
    count = min(len(candidates), max(1, int(round(rng.uniform(0.05, 0.2) * len(times)))))
    chosen = rng.choice(candidates, size=count, replace=False)
    times = times.copy()
    coupling = np.maximum(rng.uniform(0.55, 0.7, size=count) * typical_rr, SHORTEST_RR_S)
    times[chosen] = times[chosen - 1] + coupling
    is_ectopic[chosen] = True
    return times, is_ectopic


# --- Heart-vector morphology ----------------------------------------------------------------

@dataclass(frozen=True)
class Wave:
    """One bump of the heart vector: a Gaussian in time, asymmetric if the widths differ,
    flat-topped if `flatness` exceeds 2; its vector gives direction and size in mV."""

    offset: float  # s from the beat's R peak
    width_before: float  # s
    width_after: float  # s
    vector: np.ndarray
    flatness: float = 2.0
    component: str = "qrs"  # p (atrial), qrs (ventricular depolarisation), st or t (repolarisation)

    @property
    def repolarisation(self) -> bool:
        """Timing stretches with sqrt(RR), as QT does (Bazett)."""
        return self.component in ("st", "t")


def _rotation(about_x: float, about_y: float, about_z: float) -> np.ndarray:
    """Rotation by angles in degrees: about z turns the frontal-plane axis, about y the
    precordial transition zone, about x tilts the loop forwards or backwards."""
    ax, ay, az = np.radians([about_x, about_y, about_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _plateau(j_point: float, t_peak: float, vector: np.ndarray) -> Wave:
    """An ST-segment shift: flat from the J point into the T wave, along `vector`."""
    half_width = 0.6 * (t_peak - j_point)
    return Wave((j_point + t_peak) / 2.0, half_width, half_width, vector, flatness=6.0, component="st")


def _depolarisation(conditions: tuple[str, ...],
                    rng: np.random.Generator) -> tuple[list[Wave], float, float]:
    """Ventricular activation and its secondary repolarisation: (waves, J point, T peak)."""
    if "bundle_branch_block" in conditions:
        # LBBB: the left ventricle is activated late through muscle, not the fast Purkinje
        # network: no septal q, a broad notched R towards the lateral leads (I, aVL, V5-V6; two
        # slow fronts, QRS ~150-180 ms), deep QS in V1-V3, and repolarisation opposite to
        # depolarisation (discordant ST-T).
        gap, width = rng.uniform(0.045, 0.06), rng.uniform(0.021, 0.026)
        j_point, t_peak = gap / 2.0 + 2.0 * width, 0.27
        return [
            Wave(-gap / 2.0, width, width, 1.1 * _unit(0.75, 0.25, -0.6)),
            Wave(gap / 2.0, width, width, 1.0 * _unit(0.8, -0.1, -0.5)),
            Wave(t_peak, 0.055, 0.04, 0.4 * _unit(-0.6, -0.1, 0.6), component="t"),
        ], j_point, t_peak
    # Normal conduction: septum left-to-right (q in lateral leads, r in V1), then the free walls
    # towards left-inferior-posterior (R), then the basal terminal forces (S).
    q = rng.uniform(0.9, 1.1)  # QRS duration varies between people
    hypertrophy = "left_ventricular_hypertrophy" in conditions
    if hypertrophy:  # a thicker wall takes longer to activate and pulls the axis to the left
        q *= rng.uniform(1.05, 1.2)
    free_wall = _unit(0.8, 0.35, -0.5) if hypertrophy else _unit(0.65, 0.6, -0.45)
    j_point, t_peak = 0.05 * q, 0.25
    waves = [
        Wave(-0.022 * q, 0.008 * q, 0.008 * q, 0.15 * _unit(-0.5, 0.2, 0.85)),
        Wave(0.0, 0.010 * q, 0.010 * q, 1.3 * free_wall),
        Wave(0.022 * q, 0.009 * q, 0.009 * q, 0.5 * _unit(-0.35, -0.45, -0.8)),
    ]
    if "right_bundle_branch_block" in conditions:
        # RBBB: septum and left ventricle as normal, then the right ventricle late and slowly
        # through muscle towards right-anterior: a terminal R' in V1 (rSR'), a wide slurred S in
        # I, aVL and V6, QRS >= 120 ms; the T wave turns away from the late forces (inverted V1-V3).
        delay, width = rng.uniform(0.05, 0.065), rng.uniform(0.022, 0.028)
        j_point = delay + 2.0 * width
        waves.append(Wave(delay, width, width, rng.uniform(0.6, 0.9) * _unit(-0.55, 0.1, 0.8)))
        t_wave = 0.35 * _unit(0.75, 0.45, -0.35)
    elif hypertrophy:
        # Strain: the thick wall repolarises endocardium-last, so ST depression with an
        # asymmetric inverted T (slow descent, quick return) opposite the tall lateral R.
        t_wave = rng.uniform(0.2, 0.35) * -free_wall
        waves.append(_plateau(j_point, t_peak, rng.uniform(0.05, 0.12) * -free_wall))
        return waves + [Wave(t_peak, 0.065, 0.03, t_wave, component="t")], j_point, t_peak
    else:
        t_wave = 0.35 * _unit(0.6, 0.55, 0.35)
    return waves + [Wave(t_peak, 0.05, 0.035, t_wave, component="t")], j_point, t_peak


def _conducted_beat(conditions: tuple[str, ...], rng: np.random.Generator) -> list[Wave]:
    """The waves of a beat conducted through the AV node, before per-record variation."""
    ventricles, j_point, t_peak = _depolarisation(conditions, rng)
    waves = []
    if "atrial_fibrillation" not in conditions:  # atria activated in order: a P wave
        # P onset (2 widths before its peak) precedes the QRS onset by the PR interval.
        qrs_onset = min(w.offset - 2.0 * w.width_before for w in ventricles if w.component == "qrs")
        conduction = "first_degree_av_block" if "first_degree_av_block" in conditions else "normal"
        width = rng.uniform(0.02, 0.025)  # P duration 80-100 ms
        onset = qrs_onset - rng.uniform(*PR_INTERVAL_S[conduction])
        waves.append(Wave(onset + 2.0 * width, width, width, 0.15 * _unit(0.55, 0.8, 0.25), component="p"))
    waves += ventricles
    if "st_elevation" in conditions:
        # Injury current of an occluded artery: a plateau from the J point into the T wave,
        # pointing at the injured wall (inferior: II, III, aVF; anterior: V1-V4).
        territory = _unit(-0.25, 1.0, 0.1) if rng.random() < 0.5 else _unit(0.25, 0.0, 1.0)
        waves.append(_plateau(j_point, t_peak, rng.uniform(0.2, 0.35) * territory))
    if "st_depression" in conditions:
        # Subendocardial ischaemia: the injury current points from the endocardium of the
        # whole left ventricle towards the cavity and the right shoulder: horizontal ST
        # depression in I, II, aVF and V4-V6, reciprocal elevation in aVR.
        waves.append(_plateau(j_point, t_peak, rng.uniform(0.22, 0.38) * _unit(-0.7, -0.6, -0.3)))
    return waves


def _ectopic_beat(rng: np.random.Generator) -> list[Wave]:
    """A premature ventricular beat: no P wave, activation spreads slowly through muscle from a
    focus in one ventricle (broad, large QRS ~170 ms) and repolarises in the opposite direction."""
    right_ventricular = rng.random() < 0.5  # LBBB-like, inferior axis; else RBBB-like
    focus = _unit(0.3, 0.8, -0.5) if right_ventricular else _unit(-0.5, 0.3, 0.8)
    focus = _rotation(*rng.normal(0.0, 15.0, size=3)) @ focus
    size = rng.uniform(1.5, 2.5)
    return [
        Wave(-0.03, 0.022, 0.022, size * focus),
        Wave(0.03, 0.022, 0.022, 0.8 * size * (_rotation(0.0, 20.0, 20.0) @ focus)),
        Wave(0.28, 0.06, 0.05, -0.3 * size * focus, component="t"),
    ]


def _individualise(waves: list[Wave], rotation: np.ndarray, size: float,
                   rng: np.random.Generator) -> list[Wave]:
    """Each person's heart sits and conducts a little differently: rotate and rescale."""
    return [replace(w, vector=size * rng.lognormal(0.0, 0.15) * (rotation @ w.vector))
            for w in waves]


def qrs_leads(waves: list[Wave], fs: float = 500.0) -> np.ndarray:
    """(samples, 12) mV of one beat's ventricular depolarisation alone, without noise: what the
    voltage criteria read."""
    qrs = [w for w in waves if w.component == "qrs"]
    reach = 0.25  # s either side of the R peak: every QRS wave ends well within it
    heart = _render([qrs], np.array([reach]), np.ones(1), np.ones(1), int(round(2 * reach * fs)), fs)
    return heart @ ELECTRODE_VECTORS.T @ LEAD_MONTAGE.T


def sokolow_lyon_mv(leads: np.ndarray) -> float:
    """Depth of the S wave in V1 plus the taller R of V5 and V6 (Sokolow & Lyon, 1949)."""
    column = {name: i for i, name in enumerate(STANDARD_LEADS)}
    s_v1 = max(0.0, -leads[:, column["V1"]].min())
    return s_v1 + max(0.0, leads[:, column["V5"]].max(), leads[:, column["V6"]].max())


def limb_qrs_mv(leads: np.ndarray) -> float:
    """The largest peak-to-peak QRS of the six limb leads."""
    return float(np.ptp(leads[:, :6], axis=0).max())


def _calibrate_voltage(waves: list[Wave], conditions: tuple[str, ...],
                       rng: np.random.Generator) -> tuple[list[Wave], float, tuple[str, ...]]:
    """Meet the voltage criteria of the record's labels: (waves, attenuation, conditions).

    Hypertrophy scales the QRS alone (more muscle), to a Sokolow-Lyon index drawn above 3.5 mV;
    other records are kept below 3.0 mV. Low voltage attenuates the whole heart vector (fluid,
    fat or air between heart and electrodes damps every wave) to limb QRS below 0.5 mV; other
    records have at least 0.6 mV. The two labels are then read back from the beat, so that the
    rare record where the two limits cannot both hold is labelled by its signal.
    """
    leads = qrs_leads(waves)
    index = sokolow_lyon_mv(leads)
    if "left_ventricular_hypertrophy" in conditions:
        qrs_gain = rng.uniform(*SOKOLOW_LYON_LVH_MV) / index
    else:
        qrs_gain = min(1.0, SOKOLOW_LYON_NORMAL_MAX_MV * rng.uniform(0.8, 1.0) / index)
    limb = qrs_gain * limb_qrs_mv(leads)
    if "low_qrs_voltage" in conditions:
        attenuation = rng.uniform(*LOW_VOLTAGE_LIMB_MV) / limb
    else:
        attenuation = max(1.0, NORMAL_LIMB_MIN_MV * rng.uniform(1.0, 1.3) / limb)
    waves = [replace(w, vector=qrs_gain * w.vector) if w.component == "qrs" else w for w in waves]
    measured = {"left_ventricular_hypertrophy": attenuation * qrs_gain * index >= 3.5,
                "low_qrs_voltage": attenuation * limb < 0.5}
    conditions = tuple(c for c in CONDITIONS
                       if (c in conditions and c not in measured) or measured.get(c, False))
    return waves, attenuation, conditions


# --- Rendering ------------------------------------------------------------------------------

def _render(waves_per_beat: list[list[Wave]], times: np.ndarray, rr_before: np.ndarray,
            beat_size: np.ndarray, samples: int, fs: float) -> np.ndarray:
    """Sum all bumps of all beats into a (samples, 3) heart vector in one vectorised pass."""
    rows = []
    for waves, t, rr, size in zip(waves_per_beat, times, rr_before, beat_size):
        qt_stretch = np.clip(np.sqrt(rr), 0.6, 1.25)
        for w in waves:
            s = qt_stretch if w.repolarisation else 1.0
            rows.append((t + w.offset * s, w.width_before * s, w.width_after * s, w.flatness,
                         size * w.vector))
    centre, before, after, flatness, vectors = (np.array(column) for column in zip(*rows))
    # Each bump is evaluated only within four widths of its peak: ragged rows, one flat array.
    reach = np.ceil(4.0 * np.maximum(before, after) * fs).astype(int)
    lengths = 2 * reach + 1
    row = np.repeat(np.arange(len(rows)), lengths)
    position_in_row = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = (np.round(centre * fs).astype(int) - reach)[row] + position_in_row
    dt = index / fs - centre[row]
    squared = (dt / np.where(dt < 0.0, before[row], after[row])) ** 2
    flat = flatness[row] != 2.0
    squared[flat] **= flatness[row][flat] / 2.0
    inside = (index >= 0) & (index < samples)
    shape = np.exp(-0.5 * squared[inside])
    heart = np.empty((samples, 3))
    for axis in range(3):
        heart[:, axis] = np.bincount(index[inside], weights=shape * vectors[row[inside], axis],
                                     minlength=samples)
    return heart


def _fibrillatory_waves(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """AF's f-waves: chaotic atrial activity at 4-9 Hz, largest in V1 and the inferior leads.
    Two wavelets of drifting frequency and waxing amplitude along different directions."""
    heart = np.zeros((len(t), 3))
    for direction in (_unit(-0.3, 0.5, 0.8), _unit(0.3, 0.8, 0.3)):
        frequency = rng.uniform(4.0, 9.0)
        drift_hz, drift_rate = rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.5)  # f +- drift_hz
        phase = (2.0 * np.pi * frequency * t + rng.uniform(0.0, 2.0 * np.pi)
                 + (drift_hz / drift_rate) * np.sin(2.0 * np.pi * drift_rate * t))
        waxing = 1.0 + 0.4 * np.sin(2.0 * np.pi * rng.uniform(0.1, 0.4) * t
                                    + rng.uniform(0.0, 2.0 * np.pi))
        heart += (rng.uniform(0.02, 0.06) * waxing * np.sin(phase))[:, None] * direction
    return heart


def _per_electrode_sinusoid(t: np.ndarray, frequency_hz: float, amplitudes: np.ndarray,
                            rng: np.random.Generator) -> np.ndarray:
    """(samples, electrodes) of amplitude * sin(2 pi f t + phase) with a random phase each,
    expanded as sin(a + b) so that only two sines are evaluated rather than one per electrode."""
    phases = rng.uniform(0.0, 2.0 * np.pi, size=len(amplitudes))
    angle = 2.0 * np.pi * frequency_hz * t
    return (np.outer(np.sin(angle), amplitudes * np.cos(phases))
            + np.outer(np.cos(angle), amplitudes * np.sin(phases)))


def _electrode_noise(spec: SyntheticSiteConfig, t: np.ndarray, breathing: Respiration,
                     rng: np.random.Generator) -> np.ndarray:
    """(samples, 9) of what each electrode picks up besides the heart.

    Differences of two electrodes make a lead, so per-electrode sizes are 1/sqrt(2) of the
    site's nominal lead-level values.
    """
    samples, electrodes = len(t), len(ELECTRODES)
    white_mv, wander_mv, mains_mv = (v / np.sqrt(2.0) for v in
                                     (spec.noise_mv, spec.baseline_wander_mv, spec.mains_mv))
    noise = white_mv * rng.standard_normal((samples, electrodes))
    # Muscle (EMG) bursts: high-frequency noise while a limb (more often) or the chest tenses.
    burst_odds = np.r_[[0.2] * 3, [0.4 / 6] * 6]
    for _ in range(rng.poisson(spec.duration_seconds / 4.0)):
        electrode = rng.choice(electrodes, p=burst_odds)
        length = int(rng.uniform(0.3, 1.5) * spec.sample_rate)
        start = rng.integers(max(1, samples - length))
        stop = min(samples, start + length)
        burst = np.diff(rng.standard_normal(length + 1)) / np.sqrt(2.0) * np.hanning(length)
        noise[start:stop, electrode] += rng.uniform(2.0, 4.0) * white_mv * burst[: stop - start]
    # Baseline wander: breathing moves the chest, the electrode-skin contact drifts slowly.
    noise += _per_electrode_sinusoid(
        t, breathing.rate_hz, rng.uniform(0.3, 1.0, electrodes) * wander_mv, rng)
    noise += _per_electrode_sinusoid(
        t, rng.uniform(0.05, 0.15), rng.uniform(0.3, 1.0, electrodes) * wander_mv, rng)
    # Mains: common-mode pickup is rejected, unequal electrode impedances let a part through.
    noise += _per_electrode_sinusoid(t, spec.mains_hz, np.full(electrodes, mains_mv), rng)
    return noise


# --- Records and sites ----------------------------------------------------------------------

def generate_record(spec: SyntheticSiteConfig,
                    rng: np.random.Generator) -> tuple[np.ndarray, tuple[str, ...]]:
    """One recording as the site's recorder sees it: (samples, 12) in mV in STANDARD_LEADS order
    (all 12, missing leads are dropped only when writing), and its condition names."""
    conditions = draw_conditions(spec.prevalence, rng)
    rhythm = next(c for c in conditions if c in RHYTHMS)
    fs, duration = spec.sample_rate, spec.duration_seconds
    t = np.arange(int(round(duration * fs))) / fs
    breathing = Respiration(rng.uniform(0.2, 0.33), rng.uniform(0.0, 2.0 * np.pi))

    rate = rng.uniform(*HEART_RATE_BPM[rhythm])
    until = duration + 1.0  # beats just past the end still contribute their P and T
    if rhythm == "atrial_fibrillation":
        times = _fibrillation_beat_times(rate, until, rng)
    else:
        times = _sinus_beat_times(rate, until, breathing, rng)
    is_ectopic = np.zeros(len(times), dtype=bool)
    if "premature_ventricular_beats" in conditions:
        times, is_ectopic = _premature_ventricular_beats(times, duration, rng)
        if not is_ectopic.any():  # a record too short to hold one: the label follows the signal
            conditions = tuple(c for c in conditions if c != "premature_ventricular_beats")
    rr_before = np.diff(times, prepend=times[0] - 60.0 / rate)

    if rhythm == "atrial_fibrillation":  # no P wave, so no PR interval to be long
        conditions = tuple(c for c in conditions if c != "first_degree_av_block")

    # Axis, transition zone and size vary widely between people, so that no condition is told
    # apart by where the heart points or how large its signal is.
    rotation = _rotation(rng.normal(0.0, 10.0), rng.normal(0.0, 18.0), rng.normal(0.0, 22.0))
    size = rng.lognormal(0.0, 0.25)
    conducted = _individualise(_conducted_beat(conditions, rng), rotation, size, rng)
    conducted, attenuation, conditions = _calibrate_voltage(conducted, conditions, rng)
    ectopic = _individualise(_ectopic_beat(rng), rotation, size, rng) if is_ectopic.any() else []
    beat_size = (1.0 + 0.05 * breathing(times)) * rng.lognormal(0.0, 0.02, size=len(times))
    heart = _render([ectopic if e else conducted for e in is_ectopic], times, rr_before, beat_size,
                    len(t), fs)
    if rhythm == "atrial_fibrillation":
        heart += _fibrillatory_waves(t, rng)
    heart *= attenuation

    potentials = heart @ ELECTRODE_VECTORS.T + _electrode_noise(spec, t, breathing, rng)
    return spec.gain * potentials @ LEAD_MONTAGE.T, conditions


def _write_format_16(folder: Path, name: str, fs: int, signal_mv: np.ndarray,
                     lead_names: list[str], comments: list[str]) -> None:
    """Write a WFDB record byte for byte as `wfdb.wrsamp(fmt=16, adc_gain=1000, baseline=0)`
    would, without its per-field pandas look-ups that cost about 0.1 s a record."""
    clipped = np.clip(signal_mv, -RECORDER_RANGE_MV, RECORDER_RANGE_MV)
    digital = np.round(clipped * ADC_UNITS_PER_MV).astype("<i2")
    digital.tofile(folder / f"{name}.dat")
    checksums = digital.sum(axis=0, dtype=np.int64) % 65536
    lines = [f"{name} {len(lead_names)} {fs} {len(digital)}"]
    lines += [f"{name}.dat 16 {ADC_UNITS_PER_MV}(0)/mV 16 0 {first} {checksum} 0 {lead}"
              for first, checksum, lead in zip(digital[0], checksums, lead_names)]
    lines += [f"# {comment}" for comment in comments]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")


def write_synthetic_site(folder: Path, spec: SyntheticSiteConfig, seed: int) -> list[str]:
    """Write `spec.records` WFDB records (format 16, mV, CinC-2021-style header comments) and
    return their names. Record i is drawn from `np.random.default_rng([seed, i])` alone, so the
    same seed gives byte-identical files and a larger site extends a smaller one."""
    unknown = sorted(set(spec.missing_leads) - set(STANDARD_LEADS))
    if unknown:
        raise ValueError(f"missing_leads: unknown lead(s) {unknown}; "
                         f"leads are {list(STANDARD_LEADS)}")
    kept = [i for i, lead in enumerate(STANDARD_LEADS) if lead not in spec.missing_leads]
    if not kept:
        raise ValueError("missing_leads: at least one lead must be recorded")
    unknown = sorted(set(spec.labelled) - set(SNOMED))
    if unknown:
        raise ValueError(f"labelled: unknown condition(s) {unknown}; known: {list(CONDITIONS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(spec.records):
        rng = np.random.default_rng([seed, index])
        signal, conditions = generate_record(spec, rng)
        age = int(np.clip(rng.normal(58.0, 16.0), 18, 95))
        sex = "Male" if rng.random() < 0.5 else "Female"
        name = f"syn{index + 1:05d}"
        comments = [
            f"Age: {age}",
            f"Sex: {sex}",
            f"Dx: {','.join(SNOMED[c] for c in conditions if c in (spec.labelled or conditions))}",
            f"Patient: s{seed}-{index + 1:05d}",
        ]
        _write_format_16(folder, name, spec.sample_rate, signal[:, kept],
                         [STANDARD_LEADS[i] for i in kept], comments)
        names.append(name)
    return names
