"""Export a calibrated fake-quant model to ONNX with QuantizeLinear / DequantizeLinear (QDQ),
and report what ONNX Runtime really runs as integer kernels.

The export traces the model with torch's TorchScript exporter (``dynamo=False``) while the
quantizers are swapped for export-friendly forms (:mod:`dfqvit.export.qdq`, where the
exactness of each form is documented). Float parts (LayerNorm, softmax, GELU, residual adds,
layers left float, an activation correction module) export as plain float ops.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import UserError
from ..fileio import atomic_path, refuse_existing
from ..quant.packing import pack_codes
from ..quant.quantizers import Quantizer
from .cpu import has_int32_dot
from .ort import make_session, optimized_op_counts, split_counts
from .qdq import LOG2_MODES, SIGNED_CONTAINER_MAX_BITS, WEIGHT_FORMATS, export_mode

ROUNDING_MODES = ("torch", "onnx")
MIN_OPSET, MAX_OPSET = 13, 21   # per-axis DequantizeLinear needs 13; INT4 needs 21
TORCHSCRIPT_MAX_OPSET = 20      # opset 21 = an opset-20 export relabelled (21 only adds int4 types)
DEFAULT_OPSET = 17              # LayerNormalization is a single op from 17 on
INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_PREFIX = "dfqvit."

LOG2_DESCRIPTIONS = {
    "emulate": "log-sqrt2, emulated with float ops (same codes up to float rounding at code boundaries; levels within a few float ulps, bit for bit with rounding='torch')",
    "uint8": "APPROXIMATED by a uniform uint8 QDQ on [0, delta] (not the simulated quantizer)",
    "float": "dropped: attention probabilities stay float (not the simulated quantizer)",
}


@dataclass
class ExportReport:
    """What was exported and how ONNX Runtime runs it."""

    path: str
    opset: int
    input_shape: tuple
    weight_format: str
    softmax: str                                   # how the post-softmax quantizer was exported
    weight_bits: dict[str, int] = field(default_factory=dict)   # "W4" -> layers
    act_bits: dict[str, int] = field(default_factory=dict)      # "A8" -> quantizers
    float_layers: list[str] = field(default_factory=list)
    graph_ops: dict[str, int] = field(default_factory=dict)     # exported graph
    ort_ops: dict[str, int] = field(default_factory=dict)       # after ORT_ENABLE_ALL on CPU
    file_bytes: int = 0
    max_abs_diff: float | None = None   # |ORT - PyTorch simulation| on verify_images random inputs
    agreement: float | None = None      # top-1 agreement (%) on those inputs
    verify_images: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def integer_ops(self) -> dict[str, int]:
        return split_counts(self.ort_ops)[0]

    @property
    def float_matmul_ops(self) -> dict[str, int]:
        return split_counts(self.ort_ops)[1]

    @property
    def qdq_ops(self) -> dict[str, int]:
        return split_counts(self.ort_ops)[2]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(input_shape=list(self.input_shape), integer_ops=self.integer_ops,
                 float_matmul_ops=self.float_matmul_ops)
        return d

    def table(self) -> str:
        def fmt(d):
            return ", ".join(f"{k} x{v}" for k, v in d.items()) or "none"
        lines = [
            f"ONNX export: {self.path} ({self.file_bytes / 1024:.1f} KiB, opset {self.opset}, "
            f"input {'x'.join(map(str, self.input_shape))}, dynamic batch)",
            f"  weights (QDQ, {self.weight_format} container): {fmt(self.weight_bits)}",
            f"  activations (QDQ): {fmt(self.act_bits)}",
            f"  post-softmax: {self.softmax}",
            f"  float layers: {', '.join(self.float_layers) or 'none'}",
        ]
        if self.ort_ops:
            integer, floating, qdq = split_counts(self.ort_ops)
            rows = [("ONNX Runtime CPU (ORT_ENABLE_ALL)", "count", "runs as")]
            rows += [(k, str(v), "integer") for k, v in integer.items()]
            rows += [(k, str(v), "float") for k, v in floating.items()]
            rows += [(k, str(v), "quantize float -> int8" if k == "QuantizeLinear" else "dequantize int8 -> float")
                     for k, v in qdq.items()]
            widths = [max(len(r[i]) for r in rows) for i in range(3)]
            lines += ["  " + "  ".join(c.ljust(w) if i != 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                      for r in rows]
            n_int, n_float = sum(integer.values()), sum(floating.values())
            lines.append(f"  integer kernels: {n_int}; float matmul/conv kernels left: {n_float}")
        if self.max_abs_diff is not None:
            lines.append(f"  check: max |ORT - PyTorch simulation| = {self.max_abs_diff:.3g} on {self.verify_images} "
                         f"random inputs; top-1 agreement {self.agreement:.1f}%")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_path(path, force: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name such as model.onnx")
    return refuse_existing(path, force)


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
                        f"(per-channel DequantizeLinear needs 13; int4 weights need 21)")


def _input_shape(data_config: dict) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in data_config["input_size"])
    except (KeyError, TypeError, ValueError):
        raise UserError("data_config needs input_size (C, H, W), e.g. from dfqvit.models.resolve_data_config") from None
    if len(shape) != 3:
        raise UserError(f"data_config input_size must be (C, H, W), got {shape}")
    return shape


def _trace_to_onnx(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buf, dynamo=False, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True)
    return buf.getvalue()


def _set_opset(proto, opset: int) -> None:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset


def _weights_to_int4(proto, codes_info: dict[str, int]) -> int:
    """Store ≤4-bit weight codes (and their zero points) feeding DequantizeLinear as UINT4.
    Returns the number of converted weights."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def resolve(name):  # the exporter deduplicates equal initializers through Identity nodes
        while name not in inits and name in identity:
            name = identity[name]
        return name

    converted = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in codes_info:
            continue
        bits = codes_info[node.input[0]]
        if bits > 4 or resolve(node.input[0]) not in inits or resolve(node.input[2]) not in inits:
            continue
        new_inputs = []
        for i, name in enumerate(node.input[:3]):
            if i == 1:
                new_inputs.append(name)
                continue
            name = resolve(name)
            arr = numpy_helper.to_array(inits[name]).astype("int32")
            if inits[name].data_type == onnx.TensorProto.INT8:
                arr = arr + 2 ** (bits - 1)   # the int8 container is centred on zero; UINT4 is not
            packed = pack_codes(torch.from_numpy(arr), 4, signed=False)
            new_name = f"{name}.int4"
            if new_name not in inits:
                t = onnx.helper.make_tensor(new_name, onnx.TensorProto.UINT4, list(arr.shape), packed.numpy().tobytes(), raw=True)
                graph.initializer.append(t)
                inits[new_name] = t
            new_inputs.append(new_name)
        for i, name in enumerate(new_inputs):
            node.input[i] = name
        converted += 1
    # drop Identity nodes and initializers nothing reads any more
    while True:
        used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return converted


