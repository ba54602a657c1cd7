"""The `nws` command's help: a whole description, each default said once and as the README writes
it, the data directory's fallback, and one example per sub-command."""

from __future__ import annotations

import re

import pytest

from nws.cli import DESCRIPTION, main


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone


COMMANDS = ["main", "sample", "train", "predict", "import_nws", "export_nws", "cleanup"]


def test_the_top_level_description_is_whole_sentences(capsys):
    text = help_text(capsys)
    assert "".join(DESCRIPTION.split()) in "".join(text.split())  # argparse may break at a hyphen
    assert DESCRIPTION.endswith(".") and "built from the options" not in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_default_is_said_once_booleans_as_true_false_and_an_example_follows(capsys, command):
    text = help_text(capsys, command)
    options = re.split(r" (?=--[A-Za-z])", text.split(" options: ", 1)[1].split(" example: ")[0])
    for option in options:
        assert option.count("(default") <= 1, option
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: '')" not in text
    example = text.split(" example: ", 1)[1]
    assert example.startswith(f"nws {command} --")


def test_booleans_and_the_data_directory_say_what_they_take(capsys):
    text = help_text(capsys, "sample")
    assert "--download {true,false}" in text and "download missing paper datasets (default: true)" in text
    assert "(default $NWS_DATA_DIR, else ~/.cache/nws/data)" in text
    assert "(default ./optuna-journal.log)" in text and "optuna-journal.log) (default" not in text
