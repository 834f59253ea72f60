"""The learned state of a prepared graph: what calibration sets, and the settings it ran with.

Save, the calibration checkpoints and ``convert_fx`` all read it; load and resume write it back.
The float weights are never part of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from dmq_fx.errors import ConfigError, LoadError
from dmq_fx.graph.meta import ANNOTATION_KEY, graph_state, quantized_layer_nodes
from dmq_fx.observers import TimestepTableFakeQuantize
from dmq_fx.passes import GroupedWeightFakeQuantize, LESScale

__all__ = ["assign_state", "grow_tables", "layer_record", "learned_state", "saved_settings"]

_STATE_TYPES = (FakeQuantizeBase, GroupedWeightFakeQuantize, LESScale)


def learned_state(
    prepared: fx.GraphModule, modules: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Copies of the tensors calibration sets in a prepared graph: the state of every
    quantizer and LES scale module and the float parameters calibration tuned
    (``GraphState.tuned_parameters``; the other float weights excluded); ``modules``, if given,
    picks the modules by qualified name."""
    out: dict[str, torch.Tensor] = {}
    roots: list[str] = []
    for name, module in prepared.named_modules():
        if isinstance(module, _STATE_TYPES) and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
            if modules is not None and not modules(name):
                continue
            for key, value in module.state_dict(prefix=f"{name}.").items():
                out[key] = value.detach().clone()
    meta = graph_state(prepared)
    for key in meta.tuned_parameters if meta is not None else ():
        if modules is None or modules(key.rpartition(".")[0]):
            out[key] = prepared.get_parameter(key).detach().clone()
    return out


def layer_record(node: fx.Node) -> dict:
    spec = node.meta[ANNOTATION_KEY]
    return {
        "weight_bits": spec.weight_bits,
        "act_bits": spec.act_bits,
        "weight_qscheme": str(spec.weight_qscheme),
        "input_groups": list(spec.input_groups),
        "rewrites": ["adaround"] if spec.adaround else [],  # (the file format's name)
        "observers": [
            type(spec.qconfig.activation()).__name__,
            type(spec.qconfig.weight()).__name__,
        ],
    }


def saved_settings(prepared: fx.GraphModule) -> dict:
    """The settings :func:`save` records for a prepared or calibrated graph (JSON values)."""
    meta = graph_state(prepared)
    if meta is None or meta.prepare_flags is None:
        raise ConfigError("save() needs a graph made by dmq_fx.prepare_fx from this version")
    odd = {k: _unsupported(v) for k, v in meta.example_spec.items()}
    odd = {k: v for k, v in odd.items() if v is not None}
    if odd:
        name, kind = next(iter(odd.items()))
        raise ConfigError(
            f"save() records the example inputs to re-trace the model; input {name!r} holds a "
            f"{kind} (tensors, numbers, strings, None, and dicts / lists / tuples of them only)"
        )
    return {
        "example_spec": meta.example_spec,
        "prepare": meta.prepare_flags,
        "stages_run": list(meta.stages_run),
        "layers": {str(n.target): layer_record(n) for n in quantized_layer_nodes(prepared)},
    }


def _unsupported(spec: dict) -> str | None:
    """The type name of an input (or entry) the example spec could not describe, if any."""
    if "unsupported" in spec:
        return spec["unsupported"]
    children = list(spec.get("dict", {}).values()) + spec.get("list", []) + spec.get("tuple", [])
    return next((u for u in map(_unsupported, children) if u is not None), None)


def grow_tables(prepared: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """Give each per-timestep table of ``prepared`` the entries of the saved timesteps (its
    ``.grid`` in ``tensors``), so that the saved entry states have modules to go to."""
    for key in sorted(tensors):
        if key.endswith(".grid"):
            table = prepared.get_submodule(key[: -len(".grid")])
            if isinstance(table, TimestepTableFakeQuantize):
                for t in tensors[key].tolist():
                    table._entry_for(float(t))


def assign_state(prepared: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved quantizer / LES tensors and tuned float parameters into ``prepared`` (buffers
    that change shape, such as PTS exponents or learned roundings, are replaced)."""
    grow_tables(prepared, tensors)
    for key, value in tensors.items():
        _assign(prepared, key, value)
    # a saved float parameter (no quantizer's or LES scale's) was tuned by calibration: it stays
    # part of the learned state
    states = [name for name, m in prepared.named_modules() if isinstance(m, _STATE_TYPES)]
    tuned = [
        key
        for key in tensors
        if not any(key.startswith(f"{name}.") for name in states)
        and key.rpartition(".")[2] in prepared.get_submodule(key.rpartition(".")[0])._parameters
    ]
    meta = graph_state(prepared)
    if tuned and meta is not None:
        meta.tuned_parameters = sorted({*meta.tuned_parameters, *tuned})


def _assign(gm: fx.GraphModule, key: str, value: torch.Tensor) -> None:
    owner, _, attr = key.rpartition(".")
    try:
        module = gm.get_submodule(owner)
    except AttributeError as e:
        raise LoadError(f"saved tensor {key!r} has no module in the rebuilt graph") from e
    if attr in module._parameters:
        module._parameters[attr].data = value.clone()
    elif attr in module._buffers:
        module._buffers[attr] = value.clone()
    else:
        raise LoadError(f"saved tensor {key!r} matches no buffer or parameter of {owner!r}")
