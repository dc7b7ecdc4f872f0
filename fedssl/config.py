"""Typed configuration: one scenario = sites, data, model, objective, training, federation.

Every setting has a default, so an empty YAML file parses (it names no site, which
`fedssl.check.check_scenario` refuses). Loading rejects unknown keys, wrong types, non-finite
numbers and values out of range with the dotted path of the offending key, so a typo in a scenario
fails before any training starts instead of being silently ignored or failing mid-run. Each
section checks its own ranges (`__post_init__`); combinations across sections and the model
itself are checked by `fedssl.check`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONDITIONS = (
    "normal_sinus_rhythm",
    "sinus_tachycardia",
    "sinus_bradycardia",
    "atrial_fibrillation",
    "bundle_branch_block",
    "st_elevation",
    "premature_ventricular_beats",
    # conduction, ischaemia and voltage morphologies: read from intervals and lead patterns rather
    # than from the heart rate, they are what a probe needs learned features for
    "first_degree_av_block",
    "right_bundle_branch_block",
    "st_depression",
    "low_qrs_voltage",
    "left_ventricular_hypertrophy",
)


class ConfigError(ValueError):
    """A scenario or site configuration that cannot be used; the message names the key."""


NAME = re.compile(r"[A-Za-z0-9._-]+")  # a name that is safe as one path component


def check_name(name: object, what: str) -> str:
    """`name` if it can serve as one path component (letters, digits, `-`, `_`, `.`; not `.`/`..`):
    site and scenario names become folder names (fedssl/runfolder.py)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{what}: {name!r} is not a valid name: use letters, digits, '-', '_' and '.' "
                          "(not empty, no '/', not '.' or '..'), e.g. 'hospital_a'")
    return name


def require(ok: bool, key: str, what: str, value: Any) -> None:
    """Refuse `value` of `key` unless `ok`; `what` says what would work."""
    if not ok:
        raise ConfigError(f"{key}: {what}, got {value!r}")


