"""Read one PhysioNet record (`.hea` + `.dat`, or CinC 2021 `.hea` + `.mat`) as twelve leads in mV.

A lead the record does not have stays zero with its mask False: signal is never invented.
Whatever is wrong with the files becomes a `RecordError` whose reason reads "<kind>: <detail>";
site reports group skipped records by the kind, the part before the first colon.
"""

from __future__ import annotations

import ast
import csv
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Mapping

import numpy as np

from fedssl.data.leads import LeadLayout, lead_layout
from fedssl.data.windows import STANDARD_LEADS, RecordInfo

if TYPE_CHECKING:  # wfdb (and pandas) are imported when a record is read: ClientApps start faster
    import wfdb

UNITS_IN_MV = {"mv": 1.0, "uv": 1e-3, "\u00b5v": 1e-3, "\u03bcv": 1e-3, "v": 1e3}

# Bytes per stored sample of the uncompressed WFDB formats, to check a file against its header.
_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2,
                     "212": 1.5, "310": 4 / 3, "311": 4 / 3}
# ADC resolution implied by the storage format when a header leaves the field out (as wfdb
# assumes when it writes headers); 16 bits for the formats not listed.
_DEFAULT_ADC_BITS = {"8": 8, "80": 8, "508": 8, "212": 12, "310": 10, "311": 10, "24": 24, "524": 24,
                     "32": 32}
# A lead is saturated when runs of at least SATURATION_RUN_S pinned at an ADC limit cover
# SATURATION_FRACTION of the record: an R peak touching the limit for a few samples does not count.
SATURATION_RUN_S = 0.05
SATURATION_FRACTION = 0.05