def _add_metadata(proto, items: dict) -> None:
    for key, value in items.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value, default=str)


def _json_data_config(data_config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _write(proto, path: Path) -> int:
    import onnx

    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        size = os.path.getsize(tmp)
    return size


@torch.no_grad()
def verify_against_torch(model: nn.Module, onnx_path, input_shape, images: int = 8, seed: int = 0,
                         threads: int | None = 1) -> tuple[float, float]:
    """(max |ORT - PyTorch|, top-1 agreement %) of ``model`` and its ONNX export on random inputs."""
    x = torch.randn(images, *input_shape, generator=torch.Generator().manual_seed(seed))
    expected = model(x.to(_model_device(model))).float().cpu()
    got = torch.from_numpy(make_session(onnx_path, threads).run(None, {INPUT_NAME: x.numpy()})[0])
    diff = float((got - expected).abs().max())
    agree = 100.0 * float((got.argmax(1) == expected.argmax(1)).float().mean())
    return diff, agree


def export_onnx(qmodel: nn.Module, path, data_config: dict, opset: int = DEFAULT_OPSET, *,
                log2_softmax: str = "emulate", weight_format: str = "int8", patch_as_matmul: bool = True,
                rounding: str = "onnx", force: bool = False, verify: bool = True, analyze: bool = True, metadata: dict | None = None,
                threads: int | None = 1) -> ExportReport:
    """Export a calibrated fake-quant model (from :func:`dfqvit.quant.quantize` or
    :func:`dfqvit.quant.load_quantized`) to an ONNX QDQ model at ``path`` (written atomically).

    ``log2_softmax``: ``"emulate"`` | ``"uint8"`` | ``"float"`` (see :mod:`dfqvit.export.qdq`).
    ``weight_format``: ``"int8"`` (codes of any bit-width in an 8-bit container; ORT turns
    these into integer matmuls), ``"int8-vnni"`` (the same, with 8-bit codes in int8 rather
    than uint8: faster, exact only on CPUs with VNNI / AMX) or ``"int4"`` (≤4-bit codes stored
    as INT4, opset 21; ORT 1.32 dequantizes them and runs a float MatMul). ``patch_as_matmul`` exports the patch-embedding
    conv as patchify + MatMul so it can run as an integer matmul too (same function).
    ``rounding``: ``"onnx"`` (default) emits the textbook pair ``QuantizeLinear(x, s, z)`` →
    ``DequantizeLinear(·, s, z)``, which rounds ``x / s`` where torch rounds ``x · (1/s)``, so a
    value within one float rounding of a tie may get the neighbouring code (~1e-6 of the
    values); ``"torch"`` quantizes as ``QuantizeLinear(x · (1/s), 1, z)`` → ``DequantizeLinear(·, s, z)``,
    bit for bit torch's rounding (ORT still fuses the integer matmuls; one extra Mul per
    quantizer, ~10 % slower; not the textbook pattern other runtimes look for). Either way the
    network output is not bit-exact: ORT's integer matmuls accumulate in another order than
    torch's float matmuls, and a tiny difference can move a downstream value across a rounding
    boundary.
    ``verify`` compares ORT with the PyTorch simulation on 8 random inputs; ``analyze`` counts
    the kernels of ORT's graph-optimised model.
    """
    _check_opset(opset)
    if weight_format not in WEIGHT_FORMATS:
        raise UserError(f"unknown weight format {weight_format!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    if weight_format == "int4" and opset < 21:
        raise UserError("int4 weights need --opset 21 (ONNX INT4 tensors); use the default int8 container "
                        "(exact for 2..8-bit codes) with older opsets")
    if log2_softmax not in LOG2_MODES:
        raise UserError(f"unknown log2 softmax export mode {log2_softmax!r}; choose from {', '.join(LOG2_MODES)}")
    if rounding not in ROUNDING_MODES:
        raise UserError(f"unknown rounding {rounding!r}; choose from {', '.join(ROUNDING_MODES)}")
    path = _check_path(path, force)
    input_shape = _input_shape(data_config)
    import onnx

    was_training = qmodel.training
    qmodel.eval()
    example = torch.zeros(1, *input_shape, device=_model_device(qmodel))
    try:
        with export_mode(qmodel, log2_softmax, patch_as_matmul, torch_rounding=rounding == "torch",
                         signed_max_bits=8 if weight_format == "int8-vnni" else SIGNED_CONTAINER_MAX_BITS) as plan:
            raw = _trace_to_onnx(qmodel, example, opset)
    finally:
        qmodel.train(was_training)
    proto = onnx.load_from_string(raw)
    notes = []
    if opset > TORCHSCRIPT_MAX_OPSET:
        _set_opset(proto, opset)
        notes.append(f"traced at opset {TORCHSCRIPT_MAX_OPSET} and relabelled {opset} (opset 21 only adds int4 types)")
    if weight_format == "int4":
        n = _weights_to_int4(proto, plan.codes)
        notes.append(f"{n} weight tensors of <=4 bits stored as UINT4")
    _add_metadata(proto, {
        "version": __version__, "data_config": _json_data_config(data_config),
        "export": {"weight_format": weight_format, "log2_softmax": log2_softmax, "rounding": rounding, "opset": opset},
        **(metadata or {}),
    })
    onnx.checker.check_model(proto)
    graph_ops = dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))

    weight_bits = dict(sorted(Counter(f"W{b}" for b in plan.weight_bits.values()).items()))
    act_bits = dict(sorted(Counter(f"A{b}" for b in plan.act_bits.values()).items()))
    if plan.log2:
        softmax = LOG2_DESCRIPTIONS[log2_softmax]
    else:
        softmax = "float (no post-softmax quantizer in this model)"
    if any(b < 8 for b in plan.act_bits.values()):
        notes.append("activations below 8 bits: uint8 QuantizeLinear + integer Clip to [0, 2^b-1] (exact)")
    if weight_format == "int8-vnni" and any(b == 8 for b in plan.weight_bits.values()):
        notes.append("8-bit weights in an int8 container (int8-vnni): ORT's fast u8*s8 kernel, exact on CPUs with "
                     "VNNI or AMX only; elsewhere its int16 pair sums saturate (wrong by whole steps): use int8 there")
    if weight_format == "int8" and any(b == 8 for b in plan.weight_bits.values()) and has_int32_dot():
        notes.append("8-bit weights in uint8 containers run ORT's slow u8*u8 kernel; this CPU has VNNI / AMX, where "
                     "weight_format int8-vnni (--weight-format int8-vnni) is exact and about twice as fast "
                     "(keep int8 for a file that must also run on CPUs without them)")
    if any(b < 8 for b in plan.weight_bits.values()) and weight_format in ("int8", "int8-vnni"):
        notes.append("weights below 8 bits: their codes stored in an int8 container, centred on zero (exact on every "
                     "x86 integer kernel, AVX2's fast u8*s8 one included; the file is not smaller)")
    if plan.rounded_zero_points:
        notes.append(f"{len(plan.rounded_zero_points)} activation quantizers have a fractional zero point in the "
                     "simulation (RepQ-ViT's folded LayerNorm inputs, preset repq-vit) and are exported with the "
                     "nearest integer one: NOT exact there")
    if plan.patch_as_matmul:
        notes.append(f"patch embedding exported as patchify + MatMul: {', '.join(plan.patch_as_matmul)}")
    if plan.uncalibrated:
        notes.append(f"{len(plan.uncalibrated)} quantizers were never calibrated and stay float, as in the "
                     f"simulation: {', '.join(plan.uncalibrated[:4])}{' ...' if len(plan.uncalibrated) > 4 else ''}")
    if rounding == "torch":
        notes.append("activation rounding as torch: QuantizeLinear(x * (1/s), 1, z) -> DequantizeLinear(s, z) "
                     "(same codes as torch for the same input)")
    else:
        notes.append("QDQ pairs round x / s where torch rounds x * (1/s): at a rounding tie a value can land on the "
                     "neighbouring code (~1e-6 of values; rounding='torch' avoids it)")

    report = ExportReport(
        path=str(path), opset=opset, input_shape=input_shape, weight_format=weight_format, softmax=softmax,
        weight_bits=weight_bits, act_bits=act_bits, float_layers=plan.float_layers, graph_ops=graph_ops,
        notes=notes)
    # Write to a temporary file next to ``path``, analyse and check it there, and rename it
    # onto ``path`` only when everything succeeded: a failure leaves no file behind.
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        report.file_bytes = os.path.getsize(tmp)
        if analyze:
            report.ort_ops = optimized_op_counts(tmp, threads)
            report.notes.extend(_weight_kernel_notes(report.ort_ops, weight_format))
        if verify:
            report.max_abs_diff, report.agreement = verify_against_torch(qmodel, tmp, input_shape, threads=threads)
            report.verify_images = 8
    return report