def positive(section: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        require(value > 0 and math.isfinite(value), key, "must be a finite number > 0", value)


def non_negative(section: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        require(value >= 0 and math.isfinite(value), key, "must be a finite number >= 0", value)


def fraction(section: Any, key: str, low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(section, key)
    ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    require(ok, key, f"must lie in {'(' if low_open else '['}0, 1{')' if high_open else ']'}", value)


@dataclass(frozen=True)
class DataConfig:
    """How raw recordings become training windows (the same at every site)."""

    sample_rate: int = 100  # Hz after resampling; 100 Hz keeps the diagnostic band (<40 Hz)
    window_seconds: float = 10.0
    highpass_hz: float = 0.5  # removes baseline wander
    lowpass_hz: float = 40.0  # removes mains and muscle noise
    min_source_rate: int = 80  # below this the 0.5-40 Hz band cannot be represented
    max_source_rate: int = 20000
    max_windows_per_record: int = 12  # a 30-min Holter record must not drown a site of 10-s ECGs
    flat_std_mv: float = 1e-3  # a lead with less variation than this carries no signal

    def __post_init__(self) -> None:
        positive(self, "sample_rate", "window_seconds", "highpass_hz", "min_source_rate", "max_windows_per_record")
        require(self.lowpass_hz > self.highpass_hz, "lowpass_hz",
                f"must be above highpass_hz ({self.highpass_hz:g} Hz)", self.lowpass_hz)
        require(self.lowpass_hz < self.sample_rate / 2, "lowpass_hz",
                f"must be below half of sample_rate ({self.sample_rate / 2:g} Hz), the highest frequency it holds",
                self.lowpass_hz)
        require(self.max_source_rate >= self.min_source_rate, "max_source_rate",
                f"must be >= min_source_rate ({self.min_source_rate})", self.max_source_rate)
        require(round(self.window_seconds * self.sample_rate) >= 2, "window_seconds",
                f"must hold at least 2 samples at sample_rate {self.sample_rate} Hz", self.window_seconds)
        non_negative(self, "flat_std_mv")


@dataclass(frozen=True)
class ModelConfig:
    """Encoder architecture. `patch_size` is in samples at `DataConfig.sample_rate`."""

    # conv_transformer (strided conv stem, 50 time tokens per 10 s, then a transformer), st_mem
    # (transformer over per-lead patches) or resnet1d (no tokens: no masked modelling). The
    # default, with CPC, trains 10x the samples per CPU second of st_mem + hybrid and probes
    # 0.729 [0.716, 0.743] against 0.670 [0.653, 0.686] on held-out real records at the same
    # CPU budget (docs/learning_efficiency.md)
    encoder: str = "conv_transformer"
    size: str = "tiny"  # tiny / small / base
    patch_size: int = 50  # st_mem only
    dropout: float = 0.0
    # conv_transformer: attention reads only earlier time tokens, downstream too; CPC needs it
    # (its context must not see the future it predicts), every other objective works either way
    causal: bool = True
    # transformer blocks of st_mem and conv_transformer; null: the size's (fedssl/models.py)
    depth: int | None = None
    # conv_transformer: residual convolutions over its tokens between the stem and attention
    # (one; two trained 1.4x slower with CPC 12 steps ahead; docs/learning_efficiency.md)
    local_blocks: int = 1
    # conv_transformer: samples per time token, 20 (0.2 s at 100 Hz: 50 tokens per 10 s) or 40
    token_samples: int = 20
    # hidden width of each transformer block's MLP, as a multiple of the width (4 as in ViT)
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        positive(self, "patch_size")
        require(self.depth is None or self.depth > 0, "depth", "must be > 0 (or null)", self.depth)
        non_negative(self, "local_blocks")
        positive(self, "mlp_ratio")
        fraction(self, "dropout", high_open=True)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Self-supervised objective; hybrid with either weight at zero is the pure form.

    Names: generative (ST-MEM), contrastive or simclr (SimCLR), cmsc (CLOCS), byol, hybrid (CREMA),
    hybrid_byol (CREMA with BYOL's agreement instead of NT-Xent: per-sample, DP-safe), cpc
    (contrastive predictive coding, negatives from the same window: DP-safe), jepa (latent
    prediction of masked spans from an EMA target: DP-safe).
    """

    # cpc: the largest gain over random init of the objectives measured on real records
    # (+0.110 [0.092, 0.138] macro AUROC 12 steps ahead, +0.098 [0.075, 0.121] with the default's
    # 4; docs/learning_efficiency.md), and per-sample (DP-SGD runs it)
    name: str = "cpc"
    mask_ratio: float = 0.75
    generative_weight: float = 1.0
    contrastive_weight: float = 0.5
    temperature: float = 0.2  # SimCLR, CMSC, CREMA's contrastive term and CPC
    projection_dim: int = 64
    decoder_width: int = 64  # masked modelling's decoder and JEPA's predictor
    decoder_depth: int = 1
    # CPC: how many time tokens ahead the context predicts: 4 (0.8 s on ConvTransformer's 0.2-s
    # tokens, about a beat); Oord et al.'s audio CPC predicts 12, which trains 1.4x slower here
    prediction_steps: int = 4
    # CPC: predict every this many steps ahead (k = stride, 2 stride, ... up to prediction_steps):
    # as far ahead with fewer predictions, whose scores are most of CPC's cost
    prediction_stride: int = 1
    target_momentum: float = 0.99  # BYOL's and JEPA's EMA rate; 0.99 suits short runs (the paper: 0.996 -> 1)
    # chance that each distortion after crop + time mask is applied to a view (fedssl/data/augment.py):
    # 1.0 applies all of them to every view; SimCLR (on a 1-D ResNet above all) needs 0.5, as in
    # SimCLR's own pipeline, or its two views share too little to agree
    view_probability: float = 1.0

    def __post_init__(self) -> None:
        # 0 hides nothing (the generative term is 0), 1 hides everything (nothing to reconstruct from)
        fraction(self, "mask_ratio", low_open=True, high_open=True)
        non_negative(self, "generative_weight", "contrastive_weight")
        require(self.generative_weight + self.contrastive_weight > 0, "generative_weight",
                "generative_weight and contrastive_weight cannot both be 0", self.generative_weight)
        positive(self, "temperature", "projection_dim", "decoder_width", "prediction_steps", "prediction_stride")
        require(self.prediction_stride <= self.prediction_steps, "prediction_stride",
                f"must be at most prediction_steps ({self.prediction_steps})", self.prediction_stride)
        non_negative(self, "decoder_depth")
        fraction(self, "target_momentum")
        fraction(self, "view_probability")


@dataclass(frozen=True)
class TrainConfig:
    """The local training loop: the same for centralized, local-only and federated training."""

    batch_size: int = 32
    learning_rate: float = 1e-3  # the peak, reached after the warm-up
    # cosine: linear warm-up, then cosine decay to zero over the planned steps of the whole training
    # (a federation's rounds x local_steps, carried across rounds; a baseline's own steps); constant: none
    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.1  # of the planned steps, spent warming up linearly from lr / warmup steps
    weight_decay: float = 0.01
    local_steps: int = 20  # optimizer steps per round (or in total for one-shot training)
    grad_clip: float = 1.0
    threads: int = 1  # torch threads per training process; sites run side by side

    def __post_init__(self) -> None:
        positive(self, "batch_size", "learning_rate", "local_steps", "threads")
        non_negative(self, "weight_decay", "grad_clip")


@dataclass(frozen=True)
class SyntheticSiteConfig:
    """A simulated hospital: its recorder, noise environment, population and missing leads."""

    records: int = 60
    sample_rate: int = 500
    duration_seconds: float = 10.0
    gain: float = 1.0  # amplitude scaling of the recorder (mV per unit)
    noise_mv: float = 0.02  # white + muscle noise
    baseline_wander_mv: float = 0.1
    mains_hz: float = 50.0
    mains_mv: float = 0.02
    missing_leads: tuple[str, ...] = ()
    # condition -> probability: every condition of CONDITIONS, or none (the generator's defaults)
    prevalence: dict[str, float] = field(default_factory=dict)
    # conditions written into each record's `# Dx:` header; empty: every condition it has. A probe
    # population labelled for a few morphologies only still holds every rhythm and condition.
    labelled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        positive(self, "records", "sample_rate", "duration_seconds", "gain")
        non_negative(self, "noise_mv", "baseline_wander_mv", "mains_hz", "mains_mv")
        unknown = sorted(set(self.prevalence) - set(CONDITIONS))
        require(not unknown, "prevalence", f"unknown condition(s) {unknown}; known: {list(CONDITIONS)}",
                self.prevalence)
        missing = [c for c in CONDITIONS if c not in self.prevalence]
        require(not self.prevalence or not missing, "prevalence",
                f"give every condition or none (none: the generator's defaults); missing {missing}", self.prevalence)
        for condition, chance in self.prevalence.items():
            require(0 <= chance <= 1, f"prevalence.{condition}", "must lie in [0, 1]", chance)
        unlabelled = sorted(set(self.labelled) - set(CONDITIONS))
        require(not unlabelled, "labelled", f"unknown condition(s) {unlabelled}; known: {list(CONDITIONS)}",
                self.labelled)


@dataclass(frozen=True)
class SiteConfig:
    """One hospital: either a folder of WFDB records or a synthetic population."""

    name: str
    folder: str | None = None
    synthetic: SyntheticSiteConfig | None = None
    # the hospital's own labels and patient ids: a CSV `record,labels[,patient]`, labels separated
    # by `;` (fedssl/data/records.py: read_labels_csv); they replace `# Dx:` / ptbxl_database.csv
    # labels of the records it lists
    labels_csv: str | None = None
    # this site's DP-SGD setting, replacing the scenario's `privacy` section for this site only
    # (null: the scenario's); see `Scenario.privacy_of`
    privacy: PrivacyConfig | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        if (self.folder is None) == (self.synthetic is None):
            raise ConfigError(f"site {self.name!r}: give exactly one of 'folder' or 'synthetic'")


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, server strategy and what travels between the sites and the server."""

    rounds: int = 3
    # fedavgm, fedavg, fedadam, fedyogi, fedprox; robust: fedmedian, fedtrimmedavg, krum, multikrum.
    # FedAvgM (server momentum; Hsu et al., arXiv 1909.06335, 2019): averaging non-IID sites'
    # updates cancels much of each round's progress, and momentum carries the direction they
    # share across rounds (docs/real_data.md: FedAvgM reaches 0.97 of centralized training on the
    # real sources where FedAvg reaches 0.93). Site-level central DP needs fedavg or fedprox.
    strategy: str = "fedavgm"
    fraction_train: float = 1.0
    min_sites: int = 2
    connect_timeout: float = 600.0  # s with fewer than min_sites online before the run fails, naming who is missing
    round_timeout: float = 3600.0  # s a round waits for the sites' replies
    # s a round waits for the other sites once min_sites have replied without error; None: wait for
    # every sampled site (a dead one is noticed by Flower's heartbeat) or the round timeout
    straggler_timeout: float | None = None
    # encoder: heads, decoders and predictors stay at the site; all: the whole objective travels
    share: str = "encoder"
    # dtype of the shared weights on the wire, both ways: float16 halves the bytes; the server
    # casts updates back to float32 before validation and aggregation (server/validation.py)
    transfer_dtype: str = "float32"
    # replace: a site starts each round from the global model; fedema: it blends in its own
    # previous model, the more the farther it has drifted (Zhuang et al., ICLR 2022)
    local_update: str = "replace"
    fedema_tau: float = 0.7  # FedEMA's mu at a site's first blend, which sets lambda ...
    fedema_lambda: float | None = None  # ... unless lambda is given here
    # server optimiser: fedavgm's server learning rate (default 1.0) or fedadam/fedyogi's eta
    # (default 0.01: Flower's 0.1 moves every weight by ~0.07 a round, ~10x what a round of local
    # training does, and probed worst in a short sweep of 0.1 / 0.01 / 0.001)
    server_learning_rate: float | None = None
    server_momentum: float = 0.9  # fedavgm's momentum, fedadam/fedyogi's beta_1
    server_tau: float = 1e-3  # fedadam/fedyogi's adaptivity (epsilon)
    proximal_mu: float = 0.01  # fedprox: weight of mu/2 * ||w - w_global||^2 in the local loss
    # robust aggregation (server/robust.py) and update validation (server/validation.py)
    trim_beta: float = 0.2  # fedtrimmedavg: fraction of sites cut at each end of every weight
    malicious_sites: int = 0  # krum/multikrum: Byzantine sites f tolerated (f > 0 needs >= 2f + 3 sites)
    krum_select: int = 0  # multikrum: number of updates averaged (0: sites - malicious_sites)
    max_update_ratio: float = 5.0  # reject an update whose norm exceeds this x the round median; 0: off
    # site-level central DP (Flower's DifferentialPrivacy{Server,Client}SideFixedClipping around the
    # strategy): none | server (the server clips each update) | client (the sites clip theirs);
    # Gaussian noise of std noise_multiplier x clipping_norm / sampled sites on the unweighted mean
    # update (a site without an update counts as zero); site-level epsilon at central_delta per
    # round in metrics.jsonl (server/central_dp.py)
    central_dp: str = "none"
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0
    central_delta: float = 1e-5

    def __post_init__(self) -> None:
        positive(self, "rounds", "min_sites", "connect_timeout", "round_timeout", "fedema_tau", "server_tau")
        # Flower samples max(int(fraction x sites), min_sites) sites and waits for them: above 1 forever
        fraction(self, "fraction_train", low_open=True)
        for key in ("straggler_timeout", "fedema_lambda", "server_learning_rate"):
            require(getattr(self, key) is None or getattr(self, key) > 0, key, "must be > 0 (or null)",
                    getattr(self, key))
        for key in ("connect_timeout", "round_timeout", "straggler_timeout"):  # never wait without end
            require(getattr(self, key) is None or math.isfinite(getattr(self, key)), key,
                    "must be a finite number of seconds", getattr(self, key))
        require(0 <= self.server_momentum < 1, "server_momentum", "must lie in [0, 1)", self.server_momentum)
        require(0 <= self.trim_beta < 0.5, "trim_beta", "must lie in [0, 0.5)", self.trim_beta)
        non_negative(self, "proximal_mu", "malicious_sites", "krum_select", "max_update_ratio")


@dataclass(frozen=True)
class EvaluationConfig:
    """Held-out labelled data for the linear probe (never seen in pretraining)."""

    folder: str | None = None
    synthetic: SyntheticSiteConfig | None = field(
        default_factory=lambda: SyntheticSiteConfig(records=240, sample_rate=500)
    )
    labels_csv: str | None = None  # labels (and patients) of `folder`'s records, as SiteConfig.labels_csv
    # the probe's test side: this fraction of the held-out patients (records without a patient id
    # count as their own patient), redrawn for each of `seeds` splits (seed, seed + 1, ...)
    test_fraction: float = 0.5
    seeds: int = 3
    random_inits: int = 3  # random-init reference: the mean over this many initialisations
    bootstrap: int = 1000  # replicates of the 95 % interval (resampling splits, then test patients)
    probe_l2: float = 1e-3
    every_round: bool = True
    local_baselines: bool = True
    # each site also probes the global encoder on its own labelled windows (split by patient, test_fraction)
    # after every round; the server logs the test-window-weighted mean AUROC (only scalars leave a site)
    federated: bool = False

    def __post_init__(self) -> None:
        # both sides of the split must hold records, or the probe has nothing to fit or to score
        fraction(self, "test_fraction", low_open=True, high_open=True)
        non_negative(self, "probe_l2")


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level differential privacy (DP-SGD) of a site's local training; see docs/privacy.md.

    The privacy unit is a `record` or a `patient`: every window of a unit is protected together.
    Each step Poisson-samples units with rate batch_size / units and trains on one window of each
    sampled unit, so one unit changes a step's clipped gradient sum by at most `max_grad_norm`.
    `noise_multiplier` None means: calibrate it so that the planned steps (rounds x local_steps)
    spend exactly `target_epsilon`. `delta` None means min(1e-5, 1 / (10 * units)).
    """

    enabled: bool = False
    target_epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    unit: str = "record"  # record | patient
    accountant: str = "rdp"  # rdp | prv
    grad_sample_mode: str = "bookkeeping"  # bookkeeping | hooks | functorch | ghost (docs/privacy.md)

    def __post_init__(self) -> None:
        if self.unit not in ("record", "patient"):
            raise ConfigError(f"unit: expected 'record' or 'patient', got {self.unit!r}")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"accountant: expected 'rdp' or 'prv', got {self.accountant!r}")
        if self.grad_sample_mode not in ("bookkeeping", "hooks", "functorch", "ghost"):
            raise ConfigError(f"grad_sample_mode: expected bookkeeping, hooks, functorch or ghost, "
                              f"got {self.grad_sample_mode!r}")
        if not self.target_epsilon > 0:
            raise ConfigError(f"target_epsilon: must be > 0, got {self.target_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"delta: must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier: must be > 0, got {self.noise_multiplier}")


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sites: tuple[SiteConfig, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name, "name")  # the default run folder is runs/<name>-<time>
        require(self.seed >= 0, "seed", "must be >= 0 (numpy's generators take no negative seed)", self.seed)
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ConfigError(f"sites: site names must be unique, got {names}")

    def privacy_of(self, site: SiteConfig) -> PrivacyConfig:
        """The DP setting of `site`: its own `privacy` section, else the scenario's."""
        return site.privacy if site.privacy is not None else self.privacy

    def site(self, name: str) -> SiteConfig:
        for site in self.sites:
            if site.name == name:
                return site
        raise ConfigError(f"no site named {name!r}; sites are {[s.name for s in self.sites]}")


def from_dict(cls: type, values: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain YAML values, checking keys and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None
    except ConfigError as err:  # a section's own check names the key inside the section
        raise ConfigError(f"{where}.{err}" if where else str(err)) from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, where): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> Any:
    """Plain-YAML form of a config (the inverse of `from_dict`)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def read_yaml(path: Path, what: str) -> Any:
    """The plain values of YAML file `path` (an empty file is an empty mapping); a ConfigError
    naming `what` and the file if it cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} {path}: {err}") from None


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario YAML file; relative folders and labels CSVs are resolved against the file."""
    path = Path(path)
    scenario = from_dict(Scenario, read_yaml(path, "scenario"))
    def resolved(relative: str | None) -> str | None:
        return None if relative is None else str((path.parent / relative).resolve())

    sites = tuple(dataclasses.replace(s, folder=resolved(s.folder), labels_csv=resolved(s.labels_csv))
                  for s in scenario.sites)
    evaluation = dataclasses.replace(scenario.evaluation, folder=resolved(scenario.evaluation.folder),
                                     labels_csv=resolved(scenario.evaluation.labels_csv))
    return dataclasses.replace(scenario, sites=sites, evaluation=evaluation)


def save_scenario(scenario: Scenario, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(scenario), sort_keys=False))
