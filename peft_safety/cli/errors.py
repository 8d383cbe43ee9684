"""What every part of the CLI shares: the usage error, its exit code, the one-line argument parser."""

from __future__ import annotations

import argparse

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line or its input files, reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _print(message: str) -> None:
    print(message, flush=True)
