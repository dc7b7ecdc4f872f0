"""The collapse monitor: effective rank (RankMe) and spread of the embeddings, per round."""

import dataclasses

import numpy as np
import torch

from fedssl.config import FederationConfig, ModelConfig, save_scenario
from fedssl.models import build_encoder
from fedssl.monitor import embedding_health, embedding_std, rankme
from fedssl.report import collapse_warning, write_report
from fedssl.runfolder import RunFolder
from server.strategy import make_strategy
from tests.conftest import play_round, random_windows, training_reply, two_site_scenario


def test_rankme_counts_the_directions_used():
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((256, 32))
    assert 25 < rankme(spread) <= 32  # isotropic: nearly full rank
    line = rng.standard_normal((256, 1)) * rng.standard_normal((1, 32))
    assert rankme(line) < 1.1  # complete collapse onto one direction
    plane = rng.standard_normal((256, 2)) @ rng.standard_normal((2, 32))
    assert 1.5 < rankme(plane) < 2.1
    assert embedding_std(np.ones((10, 8))) < 1e-12
    assert abs(embedding_std(spread) - 1 / np.sqrt(32)) < 0.02


def test_embedding_health_of_an_encoder_on_fixed_windows():
    encoder = build_encoder(ModelConfig(encoder="conv_transformer"), 200)
    health = embedding_health(encoder, random_windows(40))
    assert set(health) == {"embedding_rank", "embedding_std"}
    assert 1 < health["embedding_rank"] <= 40 and health["embedding_std"] > 0
    with torch.no_grad():  # a collapsed encoder: every window gets the same embedding
        for p in encoder.parameters():
            p.zero_()
    collapsed = embedding_health(encoder, random_windows(40))
    assert collapsed["embedding_rank"] < 1.5 and collapsed["embedding_std"] < 1e-6


def test_the_server_logs_the_monitor_and_the_report_warns_when_rank_halves(tmp_path, flower_messages):
    scenario = two_site_scenario("hybrid", records=4)
    save_scenario(scenario, tmp_path / "scenario.yaml")
    weights = {"encoder.w": torch.ones(3)}
    ranks = {1: 20.0, 2: 12.0, 3: 8.0}  # what the server's collapse monitor measures after each round

    def monitor(record, encoder):
        return dataclasses.replace(record, embedding_rank=ranks[record.round], embedding_std=0.1)

    run = RunFolder(tmp_path)
    strategy = make_strategy(FederationConfig(rounds=3, min_sites=1), ("a", "b"), weights, run, monitor)
    for server_round in ranks:
        play_round(strategy, weights, [training_reply(weights, num_examples=10, site_index=0, loss=1.0, dp_sgd=0,
                                                      epsilon=0.0, delta=0.0)], server_round, nodes=[11])
    rounds = run.rounds()
    assert [r.embedding_rank for r in rounds] == [20.0, 12.0, 8.0]
    assert all(r.embedding_std == 0.1 for r in rounds)
    assert collapse_warning(rounds[:2]) is None  # 12 of 20: not yet below half
    text = write_report(tmp_path).read_text()
    assert "](report_collapse.png)" in text and (tmp_path / "report_collapse.png").exists()
    assert "embedding is collapsing" in text and "from 20.0 (round 1) to 8.0 (round 3)" in text
