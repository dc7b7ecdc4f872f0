"""The shared weights as one flat array and its manifest: one transfer object per message.

Flower 1.41 moves every Array of a message as an object of its own (in a deployment, a request
each between SuperNode and SuperLink), so a model of 54-102 tensors took 8-10 s each way on a
loaded machine (docs/performance.md, round overhead). Packed, a message carries one Array, every
shared tensor flattened in order into one floating dtype (the transfer dtype), and a manifest,
a JSON list of `[name, shape, dtype]` that cuts the flat array back into the state.

Only floating-point tensors are packed, so nothing is rounded through a float and the difference of
two packed states is the concatenation of the per-tensor differences: its norm is the update's
norm, which central DP clipped at the server (Flower's wrapper works on the flat arrays) bounds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

PACKABLE_DTYPES = ("float16", "float32", "float64")  # floating dtypes numpy and torch share

State = dict[str, torch.Tensor]


class PackingError(ValueError):
    """A state that cannot be packed, or a flat array and manifest that do not make one state."""


def pack(state: State, dtype: str) -> tuple[np.ndarray, str]:
    """`state` as one flat array in `dtype` (a PACKABLE_DTYPES name) and its manifest (JSON)."""
    if dtype not in PACKABLE_DTYPES:
        raise PackingError(f"cannot pack into {dtype!r}; packable dtypes: {list(PACKABLE_DTYPES)}")
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise PackingError(f"only floating-point tensors are packed; {name!r} is {tensor.dtype}")
    target = getattr(torch, dtype)
    parts = [tensor.detach().reshape(-1).to(target) for tensor in state.values()]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=target)
    manifest = json.dumps([[name, list(tensor.shape), dtype] for name, tensor in state.items()])
    return flat.cpu().numpy(), manifest


def unpack(flat: np.ndarray, manifest: str) -> State:
    """The state that `pack` made `flat` and `manifest` from; each tensor in the flat array's dtype
    and a view of one copy of it. A PackingError says why they do not fit together."""
    entries = read_manifest(manifest)
    if flat.ndim != 1:
        raise PackingError(f"the packed array must be flat, got shape {flat.shape}")
    dtypes = {dtype for _, _, dtype in entries}
    if dtypes - {flat.dtype.name}:
        raise PackingError(f"the packed array has dtype {flat.dtype.name}, its manifest says {sorted(dtypes)}")
    sizes = [math.prod(shape) for _, shape, _ in entries]
    if sum(sizes) != flat.size:
        raise PackingError(f"the manifest describes {sum(sizes)} values, the packed array holds {flat.size}")
    values = torch.from_numpy(np.array(flat))  # a writable copy, shared by the views below
    return {name: part.view(shape) for (name, shape, _), part in zip(entries, torch.split(values, sizes), strict=True)}


def read_manifest(manifest: str) -> list[tuple[str, tuple[int, ...], str]]:
    """The manifest's entries (name, shape, dtype), checked: unique names, whole non-negative
    dimensions, packable dtypes."""
    try:
        entries = json.loads(manifest)
    except (TypeError, ValueError) as err:
        raise PackingError(f"the manifest is not JSON: {err}") from None
    if not isinstance(entries, list):
        raise PackingError(f"the manifest must be a list of [name, shape, dtype], got {type(entries).__name__}")
    checked, names = [], set()
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], list) and entry[2] in PACKABLE_DTYPES
                and all(type(d) is int and d >= 0 for d in entry[1])):
            raise PackingError(f"manifest entry {str(entry)[:80]} is not [name, shape, packable dtype]")
        if entry[0] in names:
            raise PackingError(f"the manifest names {entry[0]!r} twice")
        names.add(entry[0])
        checked.append((entry[0], tuple(entry[1]), entry[2]))
    return checked
