"""The one in-memory form of ECG data after preprocessing: fixed windows with a lead mask.

Every consumer (objectives, the training loop, the linear probe) takes a `WindowSet`; it is
cached on disk as one `.npz` so that later epochs and rounds never re-read WFDB files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fedssl.storage import atomic_write

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


@dataclass(frozen=True)
class RecordInfo:
    """What is known of one source record (never sent off-site)."""

    record_id: str
    patient_id: str | None
    labels: tuple[str, ...]  # SNOMED-CT codes (or PTB-XL scp codes)


@dataclass(frozen=True)
class WindowSet:
    windows: np.ndarray  # float32 (N, 12, T): standardised per lead, zeros where a lead is missing
    lead_mask: np.ndarray  # bool (N, 12): True where the lead was recorded
    record: np.ndarray  # int64 (N,): index into `records` of the window's source record
    records: tuple[RecordInfo, ...]

    def __post_init__(self) -> None:
        n = len(self.windows)
        if self.windows.ndim != 3 or self.windows.shape[1] != len(STANDARD_LEADS):
            raise ValueError(f"windows must be (N, 12, T), got {self.windows.shape}")
        if self.lead_mask.shape != (n, len(STANDARD_LEADS)) or self.record.shape != (n,):
            raise ValueError("lead_mask and record must match the number of windows")

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def window_samples(self) -> int:
        return self.windows.shape[2]

    def classes(self) -> tuple[str, ...]:
        """Sorted label codes that occur in this set."""
        return tuple(sorted({code for r in self.records for code in r.labels}))

    def targets(self, classes: Sequence[str]) -> np.ndarray:
        """Multi-hot (N, C) float32 targets of each window for `classes`."""
        position = {c: i for i, c in enumerate(classes)}
        per_record = np.zeros((len(self.records), len(classes)), np.float32)
        for i, info in enumerate(self.records):
            for code in info.labels:
                if code in position:
                    per_record[i, position[code]] = 1.0
        return per_record[self.record]

    def subset(self, index: np.ndarray) -> "WindowSet":
        return WindowSet(self.windows[index], self.lead_mask[index], self.record[index], self.records)

    def patient_groups(self) -> np.ndarray:
        """The patient of every window, as a string: its record's patient id where one is known,
        else the record itself (a record without a patient id cannot be linked to other records).

        Held-out evaluation splits and resamples these groups, never windows: windows of one
        recording (or one patient's recordings) are near-copies, and a probe tested on a copy of
        what it was trained on measures memory, not the encoder."""
        per_record = np.array([f"patient:{r.patient_id}" if r.patient_id else f"record:{i}"
                               for i, r in enumerate(self.records)])
        return per_record[self.record]

    def patient_split(self, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Window indices (train, test) such that all windows of a patient (or, without a patient
        id, of a record) fall on one side; `round(test_fraction x patients)` patients, drawn with
        `seed`, are the test side."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
        groups = self.patient_groups()
        unique = np.unique(groups)
        rng = np.random.default_rng(seed)
        is_test = np.isin(groups, rng.permutation(unique)[: int(round(test_fraction * len(unique)))])
        return np.flatnonzero(~is_test), np.flatnonzero(is_test)

    def split_by_patient(self, test_fraction: float, seed: int) -> tuple["WindowSet", "WindowSet"]:
        """`patient_split` as the two window sets."""
        train, test = self.patient_split(test_fraction, seed)
        return self.subset(train), self.subset(test)

    @staticmethod
    def concat(sets: Sequence["WindowSet"]) -> "WindowSet":
        offsets = np.cumsum([0] + [len(s.records) for s in sets[:-1]])
        return WindowSet(
            np.concatenate([s.windows for s in sets]),
            np.concatenate([s.lead_mask for s in sets]),
            np.concatenate([s.record + o for s, o in zip(sets, offsets)]),
            tuple(r for s in sets for r in s.records),
        )

    def save(self, path: Path) -> None:
        records = np.array(json.dumps([asdict(r) for r in self.records]))
        atomic_write(path, lambda f: np.savez(f, windows=self.windows, lead_mask=self.lead_mask,
                                              record=self.record, records=records))

    @staticmethod
    def load(path: Path) -> "WindowSet":
        with np.load(path) as f:
            records = tuple(
                RecordInfo(r["record_id"], r["patient_id"], tuple(r["labels"]))
                for r in json.loads(str(f["records"]))
            )
            return WindowSet(f["windows"], f["lead_mask"], f["record"], records)
