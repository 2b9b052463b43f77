"""ONNX QDQ export: ONNX Runtime agrees with the PyTorch fake-quant simulation, integer kernels
are really used, sub-8-bit and log2 quantizers are exported as documented, and bad settings
fail with a UserError and leave no file behind.

Tolerance (stated in docs/the report): the exported graph computes the simulated function,
except that torch's fake-quant multiplies by 1/scale where ONNX divides by scale, so a value
within one float rounding of a rounding tie can land on the neighbouring code (measured:
~1.5e-6 of all activation values). On random inputs of these tiny models:
* at least 90 % of the inputs give logits equal to the simulation's up to 1e-5 (float
  accumulation order: ORT's integer kernels sum exactly, torch sums floats);
* the remaining ones (a tie flipped somewhere) stay within 5 % of the largest |logit|;
* top-1 agreement is at least 98 %.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from dfqvit.errors import UserError
from dfqvit.export import export_float_onnx, export_onnx, make_session, read_onnx_metadata
from dfqvit.export import onnx_export
from dfqvit.export.cpu import has_int32_dot
from dfqvit.export import qdq
from dfqvit.export.qdq import Log2Function, QDQFunction
from dfqvit.quant import QuantConfig, quantize, quantize_model
from dfqvit.quant import primitives as P
from dfqvit.quant.quantizers import ActQuantizer

VIT_NAME = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
SWIN_NAME = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depths=(2, 2),
                   num_heads=(1, 2), window_size=7)
DATA_CONFIG = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0, "interpolation": "bilinear"}

EXACT_FRACTION, FLIP_REL_TOL, MIN_AGREEMENT = 0.90, 0.05, 98.0


def _model(name):
    torch.manual_seed(0)
    if name == "vit":
        return timm.create_model(VIT_NAME, **VIT_KWARGS).eval()
    return timm.create_model(SWIN_NAME, **SWIN_KWARGS).eval()


@pytest.fixture(scope="module")
def calib():
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


_CACHE: dict = {}


def quantized(name, w_bits, a_bits, calib, preset="repq", **kw):
    key = (name, w_bits, a_bits, preset, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = quantize(_model(name), QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=preset, **kw), calib)[0]
    return _CACHE[key]


def compare(qmodel, path, n=64, seed=1):
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = qmodel(x).numpy()
    got = make_session(path).run(None, {"input": x.numpy()})[0]
    per_sample = np.abs(got - ref).max(axis=1)
    return {
        "exact_fraction": float((per_sample <= 1e-5).mean()),
        "max_rel": float(per_sample.max() / np.abs(ref).max()),
        "agreement": float((got.argmax(1) == ref.argmax(1)).mean() * 100),
    }


def assert_matches(stats):
    assert stats["exact_fraction"] >= EXACT_FRACTION, stats
    assert stats["max_rel"] <= FLIP_REL_TOL, stats
    assert stats["agreement"] >= MIN_AGREEMENT, stats


def n_linear_like(qmodel):
    from dfqvit.quant import QConv2d, QLinear
    return sum(isinstance(m, (QLinear, QConv2d)) for m in qmodel.modules())


def n_attention(qmodel):
    from dfqvit.quant import QAttention, QWindowAttention
    return sum(isinstance(m, (QAttention, QWindowAttention)) for m in qmodel.modules())


@pytest.mark.parametrize("name", ["vit", "swin"])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_ort_matches_simulation_and_runs_integer_kernels(tmp_path, calib, name, w_bits):
    qmodel = quantized(name, w_bits, 8, calib)
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG)
    assert_matches(compare(qmodel, tmp_path / "m.onnx"))
    # every Linear / patch embedding and every q·kᵀ runs as an integer matmul; attn·V (log2
    # probabilities, emulated in float) is the only float matmul left
    n_lin, n_att = n_linear_like(qmodel), n_attention(qmodel)
    assert report.integer_ops.get("MatMulIntegerToFloat", 0) == n_lin + n_att, report.table()
    # ORT folds the level's scalar Mul (delta) into attn·V: a FusedMatMul
    assert report.float_matmul_ops == {"FusedMatMul": n_att}, report.table()
    assert report.weight_bits == ({"W8": n_lin} if w_bits == 8 else {"W4": n_lin - 2, "W8": 2})
    assert report.act_bits == {"A8": 3 * n_att + n_lin}
    assert report.max_abs_diff is not None and report.agreement >= 75.0
    assert "emulated" in report.softmax
    text = report.table()
    assert "MatMulIntegerToFloat" in text and "integer" in text
    # dynamic batch
    sess = make_session(tmp_path / "m.onnx")
    for bs in (1, 3):
        assert sess.run(None, {"input": np.zeros((bs, 1, 28, 28), np.float32)})[0].shape == (bs, 10)


@pytest.mark.parametrize("rounding", ["onnx", "torch"])
def test_sub8bit_activations_exact(tmp_path, calib, rounding):
    """W4A4 (naive preset, no log2): 4-bit codes in uint8 + integer Clip, same function."""
    qmodel = quantized("vit", 4, 4, calib, preset="minmax")
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, rounding=rounding)
    assert report.integer_ops == {"MatMulIntegerToFloat": n_linear_like(qmodel) + n_attention(qmodel)}
    assert_matches(compare(qmodel, tmp_path / "m.onnx"))
    assert report.act_bits == {"A4": 14, "A8": 2}
    assert report.graph_ops.get("Clip", 0) >= 14
    assert "no post-softmax quantizer" in report.softmax
    # psaq: attention probabilities are float, so attn·V stays a float matmul
    assert report.float_matmul_ops == {"MatMul": 2}



def _code_dtypes(path) -> set[int]:
    proto = onnx.load(str(path))
    return {i.data_type for i in proto.graph.initializer if "_export_codes" in i.name}


@pytest.mark.parametrize("w_bits,expected", [(3, onnx.TensorProto.INT8), (4, onnx.TensorProto.INT8),
                                             (6, onnx.TensorProto.INT8), (8, onnx.TensorProto.UINT8)])
def test_weight_container_by_bits(tmp_path, calib, monkeypatch, w_bits, expected):
    """<= 7-bit weights travel as int8 centred on zero (AVX2's fast u8*s8 kernel cannot saturate
    on them), 8-bit weights as uint8: ORT's outputs are bit for bit those of the all-uint8
    container, on any x86 CPU."""
    qmodel = quantized("vit", w_bits, 8, calib, preset="repq-comp", first_last_bits=None)
    export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG)
    assert _code_dtypes(tmp_path / "m.onnx") == {expected}
    monkeypatch.setattr(onnx_export, "SIGNED_CONTAINER_MAX_BITS", 0)   # every weight in uint8
    export_onnx(qmodel, tmp_path / "u8.onnx", DATA_CONFIG)
    assert _code_dtypes(tmp_path / "u8.onnx") == {onnx.TensorProto.UINT8}
    x = {"input": np.random.default_rng(w_bits).standard_normal((16, 1, 28, 28)).astype(np.float32) * 2}
    got, reference = (make_session(tmp_path / f).run(None, x)[0] for f in ("m.onnx", "u8.onnx"))
    np.testing.assert_array_equal(got, reference)


def _cpu_has_vnni() -> bool:
    """dfqvit's own detection: the bound test below checks it against what ORT's kernel does."""
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo flags")
    return has_int32_dot()


@pytest.mark.parametrize("signed_bits", [7, 8])
def test_int8_container_bound_in_onnx_runtime(signed_bits):
    """The bound behind the container rule, in ORT's own kernel: uint8 activations at 255 times
    int8 weights at the 7-bit extremes (-64, 63) sum exactly; at the 8-bit extremes a CPU
    without VNNI saturates its int16 pair sums (exact there only with VNNI / AMX)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    m, k, n = 64, 256, 32
    lo, hi = -(2 ** (signed_bits - 1)), 2 ** (signed_bits - 1) - 1
    a = np.full((m, k), 255, np.uint8)
    b = np.where(rng.random((k, n)) < 0.5, lo, hi).astype(np.int8)
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.ones(n, np.float32), "bs"),
             numpy_helper.from_array(np.array(1.0, np.float32), "as"),
             numpy_helper.from_array(np.array(0, np.uint8), "az"), numpy_helper.from_array(np.zeros(n, np.int8), "bz")]
    node = helper.make_node("MatMulIntegerToFloat", ["a", "b", "as", "bs", "az", "bz"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    got = make_session(proto.SerializeToString()).run(None, {"a": a})[0]
    exact = np.array_equal(got, (a.astype(np.int64) @ b.astype(np.int64)).astype(np.float32))
    assert exact == (signed_bits <= 7 or _cpu_has_vnni())


def test_int8_vnni_format_puts_8bit_weights_in_int8(tmp_path, calib):
    """``weight_format="int8-vnni"``: 8-bit weights in int8 too, the same integer kernels as the
    default export, and a note saying where it is exact; on a CPU with VNNI, ORT's outputs are
    bit for bit those of the portable uint8 container (without VNNI the kernel saturates, as the
    bound test above shows)."""
    qmodel = quantized("vit", 8, 8, calib, preset="repq-comp", first_last_bits=None)
    portable = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, verify=False)
    vnni = export_onnx(qmodel, tmp_path / "v.onnx", DATA_CONFIG, weight_format="int8-vnni", verify=False)
    assert _code_dtypes(tmp_path / "m.onnx") == {onnx.TensorProto.UINT8}
    assert _code_dtypes(tmp_path / "v.onnx") == {onnx.TensorProto.INT8}
    assert vnni.integer_ops == portable.integer_ops and vnni.integer_ops.get("MatMulIntegerToFloat")
    assert any("int8-vnni" in note and "VNNI" in note for note in vnni.notes)
    assert not any("weight_format int8-vnni" in note for note in vnni.notes)
    if _cpu_has_vnni():
        x = {"input": np.random.default_rng(8).standard_normal((16, 1, 28, 28)).astype(np.float32) * 2}
        got, reference = (make_session(tmp_path / f).run(None, x)[0] for f in ("v.onnx", "m.onnx"))
        np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize("int32_dot", [False, True])
def test_portable_w8_export_points_to_int8_vnni_where_it_pays(tmp_path, calib, monkeypatch, int32_dot):
    """On a CPU with VNNI / AMX the default uint8 container for 8-bit weights is the slow kernel:
    the report says so (W8 only; W4 weights are in int8 already)."""
    monkeypatch.setattr(onnx_export, "has_int32_dot", lambda: int32_dot)
    w8 = export_onnx(quantized("vit", 8, 8, calib, first_last_bits=None), tmp_path / "w8.onnx", DATA_CONFIG, verify=False)
    w4 = export_onnx(quantized("vit", 4, 8, calib, first_last_bits=None), tmp_path / "w4.onnx", DATA_CONFIG, verify=False)
    assert any("int8-vnni" in note and "twice as fast" in note for note in w8.notes) == int32_dot
    assert not any("twice as fast" in note for note in w4.notes)


def _export_fn(tmp_path, fn, x, name="f.onnx"):
    class M(nn.Module):
        def forward(self, t):
            return fn(t)

    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(M(), (x,), str(path), dynamo=False, opset_version=17, input_names=["input"])
    return make_session(path).run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("torch_rounding", [False, True])
def test_activation_qdq_function_exact_per_value(tmp_path, bits, torch_rounding):
    """One quantizer, 400k values: the same codes as torch's fake-quant (textbook QDQ: except
    at float rounding ties, one step; torch rounding: bit for bit)."""
    qmin, qmax = P.qrange(bits, False)
    lo, hi = torch.tensor([-1.3]), torch.tensor([2.1])
    scale, zp = P.scale_zero_point(lo, hi, bits, symmetric=False)
    s, z = float(scale), int(zp)
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(bits)) * 2
    x[:1000] = (torch.arange(1000) % (qmax + 3) - z + 0.5 - 1) * scale  # exact half-steps (ties)
    expected = P.fake_quant(x, scale, zp, qmin, qmax)
    got = _export_fn(tmp_path, lambda t: QDQFunction.apply(t, s, z, qmin, qmax, torch_rounding), x)
    mismatch = got != expected.numpy()
    if torch_rounding:
        assert not mismatch.any()
    else:
        assert mismatch.mean() < 1e-2
        assert np.all(np.abs(got - expected.numpy())[mismatch] <= s * 1.0001)  # one step, at a tie
    codes = np.round(got / np.float32(s)) + z
    assert codes.min() >= qmin and codes.max() <= qmax


