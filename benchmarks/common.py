"""Shared helpers for the benchmark scripts: markdown tables, mean ± std, RESULTS.md sections."""
from __future__ import annotations

import platform
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
sys.path.insert(0, str(ROOT / "src"))


def model_dataset(model_name: str) -> str:
    """The built-in dataset a model is evaluated and really calibrated on: a zoo card's, else Fashion-MNIST."""
    from dfqvit.data import FASHION_MNIST
    from dfqvit.models import zoo_card
    return zoo_card(model_name).get("dataset", FASHION_MNIST) if model_name.startswith("zoo:") else FASHION_MNIST


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """The CPU (with the vector ISA torch's kernels use: float results, and so the last digits of
    a quantized model's figures, differ between AVX2 and AVX-512), threads and torch version."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def publish(section: str, script: str, argv, details: str, body: str, write: bool) -> None:
    """Print a result block headed by its exact command (commit, machine, ``details``) and,
    with ``write``, put it into its section of docs/RESULTS.md."""
    command = f"python benchmarks/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = f"Command: `{command}` (commit {git_commit()}; {machine_line()}{'; ' + details if details else ''})\n\n{body}"
    print("\n" + text)
    if write:
        write_section(section, text)


def write_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the block between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
