"""``convert_fx``: lower a calibrated graph to a static quantized graph."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import fx

from dmq_fx.errors import ConfigError, ConvertError, ReferenceFormWarning
from dmq_fx.graph.meta import (
    ANNOTATION_KEY,
    ConvertedFrom,
    LayerQuantSpec,
    graph_state,
    quantized_layer_nodes,
)
from dmq_fx.lowering.attention import lower_small_head_attention
from dmq_fx.lowering.quantized_modules import (
    INT16_MAX,
    QuantizedLayer,
    cpu_has_int8_dot_product,
    int16_pair_bound,
    quantize_uint8,
    quantize_uint8_per_channel,
    select_timestep_entry,
)
from dmq_fx.observers import PowerOfTwoFakeQuantize
from dmq_fx.passes import (
    LESScale,
    input_quantizer_name,
    integer_weight,
    les_scale_name,
    weight_before_quantization,
    weight_quantizer,
)
from dmq_fx.quantize.device import host_copy, module_device
from dmq_fx.quantize.state import learned_state, saved_settings

__all__ = [
    "BACKENDS",
    "LoweredLayer",
    "add_constant",
    "convert_fx",
    "integer_weights",
    "lower_plain",
    "lower_pts",
    "lower_timestep_table",
]

BACKENDS = ("reference", "x86", "onednn")
_qd = torch.ops.quantized_decomposed


def integer_weights(layer: torch.nn.Module, spec: LayerQuantSpec):
    """Per input group: (integer weight, per-channel scale, per-channel zero point), qmin, qmax."""
    grouped = weight_quantizer(layer)
    weight = weight_before_quantization(layer).detach()
    out = []
    for g, (fq, part) in enumerate(zip(grouped.fake_quants, grouped.split(weight))):
        scale = fq.scale.detach().float().reshape(-1).expand(part.shape[0]).contiguous()
        zp = fq.zero_point.detach().int().reshape(-1).expand(part.shape[0]).contiguous()
        dtype = torch.uint8 if fq.quant_min >= 0 else torch.int8
        round_up = grouped.rounding(g)
        if round_up is not None:  # learned rounding (AdaRound)
            w_int = integer_weight(part.float(), fq, round_up.float()).to(dtype)
        else:
            w_int = _qd.quantize_per_channel(
                part.float(), scale, zp, 0, fq.quant_min, fq.quant_max, dtype
            )
        out.append((w_int, scale, zp))
    fq0 = grouped.fake_quants[0]
    return out, fq0.quant_min, fq0.quant_max


def _is_les(gm: fx.GraphModule, node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and isinstance(gm.get_submodule(node.target), LESScale)
    )


def add_constant(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """Register ``value`` as buffer ``name`` (a dotted path under an existing submodule) and
    return a ``get_attr`` node reading it."""
    parent, _, leaf = name.rpartition(".")
    gm.get_submodule(parent).register_buffer(leaf, value)
    return gm.graph.get_attr(name)


def _quantize_node(
    gm,
    x: fx.Node,
    qparams,
    form: str,
    layer_node: fx.Node,
    suffix: str,
    channel_factors: torch.Tensor | None = None,
):
    """The node quantizing a layer input ``x`` to uint8 with ``qparams`` (s, z, qmin, qmax).

    With LES, ``x`` is the division ``x0 / tau``: the division merges into the quantize step, as
    ``quantize_per_channel(x0, tau * s, z)``; its integers are those of ``x0 / tau`` quantized per
    tensor with step ``s`` (up to float rounding at .5 ties), so the kernel takes them with the
    per-tensor ``(s, z)`` and the weights ``tau * W``. With PTS (``channel_factors``
    ``2^(j_c - D)``) the steps are ``(tau *) s * 2^(j_c - D)`` per channel.

    Returns the node and, for a per-channel quantization, the ``(steps, zero_points, axis)``
    nodes that dequantize its integers (steps without ``tau``: they stand for ``x0 / tau``).
    """
    s, z, amin, amax = qparams
    name = f"{layer_node.name}_input_q{suffix}"
    graph = gm.graph
    les = gm.get_submodule(x.target) if _is_les(gm, x) else None
    if les is None and channel_factors is None:
        if form == "int8":
            return graph.create_node(
                "call_function", quantize_uint8, (x, s, z, amin, amax), name=name
            ), None
        return graph.create_node(
            "call_function",
            _qd.quantize_per_tensor.default,
            (x, s, z, amin, amax, torch.uint8),
            name=name,
        ), None
    x0 = x
    if les is not None:
        x0 = x.args[0]
    rank = len(x0.meta["tensor_meta"].shape)
    axis = (les.channel_axis if les is not None else 1) % rank
    channels = x0.meta["tensor_meta"].shape[axis]
    # the integers' own steps (of x0 / tau), and the quantize steps of x0
    own_steps = torch.full((channels,), float(s))
    if channel_factors is not None:
        own_steps = own_steps * channel_factors.float()
    steps = own_steps
    if les is not None:
        offset = x.args[1] if len(x.args) > 1 else 0
        steps = own_steps * les.tau.detach().float()[offset : offset + channels]
    if form == "int8":  # the same integers as quantize_per_channel, in three passes
        inv_steps = add_constant(gm, f"{layer_node.target}_input_inv_steps{suffix}", 1.0 / steps)
        return graph.create_node(
            "call_function",
            quantize_uint8_per_channel,
            (x0, inv_steps, int(z), axis, amin, amax),
            name=name,
        ), None
    step_node = add_constant(gm, f"{layer_node.target}_input_steps{suffix}", steps)
    zp_node = add_constant(
        gm,
        f"{layer_node.target}_input_zero_points{suffix}",
        torch.full((channels,), int(z), dtype=torch.int32),
    )
    q = graph.create_node(
        "call_function",
        _qd.quantize_per_channel.default,
        (x0, step_node, zp_node, axis, amin, amax, torch.uint8),
        name=name,
    )
    own_node = step_node
    if les is not None:
        own_node = add_constant(gm, f"{layer_node.target}_input_int_steps{suffix}", own_steps)
    return q, (own_node, zp_node, axis)


def _select(gm, t_node: fx.Node, grid_node: fx.Node, table: torch.Tensor, name: str) -> fx.Node:
    table_node = add_constant(gm, f"{name}_table", table)
    return gm.graph.call_function(select_timestep_entry, (t_node, grid_node, table_node))


def _table_quantize_dequantize(gm, x: fx.Node, t_node: fx.Node, table, layer_node, suffix):
    """Quantize and dequantize a layer input with the table entry of the call's timestep.

    Per tensor: ``quantize_per_tensor.tensor`` with the selected ``(s, z)``; with LES and / or
    PTS: ``quantize_per_channel`` with the selected steps ``(tau *) s * 2^(j_c - D)`` and
    dequantization at the steps without ``tau`` (the integers stand for ``x / tau``).
    """
    graph = gm.graph
    entries = list(table.entries)
    base = f"{layer_node.target}_input{suffix}"
    qmin, qmax = table.quant_min, table.quant_max
    scales = torch.tensor([float(e.scale) for e in entries])
    zps = torch.tensor([int(e.zero_point) for e in entries], dtype=torch.int32)
    les = gm.get_submodule(x.target) if _is_les(gm, x) else None
    pts = isinstance(entries[0], PowerOfTwoFakeQuantize)
    grid = add_constant(gm, f"{base}_grid", table.grid.clone())
    if les is None and not pts:
        s = _select(gm, t_node, grid, scales, f"{base}_scales")
        z = _select(gm, t_node, grid, zps, f"{base}_zero_points")
        q = graph.call_function(_qd.quantize_per_tensor.tensor, (x, s, z, qmin, qmax, torch.uint8))
        return graph.call_function(
            _qd.dequantize_per_tensor.tensor, (q, s, z, qmin, qmax, torch.uint8)
        )
    x0 = x.args[0] if les is not None else x
    rank = len(x0.meta["tensor_meta"].shape)
    axis = (les.channel_axis if les is not None else 1) % rank
    channels = x0.meta["tensor_meta"].shape[axis]
    own = scales[:, None].expand(-1, channels).clone()
    if pts:
        own = own * torch.stack([e.observer.channel_factors(channels) for e in entries])
    steps = own
    if les is not None:
        offset = x.args[1] if len(x.args) > 1 else 0
        steps = own * les.tau.detach().float()[offset : offset + channels]
    zp_rows = zps[:, None].expand(-1, channels).contiguous()
    step = _select(gm, t_node, grid, steps.contiguous(), f"{base}_steps")
    own_step = _select(gm, t_node, grid, own.contiguous(), f"{base}_int_steps")
    z = _select(gm, t_node, grid, zp_rows, f"{base}_zero_points")
    q = graph.call_function(
        _qd.quantize_per_channel.default, (x0, step, z, axis, qmin, qmax, torch.uint8)
    )
    return graph.call_function(
        _qd.dequantize_per_channel.default, (q, own_step, z, axis, qmin, qmax, torch.uint8)
    )


def _shifted_weights(weights, factors: list[torch.Tensor], max_shift: int):
    """PTS weights as int8 ``(W_int - z_w) << j_c`` (zero point 0), or None if one overflows."""
    out = []
    for (w_int, scale, zp), factor in zip(weights, factors):
        w8 = w_int.int() - zp.view(-1, *([1] * (w_int.dim() - 1)))
        shift = torch.round(factor * 2**max_shift).int()  # 2^j_c
        shifted = w8 * shift.view(1, -1, *([1] * (w_int.dim() - 2)))
        if shifted.abs().max() > 127:
            return None
        out.append((shifted.to(torch.int8), scale, torch.zeros_like(zp)))
    return out


@dataclasses.dataclass
class _LayerInputs:
    """What every lowering of a layer starts from: its node, float layer, annotation, the
    quantize nodes in front of it (one per input group) and their per-tensor qparams."""

    node: fx.Node
    layer: torch.nn.Module
    spec: LayerQuantSpec
    quant_nodes: list[fx.Node]
    act_qparams: list[tuple[float, int, int, int]]

    def quantizer(self, gm: fx.GraphModule, g: int) -> torch.nn.Module:
        n = len(self.spec.input_groups)
        return gm.get_submodule(input_quantizer_name(self.node.target, g, n))

    def suffix(self, g: int) -> str:
        return f"_{g}" if len(self.quant_nodes) > 1 else ""


@dataclasses.dataclass
class LoweredLayer:
    """What one lowering function built: the layer's new input nodes, its integer weights
    (per group: weight, steps, zero points) and range, the activation qparams the kernel gets,
    the kernel form, and the per-timestep qparams table (table lowering only)."""

    inputs: list[fx.Node]
    weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    qmin: int
    qmax: int
    act_qparams: list[tuple[float, int, int, int]]
    form: str
    act_table: list[tuple[float, int, int, int]] | None = None
    #: why the layer is in the reference form although the backend asked for int8 kernels
    fallback: str | None = None


def _dequantize_per_tensor(gm, layer: _LayerInputs, q: fx.Node, g: int) -> fx.Node:
    s, z, amin, amax = layer.act_qparams[g]
    return gm.graph.create_node(
        "call_function",
        _qd.dequantize_per_tensor.default,
        (q, s, z, amin, amax, torch.uint8),
        name=f"{layer.node.name}_input_dq{layer.suffix(g)}",
    )


def lower_plain(gm: fx.GraphModule, layer: _LayerInputs, backend: str) -> LoweredLayer:
    """A layer with per-tensor activation steps, one input group or a split concatenation
    (one quantize per concatenated input): int8 kernel or reference form."""
    weights, qmin, qmax = integer_weights(layer.layer, layer.spec)
    form, fallback = _choose_form(backend, weights, layer.act_qparams, qmin, qmax)
    inputs = []
    with gm.graph.inserting_before(layer.node):
        for g, qnode in enumerate(layer.quant_nodes):
            q, _ = _quantize_node(
                gm, qnode.args[0], layer.act_qparams[g], form, layer.node, layer.suffix(g)
            )
            inputs.append(q if form == "int8" else _dequantize_per_tensor(gm, layer, q, g))
    return LoweredLayer(inputs, weights, qmin, qmax, layer.act_qparams, form, fallback=fallback)


def lower_pts(gm: fx.GraphModule, layer: _LayerInputs, backend: str) -> LoweredLayer:
    """A layer with PTS's per-channel power-of-two steps ``s * 2^(j_c - D)``: as integer shifts
    of the weights where they fit int8 (``pts:shift``: activations quantized at the finest step
    ``s / 2^D``, the kernel sees per-tensor steps), else dequantized per channel before a float
    layer (``pts:dequant``, reference form)."""
    spec = layer.spec
    weights, qmin, qmax = integer_weights(layer.layer, spec)
    fqs = [layer.quantizer(gm, g) for g in range(len(spec.input_groups))]
    factors = [fq.observer.channel_factors(c) for fq, c in zip(fqs, spec.input_groups)]
    max_shift = fqs[0].observer.max_shift
    shifted = _shifted_weights(weights, factors, max_shift)
    act_qparams = layer.act_qparams
    if shifted is not None and getattr(layer.layer, "groups", 1) == 1:
        spec.pts_lowering = "shift"
        weights, qmin, qmax = shifted, -128, 127
        act_qparams = [(s / 2**max_shift, z, lo, hi) for s, z, lo, hi in act_qparams]
        form, fallback = _choose_form(backend, weights, act_qparams, qmin, qmax)
    else:
        spec.pts_lowering = "dequant"
        form, fallback = "reference", None  # per-channel steps: dequantized before a float conv
    kernel = dataclasses.replace(layer, act_qparams=act_qparams)
    inputs = []
    with gm.graph.inserting_before(layer.node):
        for g, qnode in enumerate(layer.quant_nodes):
            # quantize with the tensor's own step s; the factors make it per channel
            q, per_channel = _quantize_node(
                gm,
                qnode.args[0],
                layer.act_qparams[g],
                form,
                layer.node,
                layer.suffix(g),
                factors[g],
            )
            if form == "int8":
                inputs.append(q)
            elif spec.pts_lowering == "shift":
                inputs.append(_dequantize_per_tensor(gm, kernel, q, g))
            else:
                steps, zps, axis = per_channel
                _, _, amin, amax = act_qparams[g]
                inputs.append(
                    gm.graph.create_node(
                        "call_function",
                        _qd.dequantize_per_channel.default,
                        (q, steps, zps, axis, amin, amax, torch.uint8),
                        name=f"{layer.node.name}_input_dq{layer.suffix(g)}",
                    )
                )
    return LoweredLayer(inputs, weights, qmin, qmax, act_qparams, form, fallback=fallback)


def lower_timestep_table(gm: fx.GraphModule, layer: _LayerInputs, backend: str) -> LoweredLayer:
    """A layer whose activation qparams come from a per-timestep table: chosen at run time by
    the call's timestep, so quantized and dequantized before the float layer (reference form)."""
    spec = layer.spec
    weights, qmin, qmax = integer_weights(layer.layer, spec)
    tables = [layer.quantizer(gm, g) for g in range(len(spec.input_groups))]
    if any(not len(t.entries) for t in tables):
        raise ConvertError(f"layer '{layer.node.target}': its timestep table is empty")
    act_qparams = [
        (float(t.entries[0].scale), int(t.entries[0].zero_point), t.quant_min, t.quant_max)
        for t in tables
    ]
    act_table = [
        (float(e.scale), int(e.zero_point), t.quant_min, t.quant_max)
        for t in tables
        for e in t.entries
    ]
    if spec.pts is not None:
        spec.pts_lowering = "dequant"
    with gm.graph.inserting_before(layer.node):
        inputs = [
            _table_quantize_dequantize(gm, q.args[0], q.args[1], t, layer.node, layer.suffix(g))
            for g, (q, t) in enumerate(zip(layer.quant_nodes, tables))
        ]
    return LoweredLayer(inputs, weights, qmin, qmax, act_qparams, "reference", act_table)