@pytest.mark.parametrize("bits", [4, 8])
def test_log2_emulation_same_levels(tmp_path, bits):
    """The log-√2 quantizer emulated with float ops: the same codes except at code boundaries,
    each level within a few float ulps of torch's, and exact zeros where torch has them."""
    x = torch.softmax(torch.randn(64, 50, 50, generator=torch.Generator().manual_seed(bits)) * 3, -1)
    x[0, 0, :5] = 0.0  # exact zeros -> the zero code (4 bits), the clamp's code 199 (8 bits)
    x[1, 0, :5] = 2.0 * x.max()  # above delta -> code 0, the level delta itself
    delta = float(x.max() * 0.45)
    expected = P.log2_fake_quant(x, torch.tensor(delta), bits).numpy()
    codes = P.log2_codes(x, torch.tensor(delta), bits).numpy()
    for exact_levels in (False, True):
        got = _export_fn(tmp_path, lambda t: Log2Function.apply(t, delta, bits, exact_levels), x)
        got_codes = np.where(got > 0, np.round(-2 * np.log2(np.maximum(got, 1e-38) / delta)), 2 ** bits)
        assert (got_codes != codes).mean() < 1e-4            # only inputs within rounding of a boundary
        same = got_codes == codes
        if exact_levels:
            assert np.array_equal(got[same], expected[same])
        else:   # exp(-q ln2 / 2): the rounding of q * (ln2 / 2) grows with the code q
            assert np.all(np.abs(got - expected)[same] <= (1e-6 + 3e-8 * codes[same]) * expected[same])
        assert np.array_equal(got == 0, expected == 0)
        assert np.isclose(got[1, 0, 0], delta, rtol=1e-6)


