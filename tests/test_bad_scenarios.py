"""Bad scenarios are refused by `fedssl check` and `fedssl simulate` with one line naming the key and
exit code 2, before any data is generated or Flower starts (the run folder is not even created).

Each case is a change to a small valid scenario (dotted keys; `sites[i]` indexes the site list).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedssl.cli import main
from fedssl.config import CONDITIONS
from tests.conftest import UNSET, VALID, changed


# case id -> (changes, fragment of the one-line message)
BAD = {
    # the "fails only after Flower has started" settings
    "fraction_train 2 (hung)": ({"federation.fraction_train": 2.0}, "federation.fraction_train: must lie in (0, 1]"),
    "fraction_train 0": ({"federation.fraction_train": 0.0}, "federation.fraction_train: must lie in (0, 1]"),
    "local_steps 0": ({"train.local_steps": 0}, "train.local_steps: must be a finite number > 0"),
    "batch_size 0": ({"train.batch_size": 0}, "train.batch_size: must be a finite number > 0"),
    "learning_rate -1": ({"train.learning_rate": -1.0}, "train.learning_rate: must be a finite number > 0"),
    "threads 0": ({"train.threads": 0}, "train.threads: must be a finite number > 0"),
    "temperature 0": ({"objective.temperature": 0.0}, "objective.temperature: must be a finite number > 0"),
    "privacy with simclr": ({"privacy": {"enabled": True}, "objective.name": "simclr"},
                            "privacy.enabled with objective.name 'simclr'"),
    "model size huge": ({"model.size": "huge"}, "model.size: unknown size 'huge'"),
    "patch_size not dividing the window": ({"model.patch_size": 30},
                                           "model.patch_size: 30 does not divide the window of 200 samples"),
    "window_seconds 0.1": ({"data.window_seconds": 0.1}, "model.patch_size: 50 does not divide the window of 10"),
    "unknown encoder": ({"model.encoder": "vit9000"}, "model.encoder: unknown encoder 'vit9000'"),
    "unknown objective": ({"objective.name": "mystery"}, "objective.name: unknown objective 'mystery'"),
    "test_fraction 1.0": ({"evaluation.test_fraction": 1.0}, "evaluation.test_fraction: must lie in (0, 1)"),
    "evaluation set too small to probe": ({"evaluation.synthetic.records": 3},
                                          "evaluation.synthetic.records: 3 records split"),
    "rounds 0": ({"federation.rounds": 0}, "federation.rounds: must be a finite number > 0"),
    # the "raw traceback before training" settings
    "data sample_rate 0": ({"data.sample_rate": 0}, "data.sample_rate: must be a finite number > 0"),
    "highpass above lowpass": ({"data.highpass_hz": 45.0}, "data.lowpass_hz: must be above highpass_hz (45 Hz)"),
    "max_windows_per_record 0": ({"data.max_windows_per_record": 0}, "data.max_windows_per_record: must be"),
    "unknown prevalence": ({"sites[0].synthetic.prevalence": {"dragon_pox": 0.5}},
                           "sites[0].synthetic.prevalence: unknown condition(s) ['dragon_pox']"),
    "all-zero prevalence": ({"sites[0].synthetic.prevalence": dict.fromkeys(CONDITIONS, 0.0)},
                            "sites[0].synthetic.prevalence: every rhythm"),
    "synthetic sample_rate 0": ({"sites[1].synthetic.sample_rate": 0}, "sites[1].synthetic.sample_rate: must be"),
    "every lead missing": ({"sites[0].synthetic.missing_leads": ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2",
                                                                "V3", "V4", "V5", "V6"]},
                           "sites[0].synthetic.missing_leads: every lead is missing"),
    # the "accepted silently" settings
    "mask_ratio 1": ({"objective.mask_ratio": 1.0}, "objective.mask_ratio: must lie in (0, 1)"),
    "mask_ratio 0": ({"objective.mask_ratio": 0.0}, "objective.mask_ratio: must lie in (0, 1)"),
    "one-record site": ({"sites[0].synthetic.records": 1, "sites[0].synthetic.duration_seconds": 2.0},
                        "sites[0].synthetic.records: 1 record(s) of 1 window(s) each; training needs at least 2"),
    "exclusive pair": ({"sites[0].synthetic.prevalence": dict.fromkeys(CONDITIONS, 0.6)},
                       "sites[0].synthetic.prevalence: bundle_branch_block and right_bundle_branch_block exclude"),
    "partial prevalence": ({"sites[0].synthetic.prevalence": {"atrial_fibrillation": 0.5}},
                           "sites[0].synthetic.prevalence: give every condition or none"),
    "sites: []": ({"sites": []}, "sites: the scenario names no site"),
    "synthetic records 0": ({"sites[0].synthetic.records": 0}, "sites[0].synthetic.records: must be a finite number > 0"),
    "synthetic records -5": ({"sites[1].synthetic.records": -5}, "sites[1].synthetic.records: must be"),
    # found on the way
    "nan value": ({"train.learning_rate": float("nan")}, "train.learning_rate: expected a finite number"),
    "infinite timeout": ({"federation.round_timeout": float("inf")}, "federation.round_timeout: expected a finite"),
    "batch of one for a contrastive objective": ({"objective.name": "simclr", "train.batch_size": 1},
                                                 "train.batch_size: objective 'simclr' contrasts"),
    "site named like the probe set": ({"sites[0].name": "evaluation"}, "sites[0].name: 'evaluation' is the name"),
    "missing site folder": ({"sites[0].synthetic": UNSET, "sites[0].folder": "no/such/folder"},
                            "sites[0].folder:"),
    "records shorter than a window": ({"sites[0].synthetic.duration_seconds": 1.0},
                                      "sites[0].synthetic.duration_seconds: records of 1 s are shorter"),
    "synthetic rate the data settings refuse": ({"sites[0].synthetic.sample_rate": 50},
                                                "sites[0].synthetic.sample_rate: 50 Hz is outside"),
    "lowpass above Nyquist": ({"data.lowpass_hz": 60.0}, "data.lowpass_hz: must be below half of sample_rate"),
    "strategy unknown": ({"federation.strategy": "fedmagic"}, "federation.strategy: unknown strategy"),
    "min_sites above the sites": ({"federation.min_sites": 3}, "federation.min_sites must be between 1"),
    "krum with too few sites": ({"federation.strategy": "krum", "federation.malicious_sites": 1},
                                "federation.malicious_sites: krum tolerates f malicious sites only with at least"),
    "negative seed": ({"seed": -1}, "seed: must be >= 0"),
    "token_samples 30": ({"model.token_samples": 30}, "model.token_samples: 30; known: [20, 40]"),
    "mlp_ratio 0": ({"model.mlp_ratio": 0}, "model.mlp_ratio: must be a finite number > 0"),
    "prediction_stride above its steps": ({"objective.prediction_stride": 13},
                                          "objective.prediction_stride: must be at most prediction_steps (4)"),
    "cpc predicting beyond the window": ({"objective.prediction_steps": 12, "objective.prediction_stride": 12},
                                         "CPC predicts 12 or more steps ahead: the window has 10 time tokens"),
}
# site and scenario names that were used as paths (issue item 1)
BAD_NAMES = {
    "absolute site name": ({"sites[0].name": "/tmp/x/decoy"}, "sites[0].name: '/tmp/x/decoy' is not a valid name"),
    "escaping site name": ({"sites[0].name": "../../../../tmp/x/escaped"}, "sites[0].name: '../../../../tmp/x/escaped'"),
    "empty site name": ({"sites[1].name": ""}, "sites[1].name: '' is not a valid name"),
    "nested site name": ({"sites[1].name": "a/b"}, "sites[1].name: 'a/b' is not a valid name"),
    "dot-dot site name": ({"sites[1].name": ".."}, "sites[1].name: '..' is not a valid name"),
    "escaping scenario name": ({"name": "../../escape"}, "name: '../../escape' is not a valid name"),
}


def write(tmp_path, scenario: dict):
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


@pytest.mark.parametrize("case", {**BAD, **BAD_NAMES})
def test_check_refuses_in_one_line(case, tmp_path, capsys):
    changes, fragment = {**BAD, **BAD_NAMES}[case]
    assert main(["check", str(write(tmp_path, changed(changes)))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl check: ") and err.count("\n") == 1, err
    assert fragment in err, err


@pytest.mark.parametrize("case", {**BAD, **BAD_NAMES})
def test_simulate_refuses_before_data_or_flower(case, tmp_path, capsys, monkeypatch, no_flower):
    changes, fragment = {**BAD, **BAD_NAMES}[case]
    monkeypatch.chdir(tmp_path)  # the default run folder would be runs/<name>-<time> here
    path = write(tmp_path, changed(changes))
    run = tmp_path / "run"
    assert main(["simulate", str(path), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not run.exists()  # no folder, no data, no Flower (it would write run/flower and run/logs/flower.log)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenario.yaml"]


def test_an_absolute_site_name_does_not_touch_that_folder(tmp_path, capsys, no_flower):
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "precious.txt").write_text("keep me")
    path = write(tmp_path, changed({"sites[0].name": str(decoy)}))
    assert main(["simulate", str(path), "--out", str(tmp_path / "run")]) == 2
    assert sorted(p.name for p in decoy.iterdir()) == ["precious.txt"]
    assert (decoy / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("text, fragment", [
    ("", "sites: the scenario names no site"),
    ("sites: []\n", "sites: the scenario names no site"),
    ("name: x\n", "sites: the scenario names no site"),
])
def test_a_scenario_without_sites_is_refused_as_such(text, fragment, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "min_sites" not in err, err


def test_the_valid_scenario_passes_the_check(tmp_path, capsys):
    assert main(["check", str(write(tmp_path, VALID))]) == 0
    assert "scenario 'bad-input' is valid (2 sites" in capsys.readouterr().out


def test_the_quickstart_passes_the_check(capsys):
    assert main(["check", str(Path(__file__).resolve().parents[1] / "simulations" / "quickstart.yaml")]) == 0


@pytest.mark.parametrize("argv, fragment", [
    (["--mains-hz", "nan"], "--mains-hz: must be a finite number >= 0, got nan"),
    (["--mains-hz", "inf"], "--mains-hz: must be a finite number >= 0, got inf"),
    (["--records", "0"], "--records: must be a finite number > 0, got 0"),
    (["--records", "-5"], "--records: must be a finite number > 0, got -5"),
    (["--sample-rate", "0"], "--sample-rate: must be a finite number > 0, got 0"),
])
def test_synthesize_refuses_bad_options(argv, fragment, tmp_path, capsys):
    assert main(["synthesize", str(tmp_path / "site"), *argv]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "site").exists()
