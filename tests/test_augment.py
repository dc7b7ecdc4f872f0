import numpy as np
import torch

from fedssl.data.augment import Augment, lead_dropout, random_crop


def test_views_keep_shape_mask_meaning_and_are_seeded():
    x = torch.randn(16, 12, 1000)
    mask = torch.ones(16, 12, dtype=torch.bool)
    mask[:, 3] = False
    torch.manual_seed(0)
    a, mask_a = Augment(100)(x, mask)
    torch.manual_seed(0)
    b, mask_b = Augment(100)(x, mask)
    assert a.shape == x.shape and torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not (mask_a & ~mask).any()  # no lead is invented
    assert (a[~mask_a] == 0).all()  # masked leads carry no signal


def test_lead_dropout_always_keeps_a_lead():
    torch.manual_seed(0)
    mask = torch.zeros(500, 12, dtype=torch.bool)
    mask[:, 0] = True  # single-lead records
    _, kept = lead_dropout(torch.randn(500, 12, 10), mask, p=0.9)
    assert kept.sum(1).min() == 1


def test_crop_does_not_change_heart_rate():
    t = torch.arange(1000) / 100.0
    x = torch.sin(2 * torch.pi * 1.5 * t).repeat(4, 12, 1)  # 90 beats per minute
    torch.manual_seed(1)
    cropped = random_crop(x)[0, 0].numpy()
    kept = cropped[: np.flatnonzero(cropped)[-1] + 1]
    spectrum = np.abs(np.fft.rfft(kept, n=8192))
    assert abs(np.fft.rfftfreq(8192, 0.01)[spectrum.argmax()] - 1.5) < 0.05