def test_log2_uint8_approximation(tmp_path, calib):
    """uint8 mode: attn·V becomes an integer matmul too; documented as an approximation."""
    qmodel = quantized("vit", 8, 8, calib)
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, log2_softmax="uint8")
    assert "APPROXIMATED" in report.softmax
    assert report.float_matmul_ops == {}
    assert sum(report.integer_ops.values()) == n_linear_like(qmodel) + 2 * n_attention(qmodel)
    stats = compare(qmodel, tmp_path / "m.onnx", n=128)
    assert stats["agreement"] >= 90.0 and stats["max_rel"] <= 0.2, stats
    float_report = export_onnx(qmodel, tmp_path / "f.onnx", DATA_CONFIG, log2_softmax="float", analyze=False)
    assert "dropped" in float_report.softmax


def test_int4_weights_opset21(tmp_path, calib):
    qmodel = quantized("vit", 4, 8, calib)
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, opset=21, weight_format="int4")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    int4 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT4]
    assert sum("_export_codes" in i.name for i in int4) == 8  # the 8 4-bit layers (zero points are shared)
    assert proto.opset_import[0].version == 21
    assert_matches(compare(qmodel, tmp_path / "m.onnx"))
    assert any("UINT4" in n for n in report.notes)
    assert (tmp_path / "m.onnx").stat().st_size < export_onnx(
        qmodel, tmp_path / "m8.onnx", DATA_CONFIG, opset=21, analyze=False, verify=False).file_bytes


