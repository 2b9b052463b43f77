"""The package's layering: the library never imports the command line."""
from __future__ import annotations

import subprocess
import sys

LIBRARY = ["dfqvit", "dfqvit.models", "dfqvit.data", "dfqvit.scenes", "dfqvit.evaluate", "dfqvit.train",
           "dfqvit.calib", "dfqvit.quant", "dfqvit.acm", "dfqvit.pipeline", "dfqvit.export"]


def test_library_imports_without_the_cli():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in LIBRARY)
            + "print(sorted(m for m in sys.modules if m.startswith('dfqvit.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
