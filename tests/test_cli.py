import json

import pytest

from fedssl.cli import main, parser

SUBCOMMANDS = ["check", "simulate", "pretrain", "evaluate", "check-site", "synthesize", "report", "export", "embed", "certs",
               "node-key", "dashboard", "node", "coordinator", "register", "launch", "status"]


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: fedssl" in capsys.readouterr().out


def test_subcommands_are_the_documented_ones():
    sub = next(a for a in parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


def test_synthesize_then_check_site(tmp_path, capsys):
    assert main(["synthesize", str(tmp_path / "site"), "--records", "4"]) == 0
    assert main(["check-site", str(tmp_path / "site"), "--cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "4 windows of 1000 samples from 4 records" in out
    assert json.loads((tmp_path / "cache" / "report.json").read_text())


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["check-site", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl check-site:") and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {rounds: lots}")
    assert main(["simulate", str(bad)]) == 2
    assert "federation.rounds: expected int" in capsys.readouterr().err
