"""Typed configuration: one scenario = sites, data, model, objective, training, federation.

Every setting has a default so that an empty YAML file is a valid scenario. Loading rejects
unknown keys and wrong types with the dotted path of the offending key, so a typo in a scenario
fails before any training starts instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
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
)


class ConfigError(ValueError):
    """A scenario or site configuration that cannot be used; the message names the key."""


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


@dataclass(frozen=True)
class ModelConfig:
    """Encoder architecture. `patch_size` is in samples at `DataConfig.sample_rate`."""

    # conv_transformer (strided conv stem, 50 time tokens per 10 s, then a transformer), st_mem
    # (transformer over per-lead patches) or resnet1d (no tokens: no masked modelling). The
    # default, with CPC, trained 6.4x the samples per CPU second of st_mem + hybrid and probed
    # 0.744 [0.711, 0.772] against 0.677 [0.670, 0.690] on held-out real records at the same
    # CPU budget (docs/learning_efficiency.md)
    encoder: str = "conv_transformer"
    size: str = "tiny"  # tiny / small / base
    patch_size: int = 50  # st_mem only
    dropout: float = 0.0
    # conv_transformer: attention reads only earlier time tokens, downstream too; CPC needs it
    # (its context must not see the future it predicts), every other objective works either way
    causal: bool = True


@dataclass(frozen=True)
class ObjectiveConfig:
    """Self-supervised objective; hybrid with either weight at zero is the pure form.

    Names: generative (ST-MEM), contrastive or simclr (SimCLR), cmsc (CLOCS), byol, hybrid (CREMA),
    hybrid_byol (CREMA with BYOL's agreement instead of NT-Xent: per-sample, DP-safe), cpc
    (contrastive predictive coding, negatives from the same window: DP-safe), jepa (latent
    prediction of masked spans from an EMA target: DP-safe).
    """

    # cpc: the largest gain over random init of the objectives measured on real records
    # (+0.110 [0.092, 0.138] macro AUROC; docs/learning_efficiency.md), and per-sample (DP-SGD runs it)
    name: str = "cpc"
    mask_ratio: float = 0.75
    generative_weight: float = 1.0
    contrastive_weight: float = 0.5
    temperature: float = 0.2  # SimCLR, CMSC, CREMA's contrastive term and CPC
    projection_dim: int = 64
    decoder_width: int = 64  # masked modelling's decoder and JEPA's predictor
    decoder_depth: int = 1
    # CPC: how many time tokens ahead the context predicts (12 as in Oord et al.'s audio CPC;
    # 2.4 s on ConvTransformer's 0.2-s tokens, two to three beats)
    prediction_steps: int = 12
    target_momentum: float = 0.99  # BYOL's and JEPA's EMA rate; 0.99 suits short runs (the paper: 0.996 -> 1)
    # chance that each distortion after crop + time mask is applied to a view (fedssl/data/augment.py):
    # 1.0 applies all of them to every view; SimCLR (on a 1-D ResNet above all) needs 0.5, as in
    # SimCLR's own pipeline, or its two views share too little to agree
    view_probability: float = 1.0


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
    prevalence: dict[str, float] = field(default_factory=dict)  # condition -> probability


@dataclass(frozen=True)
class SiteConfig:
    """One hospital: either a folder of WFDB records or a synthetic population."""

    name: str
    folder: str | None = None
    synthetic: SyntheticSiteConfig | None = None
    # this site's DP-SGD setting, replacing the scenario's `privacy` section for this site only
    # (null: the scenario's); see `Scenario.privacy_of`
    privacy: PrivacyConfig | None = None

    def __post_init__(self) -> None:
        if (self.folder is None) == (self.synthetic is None):
            raise ConfigError(f"site {self.name!r}: give exactly one of 'folder' or 'synthetic'")


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, server strategy and what travels between the sites and the server."""

    rounds: int = 3
    strategy: str = "fedavg"  # fedavg, fedavgm, fedadam, fedyogi, fedprox; robust: fedmedian, fedtrimmedavg, krum, multikrum
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


@dataclass(frozen=True)
class EvaluationConfig:
    """Held-out labelled data for the linear probe (never seen in pretraining)."""

    folder: str | None = None
    synthetic: SyntheticSiteConfig | None = field(
        default_factory=lambda: SyntheticSiteConfig(records=240, sample_rate=500)
    )
    test_fraction: float = 0.5
    probe_l2: float = 1e-3
    every_round: bool = True
    local_baselines: bool = True
    # each site also probes the global encoder on its own labelled windows (split by record, test_fraction)
    # after every round; the server logs the test-window-weighted mean AUROC (only scalars leave a site)
    federated: bool = False


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
            raise ConfigError(f"privacy.unit: expected 'record' or 'patient', got {self.unit!r}")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"privacy.accountant: expected 'rdp' or 'prv', got {self.accountant!r}")
        if self.grad_sample_mode not in ("bookkeeping", "hooks", "functorch", "ghost"):
            raise ConfigError(f"privacy.grad_sample_mode: expected bookkeeping, hooks, functorch or ghost, "
                              f"got {self.grad_sample_mode!r}")
        if not self.target_epsilon > 0:
            raise ConfigError(f"privacy.target_epsilon: must be > 0, got {self.target_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta: must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"privacy.max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"privacy.noise_multiplier: must be > 0, got {self.noise_multiplier}")


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


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario YAML file; relative site folders are resolved against the file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read scenario {path}: {err}") from None
    scenario = from_dict(Scenario, values)
    sites = tuple(
        dataclasses.replace(s, folder=str((path.parent / s.folder).resolve())) if s.folder else s
        for s in scenario.sites
    )
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must be unique, got {names}")
    return dataclasses.replace(scenario, sites=sites)


def save_scenario(scenario: Scenario, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(scenario), sort_keys=False))
