"""LoRA adapters on a quantized UNet, without recalibrating.

An adapter becomes float low-rank branches beside the layers it targets:
``y = layer(x) + scale * B(A(x))``, computed on the float input ``x`` the layer sees (recovered
from the graph: the tensor its quantize step reads; where LES folded ``1 / tau`` into a norm,
``tau`` is folded into ``A``; a split concatenation's inputs each meet their slice of ``A``).
The quantized layers, their integer weights and activation steps stay as calibrated.

The pass matches ``call_module`` nodes of :class:`~dmq_fx.lowering.quantized_modules.
QuantizedLayer` (or a float Conv2d / Linear the graph kept) whose name a LoRA key targets, and
rewrites ``out = layer(...)`` into ``out = layer(...) + <layer>_lora(x...)``; with no adapter
left, the branch nodes are removed again. It changes the converted graph in place, as diffusers'
``load_lora_weights`` changes a pipeline.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx

from dmq_fx.errors import ConfigError, LoadError
from dmq_fx.graph.meta import ANNOTATION_KEY, graph_state
from dmq_fx.lowering.quantized_modules import QDQ_OPS, QuantizedLayer
from dmq_fx.metrics import sqnr_db
from dmq_fx.passes import les_scale_name

__all__ = [
    "LoRABranches",
    "load_lora",
    "lora_adapters",
    "read_lora_file",
    "remove_lora",
    "set_adapters",
    "set_lora_scale",
]

_SUFFIX = "_lora"


class LoRABranches(torch.nn.Module):
    """The LoRA branches beside one layer: ``sum_a scale_a * B_a(A_a(x))`` over the active
    adapters, ``x`` given as the layer's input groups (``A`` split along its input channels)."""

    def __init__(self, layer: torch.nn.Module, group_channels: Sequence[int]) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, torch.nn.Conv2d) or getattr(layer, "is_conv", False)
        if self.is_conv:
            self.stride, self.padding = list(layer.stride), list(layer.padding)
            self.dilation = list(layer.dilation)
        self.group_channels = list(group_channels)
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        #: per adapter: the user's scale, and the file's ``alpha / rank``
        self.scales: dict[str, float] = {}
        self.factors: dict[str, float] = {}
        self.active: list[str] = []

    def add(
        self, name: str, down: torch.Tensor, up: torch.Tensor, factor: float, scale: float
    ) -> None:
        self.down[name] = torch.nn.Parameter(down.detach().float().clone(), requires_grad=False)
        self.up[name] = torch.nn.Parameter(up.detach().float().clone(), requires_grad=False)
        self.scales[name], self.factors[name] = float(scale), float(factor)
        if name not in self.active:
            self.active.append(name)

    def remove(self, name: str) -> None:
        del self.down[name], self.up[name], self.scales[name], self.factors[name]
        self.active = [a for a in self.active if a != name]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = None
        for name in self.active:
            parts = self.down[name].split(self.group_channels, dim=1)
            hidden = None
            for x, down in zip(inputs, parts):
                h = (
                    F.conv2d(x, down, None, self.stride, self.padding, self.dilation)
                    if self.is_conv
                    else F.linear(x, down)
                )
                hidden = h if hidden is None else hidden + h
            y = F.conv2d(hidden, self.up[name]) if self.is_conv else F.linear(hidden, self.up[name])
            y = y * (self.scales[name] * self.factors[name])
            out = y if out is None else out + y
        if out is None:  # every adapter switched off
            return inputs[0].new_zeros(())
        return out


# -- reading adapters ---------------------------------------------------------------------------
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(\.[^.]+)?\.weight$")
_LEGACY = re.compile(r"^(?P<module>.+)\.lora\.(?P<kind>down|up)\.weight$")
#: diffusers' attention-processor naming (what its kohya converter returns for attention)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")


