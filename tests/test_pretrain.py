"""Centralized pretraining and the evaluation protocol (probe, fine-tuning, label efficiency)."""

import json

import numpy as np
import torch

from fedssl.baselines import centralized_state, local_only_state
from fedssl.cli import main
from fedssl.config import (
    ModelConfig,
    save_scenario,
)
from fedssl.evaluate import fine_tune, label_efficiency, label_subset
from tests.conftest import labelled, two_site_scenario


def tiny_scenario():
    return two_site_scenario("contrastive", records=8, model=ModelConfig(encoder="resnet1d"))


def test_pretraining_sees_as_many_samples_as_the_federation(tmp_path):
    scenario = tiny_scenario()
    _, pooled = centralized_state(scenario, tmp_path)
    federation = sum(local_only_state(scenario, i, tmp_path)[1].examples for i in range(len(scenario.sites)))
    assert pooled.steps == len(scenario.sites) * scenario.federation.rounds * scenario.train.local_steps
    assert pooled.examples == federation == pooled.steps * scenario.train.batch_size


def test_label_subset_draws_records_and_keeps_a_positive_of_every_class():
    data = labelled(200, 0)
    small = label_subset(data, ("A", "B"), 0.01, seed=0)
    assert len(np.unique(small.record)) == 2  # 1 % of 200 is 2, one positive of each class
    assert small.targets(("A", "B")).sum(0).min() >= 1
    assert len(np.unique(label_subset(data, ("A", "B"), 0.1, seed=0).record)) == 20
    assert label_subset(data, ("A", "B"), 1.0, seed=0) is data


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(12, 4)

    def forward(self, x, mask):
        return self.layer(x.mean(-1))


def test_fine_tuning_trains_the_encoder_and_leaves_the_callers_alone():
    torch.manual_seed(0)
    encoder = Linear()
    before = encoder.layer.weight.clone()
    result, tuned = fine_tune(encoder, labelled(120, 0), labelled(80, 1), epochs=3, learning_rate=1e-2)
    assert torch.equal(encoder.layer.weight, before)
    assert not torch.equal(tuned.layer.weight, before)
    assert set(result.per_class) == {"A", "B"} and result.macro_auroc > 0.9


def weakly_labelled(n, seed):
    data = labelled(n, seed)
    is_a = data.targets(("A",))[:, 0]
    data.windows[:, 0] -= is_a[:, None] * 1.8  # a small shift: AUROC varies with the labelled records
    return data


def test_label_efficiency_reports_per_class_fractions_and_seed_spread():
    torch.manual_seed(0)
    results = label_efficiency(Linear(), weakly_labelled(150, 0), weakly_labelled(80, 1), fractions=(0.05, 1.0), seeds=3,
                               finetune=True, finetune_kwargs={"epochs": 1})
    assert set(results) == {"linear_probe", "fine_tune"}
    for by_fraction in results.values():
        assert set(by_fraction) == {"0.05", "1.0"}
        low = by_fraction["0.05"]
        assert len(low["macro_auroc"]["runs"]) == 3 and low["macro_auroc"]["std"] > 0  # seeds draw other records
        assert low["macro_auroc"]["ci95"][0] <= low["macro_auroc"]["mean"] <= low["macro_auroc"]["ci95"][1]
        assert set(low["per_class"]) == {"A", "B"} and all(v["runs"] == 3 for v in low["per_class"].values())
        assert low["labelled_records"] == [8, 8, 8]


def test_pretrain_then_evaluate_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    save_scenario(tiny_scenario(), path)
    assert main(["pretrain", str(path), "--out", str(tmp_path / "run")]) == 0
    pretrain = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    assert pretrain["steps"] == 8 and pretrain["samples_seen"] == 32
    assert main(["evaluate", str(path), "--encoder", str(tmp_path / "run" / "encoder.pt"), "--seeds", "2",
                 "--label-fractions", "0.5,1.0", "--finetune", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "linear_probe" in out and "fine_tune" in out and "±" in out
    report = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert set(report["fine_tune"]) == {"0.5", "1.0"} and report["linear_probe"]["1.0"]["per_class"]
