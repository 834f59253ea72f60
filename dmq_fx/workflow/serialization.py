"""``save`` / ``load``: what calibration learned, in safetensors, rebuilt on the float model.

A file holds only what calibration produced, never the float weights nor code: the state of
every quantizer and LES scale (activation steps and zero points, PTS exponents, per-timestep
tables, weight qparams, learned roundings, tau) as safetensors tensors, and a JSON config in the
safetensors metadata (format version, the float model's class, config and weight fingerprint,
the example input shapes the graph was traced with, the ``prepare_fx`` flags, each quantized
layer's bits and rewrites, the calibration stages, the lowering backend, library versions).
:func:`load` re-traces the float model with inputs of the recorded shapes, prepares it with the
recorded settings, puts the saved state in, and converts with the recorded backend: the same
graph, bit-identical outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from dmq_fx.errors import ConfigError, LoadError
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.graph.model_identity import model_config, weights_fingerprint
from dmq_fx.observers import TimestepTableFakeQuantize
from dmq_fx.passes import GroupedWeightFakeQuantize, LESScale

__all__ = ["FORMAT", "calibrated_graph", "learned_state", "load", "save"]

FORMAT = "dmq_fx.quantized/2"
_STATE_TYPES = (FakeQuantizeBase, GroupedWeightFakeQuantize, LESScale)


def learned_state(
    prepared: fx.GraphModule, modules: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Copies of the tensors calibration sets in a prepared graph: the state of every
    quantizer and LES scale module (the float weights excluded); ``modules``, if given, picks
    the modules by qualified name."""
    out: dict[str, torch.Tensor] = {}
    roots: list[str] = []
    for name, module in prepared.named_modules():
        if isinstance(module, _STATE_TYPES) and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
            if modules is not None and not modules(name):
                continue
            for key, value in module.state_dict(prefix=f"{name}.").items():
                out[key] = value.detach().clone()
    return out


def _layer_record(node: fx.Node) -> dict:
    spec = node.meta["dmq_fx"]
    return {
        "weight_bits": spec.weight_bits,
        "act_bits": spec.act_bits,
        "weight_qscheme": str(spec.weight_qscheme),
        "input_groups": list(spec.input_groups),
        "rewrites": [r for r in spec.rewrites if r == "adaround"],
        "observers": [
            type(spec.qconfig.activation()).__name__,
            type(spec.qconfig.weight()).__name__,
        ],
    }


def save(graph: fx.GraphModule, path: str | Path) -> None:
    """Write what calibration learned for ``graph`` to ``path`` (safetensors + JSON config).

    ``graph`` is a calibrated graph (after :func:`dmq_fx.calibrate`) or the result of
    :func:`dmq_fx.convert_fx`. The float model's class, config and weight fingerprint (recorded
    by :func:`dmq_fx.trace`) go with it, so that :func:`load` refuses another model.
    """
    meta = graph.meta.get("dmq_fx", {}) if isinstance(graph, fx.GraphModule) else {}
    state = meta.get("state")
    if state == "calibrated":
        tensors, record, backend = learned_state(graph), saved_settings(graph), None
    elif state == "converted" and "source" in meta:
        tensors, record = meta["source"]["state"], meta["source"]["record"]
        backend = meta["source"]["backend"]
        if isinstance(record, Exception):
            raise record
    else:
        raise ConfigError(
            "save() needs a calibrated graph (dmq_fx.calibrate) or its convert_fx result, got "
            + (f"a {state} graph" if state else type(graph).__name__)
        )
    import diffusers

    from dmq_fx.version import __version__

    config = {
        "format": FORMAT,
        "model_class": meta["model_class"],
        "model_config": meta["model_config"],
        "weights_fingerprint": meta["weights_fingerprint"],
        "backend": backend,
        "versions": {
            "dmq_fx": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        **record,
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(config)})


def saved_settings(prepared: fx.GraphModule) -> dict:
    """The settings :func:`save` records for a prepared or calibrated graph (JSON values)."""
    meta = prepared.meta["dmq_fx"]
    if any(k not in meta for k in ("prepare", "example_spec", "weights_fingerprint")):
        raise ConfigError("save() needs a graph made by dmq_fx.prepare_fx from this version")
    odd = [k for k, v in meta["example_spec"].items() if "unsupported" in v]
    if odd:
        raise ConfigError(
            f"save() records the example inputs to re-trace the model; input {odd[0]!r} is a "
            f"{meta['example_spec'][odd[0]]['unsupported']} (tensors, numbers, strings, None only)"
        )
    return {
        "example_spec": meta["example_spec"],
        "prepare": meta["prepare"],
        "stages_run": list(meta.get("stages_run", [])),
        "layers": {str(n.target): _layer_record(n) for n in quantized_layer_nodes(prepared)},
    }


def _example_inputs(spec: dict) -> dict[str, Any]:
    out = {}
    for name, entry in spec.items():
        if "shape" in entry:
            out[name] = torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
        else:
            out[name] = entry["value"]
    return out


