"""`python -m train <command> --help` describes every option, with its default."""

import argparse

import pytest

from train.__main__ import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_listed():
    assert set(subcommands()) == {"fit", "evaluate", "export", "feature-maps", "calibrate",
                                  "quantize", "compare", "soup", "pack", "teach", "snapshot"}


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_has_help_and_shows_its_default(command):
    parser = subcommands()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{command} {action.option_strings}: no help"
    text = parser.format_help()
    assert text.count("(default:") >= len(parser._actions) - 1 - sum(
        1 for a in parser._actions if a.required or isinstance(a, argparse._StoreTrueAction)
    )
