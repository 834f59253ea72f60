"""Modules and functions of lowered graphs: integer weights, int8 kernels or reference math.

A :class:`QuantizedLayer` replaces one quantized Conv2d / Linear. It stores the integer weights
with their exact range (``weight_quant_min`` .. ``weight_quant_max``), one set per input group,
and runs in one of two forms:

- ``"int8"``: inputs are uint8 tensors (from :func:`quantize_uint8`); onednn's u8 x s8 kernels
  accumulate in integers and rescale to a float32 output (no output requantization), with weights
  ``W_int - zero_point`` as int8.
- ``"reference"``: inputs are dequantized float tensors (``quantized_decomposed`` quantize /
  dequantize nodes in the graph); the weight is dequantized per channel, ``(W_int - z) * s``
  (the arithmetic of ``quantized_decomposed.dequantize_per_channel``), and the float conv /
  linear runs. This is the bit-exact specification of the int8 form.
"""

from __future__ import annotations

import functools

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.nn.functional as F

from dmq_fx.errors import TimestepOutOfGridError
from dmq_fx.observers import nearest_grid_index

__all__ = [
    "QDQ_OPS",
    "QuantizedLayer",
    "SELECT_TIMESTEP_ENTRY_OP",
    "cpu_has_int8_dot_product",
    "int16_pair_bound",
    "quantize_uint8",
    "quantize_uint8_per_channel",
    "select_timestep_entry",
]

#: Largest int16: AVX2 int8 kernels saturate pairs of u8 x s8 products above it.
INT16_MAX = 32767


def quantize_uint8(
    x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int
) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, quant_min, quant_max)`` as uint8.

    The same integers as ``quantized_decomposed.quantize_per_tensor`` (same ``x * (1 / scale)``
    arithmetic) in fewer passes, and without creating deprecated quint8 tensors.
    """
    return (
        torch.round(x * (1.0 / scale)).add_(zero_point).clamp_(quant_min, quant_max).to(torch.uint8)
    )


def quantize_uint8_per_channel(
    x: torch.Tensor,
    inv_steps: torch.Tensor,
    zero_point: int,
    axis: int,
    quant_min: int,
    quant_max: int,
) -> torch.Tensor:
    """``clamp(round(x * inv_steps[c]) + zero_point, quant_min, quant_max)`` as uint8, one step
    per channel along ``axis`` (``inv_steps`` = ``1 / steps`` in float32): the integers of
    ``quantized_decomposed.quantize_per_channel`` with the steps, without its permutes and
    copies (the LES and PTS quantize steps of int8 layers)."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return (
        torch.round(x * inv_steps.view(shape))
        .add_(zero_point)
        .clamp_(quant_min, quant_max)
        .to(torch.uint8)
    )


def _qdq_ops() -> frozenset:
    qd = torch.ops.quantized_decomposed
    return frozenset(
        {
            quantize_uint8,
            quantize_uint8_per_channel,
            qd.quantize_per_tensor.default,
            qd.quantize_per_tensor.tensor,
            qd.dequantize_per_tensor.default,
            qd.dequantize_per_tensor.tensor,
            qd.quantize_per_channel.default,
            qd.dequantize_per_channel.default,
        }
    )


#: the ops ``convert_fx`` puts between a float tensor and a :class:`QuantizedLayer`
QDQ_OPS = _qdq_ops()


