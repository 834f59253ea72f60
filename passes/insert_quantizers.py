"""Pass: insert fake quantizers for every annotated Conv2d / Linear node."""

from __future__ import annotations

import torch
from dmq_fx.observers import (
    PowerOfTwoFakeQuantize,
    PowerOfTwoVotingObserver,
    TimestepTableFakeQuantize,
)
from torch import fx
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.nn.utils import parametrize

from dmq_fx.graph.meta import ANNOTATION_KEY, LayerQuantSpec, quantized_layer_nodes
from dmq_fx.quantize.annotate import make_fake_quantize
from dmq_fx.quantize.bitpacking import pack_bits, unpack_bits

__all__ = [
    "GroupedWeightFakeQuantize",
    "integer_weight",
    "insert_quantizers",
    "power_of_two_fake_quantize",
    "input_quantizer_name",
    "weight_before_quantization",
    "weight_quantizer",
]


def _per_channel(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-channel (or per-tensor) qparam shaped to broadcast over ``like``."""
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def integer_weight(
    weight: torch.Tensor, fake_quant: FakeQuantizeBase, round_up: torch.Tensor
) -> torch.Tensor:
    """The integers of ``weight`` under ``fake_quant``'s qparams with a chosen rounding.

    ``clamp(floor(w / s) + round_up + z, quant_min, quant_max)``, as float: ``round_up`` is 0 or
    1 per element for a learned (AdaRound) rounding, or a soft value in [0, 1] while it is
    learned (gradients reach it). Per-output-channel qparams along axis 0.
    """
    scale = _per_channel(fake_quant.scale.detach().float(), weight)
    zero_point = _per_channel(fake_quant.zero_point.detach().float(), weight)
    floor = torch.floor(weight.detach() * (1.0 / scale))
    return torch.clamp(floor + round_up + zero_point, fake_quant.quant_min, fake_quant.quant_max)


class GroupedWeightFakeQuantize(torch.nn.Module):
    """Weight parametrization: one torch.ao FakeQuantize per group of input channels.

    With one group this is the layer's weight quantizer; with several (a shortcut conv fed by a
    skip concatenation) each group of input channels has its own per-output-channel qparams.

    A group may carry a learned rounding (0 / 1 per weight, set by AdaRound): its weights are
    then ``floor(w / s) + rounding`` instead of round-to-nearest (:func:`integer_weight`);
    ``convert_fx`` stores the same integers. It is held packed, eight weights to a byte (buffer
    ``rounding_<g>``, with the group's weight shape in ``rounding_shape_<g>``), because it stays
    from the stage that learns it to convert.
    """

    def __init__(self, fake_quants: list[FakeQuantizeBase], split_sizes: tuple[int, ...]):
        super().__init__()
        self.fake_quants = torch.nn.ModuleList(fake_quants)
        self.split_sizes = tuple(split_sizes)
        for g in range(len(fake_quants)):
            self.register_buffer(f"rounding_{g}", None)
            self.register_buffer(f"rounding_shape_{g}", None)
        #: soft roundings (one tensor per group) used instead while AdaRound learns them
        self.soft_rounding: list[torch.Tensor] | None = None

    def split(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """``weight`` cut into the groups' input channels (whole for one group: also grouped
        convs, whose weight axis 1 is ``C_in / groups``)."""
        if len(self.fake_quants) == 1:
            return [weight]
        return list(torch.split(weight, self.split_sizes, dim=1))

    def rounding(self, group: int) -> torch.Tensor | None:
        """The learned rounding of ``group``, 0 / 1 per weight as uint8 (None: round to
        nearest); unpacked on each call."""
        packed = getattr(self, f"rounding_{group}")
        if packed is None:
            return None
        return unpack_bits(packed, getattr(self, f"rounding_shape_{group}").cpu().tolist())

    def set_rounding(self, group: int, round_up: torch.Tensor | None) -> None:
        """Fix ``group``'s rounding to ``round_up`` (bool, or 0 / 1 per weight), or back to
        nearest (None)."""
        packed = shape = None
        if round_up is not None:
            packed = pack_bits(round_up)
            shape = torch.tensor(round_up.shape, dtype=torch.int64).to(round_up.device)
        setattr(self, f"rounding_{group}", packed)
        setattr(self, f"rounding_shape_{group}", shape)

    def _quantize(self, group: int, fq: FakeQuantizeBase, part: torch.Tensor) -> torch.Tensor:
        if self.soft_rounding is not None:  # learning (quantizing): no flag read per step
            up = self.soft_rounding[group]
        elif not bool(fq.fake_quant_enabled[0]):  # float forward: no rounding to unpack
            return fq(part)
        else:
            up = self.rounding(group)
        if up is None:
            return fq(part)
        scale = _per_channel(fq.scale.detach().float(), part)
        zero_point = _per_channel(fq.zero_point.detach().float(), part)
        return (integer_weight(part, fq, up) - zero_point) * scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        parts = [
            self._quantize(g, fq, p)
            for g, (fq, p) in enumerate(zip(self.fake_quants, self.split(weight)))
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def weight_quantizer(layer: torch.nn.Module) -> GroupedWeightFakeQuantize:
    """The weight quantizer of a prepared layer: the last of its weight parametrizations."""
    quantizer = layer.parametrizations.weight[-1]
    if not isinstance(quantizer, GroupedWeightFakeQuantize):
        raise TypeError(f"{type(layer).__name__} has no dmq_fx weight quantizer")
    return quantizer


def weight_before_quantization(layer: torch.nn.Module) -> torch.Tensor:
    """The weight the quantizer sees: the original weight through every parametrization before
    the quantizer (``tau * W`` with LES)."""
    chain = layer.parametrizations.weight
    weight = chain.original
    for module in list(chain)[:-1]:
        weight = module(weight)
    return weight


def power_of_two_fake_quantize(
    like: FakeQuantizeBase, options: dict, ch_axis: int
) -> PowerOfTwoFakeQuantize:
    """A :class:`PowerOfTwoFakeQuantize` with the range, dtype and averaging of ``like``."""
    observer = like.activation_post_process
    return PowerOfTwoFakeQuantize(
        observer=PowerOfTwoVotingObserver,
        dtype=observer.dtype,
        qscheme=observer.qscheme,
        quant_min=like.quant_min,
        quant_max=like.quant_max,
        averaging_constant=getattr(observer, "averaging_constant", 0.01),
        ch_axis=ch_axis,
        **options,
    )


def _timestep_input(gm: fx.GraphModule) -> fx.Node:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target == "timestep":
            return node
    raise ValueError("per-timestep activation tables need a 'timestep' input")


def input_quantizer_name(layer_target: str, group: int, num_groups: int) -> str:
    """Qualified name of the activation quantizer of ``layer_target``'s input ``group``."""
    return f"{layer_target}_input_quant" + (f"_{group}" if num_groups > 1 else "")