def _module_key(name: str) -> str:
    """``....attn1.processor.to_out_lora.down.weight`` -> ``....attn1.to_out.0.lora.down...``"""
    return _PROCESSOR.sub(lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.", name)


def read_lora_file(lora: Mapping[str, torch.Tensor] | str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA state dict, or of a ``.safetensors`` file (LoadError if
    unreadable)."""
    if isinstance(lora, (str, Path)):
        from safetensors.torch import load_file

        try:
            return load_file(str(lora))
        except Exception as e:  # unreadable file: named
            raise LoadError(f"{lora}: not a readable safetensors LoRA file ({e})") from e
    if not isinstance(lora, Mapping):
        raise ConfigError(f"lora must be a state dict or a path, got {type(lora).__name__}")
    return dict(lora)


def lora_weights(
    lora: Mapping[str, torch.Tensor] | str | Path,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """``{UNet module name: (A, B, alpha)}`` of a LoRA state dict or file: peft's naming
    (``<module>.lora_A.weight``, what ``get_peft_model_state_dict`` returns), diffusers'
    ``save_lora_weights`` files (``unet.`` prefix) and its older ``lora.down`` / ``lora.up``
    naming; kohya files (``lora_unet_...``) go through diffusers' own converter first."""
    state = read_lora_file(lora)
    if any(k.startswith("lora_unet_") for k in state):
        from diffusers import StableDiffusionPipeline

        state, alphas = StableDiffusionPipeline.lora_state_dict(state)
        state = {**state, **{k: torch.tensor(v) for k, v in (alphas or {}).items()}}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    skipped = []
    for key, value in state.items():
        if key.startswith(("text_encoder", "text_encoder_2")):
            skipped.append(key)
            continue
        name = _module_key(key.removeprefix("unet."))
        if name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = float(value)
            continue
        match = _PEFT.match(name) or _LEGACY.match(name)
        if match is None:
            raise LoadError(f"LoRA key '{key}' is not a LoRA weight dmq_fx knows how to read")
        kind = {"A": "down", "B": "up"}.get(match["kind"], match["kind"])
        pairs.setdefault(match["module"], {})[kind] = value
    out = {}
    for module, pair in pairs.items():
        if set(pair) != {"down", "up"}:
            raise LoadError(f"LoRA of '{module}' has no {'up' if 'down' in pair else 'down'}")
        module_alpha = alphas.get(module, alphas.get(module.replace(".", "_")))
        out[module] = (pair["down"], pair["up"], module_alpha)
    if not out:
        raise LoadError("the LoRA holds no UNet weights" + (" (only text encoder)" * bool(skipped)))
    return out


# -- the graph rewrite --------------------------------------------------------------------------
def _float_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The float tensors a layer's input groups were quantized from (or its float input)."""
    sources = []
    for arg in node.args:
        while arg.op == "call_function" and arg.target in QDQ_OPS:
            arg = arg.args[0]
        sources.append(arg)
    return sources


def _les_tau(gm: fx.GraphModule, node: fx.Node, forms=("norm", "step")) -> torch.Tensor | None:
    """``tau`` of a layer lowered with LES in one of ``forms`` (its integer weights are those
    of ``W diag(tau)``), else None."""
    spec = node.meta.get(ANNOTATION_KEY)
    if spec is None or spec.les_lowering not in forms:
        return None
    # the owner's LES scale module, or the weight parametrization sharing its tau
    state = graph_state(gm).converted_from.state
    owner = spec.les_owner
    keys = [f"{les_scale_name(owner)}.tau"] + [
        k for k in state if k.startswith(f"{owner}.") and k.endswith(".les.tau")
    ]
    found = [k for k in keys if k in state]
    if not found:
        raise ConfigError(f"layer '{node.target}': no LES tau of '{owner}' in the graph's state")
    return state[found[0]]


def _layer_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, (QuantizedLayer, torch.nn.Conv2d, torch.nn.Linear)):
            out.setdefault(node.target, node)
    return out


def _check_converted(gm: fx.GraphModule) -> None:
    record = graph_state(gm)
    if record is None or record.state != "converted":
        got = f"a {record.state} graph" if record and record.state else "no dmq_fx graph"
        raise ConfigError(
            "LoRA adapters go on a converted graph (dmq_fx.convert_fx); calibrate without them, "
            f"got {got}"
        )


def _shapes(layer: torch.nn.Module, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if isinstance(layer, QuantizedLayer):
        out_ch = layer.weight_int_0.shape[0]
        in_ch = sum(getattr(layer, f"weight_int_{g}").shape[1] for g in range(layer.num_groups))
    else:
        out_ch, in_ch = layer.weight.shape[0], layer.weight.shape[1]
    if down.shape[1] != in_ch or up.shape[0] != out_ch or up.shape[1] != down.shape[0]:
        raise LoadError(
            f"LoRA of '{name}': A {tuple(down.shape)} and B {tuple(up.shape)} do not fit the "
            f"layer ({in_ch} inputs, {out_ch} outputs)"
        )


def load_lora(
    quantized: fx.GraphModule,
    lora: Mapping[str, torch.Tensor] | str | Path,
    adapter_name: str = "default",
    scale: float = 1.0,
    *,
    lora_alpha: float | None = None,
    fuse: bool = False,
) -> fx.GraphModule:
    """Add a LoRA adapter to a converted graph as float low-rank branches (module docstring).

    ``fuse=True`` merges the adapter into the integer weights instead: each targeted layer's
    weight ``W + scale * alpha / r * B A`` is re-quantized with the layer's stored steps and zero
    points (no branch, no extra cost; a delta much smaller than a weight step is lost). What
    survives is stated per layer in ``quantized.meta["dmq_fx_lora"][adapter_name]["sqnr_db"]``:
    the SQNR of the fused integer change against the intended delta. Layers with PTS shifts or
    timestep tables cannot be fused (ConfigError before anything changes); ``remove_lora``
    restores the original integers.

    ``lora``: a state dict or a ``.safetensors`` path (peft / diffusers / kohya naming, see
    :func:`lora_weights`). Each branch is scaled by ``scale * alpha / rank``: ``alpha`` from the
    file where it holds one (kohya, older diffusers files), else ``lora_alpha`` (peft state dicts
    carry none: pass the ``LoraConfig``'s), else the rank. Returns ``quantized``, changed in
    place; every check runs before anything changes.
    """
    _check_converted(quantized)
    weights = lora_weights(lora)
    layers = _layer_nodes(quantized)
    missing = sorted(set(weights) - set(layers))
    if missing:
        raise LoadError(
            f"LoRA targets {len(missing)} module(s) this graph has no layer for, e.g. "
            f"'{missing[0]}' (the graph's layers: e.g. '{next(iter(layers))}')"
        )
    if adapter_name in lora_adapters(quantized):
        raise ConfigError(f"an adapter named '{adapter_name}' is loaded already; remove_lora it")
    for name, (down, up, _) in weights.items():
        _shapes(quantized.get_submodule(name), name, down, up)
    if fuse:
        return _fuse(quantized, weights, layers, adapter_name, scale, lora_alpha)
    for name, (down, up, alpha) in weights.items():
        node = layers[name]
        branches = _branches(quantized, node)
        tau = _les_tau(quantized, node, forms=("norm",))
        if tau is not None:  # LES in the norm: the input is x / tau, A x = (A diag(tau)) (x / tau)
            down = down * tau.view(1, -1, *([1] * (down.dim() - 2)))
        rank = down.shape[0]
        alpha = alpha or lora_alpha or rank
        branches.add(adapter_name, down, up, alpha / rank, scale)
    quantized.graph.lint()
    quantized.recompile()
    return quantized


def _fuse(quantized, weights, layers, adapter_name, scale, lora_alpha) -> fx.GraphModule:
    """``load_lora(fuse=True)``: the adapter merged into the integer weights (see there)."""
    for name in weights:
        module, spec = quantized.get_submodule(name), layers[name].meta.get(ANNOTATION_KEY)
        if not isinstance(module, QuantizedLayer) or spec.pts_lowering or spec.timestep_table:
            why = "a float layer" if not isinstance(module, QuantizedLayer) else "PTS / tables"
            raise ConfigError(f"cannot fuse a LoRA into '{name}' ({why}); load it unfused")
    record = {"fused": {}, "sqnr_db": {}}
    for name, (down, up, alpha) in weights.items():
        layer = quantized.get_submodule(name)
        rank = down.shape[0]
        factor = scale * (alpha or lora_alpha or rank) / rank
        if down.dim() == 4:  # conv: B (out, r, 1, 1) x A (r, in, k, k)
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0].float(), down.float())
        else:
            delta = up.float() @ down.float()
        delta = delta * factor
        tau = _les_tau(quantized, layers[name])
        if tau is not None:  # the integers are those of W diag(tau)
            delta = delta * tau.view(1, -1, *([1] * (delta.dim() - 2)))
        originals, changes = [], []
        start = 0
        for g in range(layer.num_groups):
            w_int = getattr(layer, f"weight_int_{g}")
            width = w_int.shape[1]
            part = delta[:, start : start + width]
            start += width
            shape = (-1,) + (1,) * (w_int.dim() - 1)
            steps = getattr(layer, f"weight_scale_{g}").view(shape)
            zero_points = getattr(layer, f"weight_zero_point_{g}").view(shape)
            merged = layer.dequantized_weight(g) + part
            fused = torch.round(merged / steps) + zero_points
            fused = fused.clamp(layer.weight_quant_min, layer.weight_quant_max).to(w_int.dtype)
            originals.append(w_int.clone())
            changes.append(((fused.int() - w_int.int()) * steps, part))
            w_int.copy_(fused)
        layer._packed = None  # repack the new integers
        got = torch.cat([c.flatten() for c, _ in changes])
        want = torch.cat([p.flatten() for _, p in changes])
        record["sqnr_db"][name] = sqnr_db(want, got)
        record["fused"][name] = originals
    quantized.meta.setdefault("dmq_fx_lora", {})[adapter_name] = record
    return quantized