def _foldable_norm(gm: fx.GraphModule, les_node: fx.Node) -> torch.nn.Module | None:
    """The norm whose affine can absorb ``les_node``'s 1/tau exactly, if there is one.

    That is a GroupNorm (channel axis 1) or a LayerNorm over the last axis, with an affine,
    called once in the graph, whose output only feeds this LES division (not split).
    """
    les = gm.get_submodule(les_node.target)
    if len(les_node.args) != 1:
        return None
    src = les_node.args[0]
    if src.op != "call_module" or len(src.users) != 1:
        return None
    norm = gm.get_submodule(src.target)
    if isinstance(norm, torch.nn.GroupNorm):
        ok = les.channel_axis == 1 and norm.affine
    elif isinstance(norm, torch.nn.LayerNorm):
        ok = (
            les.channel_axis == -1
            and norm.elementwise_affine
            and norm.bias is not None
            and tuple(norm.normalized_shape) == (les.tau.numel(),)
        )
    else:
        return None
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == src.target]
    return norm if ok and len(calls) == 1 else None


def _fold_les_into_norms(gm: fx.GraphModule) -> None:
    """Fold 1/tau into the norm before an LES division where that is exact (GroupNorm ->
    proj_in, LayerNorm -> q/k/v); the other divisions merge into their quantize steps."""
    for node in list(gm.graph.nodes):
        if not _is_les(gm, node):
            continue
        norm = _foldable_norm(gm, node)
        if norm is None:
            continue
        tau = gm.get_submodule(node.target).tau.detach()
        with torch.no_grad():
            norm.weight.div_(tau.to(norm.weight.dtype))
            norm.bias.div_(tau.to(norm.bias.dtype))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)


