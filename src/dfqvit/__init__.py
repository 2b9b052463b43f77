"""dfqvit: data-free quantization of Vision Transformers (DFQ-ViT)."""
__version__ = "0.1.0"

from .errors import UserError
from .models import ModelSpec, build_model, load_model, resolve_data_config, resolve_spec

__all__ = ["UserError", "ModelSpec", "build_model", "load_model", "resolve_data_config", "resolve_spec"]
