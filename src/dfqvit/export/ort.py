"""ONNX Runtime helpers: sessions, a session as a torch-callable model, the graph-optimised
model's op counts (which ops really run as integer kernels), and profiling."""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

# Kernels that compute on integers (ONNX standard + ORT contrib ops).
INTEGER_OPS = frozenset({
    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm",
    "QLinearConv", "ConvInteger", "MatMulNBits", "MatMulBnb4", "DynamicQuantizeLinear",
    "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean", "QLinearWhere", "QAttention",
    "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedGelu", "QOrderedLayerNormalization",
})
# Float compute-heavy kernels (matmuls and convolutions) left in the optimised graph.
FLOAT_MATMUL_OPS = frozenset({"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv",
                              "ConvTranspose", "Nchwc.Conv", "Attention", "MultiHeadAttention"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def _require_ort():
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - optional dependency
        raise UserError("ONNX Runtime is not installed: pip install 'dfqvit[onnx]' (onnx, onnxruntime)") from None
    return ort


def session_options(threads: int | None = None, optimized_path: str | None = None, profile_prefix: str | None = None,
                    optimization: str = "all", config: dict[str, str] | None = None):
    """CPU session options; ``config``: session config entries, e.g.
    ``{"session.qdq_matmulnbits_accuracy_level": "0"}`` for fp32 compute in MatMulNBits."""
    ort = _require_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.log_severity_level = 3  # no "serializing an NCHWc-optimised model" warnings
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    return so


def make_session(model, threads: int | None = None, **kwargs):
    """A CPU ``InferenceSession`` on ``model`` (a path or serialized bytes)."""
    ort = _require_ort()
    source = str(model) if isinstance(model, (str, os.PathLike)) else model
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
        raise UserError(f"ONNX model {model} does not exist")
    try:
        return ort.InferenceSession(source, session_options(threads, **kwargs), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX Runtime cannot load {model if not isinstance(model, bytes) else 'the model'}: "
                        f"{first}") from None


def _op_key(node) -> str:
    if node.domain == "com.microsoft.nchwc":
        return f"Nchwc.{node.op_type}"
    return node.op_type


def optimized_op_counts(model, threads: int | None = 1) -> dict[str, int]:
    """Node op types of the model after ONNX Runtime's CPU graph optimisation (ORT_ENABLE_ALL),
    read back from ``SessionOptions.optimized_model_filepath``."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="dfqvit-ort-") as d:
        out = Path(d) / "optimized.onnx"
        make_session(model, threads, optimized_path=str(out))
        graph = onnx.load(str(out), load_external_data=False).graph
        counts = Counter(_op_key(n) for n in graph.node)
    return dict(sorted(counts.items()))


def split_counts(counts: dict[str, int]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(integer kernels, float matmul/conv kernels, remaining Q/DQ) of an op-count dict."""
    integer = {k: v for k, v in counts.items() if k in INTEGER_OPS}
    floating = {k: v for k, v in counts.items() if k in FLOAT_MATMUL_OPS}
    qdq = {k: v for k, v in counts.items() if k in QDQ_OPS}
    return integer, floating, qdq


def profile_ops(session_factory, feeds: dict, runs: int = 20, warmup: int = 5) -> list[tuple[str, float, int]]:
    """Per op type: (op type, ms per run, nodes), sorted by time, over ``runs`` profiled runs
    after ``warmup`` runs (whose events are left out).

    ``session_factory(profile_prefix)`` must build a session with profiling on."""
    with tempfile.TemporaryDirectory(prefix="dfqvit-prof-") as d:
        sess = session_factory(str(Path(d) / "ort"))
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
    model_runs = sorted((ev["ts"], ev["ts"] + ev.get("dur", 0)) for ev in events if ev.get("name") == "model_run")
    start = model_runs[-runs][0] if len(model_runs) >= runs else 0
    totals: Counter = Counter()
    nodes: dict[str, set] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev.get("ts", 0) >= start:
            op = ev.get("args", {}).get("op_name", "?")
            totals[op] += ev.get("dur", 0) / 1000.0
            nodes.setdefault(op, set()).add(ev["name"])
    return sorted(((op, ms / runs, len(nodes[op])) for op, ms in totals.items()), key=lambda r: -r[1])


class OnnxModel:
    """A callable ONNX Runtime session on the CPU execution provider: ``model(images) -> logits``
    (torch tensors, images ``(N, C, H, W)``)."""

    def __init__(self, path, threads: int | None = None):
        self.path = str(path)
        self.session = make_session(path, threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise UserError(f"{path} has {len(inputs)} inputs; expected one image batch")
        self.input_name = inputs[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])

    def param_count(self) -> int:
        import onnx

        graph = onnx.load(self.path, load_external_data=False).graph
        return int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer))
