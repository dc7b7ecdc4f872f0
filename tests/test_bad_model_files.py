"""Bad weight files: `fedssl export`, `embed` and `evaluate` refuse non-finite weights, pickles that
would run code and files that are not state dicts, with one line and exit code 2, and write nothing."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedssl.cli import main
from fedssl.config import save_scenario
from fedssl.export import WEIGHTS
from tests.conftest import two_site_scenario, write_records


class RunsCode:
    """A pickle that would call os.system when loaded without weights_only."""

    def __reduce__(self):
        import os
        return os.system, ("touch /tmp/fedssl-pwned",)


def nan_state(path):
    state = torch.load(path, weights_only=True)
    state[next(iter(state))] = torch.full_like(next(iter(state.values())), float("nan"))
    torch.save(state, path)


def malicious_pickle(path):
    path.write_bytes(pickle.dumps({"patch_embed.weight": RunsCode()}))


def bare_tensor(path):
    torch.save(torch.zeros(3), path)


def not_a_torch_file(path):
    path.write_text("hello")


# case -> (damage to RUN/encoder.pt, fragment of the message)
BAD_ENCODER_PT = {
    "NaN weights": (nan_state, "non-finite weights (NaN or inf) in 1 tensor(s)"),
    "malicious pickle": (malicious_pickle, "holds Python objects besides tensors, which loading would execute"),
    "bare tensor": (bare_tensor, "holds a Tensor, not a state dict"),
    "not a torch file": (not_a_torch_file, "is not a readable torch file"),
}


@pytest.mark.parametrize("case", BAD_ENCODER_PT)
def test_export_refuses_a_bad_encoder_pt(case, run_dir, tmp_path, capsys):  # noqa: F811
    damage, fragment = BAD_ENCODER_PT[case]
    damage(run_dir / "encoder.pt")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl export: ") and err.count("\n") == 1 and fragment in err, err
    assert "weights_only=False" not in err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("case", BAD_ENCODER_PT)
def test_evaluate_refuses_a_bad_encoder_pt(case, run_dir, tmp_path, capsys):  # noqa: F811
    damage, fragment = BAD_ENCODER_PT[case]
    damage(run_dir / "encoder.pt")
    save_scenario(two_site_scenario("generative", records=4), tmp_path / "s.yaml")
    assert main(["evaluate", str(tmp_path / "s.yaml"), "--encoder", str(run_dir / "encoder.pt"),
                 "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "weights_only=False" not in err, err
    assert not (tmp_path / "eval").exists()


def test_embed_refuses_overwritten_safetensors_bytes(exported, tmp_path, capsys):  # noqa: F811
    state = load_file(exported / WEIGHTS)
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))  # as if the tensor bytes were overwritten
    save_file(state, exported / WEIGHTS, metadata={"format": "pt"})
    folder = write_records(tmp_path / "records")
    assert main(["embed", str(exported), str(folder), "--out", str(tmp_path / "e.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "non-finite weights" in err and name in err, err
    assert not (tmp_path / "e.npz").exists()


def test_embed_refuses_non_finite_embeddings(exported, tmp_path, capsys):  # noqa: F811
    """Finite weights that overflow: the embedding, not the file, is non-finite."""
    state = load_file(exported / WEIGHTS)
    first_layer = next(name for name, tensor in state.items() if tensor.ndim >= 2)  # the encoder's input map
    state[first_layer] = torch.full_like(state[first_layer], 3e38)
    save_file(state, exported / WEIGHTS, metadata={"format": "pt"})
    folder = write_records(tmp_path / "records")
    assert main(["embed", str(exported), str(folder), "--out", str(tmp_path / "e.npz"), "--quiet"]) == 2
    assert "embedding is not finite" in capsys.readouterr().err
    assert not (tmp_path / "e.npz").exists()
