"""The ``dfqvit`` entry point: one parser with a subcommand per module. A :class:`UserError`
anywhere becomes one line on stderr and exit status 2; so does a malformed option."""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import UserError
from . import evaluate, export, quantize, synth, train
from .output import check_results_file


def one_line(e: UserError) -> str:
    """The message of ``e``; a DataLoader worker re-raises it wrapped in the worker's traceback."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    return text


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the usage itself is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dfqvit", description="Data-free quantization of Vision Transformers: "
                                                      "eval, quantize, synth, train, export.")
    parser.add_argument("--version", action="version", version=f"dfqvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (evaluate, quantize, synth, train, export):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.model_given = any(a in ("--model", "-m") or a.startswith("--model=") for a in argv)
    try:
        if getattr(args, "results_file", None):
            check_results_file(args.results_file)
        return args.func(args)
    except UserError as e:
        print(f"dfqvit: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfqvit: interrupted", file=sys.stderr)
        return 130
