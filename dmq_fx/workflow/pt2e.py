"""pt2e: dmq_fx's quantization for ``torch.export`` users, through torchao's
``prepare_pt2e`` / ``convert_pt2e`` (torch.ao's FX mode is deprecated in torch 2.13).

Needs the optional ``torchao`` (``pip install --no-deps torchao==0.18.0`` beside the local
torch); importing this module without it raises ``ImportError`` with that line.

- :class:`DMQQuantizer` annotates the conv and linear nodes of an exported UNet that dmq_fx
  quantizes (not DMQ's float layers (docs/methods/quantizers.md)) with exact ``weight_bits`` /
  ``act_bits`` ranges:
  per-output-channel weights, per-tensor activations (as :func:`dmq_fx.get_default_qconfig`).
- With ``calibrated=`` (a graph after :func:`dmq_fx.calibrate`) it applies what dmq_fx learned
  instead of observing: each layer's activation step and zero point and its weight steps are
  fixed to dmq_fx's, and :func:`prepare_float_model` gives the model to export, with ``tau * W``
  replaced by its dequantized learned integers (so round-to-nearest at ``convert_pt2e``
  reproduces LES + AdaRound / FBR exactly) and ``x / tau`` before each LES layer.
- Not carried into pt2e (those layers stay float, listed in :attr:`DMQQuantizer.skipped`):
  power-of-two channel steps (PTS layers), split skip-concatenation layers (two weight step
  sets), per-timestep activation tables (a ConfigError).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx

try:
    from torchao.quantization.pt2e import MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        QuantizationSpec,
        Quantizer,
    )
except ImportError as e:  # pragma: no cover - exercised where torchao is missing
    raise ImportError("dmq_fx.pt2e needs torchao: pip install --no-deps torchao==0.18.0") from e

from dmq_fx.errors import ConfigError
from dmq_fx.graph.meta import ANNOTATION_KEY, quantized_layer_nodes
from dmq_fx.lowering.convert import integer_weights
from dmq_fx.observers import PowerOfTwoFakeQuantize, TimestepTableFakeQuantize
from dmq_fx.passes import input_quantizer_name
from dmq_fx.passes import weight_quantizer as weight_quantizer_of
from dmq_fx.quantize.qconfig import check_bits, is_float_module, weight_range

__all__ = ["DMQQuantizer", "export_unet", "prepare_float_model"]

_LAYER_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


class _FixedPerTensor(MinMaxObserver):
    """An observer whose qparams are given (dmq_fx's calibrated activation step)."""

    def __init__(self, *, scale: float, zero_point: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.register_buffer("fixed_scale", torch.tensor([scale], dtype=torch.float32))
        self.register_buffer("fixed_zero_point", torch.tensor([zero_point], dtype=torch.int32))

    def calculate_qparams(self):
        return self.fixed_scale, self.fixed_zero_point


class _FixedPerChannel(PerChannelMinMaxObserver):
    """A per-channel observer whose qparams are given (dmq_fx's weight steps)."""

    def __init__(self, *, scales: list[float], zero_points: list[int], **kwargs: Any):
        super().__init__(**kwargs)
        self.register_buffer("fixed_scale", torch.tensor(scales, dtype=torch.float32))
        self.register_buffer("fixed_zero_point", torch.tensor(zero_points, dtype=torch.int32))

    def calculate_qparams(self):
        return self.fixed_scale, self.fixed_zero_point


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


#: pt2e specs take plain integer dtypes where torch.ao observers take quantized ones
_PLAIN_DTYPE = {torch.qint8: torch.int8, torch.quint8: torch.uint8}


def _pt2e_weight_range(bits: int) -> tuple[torch.dtype, int, int, torch.qscheme]:
    dtype, quant_min, quant_max, qscheme = weight_range(bits)
    return _PLAIN_DTYPE[dtype], quant_min, quant_max, qscheme


def _layer_qparams(calibrated: fx.GraphModule) -> tuple[dict[str, dict], list[str]]:
    """Per layer name: activation (scale, zp, qmin, qmax), weight steps / zero points, and the
    layers pt2e cannot carry."""
    out, skipped = {}, []
    for node in quantized_layer_nodes(calibrated):
        spec = node.meta[ANNOTATION_KEY]
        name = str(node.target)
        if spec.timestep_table:
            raise ConfigError(
                f"layer {name!r} has per-timestep activation tables, which pt2e's static "
                "quantize nodes cannot select: prepare without timestep_tables for pt2e"
            )
        act = (
            calibrated.get_submodule(input_quantizer_name(node.target, 0, 1))
            if len(spec.input_groups) == 1
            else None
        )
        if act is None or isinstance(act, (PowerOfTwoFakeQuantize, TimestepTableFakeQuantize)):
            skipped.append(name)
            continue
        fq = weight_quantizer_of(calibrated.get_submodule(node.target)).fake_quants[0]
        out[name] = {
            "act": (float(act.scale), int(act.zero_point), act.quant_min, act.quant_max),
            "weight": (
                fq.scale.detach().float().reshape(-1).tolist(),
                fq.zero_point.detach().int().reshape(-1).tolist(),
            ),
            "weight_bits": spec.weight_bits,
            "act_bits": spec.act_bits,
        }
    return out, skipped


class DMQQuantizer(Quantizer):
    """A torchao pt2e ``Quantizer`` with dmq_fx's settings (see the module docstring).

    ``DMQQuantizer(weight_bits=4, act_bits=8)`` observes ranges itself (min/max);
    ``DMQQuantizer(calibrated=graph)`` takes every layer's qparams from a calibrated dmq_fx graph
    (export :func:`prepare_float_model` of it, not the plain float model).
    """

    def __init__(
        self,
        weight_bits: int = 8,
        act_bits: int = 8,
        *,
        calibrated: fx.GraphModule | None = None,
    ):
        super().__init__()
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.act_bits = check_bits(act_bits, "act_bits")
        self.layers: dict[str, dict] | None = None
        #: layers left float because pt2e cannot carry their dmq_fx form
        self.skipped: list[str] = []
        if calibrated is not None:
            self.layers, self.skipped = _layer_qparams(calibrated)

    def _specs(self, path: str) -> tuple[QuantizationSpec, QuantizationSpec] | None:
        if self.layers is not None:
            if path not in self.layers:
                return None
            layer = self.layers[path]
            scale, zp, qmin, qmax = layer["act"]
            act_ctr = _FixedPerTensor.with_args(scale=scale, zero_point=zp)
            wdtype, wmin, wmax, wscheme = _pt2e_weight_range(layer["weight_bits"])
            w_ctr = _FixedPerChannel.with_args(
                scales=layer["weight"][0], zero_points=layer["weight"][1]
            )
        else:
            if is_float_module(path):
                return None
            qmin, qmax = 0, 2**self.act_bits - 1
            act_ctr = MinMaxObserver
            wdtype, wmin, wmax, wscheme = _pt2e_weight_range(self.weight_bits)
            w_ctr = PerChannelMinMaxObserver
        act = QuantizationSpec(
            dtype=torch.uint8,
            observer_or_fake_quant_ctr=act_ctr,
            quant_min=qmin,
            quant_max=qmax,
            qscheme=torch.per_tensor_affine,
        )
        weight = QuantizationSpec(
            dtype=wdtype,
            observer_or_fake_quant_ctr=w_ctr,
            quant_min=wmin,
            quant_max=wmax,
            qscheme=wscheme,
            ch_axis=0,
        )
        return act, weight

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        """Annotate every conv / linear node dmq_fx quantizes: its input activation and its
        weight (``nn_module_stack`` of the exported graph names the layer)."""
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in _LAYER_OPS:
                continue
            path = _module_path(node)
            specs = None if path is None else self._specs(path)
            if specs is None:
                continue
            act, weight = specs
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={node.args[0]: act, node.args[1]: weight}, _annotated=True
            )
        return model

    def validate(self, model: fx.GraphModule) -> None:
        pass


def prepare_float_model(
    float_model: torch.nn.Module, calibrated: fx.GraphModule
) -> torch.nn.Module:
    """A copy of ``float_model`` that carries what ``calibrated`` learned, for torch.export:
    each quantized layer's weight becomes its dequantized learned integers on ``tau * W``
    (rounding included), and an LES layer divides its input by ``tau`` first (a forward
    pre-hook, captured by export). Layers pt2e cannot carry (:class:`DMQQuantizer`'s
    ``skipped``) stay as they are. ``float_model`` is not modified."""
    model = copy.deepcopy(float_model).eval()
    _, skipped = _layer_qparams(calibrated)
    for node in quantized_layer_nodes(calibrated):
        name = str(node.target)
        if name in skipped:
            continue
        layer = calibrated.get_submodule(name)
        # the integers convert_fx stores (learned rounding or round-to-nearest), dequantized
        (q, scale, zp), *_ = integer_weights(layer, node.meta[ANNOTATION_KEY])[0]
        shape = (-1, *([1] * (q.dim() - 1)))
        deq = (q.float() - zp.float().reshape(shape)) * scale.float().reshape(shape)
        target = model.get_submodule(name)
        with torch.no_grad():
            target.weight.copy_(deq)
        owner = node.meta[ANNOTATION_KEY].les_owner
        if owner is not None:
            from dmq_fx.passes import les_scale_name

            tau = calibrated.get_submodule(les_scale_name(owner)).tau.detach().clone()
            axis = 1 if isinstance(target, torch.nn.Conv2d) else -1

            def divide(module, args, tau=tau, axis=axis):
                x = args[0]
                shape = [1] * x.dim()
                shape[axis] = -1
                return (x / tau.view(shape), *args[1:])

            target.register_forward_pre_hook(divide)
    return model


def export_unet(
    model: torch.nn.Module, args: tuple, kwargs: dict | None = None, max_batch: int = 63
) -> fx.GraphModule:
    """``torch.export`` (non-strict) of a diffusers UNet with a dynamic batch of 1 to
    ``max_batch`` (below 64: diffusers' Upsample2D branches on ``shape[0] >= 64``), as the
    module ``prepare_pt2e`` takes. Every batched tensor input shares the batch dimension."""
    import inspect

    kwargs = dict(kwargs or {})
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    names = list(inspect.signature(model.forward).parameters)
    bound = dict(zip(names, args))
    first = args[0].shape[0]
    dynamic = {
        name: (
            {0: batch} if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == first else None
        )
        for name, v in {**bound, **kwargs}.items()
    }
    return torch.export.export(
        model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False
    ).module()
