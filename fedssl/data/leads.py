"""Map the lead names found in headers onto the standard twelve leads.

Databases spell leads differently (`aVR`, `AVR`, `avr`; `DII` in some European exports) and
add signals that are not standard leads (Frank `vx vy vz`, inverted `-aVR`, blood pressure).
Names are matched case-insensitively against the standard names and a few aliases; anything
else is an extra signal and is ignored, never guessed.

Modified limb leads (`MLI`, `MLII`, `MLIII`, as in MIT-BIH and the European ST-T database) are
mapped to the limb lead they approximate: their torso electrode placement changes amplitudes
somewhat but not the waveform's shape, and without the mapping a Holter record would have no
standard lead at all. Modified chest leads are already named `V1` ... `V6` and map as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedssl.data.windows import STANDARD_LEADS

_ALIASES = {lead.lower(): lead for lead in STANDARD_LEADS} | {
    "mli": "I", "mlii": "II", "mliii": "III",
    "di": "I", "dii": "II", "diii": "III",
    "d1": "I", "d2": "II", "d3": "III",
}


def standard_lead(name: str) -> str | None:
    """The standard lead that a recorded signal name denotes, or None for any other signal."""
    return _ALIASES.get(name.strip().lower())


@dataclass(frozen=True)
class LeadLayout:
    """Where each standard lead sits among a record's signals."""

    channels: tuple[int | None, ...]  # per standard lead: index of the source signal, or None
    extra: tuple[str, ...]  # signals that are not a standard lead
    duplicates: tuple[str, ...]  # signals naming a standard lead already taken by an earlier one

    @property
    def mask(self) -> np.ndarray:
        return np.array([c is not None for c in self.channels])

    @property
    def notes(self) -> tuple[str, ...]:
        notes = []
        if self.extra:
            notes.append(f"extra signals ignored: {', '.join(self.extra)}")
        if self.duplicates:
            notes.append(f"duplicated leads, kept the first: {', '.join(self.duplicates)}")
        return tuple(notes)


def lead_layout(names: Sequence[str]) -> LeadLayout:
    channels: list[int | None] = [None] * len(STANDARD_LEADS)
    extra, duplicates = [], []
    for index, name in enumerate(names):
        lead = standard_lead(name)
        if lead is None:
            extra.append(name)
            continue
        position = STANDARD_LEADS.index(lead)
        if channels[position] is None:
            channels[position] = index
        else:
            duplicates.append(name)
    return LeadLayout(tuple(channels), tuple(extra), tuple(duplicates))
