"""The one interface every self-supervised objective implements."""

from __future__ import annotations

import torch
from torch import nn


class Objective(nn.Module):
    """A self-supervised objective: the shared `encoder` plus site-local heads.

    `forward(x, lead_mask)` takes a batch of windows (B, 12, T) with its lead mask (B, 12) and
    returns the loss terms by name; "loss" is the one the training loop minimises. Every
    parameter outside `encoder` (decoders, projection heads) belongs to the site and never
    leaves it: `local_state_dict` is what a site keeps on disk between rounds.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

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