#: why a layer was lowered in the reference form on the x86 backend (LoweredLayer.fallback)
SATURATION = "int16 pair sums could saturate (CPU without VNNI / AMX)"


def _choose_form(
    backend: str, weights, act_qparams, qmin: int, qmax: int
) -> tuple[str, str | None]:
    """The kernel form of a layer and, for a reference form the backend did not ask for, why."""
    if backend == "reference":
        return "reference", None
    for _, _, zp in weights:
        if (qmin - zp).min() < -128 or (qmax - zp).max() > 127:
            # An affine 8-bit weight minus its zero point does not fit int8.
            return "reference", "the weight minus its zero point does not fit int8"
    if not cpu_has_int8_dot_product():
        for (w_int, _, zp), (_, _, _, act_qmax) in zip(weights, act_qparams):
            w8 = w_int.int() - zp.view(-1, *([1] * (w_int.dim() - 1)))
            if int16_pair_bound(w8, act_qmax) > INT16_MAX:
                return "reference", SATURATION
    return "int8", None


def convert_fx(prepared: fx.GraphModule, backend: str = "x86") -> fx.GraphModule:
    """Lower a calibrated graph (from :func:`dmq_fx.calibrate`) to a static quantized graph.

    ``backend="reference"``: ``quantized_decomposed`` quantize / dequantize ops with the exact
    ``quant_min`` / ``quant_max`` of each quantizer around float conv / linear on dequantized
    integer weights. ``backend="x86"`` (or ``"onednn"``, the same kernels): uint8 activations and
    int8 weights on onednn's integer kernels with float32 outputs. On CPUs without VNNI / AMX a
    layer whose int16 pair sums could saturate is lowered in the reference form instead (exact,
    not faster); :func:`dmq_fx.summary` shows each layer's form. ``prepared`` is not modified.

    A graph on another device (``prepared.to("cuda")``) converts with ``backend="reference"``:
    the lowering runs on a CPU copy and the converted graph is put on the graph's device.
    """
    _check_convertible(prepared, backend)
    device = module_device(prepared)
    if device.type != "cpu":
        if backend != "reference":
            raise ConvertError(
                f"backend {backend!r} runs onednn's CPU kernels and the graph is on {device}: "
                f"convert with backend='reference' to run on {device.type}, or move the graph "
                "to the CPU first (prepared.cpu())"
            )
        return convert_fx(host_copy(prepared), backend).to(device)
    record = graph_state(prepared)
    try:
        settings, settings_error = saved_settings(prepared), None
    except ConfigError as e:  # a graph save() cannot describe still converts; save() says why
        settings, settings_error = None, str(e)
    converted_from = ConvertedFrom(learned_state(prepared), settings, settings_error, backend)
    # Each quantized layer is replaced by a QuantizedLayer below and only read until then: the
    # copy shares them with ``prepared`` instead of duplicating their float weights (converting
    # SD 1.5 would otherwise hold a second FP model).
    layers = [prepared.get_submodule(n.target) for n in quantized_layer_nodes(prepared)]
    gm = copy.deepcopy(prepared, {id(layer): layer for layer in layers})
    gm.meta = copy.deepcopy(prepared.meta)
    for node in quantized_layer_nodes(gm):  # (fx's graph copy shares node.meta's values)
        node.meta[ANNOTATION_KEY] = dataclasses.replace(node.meta[ANNOTATION_KEY])
    les_owners = {n.meta[ANNOTATION_KEY].les_owner for n in quantized_layer_nodes(gm)} - {None}
    _fold_les_into_norms(gm)
    saturating = []
    for node in quantized_layer_nodes(gm):
        layer = _layer_inputs(gm, node)
        lowered = _LOWERINGS[_layer_kind(layer.spec)](gm, layer, backend)
        if lowered.fallback == SATURATION:
            saturating.append(str(node.target))
        _replace_layer(gm, layer, lowered)
    if saturating:
        _warn_saturation(saturating, len(quantized_layer_nodes(prepared)))
    for owner in les_owners:
        gm.delete_submodule(les_scale_name(owner))
    _redirect_weight_metadata_reads(gm, {str(n.target) for n in quantized_layer_nodes(gm)})
    if backend != "reference":  # the reference form stays the simulation's arithmetic
        lower_small_head_attention(gm)
    gm.graph.lint()
    gm.recompile()
    record = graph_state(gm)
    record.state, record.backend, record.converted_from = "converted", backend, converted_from
    return gm


