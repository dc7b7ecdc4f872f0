"""The learning-rate schedule: warm-up then cosine over the whole training, carried across rounds."""

import dataclasses

import pytest
import torch

from fedssl.config import ConfigError, TrainConfig
from fedssl.objectives import build_objective
from fedssl.train import learning_rate_at, train_local
from tests.conftest import random_windows, small_scenario


def test_warm_up_then_cosine_to_zero():
    cfg = TrainConfig(learning_rate=1e-3, warmup_fraction=0.1)
    rates = [learning_rate_at(step, 100, cfg) for step in range(100)]
    assert rates[:10] == pytest.approx([1e-4 * (i + 1) for i in range(10)])  # linear warm-up to the peak
    assert rates[10] == pytest.approx(1e-3)
    assert rates[55] == pytest.approx(5e-4, rel=0.02)  # half-way through the decay
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[-1] < 1e-5
    constant = dataclasses.replace(cfg, lr_schedule="constant")
    assert {learning_rate_at(step, 100, constant) for step in range(100)} == {1e-3}
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        learning_rate_at(0, 100, dataclasses.replace(cfg, lr_schedule="step"))


ADAMW_STEP = torch.optim.AdamW.step


def rates_used(monkeypatch, runs) -> list[float]:
    """The learning rate of every optimizer step taken by `runs()`."""
    seen, step = [], ADAMW_STEP

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    runs()
    return seen


def test_rounds_continue_the_schedule_of_the_whole_federation(monkeypatch):
    """Round r's steps are global steps (r - 1) * local_steps ...: three rounds of four steps see the
    rates of one twelve-step run, and a resumed round 3 (a new process, same round number) too."""
    data, cfg = random_windows(8), TrainConfig(batch_size=4, learning_rate=1e-3, warmup_fraction=0.25)

    def one_run():
        train_local(build_objective(small_scenario("generative")), data, cfg, steps=12, seed=0)

    def three_rounds():
        objective = build_objective(small_scenario("generative"))
        for server_round in (1, 2, 3):
            train_local(objective, data, cfg, steps=4, seed=server_round, planned_steps=12,
                        first_step=(server_round - 1) * 4)

    def resumed_round_3():
        train_local(build_objective(small_scenario("generative")), data, cfg, steps=4, seed=3, planned_steps=12,
                    first_step=8)

    whole = rates_used(monkeypatch, one_run)
    assert whole == pytest.approx([learning_rate_at(s, 12, cfg) for s in range(12)])
    assert rates_used(monkeypatch, three_rounds) == pytest.approx(whole)
    assert rates_used(monkeypatch, resumed_round_3) == pytest.approx(whole[8:])
    assert max(whole) == pytest.approx(1e-3) and whole[0] < whole[2] and whole[-1] < 0.1 * max(whole)
