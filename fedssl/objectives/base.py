"""The one interface every self-supervised objective implements."""

from __future__ import annotations

import torch
from torch import nn


class Objective(nn.Module):
    """A self-supervised objective: the shared `encoder` plus site-local heads.

    `forward(x, lead_mask, groups)` takes a batch of windows (B, 12, T) with its lead mask (B, 12)
    and, when known, the int64 (B,) id of each window's patient (else its record), and returns the
    loss terms by name; "loss" is the one the training loop minimises. Every parameter or buffer
    outside `encoder` (decoders, projection heads, target networks) belongs to the site and never
    leaves it: `local_state_dict` is what a site keeps on disk between rounds.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called by the training loop after each optimizer step (e.g. BYOL's target update)."""

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.local_state_dict())
        if set(state) != expected:
            raise ValueError(
                f"site state does not fit this objective: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        self.load_state_dict(state, strict=False)