def _read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise LoadError(
                    f"{path}: not a dmq_fx quantization file of this version (format "
                    f"{metadata.get('format')!r}, this dmq_fx reads {FORMAT!r})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        config = json.loads(metadata["config"])
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        if isinstance(e, LoadError):
            raise
        raise LoadError(f"{path}: unreadable or corrupted dmq_fx file ({e})") from e
    return config, tensors


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
    """Put saved quantizer / LES tensors into ``prepared`` (buffers that change shape, such as
    PTS exponents or learned roundings, are replaced)."""
    grow_tables(prepared, tensors)
    for key, value in tensors.items():
        _assign(prepared, key, value)


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


def load(
    path: str | Path,
    float_model: torch.nn.Module,
    *,
    qconfig_mapping: QConfigMapping | None = None,
) -> fx.GraphModule:
    """Rebuild the graph saved by :func:`save` on ``float_model``.

    Returns the converted graph when a converted graph was saved, else the calibrated graph
    (ready for :func:`dmq_fx.convert_fx`). ``qconfig_mapping`` is needed only when the file was
    made with observers other than dmq_fx's defaults. Raises :class:`dmq_fx.LoadError` for a
    file of another format or version, a corrupted file, or a ``float_model`` of another class,
    config or weights. ``float_model`` is not modified.
    """
    from dmq_fx.lowering.convert import convert_fx

    config, tensors = _read(path)
    prepared = _rebuild(config, tensors, float_model, qconfig_mapping, str(path))
    if config["backend"] is None:
        return prepared
    return convert_fx(prepared, config["backend"])


def calibrated_graph(graph: fx.GraphModule, float_model: torch.nn.Module) -> fx.GraphModule:
    """The calibrated (fake-quant) graph behind ``graph``: ``graph`` itself when calibrated,
    rebuilt on ``float_model`` from what :func:`dmq_fx.convert_fx` kept when converted."""
    meta = graph.meta.get("dmq_fx", {}) if isinstance(graph, fx.GraphModule) else {}
    if meta.get("state") == "calibrated":
        return graph
    if meta.get("state") == "converted" and "source" in meta:
        record = meta["source"]["record"]
        if isinstance(record, Exception):
            raise record
        config = {
            **record,
            "model_class": meta["model_class"],
            "model_config": meta["model_config"],
            "weights_fingerprint": meta["weights_fingerprint"],
        }
        return _rebuild(config, meta["source"]["state"], float_model, None, "the graph")
    raise ConfigError(
        "expected a calibrated graph or its convert_fx result, got "
        + (f"a {meta['state']} graph" if meta.get("state") else type(graph).__name__)
    )


def _rebuild(
    config: dict,
    tensors: dict[str, torch.Tensor],
    float_model: torch.nn.Module,
    qconfig_mapping: QConfigMapping | None,
    path: str,
) -> fx.GraphModule:
    """The calibrated graph described by ``config`` and ``tensors``, on ``float_model``."""
    from dmq_fx.quantize.calibrate import _enable_simulation
    from dmq_fx.quantize.prepare import prepare_fx
    from dmq_fx.quantize.qconfig import get_default_qconfig

    model_class = f"{type(float_model).__module__}.{type(float_model).__qualname__}"
    if model_class != config["model_class"]:
        raise LoadError(f"{path} was made for a {config['model_class']}, got a {model_class}")
    if model_config(float_model) != config["model_config"]:
        raise LoadError(
            f"{path} was made for a {type(float_model).__name__} with another config "
            "(another architecture): load it on the model it was calibrated on"
        )
    if weights_fingerprint(float_model) != config["weights_fingerprint"]:
        raise LoadError(
            f"{path} was calibrated on other weights of this {type(float_model).__name__}: "
            "load it on the float model it was calibrated on"
        )
    layers = config["layers"]
    if qconfig_mapping is None:
        qconfig_mapping = QConfigMapping()
        for name, layer in layers.items():
            qconfig_mapping.set_module_name(
                name, get_default_qconfig(layer["weight_bits"], layer["act_bits"])
            )
    examples = _example_inputs(config["example_spec"])
    prepared = prepare_fx(float_model, qconfig_mapping, (), examples, **config["prepare"])
    rebuilt = {str(n.target): n for n in quantized_layer_nodes(prepared)}
    if set(rebuilt) != set(layers):
        raise LoadError(
            f"{path}: the rebuilt graph quantizes other layers than the saved one "
            f"(missing {sorted(set(layers) - set(rebuilt))[:3]}, extra "
            f"{sorted(set(rebuilt) - set(layers))[:3]}); pass the qconfig_mapping it was made with"
        )
    for name, node in rebuilt.items():
        mine = _layer_record(node)
        saved = layers[name]
        if any(mine[k] != saved[k] for k in ("weight_bits", "act_bits", "observers")):
            raise LoadError(
                f"{path}: layer {name!r} was saved with {saved['observers']} at "
                f"w{saved['weight_bits']}a{saved['act_bits']}, rebuilt with {mine['observers']} "
                f"at w{mine['weight_bits']}a{mine['act_bits']}: pass the qconfig_mapping it was "
                "made with"
            )
        node.meta["dmq_fx"].rewrites += [r for r in saved["rewrites"] if r not in mine["rewrites"]]
    grow_tables(prepared, tensors)
    missing = sorted(set(learned_state(prepared)) - set(tensors))
    if missing:  # (extra keys, e.g. learned roundings, must name a buffer: _assign checks)
        raise LoadError(f"{path}: its tensors do not fit the rebuilt graph (lacks {missing[:3]})")
    assign_state(prepared, tensors)
    _enable_simulation(prepared)
    prepared.meta["dmq_fx"]["state"] = "calibrated"
    prepared.meta["dmq_fx"]["stages_run"] = list(config["stages_run"])
    return prepared
