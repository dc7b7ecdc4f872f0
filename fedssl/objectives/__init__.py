"""Self-supervised objectives behind one interface (`Objective`), built from a scenario."""

from __future__ import annotations

import torch

from fedssl.config import ConfigError, Scenario
from fedssl.data.augment import Augment
from fedssl.models import build_encoder
from fedssl.objectives.base import Objective
from fedssl.objectives.contrastive import NTXentLoss, ProjectionHead, SimCLR
from fedssl.objectives.generative import MaskedModeling, MaskedReconstruction
from fedssl.objectives.hybrid import CREMA

__all__ = ["Objective", "CREMA", "MaskedModeling", "SimCLR", "build_objective"]

NAMES = ("generative", "contrastive", "hybrid")


def build_objective(scenario: Scenario) -> Objective:
    """The scenario's objective with freshly initialised weights, seeded by `scenario.seed`.

    A hybrid whose contrastive (generative) weight is zero is the pure generative (contrastive)
    objective, so that no compute is spent on a term that does not count.
    """
    cfg = scenario.objective
    name = cfg.name
    if name not in NAMES:
        raise ConfigError(f"objective.name: unknown objective {name!r}; known: {list(NAMES)}")
    if name == "hybrid" and cfg.contrastive_weight == 0:
        name = "generative"
    elif name == "hybrid" and cfg.generative_weight == 0:
        name = "contrastive"
    torch.manual_seed(scenario.seed)
    window = round(scenario.data.window_seconds * scenario.data.sample_rate)
    encoder = build_encoder(scenario.model, window)
    augment = Augment(scenario.data.sample_rate)
    if name == "contrastive":
        return SimCLR(encoder, augment, ProjectionHead(encoder.width, cfg.projection_dim), NTXentLoss(cfg.temperature))
    reconstruction = MaskedReconstruction(encoder, cfg.mask_ratio, cfg.decoder_width, cfg.decoder_depth)
    if name == "generative":
        return MaskedModeling(encoder, reconstruction)
    return CREMA(encoder, augment, reconstruction, ProjectionHead(encoder.width, cfg.projection_dim),
                 NTXentLoss(cfg.temperature), cfg.generative_weight, cfg.contrastive_weight)
