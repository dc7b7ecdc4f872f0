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

    def split_by_record(self, test_fraction: float, seed: int) -> tuple["WindowSet", "WindowSet"]:
        """Split so that all windows of a record (and of a patient) fall on one side."""
        groups = np.array([r.patient_id or f"record:{r.record_id}" for r in self.records])
        unique = np.unique(groups)
        rng = np.random.default_rng(seed)
        test_groups = set(rng.permutation(unique)[: int(round(test_fraction * len(unique)))])
        is_test = np.array([groups[k] in test_groups for k in self.record])
        return self.subset(np.flatnonzero(~is_test)), self.subset(np.flatnonzero(is_test))

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