def _weight_kernel_notes(ort_ops: dict, weight_format: str) -> list[str]:
    """What ONNX Runtime made of the quantized weights, as seen in its optimised graph."""
    notes = []
    if ort_ops.get("MatMulNBits"):
        notes.append("weight-only layers (float activations) run as MatMulNBits (ONNX Runtime re-blocks the per-row "
                     "grid into blocks of 32, same values); its CPU kernel's default accuracy_level 4 quantizes the "
                     "activations to int8 per block (fast, ~1e-3 on logits); the session config entry "
                     "session.qdq_matmulnbits_accuracy_level=0 computes in fp32 (exact)")
    if weight_format == "int4" and ort_ops.get("DequantizeLinear"):
        notes.append("int4 weights behind an activation QDQ are dequantized to float before their MatMul (ORT fuses "
                     "integer matmuls only from 8-bit containers): use the int8 container for integer kernels")
    return notes


def export_float_onnx(model: nn.Module, path, data_config: dict, opset: int = DEFAULT_OPSET, *,
                      force: bool = False) -> Path:
    """Export an unquantized (FP32) model, e.g. as the baseline of a latency benchmark."""
    _check_opset(opset)
    if any(isinstance(m, Quantizer) for m in model.modules()):
        raise UserError("this model is quantized: use export_onnx for a QDQ export")
    path = _check_path(path, force)
    import onnx

    input_shape = _input_shape(data_config)
    was_training = model.training
    model.eval()
    try:
        raw = _trace_to_onnx(model, torch.zeros(1, *input_shape, device=_model_device(model)), opset)
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(raw)
    if opset > TORCHSCRIPT_MAX_OPSET:
        _set_opset(proto, opset)
    _add_metadata(proto, {"version": __version__, "data_config": _json_data_config(data_config),
                          "export": {"weight_format": "float32", "opset": opset}})
    _write(proto, path)
    return path


def read_onnx_metadata(path) -> dict:
    """The ``dfqvit.*`` metadata of an exported model (JSON values decoded)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"cannot read ONNX model {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    meta = {}
    for entry in proto.metadata_props:
        if entry.key.startswith(META_PREFIX):
            key = entry.key[len(META_PREFIX):]
            try:
                meta[key] = json.loads(entry.value)
            except json.JSONDecodeError:
                meta[key] = entry.value
    return meta
