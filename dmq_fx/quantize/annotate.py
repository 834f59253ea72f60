"""Deciding what each node gets: the ``node.meta["dmq_fx"]`` annotation.

:func:`annotate_quantization` is the only place that decides; passes (``dmq_fx.passes``) and
``convert_fx`` read the annotation. This is the role torchao's ``Quantizer.annotate`` plays in pt2e.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fake_quantize import FakeQuantize, FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch.nn.utils.parametrize import type_before_parametrizations

from dmq_fx.errors import ConfigError
from dmq_fx.graph.meta import ANNOTATION_KEY, LayerQuantSpec, graph_state
from dmq_fx.graph.skip_connections import skip_connection_layers
from dmq_fx.quantize.qconfig import qconfig_for_module

__all__ = ["annotate_quantization", "make_fake_quantize"]

_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


def make_fake_quantize(ctor) -> FakeQuantizeBase:
    """A torch.ao FakeQuantize from a qconfig entry (an observer or fake-quantize constructor)."""
    inst = ctor()
    if isinstance(inst, FakeQuantizeBase):
        return inst
    if isinstance(inst, ObserverBase):
        return FakeQuantize(observer=ctor)
    raise ConfigError(f"qconfig entry {ctor!r} builds {type(inst).__name__}, not an observer")


def _bits(quant_min: int, quant_max: int) -> int:
    return math.ceil(math.log2(quant_max - quant_min + 1))


def _validate(qconfig: QConfig, node: fx.Node) -> tuple[FakeQuantizeBase, FakeQuantizeBase]:
    act, weight = make_fake_quantize(qconfig.activation), make_fake_quantize(qconfig.weight)
    where = f"node '{node.name}' (module '{node.target}')"
    if act.qscheme not in _PER_TENSOR or act.dtype != torch.quint8:
        raise ConfigError(
            f"{where}: activations must be per-tensor quint8 (static, one step per tensor), got "
            f"{act.qscheme} {act.dtype}; int8 kernels take per-tensor uint8 inputs"
        )
    if not 0 <= act.quant_min < act.quant_max <= 255:
        raise ConfigError(
            f"{where}: activation range [{act.quant_min}, {act.quant_max}] is not within [0, 255]"
        )
    if weight.qscheme not in _PER_TENSOR + _PER_CHANNEL or weight.dtype not in (
        torch.qint8,
        torch.quint8,
    ):
        raise ConfigError(
            f"{where}: weights must be qint8 or quint8, per tensor or per channel; "
            f"got {weight.qscheme} {weight.dtype}"
        )
    if weight.qscheme in _PER_CHANNEL and weight.ch_axis != 0:
        raise ConfigError(f"{where}: per-channel weights must use ch_axis=0 (output channels)")
    return act, weight


def _concat_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The inputs of ``node`` if it is a channel concatenation (``torch.cat(..., dim=1)``)."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 1 or not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return None
    if not all(isinstance(t, fx.Node) and "tensor_meta" in t.meta for t in tensors):
        return None
    return list(tensors)


def annotate_quantization(
    gm: fx.GraphModule,
    qconfig_mapping: QConfigMapping,
    *,
    split_concat_inputs: bool = True,
    les: bool = False,
    pts: str | None = None,
    pts_options: dict | None = None,
    timestep_tables: bool = False,
) -> fx.GraphModule:
    """Record a :class:`LayerQuantSpec` on every Conv2d / Linear node that is quantized.

    A layer is quantized when its qconfig (resolved as torch.ao does) is not None and its input
    is a floating-point tensor: integer tensors (the timestep) never reach an observer. A Conv2d
    whose input is a channel concatenation gets one input group per concatenated tensor when
    ``split_concat_inputs`` is set, so each input of a skip concatenation has its own observer.
    With ``les`` every quantized layer gets Learned Equivalent Scaling; layers reading the same
    tensor share one ``tau``, owned by the first of them (``LayerQuantSpec.les_owner``).
    ``pts="skip"`` gives the skip-connection layers (:func:`dmq_fx.passes.skip_connection_layers`)
    channel-wise power-of-two activation steps, ``pts="all"`` every quantized conv (an
    ablation); ``pts_options`` go to their :class:`~dmq_fx.observers.PowerOfTwoVotingObserver`.
    ``timestep_tables``: every layer's activation qparams become a table over the calibrated
    timesteps (the graph must take a ``timestep`` input).
    """
    if timestep_tables and "timestep" not in graph_state(gm).input_names:
        raise ConfigError(
            "timestep_tables=True selects activation qparams by the 'timestep' input, but the "
            "traced model takes none"
        )
    if pts not in (None, "skip", "all"):
        raise ConfigError(f"pts must be None, 'skip' or 'all', got {pts!r}")
    options = {"max_shift": 3, "kappa": 0.85, "selection": "vote", **(pts_options or {})}
    unknown = set(options) - {"max_shift", "kappa", "selection"}
    if unknown:
        raise ConfigError(
            f"unknown pts_options {sorted(unknown)}; known: max_shift, kappa, selection"
        )

    skip_layers = set(skip_connection_layers(gm)) if pts == "skip" else set()
    les_owners: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        mtype = type_before_parametrizations(mod)
        if not issubclass(mtype, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        qconfig = qconfig_for_module(qconfig_mapping, node.target, mtype)
        inp = node.args[0] if node.args else None
        if qconfig is None or not isinstance(inp, fx.Node):
            continue
        meta = inp.meta.get("tensor_meta")
        if meta is None or not meta.dtype.is_floating_point:
            continue
        if isinstance(mod, torch.nn.Conv2d) and mod.padding_mode != "zeros":
            raise ConfigError(
                f"module '{node.target}': padding_mode '{mod.padding_mode}' has no "
                f"int8 kernel; exclude it with set_module_name('{node.target}', None)"
            )
        act, weight = _validate(qconfig, node)
        groups: tuple[int, ...] = (
            mod.in_channels if isinstance(mod, torch.nn.Conv2d) else mod.in_features,
        )
        split = False
        parts = _concat_inputs(inp) if isinstance(mod, torch.nn.Conv2d) else None
        if split_concat_inputs and parts is not None and mod.groups == 1:
            groups = tuple(p.meta["tensor_meta"].shape[1] for p in parts)
            split = True
        with_pts = isinstance(mod, torch.nn.Conv2d) and (pts == "all" or node in skip_layers)
        node.meta[ANNOTATION_KEY] = LayerQuantSpec(
            qconfig=qconfig,
            module_type=mtype.__name__,
            weight_bits=_bits(weight.quant_min, weight.quant_max),
            weight_qscheme=weight.qscheme,
            act_bits=_bits(act.quant_min, act.quant_max),
            input_groups=groups,
            split=split,
            les_owner=les_owners.setdefault(inp, node.target) if les else None,
            pts=dict(options) if with_pts else None,
            timestep_table=timestep_tables,
        )
    return gm
