"""``save`` / ``load``: what calibration learned, in safetensors, rebuilt on the float model.

A file holds only what calibration produced, never the float weights nor code: the state of
every quantizer and LES scale (activation steps and zero points, PTS exponents, per-timestep
tables, weight qparams, learned roundings, tau) and the float parameters calibration tuned
(``tune_float_params``: biases, norm affines) as safetensors tensors, and a JSON config in the
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
from dmq_fx.lowering.quantized_modules import QuantizedLayer
from dmq_fx.passes import ScaleWeightInputChannels, input_quantizer_name
from dmq_fx.passes.insert_les_scales import tau_per_weight
from dmq_fx.quantize.bitpacking import pack_nibbles, unpack_nibbles
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


def save(graph: fx.GraphModule, path: str | Path, *, standalone: bool = False) -> None:
    """Write what calibration learned for ``graph`` to ``path`` (safetensors + JSON config).

    ``graph`` is a calibrated graph (after :func:`dmq_fx.calibrate`) or the result of
    :func:`dmq_fx.convert_fx`. The float model's class, config and weight fingerprint (recorded
    by :func:`dmq_fx.trace`) go with it, so that :func:`load` refuses another model.

    ``standalone=True`` (a converted graph only) also writes the lowered graph's own tensors:
    integer weights (4-bit and narrower packed two to a byte), their steps and zero points, the
    float layers' weights and the activation qparams, so that ``load(path)`` rebuilds the same
    graph without the float model.
    """
    meta = graph_state(graph)
    state = meta.state if meta is not None else None
    if standalone and state != "converted":
        raise ConfigError(
            "save(standalone=True) writes the lowered graph: pass the result of "
            f"dmq_fx.convert_fx, got {'a ' + state + ' graph' if state else type(graph).__name__}"
        )
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
    if standalone:
        # learned roundings are in the integers already (and would not fit the rebuilt weights)
        tensors = {k: v for k, v in tensors.items() if not _is_rounding(k)}
        lowered, packed = _lowered_tensors(graph)
        tensors.update({f"{LOWERED}{k}": v for k, v in lowered.items()})
        config["standalone"] = {
            "packed": packed,
            "pts_shift": [
                str(n.target)
                for n in quantized_layer_nodes(graph)
                if n.meta[ANNOTATION_KEY].pts_lowering == "shift"
            ],
        }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(config)})


#: prefix of a standalone file's lowered-graph tensors
LOWERED = "lowered/"


def _is_rounding(key: str) -> bool:
    return key.rpartition(".")[2].startswith("rounding_")


def _lowered_tensors(graph: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """The converted graph's state, integer weights of at most 4 bits packed two to a byte;
    the shapes of the packed ones."""
    out, packed = {}, {}
    narrow = {
        name
        for name, m in graph.named_modules()
        if isinstance(m, QuantizedLayer) and m.weight_quant_min >= 0 and m.weight_quant_max <= 15
    }
    for key, value in graph.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if owner in narrow and attr.startswith("weight_int_") and value.dtype == torch.uint8:
            out[key], packed[key] = pack_nibbles(value), list(value.shape)
        elif (
            attr.startswith("weight_zero_point_")
            and 0 <= int(value.min()) <= int(value.max()) < 256
        ):
            out[key] = value.to(torch.uint8)  # int32 in the graph; loaded back as int32
        else:
            out[key] = value
    return out, packed


def _example_inputs(spec: dict) -> dict[str, Any]:
    return {name: _example_value(entry) for name, entry in spec.items()}


def _example_value(entry: dict) -> Any:
    """An input like the recorded one (``trace``'s example spec): zeros of the recorded shape
    and dtype, containers rebuilt."""
    if "shape" in entry:
        return torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
    if "dict" in entry:
        return {k: _example_value(v) for k, v in entry["dict"].items()}
    if "list" in entry:
        return [_example_value(v) for v in entry["list"]]
    if "tuple" in entry:
        return tuple(_example_value(v) for v in entry["tuple"])
    return entry["value"]


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
    float_model: torch.nn.Module | None = None,
    *,
    qconfig_mapping: QConfigMapping | None = None,
) -> fx.GraphModule:
    """Rebuild the graph saved by :func:`save` on ``float_model``.

    A file written with ``save(..., standalone=True)`` loads without ``float_model``: the model
    is built from its recorded class and config, traced and prepared as before, its quantized
    layers get the float weights their saved integers stand for, and after ``convert_fx`` the
    lowered graph takes the saved tensors; it computes exactly what the saved graph computed.
    With ``float_model`` given, that model is checked against the file as for any file.

    Returns the converted graph when a converted graph was saved, else the calibrated graph
    (ready for :func:`dmq_fx.convert_fx`). ``qconfig_mapping`` is needed only when the file was
    made with observers other than dmq_fx's defaults. Raises :class:`dmq_fx.LoadError` for a
    file of another format or version, a corrupted file, or a ``float_model`` of another class,
    config or weights. ``float_model`` is not modified.
    """

    config, tensors = _read(path)
    standalone = config.get("standalone")
    if float_model is None and not standalone:
        raise LoadError(
            f"{path} holds the calibration only: load it on its float model, "
            "load(path, float_model), or save it with save(..., standalone=True)"
        )
    lowered = {k[len(LOWERED) :]: v for k, v in tensors.items() if k.startswith(LOWERED)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(LOWERED)}
    check_weights = float_model is not None
    if float_model is None:
        float_model = _model_from_config(config, str(path))
    prepared = _rebuild(config, tensors, float_model, qconfig_mapping, str(path), check_weights)
    if config["backend"] is None:
        return prepared
    if not standalone:
        return convert_fx(prepared, config["backend"])
    for key, shape in standalone["packed"].items():
        lowered[key] = unpack_nibbles(lowered[key], shape)
    for key, value in lowered.items():
        if key.rpartition(".")[2].startswith("weight_zero_point_"):
            lowered[key] = value.to(torch.int32)
    _weights_from_integers(prepared, lowered, set(standalone["pts_shift"]))
    converted = convert_fx(prepared, config["backend"])
    try:
        converted.load_state_dict(lowered, strict=True)
    except RuntimeError as e:
        raise LoadError(f"{path}: the rebuilt graph does not take its lowered tensors ({e})") from e
    return converted


def _model_from_config(config: dict, path: str) -> torch.nn.Module:
    """The float model class of the file, built from its config with zero weights.

    Every weight the loaded graph uses is replaced by the file's, so the random initialization
    (most of building an SD-sized UNet) is skipped: the model is built on the meta device and
    given zero-filled CPU storage. A model that computes a non-persistent buffer when built (a
    table the file does not hold) is built normally instead.
    """
    import importlib

    module_name, _, class_name = config["model_class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        with torch.device("meta"):
            model = cls.from_config(config["model_config"])
        if any(m._non_persistent_buffers_set for m in model.modules()):
            model = cls.from_config(config["model_config"])
        else:
            model.to_empty(device="cpu")
            with torch.no_grad():
                for tensor in (*model.parameters(), *model.buffers()):
                    tensor.zero_()
        return model.eval()
    except Exception as e:  # an unknown class or a config it refuses: named
        raise LoadError(
            f"{path}: cannot build its {config['model_class']} from the recorded config ({e})"
        ) from e


def _weights_from_integers(
    prepared: fx.GraphModule, lowered: dict[str, torch.Tensor], pts_shift: set[str]
) -> None:
    """Give each quantized layer of ``prepared`` the float weight its saved integers stand for
    (``(W_int - z) * s``, unshifted for PTS shift layers, divided by LES's tau), so that
    ``convert_fx`` makes the same integers and the same lowering choices."""
    for node in quantized_layer_nodes(prepared):
        name = str(node.target)
        layer = prepared.get_submodule(name)
        parts = []
        for g in range(len(node.meta[ANNOTATION_KEY].input_groups)):
            w_int = lowered[f"{name}.weight_int_{g}"]
            shape = (-1,) + (1,) * (w_int.dim() - 1)
            steps = lowered[f"{name}.weight_scale_{g}"].view(shape)
            zero_points = lowered[f"{name}.weight_zero_point_{g}"].view(shape)
            w = (w_int.int() - zero_points) * steps
            if name in pts_shift:  # integers (W_int - z) * 2^j_c: back to W_int - z
                fq = prepared.get_submodule(input_quantizer_name(name, g, len(node.meta[
                    ANNOTATION_KEY].input_groups)))  # fmt: skip
                factors = fq.observer.channel_factors(w.shape[1])
                shifts = torch.round(factors * 2**fq.observer.max_shift)
                w = w / shifts.view(1, -1, *([1] * (w.dim() - 2)))
            parts.append(w)
        weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        for module in reversed(list(layer.parametrizations.weight)[:-1]):
            if not isinstance(module, ScaleWeightInputChannels):
                raise LoadError(f"layer '{name}': weight parametrization {type(module).__name__}")
            weight = weight / tau_per_weight(module.les.tau, weight, module.groups)
        original = layer.parametrizations.weight.original
        with torch.no_grad():
            original.copy_(weight.to(original.dtype))


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
    check_weights: bool = True,
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
    if check_weights and weights_fingerprint(float_model) != config["weights_fingerprint"]:
        raise LoadError(
            f"{path} was calibrated on other weights of this {type(float_model).__name__}: "
            "load it on the float model it was calibrated on"
        )
    layers = config["layers"]
    if qconfig_mapping is None:
        qconfig_mapping = QConfigMapping()
        for name, layer in layers.items():
            ranges = "histogram" if "HistogramRangeObserver" in layer["observers"] else "minmax"
            qconfig_mapping.set_module_name(
                name, get_default_qconfig(layer["weight_bits"], layer["act_bits"], ranges)
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