#: what a graph may read of a quantized layer's float weight: its metadata
_METADATA_ATTRIBUTES = ("dtype", "device")


def _redirect_weight_metadata_reads(gm: fx.GraphModule, layers: set[str]) -> None:
    """Point reads of a replaced layer's float ``weight`` / ``bias`` at an empty float32 buffer
    (the dtype a quantized layer computes in, half-precision models included) on its device
    (``x.to(self.proj.weight.dtype)`` in diffusers' image projection).

    Matches ``get_attr`` nodes ``<layer>.weight`` / ``<layer>.bias`` of quantized layers; only
    ``.dtype`` / ``.device`` reads are allowed: a graph that computes with the float weight of
    a quantized layer cannot be lowered (ConvertError naming the layer and the node)."""
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        owner, _, attr = node.target.rpartition(".")
        if owner not in layers or attr not in ("weight", "bias"):
            continue
        readers = [
            u
            for u in node.users
            if not (u.op == "call_function" and u.target is getattr)
            or u.args[1] not in _METADATA_ATTRIBUTES
        ]
        if readers:
            raise ConvertError(
                f"node '{readers[0].name}' computes with the float {attr} of quantized layer "
                f"'{owner}'; keep that layer float (qconfig_mapping.set_module_name('{owner}', "
                "None))"
            )
        layer = gm.get_submodule(owner)
        name = f"float_{attr}_metadata"
        if not hasattr(layer, name):
            layer.register_buffer(name, torch.empty(0, dtype=torch.float32))
        node.target = f"{owner}.{name}"