class RecordError(Exception):
    """A record that cannot be used; `reason` is short and human-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def kind(self) -> str:
        return reason_kind(self.reason)


def reason_kind(text: str) -> str:
    """The part of a reason or note that names its kind, for grouping in reports."""
    return text.split(":", 1)[0]


@dataclass(frozen=True)
class CatalogueEntry:
    """What a database keeps about a record outside its header (PTB-XL's csv)."""

    patient_id: str | None
    labels: tuple[str, ...]


@dataclass(frozen=True)
class RawRecord:
    record_id: str
    patient_id: str | None
    labels: tuple[str, ...]
    sample_rate: float  # as declared in the header, not yet checked for plausibility
    signal: np.ndarray  # float64 (12, T) in mV, zeros where a lead is missing
    lead_mask: np.ndarray  # bool (12,): True where the record has the lead
    saturated: np.ndarray  # bool (12,): the lead is pinned at an ADC limit for long runs
    source_leads: tuple[str, ...]  # signal names as written in the header
    notes: tuple[str, ...]

    @property
    def duration_seconds(self) -> float | None:
        return self.signal.shape[1] / self.sample_rate if self.sample_rate > 0 else None

    @property
    def info(self) -> RecordInfo:
        return RecordInfo(self.record_id, self.patient_id, self.labels)


def read_record(header: Path, record_id: str | None = None,
                catalogue: Mapping[str, CatalogueEntry] | None = None) -> RawRecord:
    """Read the record whose header is `header`.

    Labels come from `catalogue` if it knows the record (by `record_id`, the path in its site
    folder, or by the header's name), else from CinC `# Dx:` header comments; the patient from
    the catalogue, else from a `# Patient:` header comment, else it stays unknown."""
    record_line = _record_line(header)
    if "/" in record_line.split()[0]:
        raise RecordError("unsupported record: multi-segment (its segments are read as records)")
    import wfdb

    name = str(header.with_suffix(""))
    try:
        rec = wfdb.rdrecord(name, physical=False)
        physical = rec.dac(return_res=64)
    except Exception as err:  # wfdb fails in many ways, from IndexError to HeaderSyntaxError
        raise _explain(header, name, err) from None
    if not rec.n_sig:
        raise _no_signals()
    names = tuple(rec.sig_name or ())
    garbled = next((n for n in names if " " in n.strip() and ("/" in n or "(" in n)), None)
    if garbled is not None:  # wfdb read the rest of a signal line it could not parse as its name
        raise RecordError(f"unreadable header: a signal line's gain, units or ADC fields cannot be parsed "
                          f"({garbled[:60]!r} was read as a signal name)")
    layout = lead_layout(names)
    if not layout.mask.any():
        raise RecordError(f"no standard ECG lead: signals are {', '.join(names) or 'none'}")
    scale = _scale_to_mv(rec, layout)
    rate = _declared_rate(record_line, rec.fs)
    notes = layout.notes + _check_signal_files(header, rec)

    signal = np.zeros((len(STANDARD_LEADS), rec.sig_len))
    saturated = np.zeros(len(STANDARD_LEADS), bool)
    for lead, channel in enumerate(layout.channels):
        if channel is not None:
            signal[lead] = physical[:, channel] * scale[channel]
            # WFDB's invalid-sample value sits at the ADC limit: NaN samples are not saturation
            saturated[lead] = _is_saturated(rec.d_signal[:, channel], np.isfinite(physical[:, channel]), rate,
                                            _adc_limits(rec, channel))
    record_id = record_id or header.stem
    entry = (catalogue or {}).get(record_id) or (catalogue or {}).get(header.stem)
    return RawRecord(
        record_id=record_id,
        patient_id=(entry.patient_id if entry else None) or _header_patient(rec.comments),
        labels=entry.labels if entry else _header_labels(rec.comments),
        sample_rate=rate,
        signal=signal,
        lead_mask=layout.mask,
        saturated=saturated,
        source_leads=names,
        notes=notes,
    )


def read_ptbxl_catalogue(path: Path) -> dict[str, CatalogueEntry]:
    """Patient and scp_codes of each record in a PTB-XL `ptbxl_database.csv`, keyed by record
    name (`00001_lr` and `00001_hr`), so that it matches wherever the records are placed."""
    entries = {}
    try:
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                entry = CatalogueEntry(_patient_id(row["patient_id"]),
                                       tuple(ast.literal_eval(row["scp_codes"])))
                for column in ("filename_lr", "filename_hr"):
                    if row.get(column):
                        entries[PurePosixPath(row[column]).name] = entry
    except KeyError as err:
        raise ValueError(f"cannot read PTB-XL catalogue {path}: no column {err}") from None
    except (OSError, csv.Error, ValueError, SyntaxError, TypeError) as err:
        raise ValueError(f"cannot read PTB-XL catalogue {path}: {err}") from None
    return entries


LABEL_SEPARATOR = ";"  # between the labels of one record in a labels CSV (commas separate columns)


def read_labels_csv(path: Path) -> dict[str, CatalogueEntry]:
    """A hospital's own labels: a CSV with a header row naming the columns `record` and `labels`,
    and optionally `patient` (other columns are ignored).

    `record` is the record's path in its site folder without suffix (`data/1`) or its header's
    name (`A0001`); `labels` holds its codes separated by `;` (`426783006;59118001`; an empty
    cell: no label); `patient` its patient id (empty: unknown). A record listed twice is refused
    rather than one of its rows silently chosen.
    """
    entries: dict[str, CatalogueEntry] = {}
    try:
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            columns = [c.strip() for c in reader.fieldnames or ()]
            missing = [c for c in ("record", "labels") if c not in columns]
            if missing:
                raise ValueError(f"no column {' or '.join(map(repr, missing))} (header row: {','.join(columns)}; "
                                 f"expected record,labels[,patient])")
            reader.fieldnames = columns
            for line, row in enumerate(reader, start=2):
                record = (row["record"] or "").strip()
                if not record:
                    raise ValueError(f"line {line}: empty record name")
                if record in entries:
                    raise ValueError(f"line {line}: record {record!r} is listed twice")
                labels = [code.strip() for code in (row["labels"] or "").split(LABEL_SEPARATOR)]
                entries[record] = CatalogueEntry(_patient_id(row.get("patient") or ""),
                                                 tuple(dict.fromkeys(code for code in labels if code)))
    except (OSError, csv.Error, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"cannot read labels CSV {path}: {err}") from None
    return entries


def _explain(header: Path, name: str, err: Exception) -> RecordError:
    """Why wfdb could not read a record, in terms of the header and its files where possible
    (the header is parsed again only here: wfdb's parser is the slow part of reading)."""
    import wfdb

    try:
        head = wfdb.rdheader(name)
    except Exception as header_err:  # as above
        return RecordError(f"unreadable header: {_describe(header_err)}")
    if not head.n_sig:
        return _no_signals()
    described = len(head.sig_name or ())
    if described != head.n_sig:
        return RecordError(f"unreadable header: declares {head.n_sig} signals, describes {described}")
    if head.sig_len == 0:
        return RecordError("too short: the header declares no samples")
    try:
        _check_signal_files(header, head)
    except RecordError as file_err:
        return file_err
    return RecordError(f"unreadable signal: {_describe(err)}")


def _no_signals() -> RecordError:
    return RecordError("no signals: the header's record line declares 0 signals and no signal file")


def _describe(err: Exception) -> str:
    return str(err) or type(err).__name__


def _patient_id(text: str) -> str | None:
    """PTB-XL writes patient ids as floats ("15709.0")."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        return text or None
    return str(int(number)) if number.is_integer() else text


def _header_patient(comments: list[str]) -> str | None:
    """The patient id of a `# Patient: 1234` (or `# Patient ID:` / `# patient_id:`) comment line."""
    for comment in comments:
        key, _, value = comment.partition(":")
        if key.strip().lower().replace("_", " ") in ("patient", "patient id") and value.strip():
            return value.strip()
    return None


def _header_labels(comments: list[str]) -> tuple[str, ...]:
    """SNOMED-CT codes of CinC 2021 `# Dx: 426783006,164934002` comment lines."""
    codes = []
    for comment in comments:
        key, _, value = comment.partition(":")
        if key.strip().lower() == "dx":
            codes += [code.strip() for code in value.split(",") if code.strip()]
    return tuple(dict.fromkeys(codes))


def _scale_to_mv(rec: wfdb.Record, layout: LeadLayout) -> dict[int, float]:
    scale = {}
    for channel in (c for c in layout.channels if c is not None):
        units = (rec.units[channel] or "mV").strip()
        if units.lower() not in UNITS_IN_MV:
            raise RecordError(f"unsupported units: {units!r} for lead {rec.sig_name[channel]}")
        scale[channel] = UNITS_IN_MV[units.lower()]
    return scale


def _record_line(header: Path) -> str:
    try:
        lines = header.read_text(errors="replace").splitlines()
    except OSError as err:
        raise RecordError(f"unreadable header: {err.strerror}") from None
    line = next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), None)
    if line is None:
        raise RecordError("unreadable header: no record line")
    return line


def _declared_rate(record_line: str, parsed: float) -> float:
    """The sampling rate as written: wfdb falls back to 250 Hz when it cannot parse the field
    (a negative rate, say), and a record must not be resampled from a rate it never had."""
    fields = record_line.split()
    if len(fields) < 3:
        return parsed  # no rate given: the WFDB default applies
    try:
        return float(fields[2].split("/")[0].split("(")[0])
    except ValueError:
        raise RecordError(f"unsupported sampling rate: {fields[2]!r}") from None


def _check_signal_files(header: Path, head: wfdb.Record) -> tuple[str, ...]:
    """Missing, truncated or foreign signal files as clear reasons; a note if a file holds more samples.

    A signal file must lie beside its header, and a file named after another record whose header
    is there too belongs to that record: reading it would count the same signal twice.
    """
    notes = []
    for file_name in dict.fromkeys(head.file_name or ()):
        if Path(file_name).name != file_name or file_name in (".", ".."):
            raise RecordError(f"signal file outside the record's folder: {file_name}")
        path = header.parent / file_name
        if not path.is_file():
            raise RecordError(f"missing signal file: {file_name}")
        owner = Path(file_name).stem
        if owner != header.stem and (header.parent / f"{owner}.hea").is_file():
            raise RecordError(f"signal file of another record: {file_name} belongs to record {owner}")
        channels = [c for c, name in enumerate(head.file_name) if name == file_name]
        fmt = head.fmt[channels[0]]
        if head.sig_len is None or fmt not in _BYTES_PER_SAMPLE:
            continue  # length taken from the file, or a compressed format
        frame_bytes = sum(head.samps_per_frame[c] or 1 for c in channels) * _BYTES_PER_SAMPLE[fmt]
        needed = (head.byte_offset[channels[0]] or 0) + math.ceil(head.sig_len * frame_bytes)
        size = path.stat().st_size
        if size < needed:
            raise RecordError(f"signal file too short: {file_name} has {size} bytes, "
                              f"the header's {head.sig_len} samples need {needed}")
        if size - needed >= math.ceil(frame_bytes):
            notes.append(f"signal file longer than its header says: {file_name}, extra samples ignored")
    return tuple(notes)


def _adc_limits(rec: wfdb.Record, channel: int) -> tuple[int, int]:
    bits = rec.adc_res[channel] or _DEFAULT_ADC_BITS.get(rec.fmt[channel], 16)
    zero = rec.adc_zero[channel] or 0
    return zero - 2 ** (bits - 1), zero + 2 ** (bits - 1) - 1


def _is_saturated(digital: np.ndarray, valid: np.ndarray, rate: float, limits: tuple[int, int]) -> bool:
    pinned = ((digital <= limits[0]) | (digital >= limits[1])) & valid
    edges = np.diff(np.concatenate([[0], pinned.astype(np.int8), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    long_runs = runs[runs >= SATURATION_RUN_S * rate].sum()
    return bool(long_runs >= SATURATION_FRACTION * len(digital))