def _branches(gm: fx.GraphModule, node: fx.Node) -> LoRABranches:
    """The layer's LoRABranches, inserted beside it (``out = layer(...) + branches(x...)``)
    on first use."""
    name = f"{node.target}{_SUFFIX}"
    try:
        return gm.get_submodule(name)
    except AttributeError:
        pass
    layer = gm.get_submodule(node.target)
    sources = _float_inputs(gm, node)
    if isinstance(layer, QuantizedLayer):
        groups = [getattr(layer, f"weight_int_{g}").shape[1] for g in range(layer.num_groups)]
    else:
        groups = [layer.weight.shape[1]]
    branches = LoRABranches(layer, groups)
    gm.add_submodule(name, branches)
    users = list(node.users)
    with gm.graph.inserting_after(node):
        branch = gm.graph.call_module(name, tuple(sources))
    with gm.graph.inserting_after(branch):
        total = gm.graph.call_function(operator.add, (node, branch))
    for user in users:
        user.replace_input_with(node, total)
    return branches


def _all_branches(gm: fx.GraphModule) -> dict[str, LoRABranches]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, LoRABranches)}


def lora_adapters(quantized: fx.GraphModule) -> list[str]:
    """Names of the adapters loaded on ``quantized``."""
    names: list[str] = []
    for branches in _all_branches(quantized).values():
        names += [n for n in branches.scales if n not in names]
    return names + [n for n in quantized.meta.get("dmq_fx_lora", {}) if n not in names]