def _warn_saturation(layers: list[str], total: int) -> None:
    """Say once per graph that layers run in the slower reference form, and what would not."""
    warnings.warn(
        f"convert_fx(backend='x86'): {len(layers)} of {total} quantized layers (e.g. "
        f"'{layers[0]}') run in the exact but slower reference form: on this CPU without VNNI / "
        "AMX int8 kernels add pairs of u8 x s8 products in int16, which these layers could "
        "overflow. Fast choices here: 7-bit activations (act_bits=7, as torch.ao's x86 default) "
        "or 4-bit weights (weight_bits=4); dmq_fx.summary() shows each layer's form.",
        ReferenceFormWarning,
        stacklevel=3,
    )


def _check_convertible(prepared: fx.GraphModule, backend: str) -> None:
    if backend not in BACKENDS:
        raise ConvertError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend != "reference" and not torch.backends.mkldnn.is_available():
        raise ConvertError(f"backend {backend!r} needs a torch build with oneDNN (mkldnn)")
    record = graph_state(prepared)
    state = record.state if record is not None else None
    if state != "calibrated":
        raise ConvertError(
            "convert_fx() needs a calibrated graph: run dmq_fx.calibrate(prepared, data) first"
            if state == "prepared"
            else f"convert_fx() expects the graph from dmq_fx.prepare_fx + calibrate, got "
            f"{'a ' + state + ' graph' if state else type(prepared).__name__}"
        )


