"""The README's Python example, run verbatim: what it saves must load back and compute the same."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.needs_fashion_mnist, pytest.mark.zoo("deit-fmnist")]


def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_one_python_example():
    assert len(readme_python_blocks()) == 1


def test_readme_python_example_saves_a_model_that_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)              # it writes runs/... relative to the working directory
    namespace: dict = {}
    exec(compile(readme_python_blocks()[0], "README.md", "exec"), namespace)
    from dfqvit.quant import load_quantized

    saved_dir = next((tmp_path / "runs").iterdir())
    reloaded, meta = load_quantized(saved_dir)
    images = namespace["images"]
    with torch.no_grad():
        assert torch.equal(reloaded(images), namespace["qmodel"](images))
    assert meta["acm"]["kind"] in ("full", "diag")