def test_weight_only_int4_runs_as_matmulnbits(tmp_path, calib):
    """Float activations + <=4-bit weights in UINT4: ORT fuses each into MatMulNBits (#21's W4 path)."""
    qmodel = quantized("vit", 4, 32, calib)
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, opset=21, weight_format="int4")
    assert report.ort_ops.get("MatMulNBits") == 8, report.ort_ops      # every 4-bit layer
    assert any("MatMulNBits" in n and "accuracy_level" in n for n in report.notes)
    assert report.agreement == 100.0 and report.max_abs_diff < 0.05   # int8 activations inside the kernel
    # accuracy level 0: the kernel computes in fp32 on exactly the simulation's weights
    from dfqvit.export.ort import make_session

    session = make_session(tmp_path / "m.onnx", 1, config={"session.qdq_matmulnbits_accuracy_level": "0"})
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = qmodel(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert (got - expected).abs().max() < 1e-4


def test_opset13_and_float_layers_stay_float(tmp_path, calib):
    qmodel = quantized("vit", 4, 8, calib, exclude=("blocks.1.mlp.*",))
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, opset=13)
    assert_matches(compare(qmodel, tmp_path / "m.onnx"))
    assert report.float_layers == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert report.float_matmul_ops.get("MatMul", 0) == 2 + 2  # attn·V x2, excluded MLP x2


