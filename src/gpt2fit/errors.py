"""One error type for every user-facing failure.

Raise ``UserError`` with a message whose first line names the bad value and the fix. The CLI
prints it as ``error: <message>`` on stderr and exits with status 2; nothing else is printed, so
the first line a user sees is the one that matters.
"""

import argparse
import difflib
from typing import Iterable


class UserError(Exception):
    """A problem with the user's input or environment (not a bug in gpt2fit)."""

    exit_code = 2


def suggest(value: str, choices: Iterable[str]) -> str:
    """' Did you mean X?' for the closest matches of ``value`` in ``choices``, or ''."""
    close = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.6)
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises UserError: "error: ..." is the first line, exit 2, as for
    every other bad input (plain argparse prints its usage block first)."""

    def error(self, message):
        raise UserError(f"{message} (see `{self.prog} --help`)")