def _half_precision_dtype(node: fx.Node) -> torch.dtype | None:
    """The layer's output dtype when it is a half-precision float (fp16 / bf16), else None."""
    meta = node.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _cast(gm: fx.GraphModule, layer: fx.Node, x: fx.Node, dtype, *, before: bool) -> fx.Node:
    """A ``x.to(dtype)`` node before (an input) or after (the output of) ``layer``."""
    where = gm.graph.inserting_before(layer) if before else gm.graph.inserting_after(layer)
    with where:
        cast = gm.graph.call_method("to", (x, dtype))
    meta = x.meta.get("tensor_meta")
    if meta is not None:
        cast.meta["tensor_meta"] = meta._replace(dtype=dtype)
    return cast


def insert_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Insert the fake quantizers that the annotations of ``gm`` ask for.

    Matches: ``call_module`` nodes carrying a :class:`~dmq_fx.quantize.annotate.LayerQuantSpec`.
    Rewrites: ``y = layer(x)`` into ``y = layer(layer_input_quant(x))``, with a torch.ao
    ``FakeQuantize`` module registered beside the layer (``<layer>_input_quant``), and the layer's
    weight parametrized by a :class:`GroupedWeightFakeQuantize`. For a split layer fed by
    ``torch.cat([a, b], 1)``, each of ``a`` and ``b`` gets its own quantizer
    (``<layer>_input_quant_0``, ``_1``) and a new concatenation of the quantized tensors feeds
    the layer; the original concatenation keeps its other users. A layer annotated for PTS gets
    :class:`~dmq_fx.observers.PowerOfTwoFakeQuantize` input quantizers; with per-timestep tables
    each input quantizer is a :class:`~dmq_fx.observers.TimestepTableFakeQuantize` called as
    ``quant(x, timestep)``. Observers start enabled and fake quantization disabled, as in a
    torch.ao prepared model.

    In a half-precision model (fp16 / bf16) a quantized layer computes in float32: its weights
    become float32 (the model's values, exactly), its inputs are cast to float32 before their
    quantizers (``x.float()``), and its output back to the model's dtype (``y.to(dtype)``), so
    the integers and steps are those of float32 arithmetic while the float layers stay in the
    model's dtype.
    """
    for node in quantized_layer_nodes(gm):
        spec: LayerQuantSpec = node.meta[ANNOTATION_KEY]
        layer = gm.get_submodule(node.target)
        n_groups = len(spec.input_groups)
        inputs = [node.args[0]] if n_groups == 1 else list(node.args[0].args[0])
        half = _half_precision_dtype(node)
        if half is not None:
            layer.float()
            inputs = [_cast(gm, node, x, torch.float32, before=True) for x in inputs]
        quantized = []
        for g, inp in enumerate(inputs):
            fq = make_fake_quantize(spec.qconfig.activation)
            if spec.pts is not None:
                fq = power_of_two_fake_quantize(fq, spec.pts, ch_axis=1)
            if spec.timestep_table:
                fq = TimestepTableFakeQuantize(fq)
            fq.disable_fake_quant()
            name = input_quantizer_name(node.target, g, n_groups)
            gm.add_submodule(name, fq)
            with gm.graph.inserting_before(node):
                args = (inp, _timestep_input(gm)) if spec.timestep_table else (inp,)
                quantized.append(gm.graph.call_module(name, args))
        if n_groups == 1:
            new_input = quantized[0]
        else:
            with gm.graph.inserting_before(node):
                new_input = gm.graph.call_function(torch.cat, (quantized,), {"dim": 1})
            new_input.meta["tensor_meta"] = node.args[0].meta.get("tensor_meta")
        node.args = (new_input,) + tuple(node.args[1:])
        weight_fqs = []
        for _ in range(n_groups):
            wfq = make_fake_quantize(spec.qconfig.weight)
            wfq.disable_observer()  # weights are observed once, by a calibration stage
            wfq.disable_fake_quant()
            weight_fqs.append(wfq)
        parametrize.register_parametrization(
            layer, "weight", GroupedWeightFakeQuantize(weight_fqs, spec.input_groups), unsafe=True
        )
        if half is not None:
            users = list(node.users)
            back = _cast(gm, node, node, half, before=False)
            for user in users:
                user.replace_input_with(node, back)
    gm.graph.lint()
    gm.recompile()
    return gm