def test_activation_correction_exports_as_float(tmp_path, calib):
    acm = pytest.importorskip("dfqvit.acm")
    fp = _model("vit")
    qmodel = quantize(fp, QuantConfig(w_bits=4, a_bits=8, preset="repq"), calib)[0]
    acm.fit_corrections(qmodel, fp, calib, acm.ACMConfig(kind="full"), progress=False)
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG)
    assert_matches(compare(qmodel, tmp_path / "m.onnx"))
    assert report.integer_ops.get("MatMulIntegerToFloat", 0) == n_linear_like(qmodel) + n_attention(qmodel)


def test_metadata_and_float_export(tmp_path, calib):
    qmodel = quantized("vit", 8, 8, calib)
    export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, analyze=False, verify=False, metadata={"extra": {"a": 1}})
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["data_config"]["input_size"] == [1, 28, 28] and meta["extra"] == {"a": 1}
    fp = _model("vit")
    export_float_onnx(fp, tmp_path / "fp.onnx", DATA_CONFIG)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(make_session(tmp_path / "fp.onnx").run(None, {"input": x.numpy()})[0],
                                   fp(x).numpy(), atol=1e-4)
    with pytest.raises(UserError, match="quantized"):
        export_float_onnx(qmodel, tmp_path / "x.onnx", DATA_CONFIG)


def _no_leftovers(directory, allowed=()):
    return sorted(p.name for p in directory.iterdir() if p.name not in allowed) == []


def test_unquantized_or_uncalibrated_model_refused(tmp_path):
    with pytest.raises(UserError, match="not quantized"):
        export_onnx(_model("vit"), tmp_path / "m.onnx", DATA_CONFIG)
    uncalibrated, _ = quantize_model(_model("vit"), QuantConfig(w_bits=4, a_bits=8))
    with pytest.raises(UserError, match="not calibrated"):
        export_onnx(uncalibrated, tmp_path / "m.onnx", DATA_CONFIG)
    assert _no_leftovers(tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    ({"opset": 12}, "opset"),
    ({"opset": 22}, "opset"),
    ({"weight_format": "int4"}, "opset 21"),
    ({"weight_format": "fp8"}, "weight format"),
    ({"log2_softmax": "exact"}, "log2"),
    ({"rounding": "up"}, "rounding"),
])
def test_bad_settings(tmp_path, calib, kwargs, match):
    qmodel = quantized("vit", 8, 8, calib)
    with pytest.raises(UserError, match=match):
        export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, **kwargs)
    with pytest.raises(UserError, match="input_size"):
        export_onnx(qmodel, tmp_path / "m.onnx", {})
    assert _no_leftovers(tmp_path)