def _check_unfused(quantized: fx.GraphModule, names: Sequence[str], what: str) -> None:
    fused = [n for n in names if n in quantized.meta.get("dmq_fx_lora", {})]
    if fused:
        raise ConfigError(
            f"adapter '{fused[0]}' is fused into the weights: it has no {what}; remove_lora it "
            "and load it again (unfused) to change that"
        )


def _require(quantized: fx.GraphModule, names: Sequence[str]) -> None:
    loaded = lora_adapters(quantized)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise ConfigError(f"no adapter named '{unknown[0]}' is loaded (loaded: {loaded})")


def set_lora_scale(quantized: fx.GraphModule, adapter_name: str, scale: float) -> None:
    """Scale adapter ``adapter_name`` by ``scale`` (times its ``alpha / rank``) from now on."""
    _require(quantized, [adapter_name])
    _check_unfused(quantized, [adapter_name], "scale")
    for branches in _all_branches(quantized).values():
        if adapter_name in branches.scales:
            branches.scales[adapter_name] = float(scale)


def set_adapters(
    quantized: fx.GraphModule, names: Sequence[str], weights: Sequence[float] | None = None
) -> None:
    """Make exactly ``names`` active (others stay loaded, off), with ``weights`` as their
    scales if given, as diffusers' ``set_adapters``."""
    names = [names] if isinstance(names, str) else list(names)
    _require(quantized, names)
    off = [n for n in quantized.meta.get("dmq_fx_lora", {}) if n not in names]
    _check_unfused(quantized, off + (names if weights is not None else []), "switch")
    if weights is not None:
        if len(weights) != len(names):
            raise ConfigError(f"{len(names)} adapters but {len(weights)} weights")
        for name, weight in zip(names, weights):
            set_lora_scale(quantized, name, weight)
    for branches in _all_branches(quantized).values():
        branches.active = [n for n in names if n in branches.scales]


def remove_lora(quantized: fx.GraphModule, adapter_name: str) -> fx.GraphModule:
    """Remove adapter ``adapter_name``; a layer left without adapters gets its graph back (a
    fused adapter: the original integer weights)."""
    _require(quantized, [adapter_name])
    fused = quantized.meta.get("dmq_fx_lora", {}).pop(adapter_name, None)
    if fused is not None:
        for name, originals in fused["fused"].items():
            layer = quantized.get_submodule(name)
            for g, w_int in enumerate(originals):
                getattr(layer, f"weight_int_{g}").copy_(w_int)
            layer._packed = None
        return quantized
    graph = quantized.graph
    for name, branches in _all_branches(quantized).items():
        if adapter_name not in branches.scales:
            continue
        branches.remove(adapter_name)
        if branches.scales:
            continue
        branch = next(n for n in graph.nodes if n.op == "call_module" and n.target == name)
        (total,) = branch.users
        total.replace_all_uses_with(total.args[0])
        graph.erase_node(total)
        graph.erase_node(branch)
        quantized.delete_submodule(name)
    graph.lint()
    quantized.recompile()
    return quantized
