"""The commands' argument parsers: a one-line usage, and -h showing every flag's default.

argparse's own usage line lists every flag; for the stage scripts that is 38 wrapped lines, printed before
each one-line error. Here a mistake prints `usage: pretrain.py [options] (-h lists them)` and the error line.
"""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and `(default: X)` after each flag's help where there is a default."""

    def _get_help_string(self, action):
        # A flag whose default is None or False has nothing worth printing: its help says what happens without it.
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def make_parser(description: str | None, prog: str | None = None, positional: str = "") -> argparse.ArgumentParser:
    """`positional`: what the usage line shows after the options (a command's required arguments)."""
    usage = "%(prog)s [options] " + (f"{positional} " if positional else "") + "(-h lists them)"
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, usage=usage)
