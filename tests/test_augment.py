import numpy as np
import pytest
import torch

from fedssl.data.augment import (
    Augment,
    amplitude_scale,
    baseline_wander,
    gaussian_noise,
    lead_dropout,
    mains_interference,
    muscle_noise,
    random_crop,
    time_mask,
)

AUGMENTATIONS = [
    random_crop, time_mask, amplitude_scale, gaussian_noise,
    lambda x: baseline_wander(x, 500), lambda x: mains_interference(x, 500), lambda x: muscle_noise(x, 500),
    lambda x: lead_dropout(x, torch.ones(x.shape[:2], dtype=torch.bool))[0],
]


def dominant_hz(signal: torch.Tensor, sample_rate: float) -> float:
    spectrum = np.abs(np.fft.rfft(signal.numpy(), n=16384))
    return float(np.fft.rfftfreq(16384, 1 / sample_rate)[spectrum.argmax()])


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_each_augmentation_keeps_the_shape_and_is_seeded(augment):
    x = torch.randn(8, 12, 1000)
    torch.manual_seed(0)
    a = augment(x)
    torch.manual_seed(0)
    assert a.shape == x.shape and torch.equal(a, augment(x))
    assert not torch.equal(a, augment(x))  # a fresh draw differs


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


def test_views_apply_each_distortion_to_about_p_of_the_records():
    x, mask = torch.randn(2000, 12, 200), torch.ones(2000, 12, dtype=torch.bool)
    torch.manual_seed(0)
    _, kept = Augment(100, p=0.5)(x, mask)
    expected = 0.5 * (1 - 0.8**12)  # lead dropout chosen (p = 0.5), then at least one of 12 leads dropped
    assert abs((~kept).any(1).float().mean().item() - expected) < 0.04
    _, kept = Augment(100, p=0.0)(x, mask)
    assert kept.all()
    _, kept = Augment(100, p=1.0)(x, mask)
    assert (~kept).any(1).float().mean().item() > 0.9


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


def test_time_mask_zeroes_one_short_stretch_on_every_lead():
    torch.manual_seed(0)
    x = torch.ones(200, 12, 1000)
    zero = time_mask(x) == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # all leads alike
    counts = zero[:, 0].sum(1)
    assert counts.max() <= 100 and (counts == 0).any() and (counts > 50).any()
    for row in zero[:, 0]:  # one contiguous stretch
        where = torch.nonzero(row).flatten()
        assert len(where) == 0 or where[-1] - where[0] + 1 == len(where)


def test_amplitude_and_noise_ranges():
    torch.manual_seed(0)
    x = torch.ones(200, 12, 500)
    factors = amplitude_scale(x)[..., 0]
    assert factors.min() >= 0.8 and factors.max() <= 1.25
    stds = (gaussian_noise(torch.zeros(200, 12, 2000))).std(dim=(1, 2))
    assert stds.max() < 0.105 and stds.min() < 0.01


def test_baseline_wander_is_slow_and_small():
    torch.manual_seed(0)
    wander = baseline_wander(torch.zeros(20, 12, 5000), 100)
    assert wander.abs().max() <= 0.2
    assert all(dominant_hz(w, 100) <= 0.55 for w in wander[:, 0])


def test_mains_is_50_or_60_hz_and_skipped_above_nyquist():
    torch.manual_seed(0)
    hum = mains_interference(torch.zeros(20, 12, 1000), 500)
    assert hum.abs().max() <= 0.1
    assert {round(dominant_hz(h, 500)) for h in hum[:, 0]} == {50, 60}
    assert torch.equal(mains_interference(torch.zeros(4, 12, 200), 100), torch.zeros(4, 12, 200))


def test_muscle_noise_is_a_band_limited_burst():
    torch.manual_seed(0)
    noise = muscle_noise(torch.zeros(20, 12, 2000), 500)  # 4 s
    power = np.abs(np.fft.rfft(noise.numpy(), axis=-1)) ** 2
    freqs = np.fft.rfftfreq(2000, 1 / 500)
    assert power[..., (freqs >= 20) & (freqs <= 150)].sum() > 0.9 * power.sum()
    active = (noise.abs() > 0).any(1).sum(1)
    assert active.max() <= 500  # at most one second
    assert noise.std(-1).max() <= 0.2
    # below the band's Nyquist (sample rate 30 Hz: Nyquist 15 Hz < 20 Hz) there is nothing to add
    assert torch.equal(muscle_noise(torch.zeros(2, 12, 300), 30), torch.zeros(2, 12, 300))
