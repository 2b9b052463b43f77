"""CPU feature detection for the integer kernels (its agreement with ORT's real kernel is checked
by tests/export/test_export_onnx.py::test_int8_container_bound_in_onnx_runtime)."""
import pytest

from dfqvit.export import cpu


@pytest.mark.parametrize("flags, int32_dot", [
    ({"sse2", "avx2"}, False),
    ({"avx2", "avx512f", "avx512bw"}, False),      # AVX-512 without VNNI still saturates
    ({"avx2", "avx_vnni"}, True),
    ({"avx512f", "avx512_vnni"}, True),
    ({"avx512f", "amx_tile", "amx_int8"}, True),
])
def test_int32_dot_from_flags(monkeypatch, flags, int32_dot):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: ("test CPU", frozenset(flags)))
    assert cpu.has_int32_dot() == int32_dot
    assert cpu.isa()["AVX2"] == ("avx2" in flags)
    assert cpu.cpu_name() == "test CPU"


def test_this_machine_reads():
    assert set(cpu.isa()) == set(cpu.ISA_FLAGS.values())
    assert isinstance(cpu.cpu_name(), str) and cpu.cpu_name()
