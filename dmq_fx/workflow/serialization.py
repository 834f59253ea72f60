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
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx
from torch.ao.quantization import QConfigMapping

from dmq_fx.errors import ConfigError, LoadError
from dmq_fx.graph.meta import ANNOTATION_KEY, GraphState, graph_state, quantized_layer_nodes
from dmq_fx.graph.model_identity import model_config, weights_fingerprint
from dmq_fx.lowering.convert import convert_fx
from dmq_fx.quantize.modes import set_quantizer_mode
from dmq_fx.quantize.prepare import prepare_fx
from dmq_fx.quantize.qconfig import get_default_qconfig
from dmq_fx.quantize.state import (
    assign_state,
    grow_tables,
    layer_record,
    learned_state,
    saved_settings,
)

__all__ = ["FORMAT", "calibrated_graph", "load", "save"]

FORMAT = "dmq_fx.quantized/2"


def save(graph: fx.GraphModule, path: str | Path) -> None:
    """Write what calibration learned for ``graph`` to ``path`` (safetensors + JSON config).

    ``graph`` is a calibrated graph (after :func:`dmq_fx.calibrate`) or the result of
    :func:`dmq_fx.convert_fx`. The float model's class, config and weight fingerprint (recorded
    by :func:`dmq_fx.trace`) go with it, so that :func:`load` refuses another model.
    """
    meta = graph_state(graph)
    state = meta.state if meta is not None else None
    if state == "calibrated":
        tensors, record, backend = learned_state(graph), saved_settings(graph), None
    elif state == "converted" and meta.converted_from is not None:
        tensors, record = meta.converted_from.state, _converted_record(meta)
        backend = meta.converted_from.backend
    else:
        raise ConfigError(
            "save() needs a calibrated graph (dmq_fx.calibrate) or its convert_fx result, got "
            + (f"a {state} graph" if state else type(graph).__name__)
        )
    import diffusers

    from dmq_fx.version import __version__

    config = {
        "format": FORMAT,
        "model_class": meta.model_class,
        "model_config": meta.model_config,
        "weights_fingerprint": meta.weights_fingerprint,
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

    config, tensors = _read(path)
    prepared = _rebuild(config, tensors, float_model, qconfig_mapping, str(path))
    if config["backend"] is None:
        return prepared
    return convert_fx(prepared, config["backend"])


def calibrated_graph(graph: fx.GraphModule, float_model: torch.nn.Module) -> fx.GraphModule:
    """The calibrated (fake-quant) graph behind ``graph``: ``graph`` itself when calibrated,
    rebuilt on ``float_model`` from what :func:`dmq_fx.convert_fx` kept when converted."""
    meta = graph_state(graph)
    state = meta.state if meta is not None else None
    if state == "calibrated":
        return graph
    if state == "converted" and meta.converted_from is not None:
        config = {
            **_converted_record(meta),
            "model_class": meta.model_class,
            "model_config": meta.model_config,
            "weights_fingerprint": meta.weights_fingerprint,
        }
        return _rebuild(config, meta.converted_from.state, float_model, None, "the graph")
    raise ConfigError(
        "expected a calibrated graph or its convert_fx result, got "
        + (f"a {state} graph" if state else type(graph).__name__)
    )


def _converted_record(meta: GraphState) -> dict:
    """The settings record a converted graph kept; ConfigError if save() could not describe
    the calibrated graph it came from."""
    if meta.converted_from.record is None:
        raise ConfigError(meta.converted_from.record_error)
    return meta.converted_from.record


def _rebuild(
    config: dict,
    tensors: dict[str, torch.Tensor],
    float_model: torch.nn.Module,
    qconfig_mapping: QConfigMapping | None,
    path: str,
) -> fx.GraphModule:
    """The calibrated graph described by ``config`` and ``tensors``, on ``float_model``."""

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
        mine = layer_record(node)
        saved = layers[name]
        if any(mine[k] != saved[k] for k in ("weight_bits", "act_bits", "observers")):
            raise LoadError(
                f"{path}: layer {name!r} was saved with {saved['observers']} at "
                f"w{saved['weight_bits']}a{saved['act_bits']}, rebuilt with {mine['observers']} "
                f"at w{mine['weight_bits']}a{mine['act_bits']}: pass the qconfig_mapping it was "
                "made with"
            )
        node.meta[ANNOTATION_KEY].adaround = "adaround" in saved["rewrites"]
    grow_tables(prepared, tensors)
    missing = sorted(set(learned_state(prepared)) - set(tensors))
    if missing:  # (extra keys, e.g. learned roundings, must name a buffer: _assign checks)
        raise LoadError(f"{path}: its tensors do not fit the rebuilt graph (lacks {missing[:3]})")
    assign_state(prepared, tensors)
    set_quantizer_mode(prepared, "simulate")
    record = graph_state(prepared)
    record.state = "calibrated"
    record.stages_run = list(config["stages_run"])
    return prepared
