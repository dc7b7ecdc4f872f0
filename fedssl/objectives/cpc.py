"""Contrastive predictive coding with negatives from the same recording (per-sample, DP-safe).

Oord et al., "Representation Learning with Contrastive Predictive Coding", arXiv 1807.03748
(2018): a local encoder maps the signal to a sequence z_t, an autoregressive context network
summarises z_1..z_t into c_t, and a linear map W_k per step k must pick z_{t+k} out of a set of
candidates with InfoNCE. For 12-lead ECGs Mehari & Strodthoff ("Self-supervised representation
learning from 12-lead ECG data", Computers in Biology and Medicine 2022) found CPC among the best
objectives. Here z_t are the `ConvTransformer`'s stem tokens (0.2 s of all leads, no position)
and c_t the rest of it (token convolutions and transformer) run causally (`model.causal: true`),
so the shared encoder is both.

The candidates for z_{t+k} are the other time steps of the *same* window (Oord et al.'s
"negatives from the same sequence"), never other records: every loss term is a function of one
window, so DP-SGD's per-sample clipping bounds each record's influence and CPC runs under DP,
unlike SimCLR, CMSC and CREMA whose negatives are the other records of the batch. Scores are
cosine similarities over a temperature (as in wav2vec 2.0, Baevski et al. 2020), which keeps the
logits bounded without batch statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.objectives.base import Objective


class CPC(Objective):
    couples_batch = False  # negatives come from the window itself

    def __init__(self, encoder: nn.Module, steps_ahead: int, temperature: float, stride: int = 1) -> None:
        super().__init__(encoder)
        self.temperature = temperature
        self.register_buffer("ahead", torch.arange(stride, steps_ahead + 1, stride), persistent=False)  # the k
        self.predict = nn.Linear(encoder.width, len(self.ahead) * encoder.width)  # every W_k in one map

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {k: v.mean() for k, v in self.per_sample_terms(x, lead_mask).items()}

    def per_sample_terms(self, x: torch.Tensor, lead_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """InfoNCE of every (t, k) with t + k inside the window, averaged per window: (B,)."""
        b, n = x.shape[0], self.encoder.steps(x.shape[-1])
        ahead = self.ahead[self.ahead < n]
        if not len(ahead):
            raise ValueError(f"CPC predicts {int(self.ahead[0])} or more steps ahead: the window has {n} time tokens")
        z = self.encoder.stem_tokens(x, lead_mask)
        tokens = self.encoder.local_features(z) + self.encoder.positions(b, n)  # causal convolutions
        context = self.encoder.mix(tokens, self.encoder.token_valid(lead_mask, n), causal=True)
        prediction = self.predict(context).view(b, n, len(self.ahead), -1)[:, :, :len(ahead)]
        logits = torch.einsum("btkd,bsd->btks", F.normalize(prediction, dim=-1), F.normalize(z, dim=-1))
        logits = logits / self.temperature  # (B, t, k, s): prediction at t for step k against every z_s
        target = torch.arange(n, device=x.device)[:, None] + ahead  # (n, k): the index of the true z_{t+k}
        inside = target < n
        nll = -logits.log_softmax(-1).gather(-1, target.clamp_max(n - 1).expand(b, -1, -1)[..., None])[..., 0]
        loss = (nll * inside).sum((1, 2)) / inside.sum()
        return {"loss": loss, "cpc": loss}
