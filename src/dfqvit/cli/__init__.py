"""dfqvit command line: eval, quantize, synth, train, export.

One module per subcommand (its parser and its command), ``args`` for the argument groups they
share and ``output`` for what they print and write. Nothing in the library imports this
package: the library's functions never depend on the command line.
"""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
