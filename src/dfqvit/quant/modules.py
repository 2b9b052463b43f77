"""Quantized modules and the float → quantized registry.

Each quantized module is built from its float twin by ``from_float`` and keeps the twin's
parameters under the same names, so a float state dict loads into it. Attention modules
compute q·kᵀ and attn·V explicitly (no fused SDPA) so both matmuls are quantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from .config import QuantScheme
from .quantizers import ActQuantizer, Log2Quantizer, WeightQuantizer

QUANT_MODULES: dict[type, type] = {}


@dataclass(frozen=True)
class LayerBits:
    """Bit-widths for one module: weights and its input activations."""

    w_bits: int
    a_bits: int


def register(float_type: type) -> Callable[[type], type]:
    """Class decorator: ``float_type`` modules are replaced by the decorated class."""
    def wrap(qcls):
        QUANT_MODULES[float_type] = qcls
        return qcls
    return wrap


class QuantModuleMixin:
    """Marks quantized modules; ``kind`` names them in coverage reports."""

    kind: str = "module"


class InputFold(nn.Module):
    """The per-channel map ``x' = (x + shift) / divisor`` in front of a Linear's input quantizer,
    for an input that no LayerNorm feeds (post-GELU, attention output): RepQ-ViT's LayerNorm
    reparameterization with the map kept as an op instead of folded into the norm (ours, see
    :func:`dfqvit.quant.reparam.fold_into_linear`). The Linear's weight and bias absorb its
    inverse, so the per-tensor quantizer of ``x'`` is a per-channel quantizer of ``x`` while the
    integer matmul stays per tensor. Identity (and skipped) until set."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(channels))
        self.register_buffer("divisor", torch.ones(channels))
        self.active = False

    def set(self, shift: torch.Tensor, divisor: torch.Tensor) -> None:
        self.shift.copy_(shift)
        self.divisor.copy_(divisor)
        self._sync_active()

    def _sync_active(self) -> None:
        # A Python flag, so that the forward never has to inspect the tensors (no device sync).
        self.active = bool((self.shift != 0).any() or (self.divisor != 1).any())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_active()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.shift) / self.divisor if self.active else x

    def extra_repr(self) -> str:
        return f"channels={self.shift.numel()}, active={self.active}"


@register(nn.Linear)
class QLinear(QuantModuleMixin, nn.Linear):
    kind = "linear"

    @classmethod
    def from_float(cls, mod: nn.Linear, bits: LayerBits, scheme: QuantScheme) -> "QLinear":
        # Always with a bias: LayerNorm reparameterization may need to fold a shift into it.
        q = cls(mod.in_features, mod.out_features, bias=True, device=mod.weight.device, dtype=mod.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(mod.weight)
            q.bias.copy_(mod.bias if mod.bias is not None else torch.zeros_like(q.bias))
        q.input_fold = InputFold(mod.in_features).to(mod.weight.device)
        q.input_quant = ActQuantizer(bits.a_bits, method=scheme.a_method)
        q.weight_quant = WeightQuantizer(bits.w_bits, mod.out_features, symmetric=scheme.w_symmetric,
                                         method=scheme.w_method)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(self.input_fold(x)), self.weight_quant(self.weight), self.bias)


@register(nn.Conv2d)
class QConv2d(QuantModuleMixin, nn.Conv2d):
    kind = "conv"

    @classmethod
    def from_float(cls, mod: nn.Conv2d, bits: LayerBits, scheme: QuantScheme) -> "QConv2d":
        q = cls(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None,
                padding_mode=mod.padding_mode, device=mod.weight.device, dtype=mod.weight.dtype)
        q.load_state_dict(mod.state_dict())
        q.input_quant = ActQuantizer(bits.a_bits, method=scheme.a_method)
        q.weight_quant = WeightQuantizer(bits.w_bits, mod.out_channels, symmetric=scheme.w_symmetric,
                                         method=scheme.w_method)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QMatMul(QuantModuleMixin, nn.Module):
    """``a @ b`` with both operands quantized (a quantizer may be float: bits 32)."""

    kind = "matmul"

    def __init__(self, a_quant: nn.Module, b_quant: nn.Module):
        super().__init__()
        self.a_quant, self.b_quant = a_quant, b_quant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quant(a) @ self.b_quant(b)


def _attention_matmuls(bits: LayerBits, scheme: QuantScheme) -> tuple[QMatMul, QMatMul]:
    """q·kᵀ (both uniform; with ``scheme.token_ranges`` below 8 bits one range per token of q
    and of kᵀ) and attn·V (log-√2 or float attention probabilities, uniform V).

    Below 8 bits the codes of all tokens, each centred on its own zero point, fit one byte, so
    the export keeps q·kᵀ an integer matmul (:mod:`dfqvit.export.qdq`); at 8 bits they would
    not, and per-tensor ranges lose little there."""
    per_token = scheme.token_ranges and bits.a_bits < 8
    q_axis, k_axis = (2, 1) if per_token else (None, None)   # q: (..., N, d); kᵀ: (..., d, N)
    qk = QMatMul(ActQuantizer(bits.a_bits, method=scheme.a_method, token_axis=q_axis),
                 ActQuantizer(bits.a_bits, method=scheme.a_method, token_axis=k_axis))
    probs = Log2Quantizer(bits.a_bits, method=scheme.a_method) if scheme.log2_softmax else ActQuantizer(32)
    av = QMatMul(probs, ActQuantizer(bits.a_bits, method=scheme.a_method))
    return qk, av


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` (created bare) all attributes and submodules of ``old``."""
    new.__dict__.update({k: v for k, v in old.__dict__.items() if k != "_modules"})
    new._modules = dict(old._modules)
    return new


class QuantAttentionMixin(QuantModuleMixin):
    """Built from a float attention module: same parameters and submodules, plus the two
    quantized matmuls (``matmul_qk``, ``matmul_av``) that the subclass's forward uses."""

    kind = "attention"

    @classmethod
    def from_float(cls, mod: nn.Module, bits: LayerBits, scheme: QuantScheme):
        q = _adopt(cls.__new__(cls), mod)
        q.matmul_qk, q.matmul_av = _attention_matmuls(bits, scheme)
        return q


@register(Attention)
class QAttention(QuantAttentionMixin, Attention):
    """timm ``Attention`` (ViT / DeiT, any number of prefix tokens) with explicit, quantized matmuls."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        if is_causal:
            attn = attn + attn.new_full((N, N), float("-inf")).triu_(1)
        elif attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul_av(attn, v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@register(WindowAttention)
class QWindowAttention(QuantAttentionMixin, WindowAttention):
    """Swin ``WindowAttention`` (relative position bias, shifted-window mask), quantized matmuls."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1)) + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul_av(attn, v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
