import pytest

from fedssl.config import ConfigError, Scenario, SiteConfig, load_scenario, save_scenario


def test_empty_file_is_the_default_scenario(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("")
    assert load_scenario(path) == Scenario()


def test_round_trip_and_relative_folders(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nsites:\n  - {name: a, folder: data/a}\n  - {name: b, synthetic: {records: 5, missing_leads: [V1]}}\n")
    scenario = load_scenario(path)
    assert scenario.sites[0].folder == str((tmp_path / "data/a").resolve())
    assert scenario.sites[1].synthetic.missing_leads == ("V1",)
    save_scenario(scenario, tmp_path / "again.yaml")
    assert load_scenario(tmp_path / "again.yaml") == scenario


@pytest.mark.parametrize("text, message", [
    ("trian: {}", "unknown key"),
    ("train: {batch_size: many}", "train.batch_size: expected int"),
    ("train: {batch_size: true}", "expected int"),
    ("sites: [{name: a}]", "exactly one of"),
    ("sites: [{name: a, folder: x}, {name: a, folder: y}]", "unique"),
    ("sites: [{folder: x}]", "name"),
    ("data: [1, 2]", "expected a mapping"),
    ("a: [", "cannot read"),
])
def test_bad_scenarios_name_the_key(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_scenario(path)


def test_site_lookup():
    scenario = Scenario(sites=(SiteConfig("a", folder="x"),))
    assert scenario.site("a").folder == "x"
    with pytest.raises(ConfigError, match="no site named"):
        scenario.site("b")
