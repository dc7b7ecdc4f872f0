"""Collapse monitor: is the encoder's embedding still using its dimensions?

Self-supervised objectives can collapse: every ECG mapped to (nearly) the same embedding
(complete collapse) or to a low-dimensional subspace (dimensional collapse), while the loss
still looks fine. Two numbers on a fixed set of windows tell it apart, without labels:

- `embedding_rank`: RankMe (Garrido et al., "RankMe: Assessing the Downstream Performance of
  Pretrained Self-Supervised Representations by Their Rank", ICML 2023), the exponential of the
  Shannon entropy of the normalised singular values of the (windows x dimensions) embedding
  matrix: a smooth effective rank between 1 (collapsed) and min(windows, dimensions).
- `embedding_std`: the mean over dimensions of the standard deviation of the L2-normalised
  embeddings (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021): 0 when
  collapsed, about 1 / sqrt(dimensions) when the embeddings spread over the sphere.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedssl.data.windows import WindowSet

MONITOR_WINDOWS = 256  # the fixed batch: the first windows of a fixed set


def rankme(embeddings: np.ndarray, eps: float = 1e-7) -> float:
    """exp(entropy of the singular values normalised to sum 1), (N, D) -> [1, min(N, D)]."""
    singular = np.linalg.svd(np.asarray(embeddings, np.float64), compute_uv=False)
    p = singular / max(singular.sum(), eps) + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def embedding_std(embeddings: np.ndarray) -> float:
    """Mean per-dimension std of the L2-normalised embeddings, (N, D) -> [0, 1 / sqrt(D)] typically."""
    e = np.asarray(embeddings, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return float(e.std(0).mean())


def embedding_health(encoder: nn.Module, data: WindowSet, windows: int = MONITOR_WINDOWS) -> dict[str, float]:
    """`embedding_rank` and `embedding_std` of `encoder` on the first `windows` windows of `data`."""
    from fedssl.evaluate import embed  # here: fedssl.evaluate imports the data stack

    if len(data) < 2:
        raise ValueError("the collapse monitor needs at least two windows")
    fixed = data.subset(np.arange(min(windows, len(data))))
    with torch.no_grad():
        e = embed(encoder, fixed)
    return {"embedding_rank": rankme(e), "embedding_std": embedding_std(e)}
