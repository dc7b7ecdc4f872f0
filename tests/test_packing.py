"""The shared weights packed into one flat array and a manifest (fedssl/packing.py), Flower-free:
round trips, the float16 transfer, what is refused, and the property central DP relies on (the
packed arrays' difference has the update's norm). The server's side (a bad packing is a rejected
update) is in tests/test_update_validation.py, the site's in tests/test_replies.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedssl.federated import shared_state
from fedssl.objectives import build_objective
from fedssl.packing import PackingError, pack, read_manifest, unpack
from tests.conftest import small_scenario


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"encoder.w": torch.randn(4, 3, generator=generator), "encoder.scale": torch.randn((), generator=generator),
            "encoder.empty": torch.zeros(0, 5), "encoder.b": torch.randn(7, generator=generator)}


def test_a_float32_round_trip_is_exact_in_names_order_shapes_and_values():
    original = state()
    flat, manifest = pack(original, "float32")
    assert flat.shape == (12 + 1 + 0 + 7,) and flat.dtype == np.float32
    assert read_manifest(manifest) == [("encoder.w", (4, 3), "float32"), ("encoder.scale", (), "float32"),
                                       ("encoder.empty", (0, 5), "float32"), ("encoder.b", (7,), "float32")]
    back = unpack(flat, manifest)
    assert list(back) == list(original)
    for key, value in original.items():
        assert back[key].dtype == torch.float32 and torch.equal(back[key], value)


def test_the_whole_shared_encoder_round_trips():
    original = shared_state(build_objective(small_scenario()), "encoder")
    back = unpack(*pack(original, "float32"))
    assert list(back) == list(original) and all(torch.equal(back[k], v) for k, v in original.items())


def test_float16_packing_rounds_as_a_float16_cast_does():
    original = state()
    flat, manifest = pack(original, "float16")
    assert flat.dtype == np.float16
    back = unpack(flat, manifest)
    for key, value in original.items():
        assert back[key].dtype == torch.float16 and torch.equal(back[key], value.half())


def test_unpacked_tensors_do_not_share_memory_with_the_received_array():
    flat, manifest = pack(state(), "float32")
    received = flat.copy()
    received.flags.writeable = False  # as Flower's Array.numpy() may hand it over
    back = unpack(received, manifest)
    back["encoder.w"].add_(1.0)  # a site trains on what it received
    assert np.array_equal(received, flat)


def test_the_packed_difference_has_the_updates_norm():
    """Central DP clipped at the server clips the flat packed arrays (Flower's wrapper): the norm
    of their difference must be the norm of the update over all its tensors."""
    before, after = state(0), state(1)
    (flat_before, _), (flat_after, _) = pack(before, "float32"), pack(after, "float32")
    per_tensor = torch.sqrt(sum(((after[k].double() - before[k].double()) ** 2).sum() for k in before))
    packed = np.linalg.norm(flat_after.astype(np.float64) - flat_before.astype(np.float64))
    assert packed == pytest.approx(float(per_tensor), rel=1e-12)


def test_integer_tensors_and_unpackable_dtypes_are_refused():
    with pytest.raises(PackingError, match="only floating-point tensors are packed; 'steps' is torch.int64"):
        pack({"w": torch.zeros(2), "steps": torch.tensor([3])}, "float32")
    with pytest.raises(PackingError, match=r"cannot pack into 'bfloat16'; packable dtypes: \['float16', 'float32', "
                                           r"'float64'\]"):
        pack(state(), "bfloat16")


def manifest_with(entries) -> str:
    return json.dumps(entries)


@pytest.mark.parametrize("manifest, message", [
    ("not json", "the manifest is not JSON"),
    ('{"w": [3]}', "the manifest must be a list of [name, shape, dtype], got dict"),
    (manifest_with([["w", [3], "int64"]]), "is not [name, shape, packable dtype]"),
    (manifest_with([["w", [-3], "float32"]]), "is not [name, shape, packable dtype]"),
    (manifest_with([["w", [1.5], "float32"]]), "is not [name, shape, packable dtype]"),
    (manifest_with([["w", [2], "float32"], ["w", [1], "float32"]]), "the manifest names 'w' twice"),
    (manifest_with([["w", [4], "float32"]]), "the manifest describes 4 values, the packed array holds 3"),
    (manifest_with([["w", [3], "float16"]]), "the packed array has dtype float32, its manifest says ['float16']"),
])
def test_a_manifest_that_does_not_fit_is_one_clear_error(manifest, message):
    with pytest.raises(PackingError) as caught:
        unpack(np.zeros(3, np.float32), manifest)
    assert message in str(caught.value)


def test_a_packed_array_that_is_not_flat_is_refused():
    with pytest.raises(PackingError, match=r"the packed array must be flat, got shape \(3, 1\)"):
        unpack(np.zeros((3, 1), np.float32), manifest_with([["w", [3], "float32"]]))