def test_existing_file_and_failure_leave_no_partial_file(tmp_path, calib, monkeypatch):
    qmodel = quantized("vit", 8, 8, calib)
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        export_onnx(qmodel, out, DATA_CONFIG)
    assert out.read_text() == "keep me"
    import dfqvit.export.onnx_export as ox

    def boom(*a, **k):
        raise RuntimeError("ORT crashed")

    monkeypatch.setattr(ox, "optimized_op_counts", boom)
    with pytest.raises(RuntimeError):
        export_onnx(qmodel, out, DATA_CONFIG, force=True)
    assert out.read_text() == "keep me"  # not replaced by a half-checked export
    with pytest.raises(RuntimeError):
        export_onnx(qmodel, tmp_path / "new.onnx", DATA_CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # the model is restored after an export (quantizer forwards, no leftover export buffers)
    assert not any("_export_" in k for k in qmodel.state_dict())
    assert all("forward" not in m.__dict__ for m in qmodel.modules())


def test_profile_ops(tmp_path, calib):
    import onnxruntime as ort

    from dfqvit.export import profile_ops
    from dfqvit.export.ort import session_options

    qmodel = quantized("vit", 8, 8, calib)
    export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, analyze=False, verify=False)
    rows = profile_ops(lambda prefix: ort.InferenceSession(str(tmp_path / "m.onnx"), session_options(1, profile_prefix=prefix),
                                                           providers=["CPUExecutionProvider"]),
                       {"input": np.zeros((2, 1, 28, 28), np.float32)}, runs=3, warmup=1)
    ops = {op: nodes for op, _, nodes in rows}
    assert ops["MatMulIntegerToFloat"] == 12 and all(ms >= 0 for _, ms, _ in rows)