def _layer_kind(spec: LayerQuantSpec) -> str:
    if spec.timestep_table:
        return "timestep_table"
    return "pts" if spec.pts is not None else "plain"


#: the lowering of each layer kind (a split concatenation is a plain layer of several groups)
_LOWERINGS = {"plain": lower_plain, "pts": lower_pts, "timestep_table": lower_timestep_table}


def _layer_inputs(gm: fx.GraphModule, node: fx.Node) -> _LayerInputs:
    spec: LayerQuantSpec = node.meta[ANNOTATION_KEY]
    n_groups = len(spec.input_groups)
    quant_nodes = [node.args[0]] if n_groups == 1 else list(node.args[0].args[0])
    layer = _LayerInputs(node, gm.get_submodule(node.target), spec, quant_nodes, [])
    if not spec.timestep_table:
        for g in range(n_groups):
            fq = layer.quantizer(gm, g)
            layer.act_qparams.append(
                (float(fq.scale), int(fq.zero_point), int(fq.quant_min), int(fq.quant_max))
            )
    if spec.les_owner is not None:  # the division is still there, or it went into the norm
        spec.les_lowering = "step" if _is_les(gm, quant_nodes[0].args[0]) else "norm"
        tau = gm.get_submodule(les_scale_name(spec.les_owner)).tau.detach()
        spec.les_tau = (float(tau.min()), float(tau.max()))
    return layer


