"""Real integer deployment: ONNX QDQ export of calibrated quantized models, and what ONNX
Runtime really runs as integer kernels.

``export_onnx(qmodel, path, data_config, opset=17) -> ExportReport``
"""
from .onnx_export import (DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, ExportReport, export_float_onnx, export_onnx,
                          read_onnx_metadata, verify_against_torch)
from .ort import INTEGER_OPS, make_session, optimized_op_counts, profile_ops, split_counts
from .qdq import LOG2_MODES, WEIGHT_FORMATS, export_mode

__all__ = [
    "DEFAULT_OPSET", "INPUT_NAME", "INTEGER_OPS", "LOG2_MODES", "OUTPUT_NAME", "WEIGHT_FORMATS", "ExportReport",
    "export_float_onnx", "export_mode", "export_onnx", "make_session", "optimized_op_counts", "profile_ops",
    "read_onnx_metadata", "split_counts", "verify_against_torch",
]
