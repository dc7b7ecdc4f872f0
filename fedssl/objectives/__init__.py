"""Self-supervised objectives behind one interface (`Objective`), built from a scenario."""

from __future__ import annotations

import torch

from fedssl.config import ConfigError, Scenario
from fedssl.data.augment import Augment
from fedssl.models import TIME_TOKEN_ENCODERS, TOKEN_ENCODERS, build_encoder
from fedssl.objectives.base import Objective
from fedssl.objectives.byol import BYOL
from fedssl.objectives.cmsc import CMSC, MultiPositiveInfoNCE
from fedssl.objectives.contrastive import NTXentLoss, ProjectionHead, SimCLR
from fedssl.objectives.cpc import CPC
from fedssl.objectives.generative import MaskedModeling, MaskedReconstruction, TokenDecoder
from fedssl.objectives.hybrid import CREMA
from fedssl.objectives.hybrid_byol import MaskedBYOL
from fedssl.objectives.jepa import JEPA

__all__ = ["BYOL", "CMSC", "CPC", "CREMA", "JEPA", "MaskedBYOL", "MaskedModeling", "Objective", "SimCLR",
           "build_objective"]

NAMES = ("generative", "contrastive", "simclr", "cmsc", "byol", "hybrid", "hybrid_byol", "cpc", "jepa")
MASKED = ("generative", "hybrid", "hybrid_byol", "jepa")  # need an encoder with tokens


def build_objective(scenario: Scenario) -> Objective:
    """The scenario's objective with freshly initialised weights, seeded by `scenario.seed`.

    A hybrid whose contrastive (generative) weight is zero is the pure generative (contrastive)
    objective, so that no compute is spent on a term that does not count.
    """
    cfg, model = scenario.objective, scenario.model
    name = "contrastive" if cfg.name == "simclr" else cfg.name
    if name not in NAMES:
        raise ConfigError(f"objective.name: unknown objective {name!r}; known: {list(NAMES)}")
    if name in ("hybrid", "hybrid_byol") and cfg.contrastive_weight == 0:
        name = "generative"
    elif name == "hybrid" and cfg.generative_weight == 0:
        name = "contrastive"
    if name in MASKED and model.encoder not in TOKEN_ENCODERS:
        others = [n for n in NAMES if n not in MASKED]
        raise ConfigError(f"objective {name!r} masks tokens, which model.encoder "
                          f"{model.encoder!r} does not have: use it with {others}, or use "
                          f"{list(MASKED)} with model.encoder {list(TOKEN_ENCODERS)}")
    if name == "cpc" and (model.encoder not in TIME_TOKEN_ENCODERS or not model.causal):
        raise ConfigError(f"objective 'cpc' predicts future time tokens from a causal context: use model.encoder "
                          f"{list(TIME_TOKEN_ENCODERS)} with model.causal: true (got {model.encoder!r}, "
                          f"causal {model.causal})")
    window = round(scenario.data.window_seconds * scenario.data.sample_rate)
    if name == "cmsc" and model.encoder == "st_mem" and (window // 2) % model.patch_size:
        raise ConfigError(f"objective 'cmsc' encodes half windows of {window // 2} samples, which is "
                          f"not a multiple of model.patch_size {model.patch_size}")
    torch.manual_seed(scenario.seed)
    encoder = build_encoder(model, window)
    if not 0.0 <= cfg.view_probability <= 1.0:
        raise ConfigError(f"objective.view_probability must be in [0, 1], got {cfg.view_probability}")
    augment = Augment(scenario.data.sample_rate, p=cfg.view_probability)

    def projection() -> ProjectionHead:
        return ProjectionHead(encoder.width, cfg.projection_dim)

    if name == "contrastive":
        return SimCLR(encoder, augment, projection(), NTXentLoss(cfg.temperature))
    if name == "cmsc":
        return CMSC(encoder, projection(), MultiPositiveInfoNCE(cfg.temperature))
    if name == "cpc":
        return CPC(encoder, cfg.prediction_steps, cfg.temperature, cfg.prediction_stride)
    if name == "jepa":
        predictor = TokenDecoder(encoder, cfg.decoder_width, cfg.decoder_depth, encoder.width)
        return JEPA(encoder, predictor, cfg.mask_ratio, cfg.target_momentum)
    if name == "byol":
        prediction = ProjectionHead(cfg.projection_dim, cfg.projection_dim, hidden=encoder.width)
        return BYOL(encoder, augment, projection(), prediction, cfg.target_momentum)
    reconstruction = MaskedReconstruction(encoder, cfg.mask_ratio, cfg.decoder_width, cfg.decoder_depth)
    if name == "generative":
        return MaskedModeling(encoder, reconstruction)
    if name == "hybrid_byol":  # per-sample (DP-safe): contrastive_weight weighs BYOL's agreement
        prediction = ProjectionHead(cfg.projection_dim, cfg.projection_dim, hidden=encoder.width)
        return MaskedBYOL(encoder, augment, reconstruction, projection(), prediction, cfg.target_momentum,
                          cfg.generative_weight, cfg.contrastive_weight)
    return CREMA(encoder, augment, reconstruction, projection(), NTXentLoss(cfg.temperature),
                 cfg.generative_weight, cfg.contrastive_weight)
