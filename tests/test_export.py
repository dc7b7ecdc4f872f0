"""`fedssl export` (safetensors + model card + config) and `fedssl embed`, on a hand-made run folder with a
tiny encoder: no federation needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedssl.cli import main
from fedssl.config import load_scenario
from fedssl.data.site import build_site, load_site
from fedssl.evaluate import embed
from fedssl.export import CARD, CONFIG, WEIGHTS, ExportError, embed_folder, export_run, load_encoder
from fedssl.objectives import build_objective
from tests.conftest import SHARED_DATA, two_site_scenario, write_records

WIDTH = build_objective(two_site_scenario("generative", records=4)).encoder.width  # the default encoder's


def test_export_round_trip_gives_the_same_encoder(run_dir, exported):
    saved = torch.load(run_dir / "encoder.pt", weights_only=True)
    loaded = load_encoder(exported)
    assert loaded.window_samples == 200 and loaded.data.sample_rate == 100
    for name, tensor in loaded.encoder.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    with safe_open(exported / WEIGHTS, framework="pt") as f:  # the weights file describes itself too
        assert json.loads(f.metadata()["fedssl_config"])["model"]["size"] == "tiny"
    config = json.loads((exported / CONFIG).read_text())
    assert config["parameters"] == sum(p.numel() for p in loaded.encoder.parameters())
    assert config["embedding_dim"] == loaded.encoder.width and len(config["leads"]) == 12


def test_model_card_says_what_the_encoder_is_and_was_trained_on(exported):
    card = (exported / CARD).read_text()
    parameters = json.loads((exported / CONFIG).read_text())["parameters"]
    assert f"| parameters | {parameters:,} " in card
    assert "| sample rate | 100 Hz" in card and "2 s = 200 samples" in card and "band-pass 0.5-40 Hz" in card
    assert "| objective | generative (mask_ratio 0.75" in card
    assert "| a | 8 | 2 |" in card and "| b | 6 | 2 |" in card  # windows per site, rounds aggregated
    assert "| a | none | - | - | - |" in card  # no DP: no guarantee claimed
    assert "| federated | 0.800 (round 2) |" in card
    assert "syn0" not in card  # no record ids


def test_wrong_folders_are_clear_errors(run_dir, exported, tmp_path):
    with pytest.raises(ExportError, match="not a fedssl encoder export.*no encoder_config.json or encoder.safetensors"):
        load_encoder(tmp_path)
    config = json.loads((exported / CONFIG).read_text())
    (exported / CONFIG).write_text(json.dumps(config | {"model": config["model"] | {"size": "small"}}))
    with pytest.raises(ExportError, match="does not fit the configured encoder: .*wrong shapes"):
        load_encoder(exported)
    (exported / CONFIG).write_text(json.dumps(config | {"format_version": 99}))
    with pytest.raises(ExportError, match="expected 'fedssl-encoder' version 1"):
        load_encoder(exported)
    (run_dir / "encoder.pt").unlink()
    with pytest.raises(ExportError, match="no global encoder"):
        export_run(run_dir, tmp_path / "again")


def test_embed_uses_exactly_the_training_preprocessing(exported, tmp_path):
    folder = write_records(tmp_path / "records")
    result = embed_folder(exported, folder, progress=False)
    training = build_site(folder, load_encoder(exported).data, tmp_path / "cache")  # what a site trains on
    expected = embed(load_encoder(exported).encoder, training)
    np.testing.assert_allclose(result.windows, expected, rtol=1e-5, atol=1e-6)
    assert result.record_ids == [training.records[i].record_id for i in training.record]
    assert result.window_index.tolist() == [0, 1] * 3
    assert [record for record, _ in result.skipped] == ["broken"]
    ids, means = result.per_record()
    np.testing.assert_allclose(means[1], result.windows[2:4].mean(0), rtol=1e-6)
    assert ids == list(dict.fromkeys(result.record_ids))


def test_cli_export_and_embed_end_to_end(run_dir, tmp_path, capsys):
    folder = write_records(tmp_path / "records")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "model")]) == 0
    assert main(["embed", str(tmp_path / "model"), str(folder), "--out", str(tmp_path / "e.npz")]) == 0
    captured = capsys.readouterr()
    assert f"embedded 6 windows of 3 records ({WIDTH} dimensions)" in captured.out
    assert "skipped 1 unusable records (unreadable header: 1)" in captured.out
    assert "embedding records" in captured.err and "4/4" in captured.err  # the progress bar
    with np.load(tmp_path / "e.npz") as saved:  # plain arrays: no pickle needed
        assert saved["embeddings"].shape == (6, WIDTH) and saved["record_embeddings"].shape == (3, WIDTH)
        assert saved["record_id"].tolist()[:2] == ["syn00001", "syn00001"]
        assert saved["skipped_records"].tolist() == ["broken"]
        assert saved["skipped_reasons"][0].startswith("unreadable header")
    assert main(["embed", str(run_dir), str(folder)]) == 2  # a run folder is not an export
    err = capsys.readouterr().err
    assert err.startswith("fedssl embed:") and "not a fedssl encoder export" in err and "Traceback" not in err


def test_embed_refuses_a_folder_without_usable_records(exported, tmp_path):
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="no WFDB record"):
        embed_folder(exported, tmp_path / "bad", progress=False)
    (tmp_path / "bad" / "x.hea").write_text("x 12 500 5000\n")
    with pytest.raises(ValueError, match="no usable ECG record .*unreadable header: 1"):
        embed_folder(exported, tmp_path / "bad", progress=False)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared PhysioNet samples not present")
def test_embed_real_records(exported):
    """PTB-XL at 100 Hz (12 leads) and the 30-min two-lead MIT-BIH record (windows capped at 12)."""
    for name, windows in (("ptb-xl", 5), ("mit-bih", 12)):
        result = embed_folder(exported, SHARED_DATA / name, progress=False)
        assert result.windows.shape == (windows, WIDTH) and np.isfinite(result.windows).all(), name
        assert not result.skipped


def test_export_of_a_finished_run(finished_run, tmp_path):
    """On a run folder the runner and the server wrote: the encoder as saved, and the model card's
    training windows per site are the windows each site has."""
    exported = export_run(finished_run, tmp_path / "export")
    saved = torch.load(finished_run / "encoder.pt", weights_only=True)
    loaded = load_encoder(exported).encoder.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    scenario = load_scenario(finished_run / "scenario.yaml")
    card = (exported / CARD).read_text()
    for site in scenario.sites:
        windows = load_site(site, scenario.data, finished_run / "data", scenario.seed)
        assert f"| {site.name} | {len(windows)} | 2 |" in card
