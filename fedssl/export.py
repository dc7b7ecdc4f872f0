"""The federated encoder outside fedssl: export a run's encoder, load it back, embed WFDB records.

An export folder holds `encoder.safetensors` (the weights: safe to load, no pickle),
`encoder_config.json` (what rebuilds the encoder and the preprocessing it was trained with) and
`MODEL_CARD.md` (architecture, preprocessing, objective, sites, privacy, evaluation). `embed_folder`
reads WFDB records with the training preprocessing itself (`read_record` + `make_windows`), so an
embedding means what it meant in training.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from fedssl.check import window_samples
from fedssl.config import DataConfig, ModelConfig, Scenario, from_dict, to_dict
from fedssl.data.preprocess import FILTER_ORDER, make_windows
from fedssl.data.records import RecordError, read_record, reason_kind
from fedssl.data.site import SiteDataError
from fedssl.data.windows import STANDARD_LEADS, RecordInfo, WindowSet
from fedssl.evaluate import embed
from fedssl.models import RESNET_SIZES, build_encoder, transformer_size
from fedssl.report import Run, epsilon_by_site, last_delta, load_run, privacy_text
from fedssl.runfolder import RunFolderError
from fedssl.storage import atomic_write

WEIGHTS, CONFIG, CARD = "encoder.safetensors", "encoder_config.json", "MODEL_CARD.md"
FORMAT, FORMAT_VERSION = "fedssl-encoder", 1
T = TypeVar("T")


class ExportError(RunFolderError):
    """A run that cannot be exported, or a folder that is not a usable export."""


@dataclass(frozen=True)
class ExportedEncoder:
    encoder: nn.Module  # in evaluation mode
    model: ModelConfig
    data: DataConfig  # the preprocessing the encoder was trained with
    window_samples: int


# -- export ---------------------------------------------------------------------------------------

def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's final global encoder, its config and its model card into `out`."""
    run = load_run(run_dir)
    checkpoint = run.folder.encoder
    if not checkpoint.is_file():
        raise ExportError(f"run folder {run.folder.root} has no global encoder ({checkpoint.name})")
    samples = window_samples(run.scenario.data)
    encoder = build_encoder(run.scenario.model, samples)
    state = load_state_file(checkpoint)
    check_state(encoder, state, str(checkpoint))
    encoder.load_state_dict(state)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": to_dict(run.scenario.model),
        "data": to_dict(run.scenario.data),
        "window_samples": samples,
        "leads": list(STANDARD_LEADS),
        "embedding_dim": encoder.width,
        "parameters": parameter_count(encoder),
        "source": {"run_dir": str(run.folder.root), "scenario": run.scenario.name, "rounds": len(run.rounds),
                   "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}  # float32, as built
    # bytes written here, not with save_file, which creates the file readable by its owner only
    (out / WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt", "fedssl_config": json.dumps(config)}))
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / CARD).write_text(model_card(run, config))
    return out


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict saved with torch.save at `path`: tensors by name and nothing else.

    Loaded with `weights_only=True`: a pickle that would run code or build other objects is
    refused, and no advice is given to load it less safely.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ExportError(f"{path} holds Python objects besides tensors, which loading would execute; "
                          "refused: use an encoder.pt written by fedssl (a state dict of tensors)") from None
    except Exception as err:  # noqa: BLE001 - torch's unpickler fails on arbitrary bytes in arbitrary ways
        raise ExportError(f"{path} is not a readable torch file ({type(err).__name__}: "
                          f"{(str(err).splitlines() or [''])[0][:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ExportError(f"{path} holds a {type(state).__name__}, not a state dict (names -> tensors) as "
                          "fedssl saves an encoder")
    return state


def check_state(encoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights whose names or shapes are not the encoder's, saying which differ, and
    weights that are not finite (a diverged run, a damaged file): they would embed as NaN."""
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    wrong = [f"{k}: {given[k]} instead of {expected[k]}" for k in expected if k in given and given[k] != expected[k]]
    problems = [f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if names]
    if problems:
        raise ExportError(f"{source} does not fit the configured encoder: {'; '.join(problems)}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ExportError(f"{source}: non-finite weights (NaN or inf) in {len(broken)} tensor(s), e.g. "
                          f"{broken[:3]}; the run diverged or the file is damaged")


# -- model card -------------------------------------------------------------------------------------

def model_card(run: Run, config: dict) -> str:
    s = run.scenario
    return "\n".join([
        f"# fedssl ECG encoder: {s.name}",
        "",
        (f"A self-supervised 12-lead ECG encoder, pretrained with federated learning (fedssl on Flower) by "
        f"{len(s.sites)} sites over {len(run.rounds)} rounds; only encoder weights left the sites. Exported "
        f"{config['source']['exported']} from run folder `{run.folder.root}`."),
        "",
        (f"Files: `{WEIGHTS}` (weights, float32), `{CONFIG}` (rebuilds the encoder and its preprocessing), "
        f"this card. Load with `fedssl.export.load_encoder(FOLDER)`; embed a folder of WFDB records with "
        f"`fedssl embed FOLDER RECORDS --out embeddings.npz`."),
        "",
        "## Architecture",
        "",
        *_table(architecture(s.model, config)),
        "",
        "## Preprocessing (apply exactly this to new records)",
        "",
        *_table(preprocessing(s.data, config)),
        "",
        "## Objective and training",
        "",
        *_table(objective(s)),
        "",
        "## Sites and samples",
        "",
        ("Training windows per site as the server saw them (each site's reply reports its window count; no "
        "record ids or signals leave a site)."),
        "",
        *_table(sites_and_samples(run), header=("site", "training windows", "rounds aggregated")),
        "",
        "## Privacy guarantee",
        "",
        *privacy_section(run),
        "",
        "## Evaluation",
        "",
        *evaluation_section(run),
        "",
    ])


def _table(rows: list[tuple], header: tuple[str, ...] = ("", "")) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def architecture(model: ModelConfig, config: dict) -> list[tuple[str, str]]:
    if model.encoder == "st_mem":
        width, depth, heads = transformer_size(model)
        shape = (f"ST-MEM-style signal transformer (per-lead patches, lead and position embeddings, mean of the "
                 f"recorded leads' tokens), size {model.size}: width {width}, depth {depth}, {heads} heads, "
                 f"patches of {model.patch_size} samples")
    elif model.encoder == "conv_transformer":
        stem, width, depth, heads = transformer_size(model)
        shape = (f"convolutional stem (leads as channels, stem channels {list(stem)}, one token per "
                 f"{model.token_samples} samples) + "
                 f"{model.local_blocks} token convolutions + transformer over time tokens, size {model.size}: "
                 f"width {width}, depth {depth}, {heads} heads, MLP {model.mlp_ratio} x width"
                 f"{', causal attention' if model.causal else ''}, "
                 "mean of the tokens")
    else:
        channels, blocks = RESNET_SIZES[model.size]
        shape = (f"1-D ResNet with GroupNorm, size {model.size}: stage channels {list(channels)}, "
                 f"{blocks} block(s) per stage, global average over time")
    n = config["parameters"]
    return [
        ("encoder", shape),
        ("parameters", f"{n:,} ({n * 4 / 1e6:.1f} MB in float32)"),
        ("input", (f"windows (batch, 12, {config['window_samples']}) in the lead order below, and a lead mask "
                  "(batch, 12), True where the lead was recorded")),
        ("output", f"embedding (batch, {config['embedding_dim']})"),
        ("dropout", f"{model.dropout:g}"),
    ]


def preprocessing(data: DataConfig, config: dict) -> list[tuple[str, str]]:
    return [
        ("sample rate", (f"{data.sample_rate} Hz (resampled from the source rate; sources of "
                        f"{data.min_source_rate}-{data.max_source_rate} Hz accepted)")),
        ("window", (f"{data.window_seconds:g} s = {config['window_samples']} samples, consecutive, "
                   f"at most {data.max_windows_per_record} per record (spread evenly over longer records)")),
        ("leads", (f"{', '.join(STANDARD_LEADS)}; a missing or unusable lead (flat below {data.flat_std_mv:g} mV, "
                  "saturated, non-finite) is zero with its mask False")),
        ("filter", (f"Butterworth band-pass {data.highpass_hz:g}-{data.lowpass_hz:g} Hz, order {FILTER_ORDER} per "
                   "band edge, forward-backward (zero phase)")),
        ("scaling", "each lead standardised (zero mean, unit variance) over the whole record"),
    ]


def objective(s: Scenario) -> list[tuple[str, str]]:
    settings = ", ".join(f"{k} {v}" for k, v in to_dict(s.objective).items() if k != "name")
    fed = s.federation
    return [
        ("objective", f"{s.objective.name} ({settings})"),
        ("local training", (f"{s.train.local_steps} steps per round, batch {s.train.batch_size}, learning rate "
                           f"{s.train.learning_rate:g}, weight decay {s.train.weight_decay:g}")),
        ("federation", f"{fed.strategy}, {fed.rounds} rounds, share {fed.share}, local update {fed.local_update}"),
        ("seed", str(s.seed)),
    ]


def sites_and_samples(run: Run) -> list[tuple[str, str, int]]:
    rows = []
    for site in run.sites:
        seen = [r.site_windows[site] for r in run.rounds if site in r.site_windows]
        rows.append((site, str(max(seen)) if seen else "not recorded", len(seen)))
    return rows


def privacy_section(run: Run) -> list[str]:
    s, spent = run.scenario, epsilon_by_site(run.rounds)
    lines = [f"Setting: {privacy_text(s, run.rounds)}.", ""]
    rows = []
    for site in s.sites:
        privacy = s.privacy_of(site)
        values = [v for v in spent.get(site.name, []) if v is not None]
        if not privacy.enabled:
            rows.append((site.name, "none", "-", "-", "-"))
        elif values:
            guarantee = f"({values[-1]:.3g}, {last_delta(run.rounds, site.name):.2g})-DP"
            rows.append((site.name, guarantee, privacy.unit, privacy.accountant,
                         f"{privacy.target_epsilon:g}"))
        else:
            rows.append((site.name, "DP-SGD on, no round trained", privacy.unit, privacy.accountant,
                         f"{privacy.target_epsilon:g}"))
    lines += _table(rows, header=("site", "guarantee (epsilon, delta)", "unit", "accountant", "target epsilon"))
    lines += ["", ("Sample-level DP-SGD protects each site's records (or patients) against what the encoder reveals; "
              "a site marked none gives no formal guarantee for its data.")]
    return lines


def evaluation_section(run: Run) -> list[str]:
    ev = run.scenario.evaluation
    held_out = f"folder {ev.folder}" if ev.folder else f"{ev.synthetic.records} synthetic labelled records"
    lines = [(f"Linear probe (frozen encoder, L2 logistic regression) macro AUROC on a held-out labelled set "
             f"({held_out}, {ev.test_fraction:g} of the records for testing, split by record and patient)."), ""]
    encoders = (run.summary or {}).get("encoders")
    if encoders:
        rows = [(name, "-" if e.get("macro_auroc") is None else f"{e['macro_auroc']:.3f}")
                for name, e in encoders.items()]
    else:
        probes = [r for r in run.rounds if r.probe_macro_auroc is not None]
        rows = [("federated", f"{probes[-1].probe_macro_auroc:.3f} (round {probes[-1].round})")] if probes else []
    return lines + (_table(rows, header=("encoder", "macro AUROC")) if rows else ["No probe was recorded."])


# -- load -------------------------------------------------------------------------------------------

def load_encoder(folder: str | Path) -> ExportedEncoder:
    """The exported encoder in `folder`, with its weights checked against its config."""
    folder = Path(folder)
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder} is not a fedssl encoder export (made by `fedssl export`): "
                          f"no {' or '.join(missing)}")
    try:
        config = json.loads((folder / CONFIG).read_text())
        if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{folder / CONFIG}: format {config.get('format')!r} version "
                              f"{config.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
        model, data = from_dict(ModelConfig, config["model"], "model"), from_dict(DataConfig, config["data"], "data")
        samples = int(config["window_samples"])
        state = load_file(folder / WEIGHTS)
    except (ValueError, KeyError, TypeError, SafetensorError) as err:  # ConfigError is a ValueError
        raise ExportError(f"cannot read the export in {folder}: {err}") from None
    if samples != window_samples(data):
        raise ExportError(f"{folder / CONFIG}: window_samples {samples} does not match the data settings "
                          f"({window_samples(data)})")
    encoder = build_encoder(model, samples)
    check_state(encoder, state, str(folder / WEIGHTS))
    encoder.load_state_dict(state)
    return ExportedEncoder(encoder.eval(), model, data, samples)


# -- embed ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Embeddings:
    windows: np.ndarray  # float32 (N, D)
    record_ids: list[str]  # (N,) the source record of each window
    window_index: np.ndarray  # int (N,) the window's position among its record's windows
    skipped: list[tuple[str, str]]  # (record id, reason)

    def per_record(self) -> tuple[list[str], np.ndarray]:
        """Record ids in order of appearance and each record's mean embedding."""
        ids = list(dict.fromkeys(self.record_ids))
        position = {r: i for i, r in enumerate(ids)}
        index = np.array([position[r] for r in self.record_ids], np.int64)
        sums = np.zeros((len(ids), self.windows.shape[1]), np.float64)
        np.add.at(sums, index, self.windows)
        return ids, (sums / np.bincount(index, minlength=len(ids))[:, None]).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        ids, means = self.per_record()
        skipped_ids, reasons = zip(*self.skipped) if self.skipped else ((), ())
        arrays = {
            "embeddings": self.windows,
            "record_id": np.array(self.record_ids, dtype=str),
            "window_index": self.window_index,
            "records": np.array(ids, dtype=str),
            "record_embeddings": means,
            "skipped_records": np.array(skipped_ids, dtype=str),
            "skipped_reasons": np.array(reasons, dtype=str),
        }
        return atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def embed_folder(model_dir: str | Path, records_dir: str | Path, *, progress: bool = True) -> Embeddings:
    """Embed every window of every usable WFDB record under `records_dir` with the exported encoder."""
    exported = load_encoder(model_dir)
    folder = Path(records_dir)
    if not folder.is_dir():
        raise SiteDataError(f"records folder {folder} does not exist or is not a folder")
    headers = sorted(folder.rglob("*.hea"))
    if not headers:
        raise SiteDataError(f"no WFDB record (.hea file) in {folder}")
    vectors, record_ids, window_index, skipped = [], [], [], []
    for header in track(headers, "embedding records", show=progress):
        record_id = header.relative_to(folder).with_suffix("").as_posix()  # as in training (site.py)
        try:
            windows = make_windows(read_record(header, record_id), exported.data)
        except RecordError as err:
            skipped.append((record_id, err.reason))
        else:
            n = len(windows.windows)
            data = WindowSet(windows.windows, np.repeat(windows.lead_mask[None], n, 0), np.zeros(n, np.int64),
                             (RecordInfo(record_id, None, ()),))
            vectors.append(embed(exported.encoder, data))
            if not np.isfinite(vectors[-1]).all():
                raise ExportError(f"record {record_id}: the encoder's embedding is not finite; refused "
                                  f"(no file written)")
            record_ids += [record_id] * n
            window_index.append(np.arange(n))
    if not vectors:
        raise SiteDataError(f"no usable ECG record in {folder}: {len(skipped)} skipped ({skipped_summary(skipped)})")
    return Embeddings(np.concatenate(vectors), record_ids, np.concatenate(window_index), skipped)


def track(items: list[T], label: str, *, show: bool) -> Iterator[T]:
    """`items`, with a progress bar on stderr while they are consumed when `show` (stdout keeps
    only the command's result)."""
    if not show:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield from progress.track(items, description=label)


def skipped_summary(skipped: list[tuple[str, str]]) -> str:
    kinds = Counter(reason_kind(reason) for _, reason in skipped)
    return ", ".join(f"{kind}: {n}" for kind, n in kinds.most_common())