def test_bench_latency_smoke(tmp_path):
    """benchmarks/bench_latency.py end to end on the tiny ViT (2 timed runs): every runtime row,
    ORT's own quantize_static, the weight-only int4 export, ratios to ORT FP32."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_latency.py"
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(script), "--models", VIT_NAME, "--model-kwargs",
                        *[f"{k}={v}" for k, v in VIT_KWARGS.items()], "--runs", "2", "--warmup", "1",
                        "--settings", "W8A8", "W4A8", "--quantize-static", "--weight-only-int4",
                        "--batch-sizes", "1", "4", "--markdown", "--profile", "--results-file", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| PyTorch FP32 |" in r.stdout and "/ ORT FP32" in r.stdout and "ORT profile" in r.stdout
    assert "AVX2" in r.stdout
    result = json.loads(out.read_text())["models"][VIT_NAME]
    rows = set(result["median_ms"])
    assert rows >= {"PyTorch FP32", "ONNX Runtime FP32", "ORT quantize_static int8 (QDQ, per-channel)",
                    "dfqvit W4 weight-only (int4, MatMulNBits)"}
    assert any(name.startswith("dfqvit W8A8") for name in rows) and any(name.startswith("dfqvit W4A8") for name in rows)
    static = result["export"]["ORT quantize_static int8 (QDQ, per-channel)"]["ort_ops"]
    assert static.get("MatMulIntegerToFloat", 0) + static.get("QLinearMatMul", 0) > 0, static
    assert result["export"]["dfqvit W4 weight-only (int4, MatMulNBits)"]["ort_ops"].get("MatMulNBits")


@pytest.mark.parametrize("name", ["vit", "swin"])
@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (4, 4)])
def test_default_preset_exports_exactly(tmp_path, calib, name, w_bits, a_bits):
    """repq-comp (the default): GPTQ-rounded weights and folded LayerNorm inputs with a rounded
    zero point are an exact b-bit integer model; with torch's rounding the export matches.
    Below 8 bits q and k carry one range per token, and q·kᵀ still runs as an integer matmul."""
    qmodel = quantized(name, w_bits, a_bits, calib, preset="repq-comp")
    per_token = [n for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer) and m.scale.numel() > 1]
    assert len(per_token) == (2 * n_attention(qmodel) if a_bits < 8 else 0)
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, rounding="torch")
    assert_matches(compare(qmodel, tmp_path / "m.onnx"))
    assert not any("fractional zero point" in n for n in report.notes)
    assert report.integer_ops.get("MatMulIntegerToFloat", 0) == n_linear_like(qmodel) + n_attention(qmodel), \
        report.table()


def test_centred_token_codes_are_the_quantizers_codes():
    """The export form of a per-token quantizer: its codes centred on each token's zero point,
    bit for bit the simulation's ``q(x) / s_t``, shifted into one uint8 container; where zero
    points spread too far for one byte the codes stay float (and the matmul with them)."""
    x = torch.randn(2, 3, 9, 5, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 4, 9).reshape(9, 1)
    q = ActQuantizer(4, method="percentile", token_axis=2)
    q.calibrate_on(x)
    fn, scale, in_one_byte = qdq._centred_codes(q)
    codes = fn(x)
    assert torch.equal(codes * scale.reshape(9, 1), q(x)) and in_one_byte
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 15
    wide = ActQuantizer(8, token_axis=2)       # 8 bits, zero points 0 and 128: 383 codes in all
    wide.set_scale_zero_point(torch.tensor([0.01, 0.05]), torch.tensor([128.0, 0.0]))
    fn, scale, in_one_byte = qdq._centred_codes(wide)
    y = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1)) * 5
    assert not in_one_byte and torch.equal(fn(y) * scale.reshape(2, 1), wide(y))


def test_token_codes_wider_than_a_byte_export_as_float(tmp_path, calib):
    """An 8-bit per-token q whose zero points spread over the grid does not fit one byte: its
    codes and that one q·kᵀ stay float in ONNX Runtime, and still match the simulation."""
    qmodel = copy.deepcopy(quantized("vit", 4, 4, calib, preset="repq-comp"))
    q = next(m for m in qmodel.modules() if hasattr(m, "matmul_qk")).matmul_qk.a_quant
    q.bits = 8
    zero_points = torch.tensor([0.0, 128.0]).repeat(q.scale.numel())[: q.scale.numel()]
    q.set_scale_zero_point(q.scale / 16, zero_points)
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, rounding="torch")
    assert_matches(compare(qmodel, tmp_path / "m.onnx"))
    assert report.integer_ops.get("MatMulIntegerToFloat", 0) == n_linear_like(qmodel) + n_attention(qmodel) - 1


def test_token_ranges_along_a_reduction_axis_refused(tmp_path, calib):
    """Per-token ranges factor out of q·kᵀ only along its rows (q) and columns (kᵀ)."""
    qmodel = copy.deepcopy(quantized("vit", 4, 4, calib, preset="repq-comp"))
    attention = next(m for m in qmodel.modules() if hasattr(m, "matmul_qk"))
    attention.matmul_qk.a_quant.token_axis = 1
    with pytest.raises(UserError, match="do not factor out"):
        export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG)
    assert _no_leftovers(tmp_path)


def test_repq_vit_fractional_zero_points_are_reported(tmp_path, calib):
    """repq-vit keeps RepQ-ViT's fractional zero points on the folded inputs: the export rounds
    them and says so (an approximation there, measured on the zoo in docs/RESULTS.md)."""
    qmodel = quantized("vit", 4, 8, calib, preset="repq-vit")
    report = export_onnx(qmodel, tmp_path / "m.onnx", DATA_CONFIG, analyze=False, verify=False)
    assert any("4 activation quantizers have a fractional zero point" in n for n in report.notes), report.notes