def select_timestep_entry(timestep, grid: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The row of ``table`` for the calibrated timestep nearest to the call's ``timestep``.

    A lowered graph quantizes a whole batch with one entry, so every sample of the call must
    share one timestep (samplers call the UNet so); a timestep outside the calibrated range or a
    mix raises :class:`~dmq_fx.errors.TimestepOutOfGridError`. The choice is a custom op
    (``dmq_fx::select_timestep_entry``, with a fake kernel), so ``torch.compile`` keeps it in one
    graph: the index depends on the timestep's value.
    """
    return _select_timestep_entry(torch.as_tensor(timestep), grid, table)


@torch.library.custom_op("dmq_fx::select_timestep_entry", mutates_args=())
def _select_timestep_entry(
    timestep: torch.Tensor, grid: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    t = timestep.reshape(-1)
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise TimestepOutOfGridError(
            "a lowered graph with per-timestep activation tables quantizes a batch with one "
            f"table entry: call it with one timestep per batch, got {t.unique().tolist()}"
        )
    return table[int(nearest_grid_index(grid, t[:1])[0])].clone()  # (a custom op's output
    # must not alias its input)


#: the op a lowered graph calls for the table choice (exporters translate it)
SELECT_TIMESTEP_ENTRY_OP = _select_timestep_entry._opoverload


@_select_timestep_entry.register_fake
def _(timestep: torch.Tensor, grid: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table.new_empty(table.shape[1:])


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


@functools.cache
def cpu_features() -> str:
    """The CPU's int8 features as benchmarks print them, e.g. ``"AVX-512 VNNI, AMX-INT8"`` or
    ``"AVX2 only (no VNNI / AMX)"``."""
    flags = _cpu_flags()
    named = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
    found = [label for flag, label in named.items() if flag in flags]
    if found:
        return ", ".join(found)
    return "AVX2 only (no VNNI / AMX)" if "avx2" in flags else "no AVX2 / VNNI / AMX"


@functools.cache
def cpu_has_int8_dot_product() -> bool:
    """Whether onednn's int8 kernels here add u8 x s8 products in int32 (VNNI / AMX).

    Without VNNI / AMX (AVX2, or AVX-512 without VNNI) they add pairs of products in int16 with
    saturation, so a layer is exact only if no pair can exceed 32767 (:func:`int16_pair_bound`).
    Decided by running one such kernel: a 64-long dot product of 255 x 127 pairs, exact only
    without saturation. (The CPU's flags can differ from what onednn dispatches, e.g. under
    ``ONEDNN_MAX_CPU_ISA=AVX2``.)
    """
    if not torch.backends.mkldnn.is_available():
        return False
    x = torch.full((1, 64), 255, dtype=torch.uint8)
    w = torch.full((1, 64), 127, dtype=torch.int8)
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        out = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, packed, torch.ones(1), torch.zeros(1, dtype=torch.int32), None,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
    except RuntimeError:  # no onednn int8 kernel at all: nothing to dispatch to
        return False
    return float(out) == 255.0 * 127 * 64


def int16_pair_bound(weight_int8: torch.Tensor, act_quant_max: int) -> int:
    """Largest possible sum of two u8 x s8 products: ``act_quant_max`` x the two largest |w|."""
    w = weight_int8.reshape(weight_int8.shape[0], -1).abs().int()
    top = w.topk(min(2, w.shape[1]), dim=1).values.sum(1).max()
    return int(act_quant_max) * int(top)


class QuantizedLayer(torch.nn.Module):
    """A Conv2d or Linear with integer weights per input group (see module docstring)."""

    def __init__(
        self,
        float_layer: torch.nn.Module,
        weight_int: list[torch.Tensor],
        weight_scale: list[torch.Tensor],
        weight_zero_point: list[torch.Tensor],
        weight_quant_min: int,
        weight_quant_max: int,
        act_qparams: list[tuple[float, int, int, int]],
        form: str,
        float_type: str,
    ) -> None:
        super().__init__()
        if form not in ("int8", "reference"):
            raise ValueError(f"unknown form {form!r}")
        self.is_conv = isinstance(float_layer, torch.nn.Conv2d)
        if self.is_conv:
            self.stride, self.padding = list(float_layer.stride), list(float_layer.padding)
            self.dilation, self.groups = list(float_layer.dilation), float_layer.groups
        self.form = form
        self.float_type = float_type
        self.weight_quant_min, self.weight_quant_max = weight_quant_min, weight_quant_max
        self.act_qparams = [tuple(p) for p in act_qparams]
        self.num_groups = len(weight_int)
        bias = float_layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        for g in range(self.num_groups):
            self.register_buffer(f"weight_int_{g}", weight_int[g].clone())
            self.register_buffer(f"weight_scale_{g}", weight_scale[g].float().clone())
            self.register_buffer(f"weight_zero_point_{g}", weight_zero_point[g].int().clone())
        self._packed: list[torch.Tensor] | None = None

    # -- weights ---------------------------------------------------------------------------------
    def integer_weight(self, g: int) -> torch.Tensor:
        """Group ``g``'s weight as int8 ``W_int - zero_point`` (what the int8 kernel multiplies)."""
        w = getattr(self, f"weight_int_{g}").int()
        zp = getattr(self, f"weight_zero_point_{g}").view(-1, *([1] * (w.dim() - 1)))
        return (w - zp).to(torch.int8)

    def dequantized_weight(self, g: int) -> torch.Tensor:
        """``(W_int - zero_point) * scale`` per output channel, in float32.

        The arithmetic of ``quantized_decomposed.dequantize_per_channel`` (the same values),
        written out: under ``torch.compile`` inductor's x86 passes turn that op followed by a
        conv into an int8 kernel, and a reference-form layer must stay exact (on AVX2 the int8
        kernel could saturate exactly where this form was chosen to avoid it).
        """
        w = getattr(self, f"weight_int_{g}")
        shape = (-1,) + (1,) * (w.dim() - 1)
        zero_point = getattr(self, f"weight_zero_point_{g}").view(shape)
        return (w.int() - zero_point) * getattr(self, f"weight_scale_{g}").view(shape)

    def pack(self) -> None:
        """Pack the int8 weights for onednn now (otherwise done at the first call)."""
        self._packed_weights()

    def _packed_weights(self) -> list[torch.Tensor]:
        if self._packed is None:
            packed = []
            for g in range(self.num_groups):
                scale, zp = self.act_qparams[g][:2]
                if self.is_conv:
                    packed.append(
                        torch.ops.onednn.qconv_prepack(
                            self.integer_weight(g),
                            getattr(self, f"weight_scale_{g}"),
                            scale,
                            zp,
                            self.stride,
                            self.padding,
                            self.dilation,
                            self.groups,
                            None,
                        )
                    )
                else:
                    packed.append(torch.ops.onednn.qlinear_prepack(self.integer_weight(g), None))
            self._packed = packed
        return self._packed

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new integer weights: repack on next use
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state["_packed"] = None  # opaque onednn tensors: rebuilt on first use
        return state

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != self.num_groups:
            raise ValueError(f"expected {self.num_groups} inputs, got {len(inputs)}")
        if self.form == "reference":
            out = None
            for g, x in enumerate(inputs):
                w, b = self.dequantized_weight(g), self.bias if g == 0 else None
                y = (
                    F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
                    if self.is_conv
                    else F.linear(x, w, b)
                )
                out = y if out is None else out + y
            return out
        out = None
        for g, (x, packed) in enumerate(zip(inputs, self._packed_weights())):
            scale, zp = self.act_qparams[g][:2]
            w_scale = getattr(self, f"weight_scale_{g}")
            w_zp = torch.zeros_like(getattr(self, f"weight_zero_point_{g}"))
            b = self.bias if g == 0 else None
            if self.is_conv:
                y = torch.ops.onednn.qconv_pointwise(
                    x,
                    scale,
                    zp,
                    packed,
                    w_scale,
                    w_zp,
                    b,
                    self.stride,
                    self.padding,
                    self.dilation,
                    self.groups,
                    1.0,
                    0,
                    torch.float32,
                    "none",
                    [],
                    "",
                )
            else:
                y = torch.ops.onednn.qlinear_pointwise(
                    x, scale, zp, packed, w_scale, w_zp, b, 1.0, 0, torch.float32, "none", [], ""
                )
            out = y if out is None else out + y
        return out

    def extra_repr(self) -> str:
        bits = (self.weight_quant_max - self.weight_quant_min + 1).bit_length() - 1
        return f"{self.float_type}, form={self.form}, weight_bits={bits}, groups={self.num_groups}"
