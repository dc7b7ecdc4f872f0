"""The run report: built from a hand-made run folder (no federation), so every case is exact and fast."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from fedssl.cli import main
from fedssl.config import FederationConfig, PrivacyConfig, SiteConfig, load_scenario, save_scenario
from fedssl.report import (ABSENT, DECLINED, FAILED, REJECTED, TRAINED, load_run, loss_terms, participation,
                           participation_table, write_report)
from fedssl.runfolder import RoundRecord, RunFolder, RunFolderError
from server.strategy import make_strategy
from tests.conftest import play_round, training_reply, two_site_scenario


def dp_scenario():
    """Three sites: a (DP-SGD, target 4 per patient), b and c (no DP)."""
    base = two_site_scenario("hybrid", records=4)
    a, b = base.sites
    return dataclasses.replace(base, name="hand-made", sites=(
        dataclasses.replace(a, privacy=PrivacyConfig(enabled=True, target_epsilon=4.0, unit="patient")),
        b, SiteConfig("c", synthetic=b.synthetic)))


def round_line(r: int, **extra) -> dict:
    line = {"round": r, "examples-seen": 8.0, "loss": 2.0 / r, "generative": 1.5 / r, "contrastive": 1.0 / r,
            "probe_macro_auroc": 0.6 + 0.05 * r, "seconds": 3.0 + r, "probe_seconds": 0.5, "sites": 3,
            "site_windows": {"a": 10, "b": 12, "c": 8}, "examples": 30, "rejected": [], "epsilon": {"a": 1.0 * r},
            "delta": {"a": 1e-5}, "declined": [], "errors": []}
    return line | extra


@pytest.fixture
def run_dir(tmp_path):
    save_scenario(dp_scenario(), tmp_path / "scenario.yaml")
    rounds = [
        round_line(1),
        round_line(2, sites=2, site_windows={"a": 10, "b": 12}, examples=22,
                   rejected=[{"round": 2, "node_id": 7, "site": "c", "reason": "norm 9.1 > 5 x median"}]),
        round_line(3, sites=2, site_windows={"b": 12, "c": 8}, examples=20, epsilon={}, probe_macro_auroc_ci95=[0.7, 0.79],
                   declined=[{"node_id": 5, "site": "a", "code": 1001, "reason": "privacy budget exhausted"}]),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    encoders = {"random_init": {"macro_auroc": 0.61, "ci95": [0.55, 0.67], "runs": [0.6, 0.62, 0.61],
                                "federated_minus": {"mean": 0.14, "ci95": [0.05, 0.22]}},
                "federated": {"macro_auroc": 0.75, "ci95": [0.7, 0.8], "runs": [0.75]},
                "local_only/a": {"macro_auroc": 0.66}}
    evaluation = {"splits": 1, "test_fraction": 0.5, "random_inits": 3, "bootstrap_replicates": 1000}
    (tmp_path / "summary.json").write_text(json.dumps({"encoders": encoders, "evaluation": evaluation}))
    return tmp_path


def test_report_has_every_section_and_readable_plots(run_dir):
    path = write_report(run_dir)
    text = path.read_text()
    for plot in ("report_losses.png", "report_auroc.png", "report_epsilon.png", "report_seconds.png"):
        assert f"]({plot})" in text
        image = imread(run_dir / plot)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert np.ptp(image[..., :3]) > 0.5  # something is drawn, not a blank canvas
    assert "| final probe macro AUROC | 0.750 [0.700, 0.790] |" in text
    assert "| rounds | 3 of 2 planned;" in text  # the scenario's rounds, not the metrics', are the plan
    assert "| a | 2.000 | 1e-05 | patient | 4 |" in text  # epsilon spent by the last round a trained
    assert "DP-SGD at a (target epsilon 4 per patient); no DP at b, c" in text
    assert "| local_only/a | 0.660 | - | - |" in text
    assert "| random_init | 0.610 | [0.550, 0.670] | 3 | +0.140 [0.050, 0.220] |" in text
    assert "over 3 initialisations" in text
    assert "| 2 | c | rejected | norm 9.1 > 5 x median |" in text
    assert write_report(run_dir).read_text() == text  # regenerating gives the same report


def test_participation_says_who_trained_declined_or_was_rejected(run_dir):
    run = load_run(run_dir)
    assert participation(run) == [
        {"a": TRAINED, "b": TRAINED, "c": TRAINED},
        {"a": TRAINED, "b": TRAINED, "c": REJECTED},
        {"a": DECLINED, "b": TRAINED, "c": TRAINED},
    ]
    assert "| 3 | declined | trained | trained | 20 |" in participation_table(run)


def test_error_and_silent_sites(run_dir):
    run = load_run(run_dir)
    run.rounds[0] = dataclasses.replace(run.rounds[0], site_windows={"b": 12},
                                        errors=[{"node_id": 3, "site": "a", "code": 0, "reason": "boom"}])
    assert participation(run)[0] == {"a": FAILED, "b": TRAINED, "c": ABSENT}


def test_the_server_records_who_trained_with_how_many_windows(tmp_path, flower_messages):
    scenario = dp_scenario()
    save_scenario(scenario, tmp_path / "scenario.yaml")
    weights = {"encoder.w": torch.ones(3)}
    strategy = make_strategy(FederationConfig(rounds=2, min_sites=1), [s.name for s in scenario.sites], weights,
                             RunFolder(tmp_path))

    def replies(*sites: int) -> list:
        return [training_reply(weights, num_examples=10 + i, site_index=i, loss=1.0, dp_sgd=0, epsilon=0.0, delta=0.0)
                for i in sites]

    for server_round, sites in ((1, (0, 1, 2)), (2, (2,))):
        play_round(strategy, weights, replies(*sites), server_round, nodes=[11 + i for i in sites])
    run = load_run(tmp_path)
    assert run.rounds[0].site_windows == {"a": 10, "b": 11, "c": 12}
    assert participation(run) == [dict.fromkeys("abc", TRAINED), {"a": ABSENT, "b": ABSENT, "c": TRAINED}]


def test_loss_terms_leave_out_bookkeeping_and_put_loss_first(run_dir):
    assert loss_terms(load_run(run_dir).rounds) == ["loss", "contrastive", "generative"]


def test_without_dp_the_report_says_so_and_draws_no_epsilon(run_dir):
    scenario = dataclasses.replace(dp_scenario(), sites=tuple(dataclasses.replace(s, privacy=None)
                                                              for s in dp_scenario().sites))
    save_scenario(scenario, run_dir / "scenario.yaml")
    rounds = [round_line(r, epsilon={}, delta={}) for r in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run_dir / "summary.json").unlink()
    text = write_report(run_dir).read_text()
    assert "No DP: no site trained with DP-SGD" in text
    assert "report_epsilon.png" not in text and "Comparison with baselines" not in text


def test_a_central_dp_report_plots_only_losses_and_states_the_accounted_epsilon(tmp_path):
    scenario = dataclasses.replace(dp_scenario(), federation=FederationConfig(
        rounds=2, strategy="fedavg", central_dp="server", central_noise_multiplier=1.5, central_clipping_norm=0.5, central_delta=1e-4))
    save_scenario(scenario, tmp_path / "scenario.yaml")
    run = RunFolder(tmp_path)
    # round 1 as an older fedssl wrote it (one flat line), round 2 as RoundRecord writes it now
    run.metrics.write_text(json.dumps(round_line(1, central_epsilon=1.25, central_delta=1e-4)) + "\n")
    run.append_round(RoundRecord(2, losses={"loss": 0.9, "generative": 0.6, "contrastive": 0.3},
                                 training={"examples-seen": 8.0}, sites=3, site_windows={"a": 10, "b": 12, "c": 8},
                                 central_epsilon=1.87, central_delta=1e-4))
    rounds = load_run(tmp_path).rounds
    assert [r.losses for r in rounds] == [{"loss": 2.0, "generative": 1.5, "contrastive": 1.0},
                                          {"loss": 0.9, "generative": 0.6, "contrastive": 0.3}]
    assert [r.central_epsilon for r in rounds] == [1.25, 1.87] and rounds[0].training == {"examples-seen": 8.0}
    assert loss_terms(rounds) == ["loss", "contrastive", "generative"]  # what the loss plot draws: no epsilon
    text = write_report(tmp_path).read_text()
    assert ("central DP (server-side clipping at 0.5, noise multiplier 1.5; site-level (1.87, 0.0001)-DP after "
            "round 2)") in text
    assert "no epsilon accounted" not in text


def test_rounds_written_are_read_back_exactly(tmp_path):
    record = RoundRecord(3, losses={"loss": 0.5}, training={"fedema-mu": 0.3}, sites=1, examples=7,
                         site_windows={"a": 7}, declined=[{"node_id": 5, "site": "b", "code": 1001, "reason": "r"}],
                         epsilon={"a": 1.5}, delta={"a": 1e-5}, probe_macro_auroc=0.7,
                         probe_macro_auroc_ci95=[0.6, 0.8], embedding_rank=12.0, compute_seconds={"a": 1.5})
    run = RunFolder(tmp_path)
    earlier = [RoundRecord(r, losses={"loss": 1.0 / r}) for r in (1, 2)]
    for r in [*earlier, record]:
        run.append_round(r)
    run.metrics.write_text(run.metrics.read_text() + '{"round": 4, "loss"')  # a line still being written
    assert run.rounds() == [*earlier, record]
    run.start_rounds(resume_after=2)  # a run resumed after round 2 runs round 3 again
    assert run.rounds() == earlier
    run.start_rounds()  # a new run
    assert run.rounds() == [] and not run.metrics.exists()


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RunFolderError, match="no scenario.yaml"):
        load_run(tmp_path)
    save_scenario(dp_scenario(), tmp_path / "scenario.yaml")
    with pytest.raises(RunFolderError, match="no round recorded"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(RunFolderError, match="run folder"):
        load_run(tmp_path)


def test_run_config_is_saved_unless_read_from_the_run_folder(tmp_path):
    scenario = dp_scenario()
    source = tmp_path / "elsewhere.yaml"
    save_scenario(scenario, source)
    run = RunFolder(tmp_path / "run")
    run.keep_scenario(scenario, source)  # a deployed run: the YAML lives elsewhere
    assert load_scenario(tmp_path / "run" / "scenario.yaml") == load_scenario(source)
    in_run = tmp_path / "run" / "scenario.yaml"
    in_run.write_text("# as the runner wrote it\n" + in_run.read_text())
    run.keep_scenario(scenario, in_run)  # simulated: the runner's own copy is kept as is
    assert in_run.read_text().startswith("# as the runner wrote it")


def test_cli_report(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert str(run_dir / "report.md") in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl report:") and "no scenario.yaml" in err and "Traceback" not in err


def test_summary_table_prints_intervals_and_the_federated_differences():
    from simulations.run import summary_table

    summary = {"encoders": {"random_init": {"macro_auroc": 0.7, "ci95": [0.6, 0.8],
                                            "federated_minus": {"mean": 0.05, "ci95": [-0.01, 0.1]}},
                            "federated": {"macro_auroc": 0.75, "ci95": [0.7, 0.8]}},
               "rounds": 2, "sites": ["a", "b"], "wall_seconds": 3.0, "run_dir": "/run"}
    lines = summary_table(summary).splitlines()
    assert lines[2].split() == ["random_init", "0.700", "[0.600,", "0.800]", "+0.050", "[-0.010,", "+0.100]"]
    assert lines[3].split() == ["federated", "0.750", "[0.700,", "0.800]"]


def test_report_of_a_finished_run(finished_run):
    """On a run folder the runner and the server wrote: who trained, the last probe, every plot."""
    run = load_run(finished_run)
    assert participation(run) == [{"north": TRAINED, "south": TRAINED}] * 2
    text = (finished_run / "report.md").read_text()
    last = run.rounds[-1]
    assert (f"| final probe macro AUROC | {last.probe_macro_auroc:.3f} "
            f"[{last.probe_macro_auroc_ci95[0]:.3f}, {last.probe_macro_auroc_ci95[1]:.3f}] |") in text
    assert "| random_init |" in text  # the runner rewrote the report with its comparison
    plots = re.findall(r"\]\((report_\w+\.png)\)", text)
    assert "report_losses.png" in plots and all(imread(finished_run / plot).ndim == 3 for plot in plots)