def _replace_layer(gm: fx.GraphModule, layer: _LayerInputs, lowered: LoweredLayer) -> None:
    """Point the layer at its lowered inputs, drop the fake-quant nodes and modules it no
    longer reads, and swap the float layer for its :class:`QuantizedLayer`."""
    node, spec = layer.node, layer.spec
    n_groups = len(spec.input_groups)
    cat = node.args[0] if n_groups > 1 else None
    node.args = tuple(lowered.inputs)
    for dead in ([cat] if cat is not None else []) + layer.quant_nodes:
        les_inputs = [a for a in dead.args if _is_les(gm, a)]
        if not dead.users:
            gm.graph.erase_node(dead)
        for les_node in les_inputs:
            if not les_node.users:
                gm.graph.erase_node(les_node)
    for g in range(n_groups):
        gm.delete_submodule(input_quantizer_name(node.target, g, n_groups))
    quantized = QuantizedLayer(
        layer.layer,
        [w for w, _, _ in lowered.weights],
        [s for _, s, _ in lowered.weights],
        [z for _, _, z in lowered.weights],
        lowered.qmin,
        lowered.qmax,
        lowered.act_qparams,
        lowered.form,
        spec.module_type,
    )
    if lowered.act_table is not None:
        quantized.act_table = lowered.act_table  # for summary()
    gm.add_submodule(node.target, quantized)
