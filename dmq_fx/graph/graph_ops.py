"""Functions that :func:`dmq_fx.trace` inserts into traced graphs.

Each one dispatches through ``__torch_function__`` when given an FX proxy (as ``torch._assert``
does), so a traced GraphModule re-traces with any FX tracer, torch.ao's QuantizationTracer included,
and the function shows up again as one ``call_function`` node.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch.fx.node import has_side_effect
from torch.overrides import handle_torch_function, has_torch_function

from dmq_fx.errors import InputMismatchError


def normalize_timestep(timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    """Return ``timestep`` as a 1-d tensor with one entry per batch element of ``sample``.

    Accepts what diffusers UNets accept: a Python number, a 0-d tensor, a 1-d tensor of length 1
    or of the batch size. Traced graphs call this first, so Python control flow inside the UNet
    always sees the same timestep form, whatever the caller passes.
    """
    if has_torch_function((timestep, sample)):
        return handle_torch_function(normalize_timestep, (timestep, sample), timestep, sample)
    batch = sample.shape[0]
    if not isinstance(timestep, torch.Tensor):
        dtype = torch.float32 if isinstance(timestep, float) else torch.int64
        return torch.full((batch,), timestep, dtype=dtype, device=sample.device)
    if timestep.ndim == 0 or (timestep.ndim == 1 and timestep.shape[0] == 1):
        return timestep.reshape(1).expand(batch).to(sample.device)
    if timestep.ndim == 1 and timestep.shape[0] == batch:
        return timestep.to(sample.device)
    raise InputMismatchError(
        f"argument 'timestep' has shape {tuple(timestep.shape)}; expected a number, a 0-d "
        f"tensor or a 1-d tensor of length 1 or {batch} (the batch size of 'sample')"
    )


@has_side_effect
def check_input(
    value: torch.Tensor, trailing_shape: tuple[int, ...], dtype: torch.dtype, arg_name: str
) -> None:
    """Raise :class:`InputMismatchError` unless ``value`` matches what the graph was traced for.

    Only the batch dimension may change: diffusers UNets branch in Python on the spatial size
    (``forward_upsample_size``) and on the dtype, and a traced graph keeps the branch it saw.
    """
    if has_torch_function((value,)):
        return handle_torch_function(check_input, (value,), value, trailing_shape, dtype, arg_name)
    if not isinstance(value, torch.Tensor):
        raise InputMismatchError(
            f"argument '{arg_name}' must be a tensor, got {type(value).__name__}"
        )
    if tuple(value.shape[1:]) != tuple(trailing_shape) or value.dtype != dtype:
        traced = "(B, " + ", ".join(str(d) for d in trailing_shape) + ")"
        raise InputMismatchError(
            f"argument '{arg_name}' has shape {tuple(value.shape)} and dtype {value.dtype}, but "
            f"this graph was traced for shape {traced} and dtype {dtype}; only the batch size may "
            f"change. Re-trace for the new size: dmq_fx.trace(model, example_inputs) (or "
            f"dmq_fx.prepare_fx / calibrate / convert_fx again) with an example of that shape."
        )


@has_side_effect
def check_is_none(value: Any, arg_name: str) -> None:
    """Raise :class:`InputMismatchError` if an argument the graph was traced without is given."""
    if has_torch_function((value,)):
        return handle_torch_function(check_is_none, (value,), value, arg_name)
    if value is not None:
        raise InputMismatchError(
            f"argument '{arg_name}' was not given when this graph was traced, so the graph has "
            f"no path for it; re-trace with it in example_kwargs: dmq_fx.trace(model, args, "
            f"{{'{arg_name}': ...}})"
        )


@has_side_effect
def check_structure(value: Any, structure: tuple, arg_name: str) -> None:
    """Raise :class:`InputMismatchError` unless a dict / tuple / list input has the keys or
    length the graph was traced with (``("dict", keys)`` or ``("sequence", length)``): the
    graph reads each entry the example had, and nothing else."""
    if has_torch_function((value,)):
        return handle_torch_function(check_structure, (value,), value, structure, arg_name)
    kind, expected = structure
    if kind == "dict":
        if not isinstance(value, Mapping) or set(value) != set(expected):
            got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise InputMismatchError(
                f"argument '{arg_name}' must be a dict with the keys {sorted(expected)} this "
                f"graph was traced with, got {got}; re-trace with an example that has them"
            )
    elif not isinstance(value, (tuple, list)) or len(value) != expected:
        got = len(value) if isinstance(value, (tuple, list)) else type(value).__name__
        raise InputMismatchError(
            f"argument '{arg_name}' must be a tuple or list of {expected} entries (as traced), "
            f"got {got}"
        )


@has_side_effect
def check_constant(value: Any, expected: Any, arg_name: str) -> None:
    """Raise :class:`InputMismatchError` unless a non-tensor entry of a nested input (a LoRA
    ``scale`` in ``cross_attention_kwargs``, say) has the value the graph was traced with: the
    graph holds that value as a constant."""
    if has_torch_function((value,)):
        return handle_torch_function(check_constant, (value,), value, expected, arg_name)
    if value is not expected and value != expected:
        raise InputMismatchError(
            f"'{arg_name}' is {value!r}, but this graph was traced with {expected!r} and holds "
            f"it as a constant; re-trace with the new value"
        )


def format_output(result: Any, return_dict: Any, output_class: str) -> Any:
    """Return ``result`` (the model's tuple output) as the model would for ``return_dict``.

    ``output_class`` is the dotted path of the class the model returns when ``return_dict`` is
    true (for example ``diffusers.models.unets.unet_2d.UNet2DOutput``).
    """
    if has_torch_function((return_dict,)):
        return handle_torch_function(
            format_output, (return_dict,), result, return_dict, output_class
        )
    if not return_dict:
        return result
    return _output_class(output_class)(*result)


# Output classes by dotted path, filled when a graph is traced (register_output_class): a plain
# dict lookup is what torch.compile can trace through; an import is not.
_OUTPUT_CLASSES: dict[str, type] = {}


def register_output_class(path: str) -> type:
    """Resolve (import) the output class at ``path`` once and remember it."""
    if path not in _OUTPUT_CLASSES:
        module_name, _, class_name = path.rpartition(".")
        _OUTPUT_CLASSES[path] = getattr(importlib.import_module(module_name), class_name)
    return _OUTPUT_CLASSES[path]


def _output_class(path: str) -> type:
    cls = _OUTPUT_CLASSES.get(path)
    return cls if cls is not None else register_output_class(path)
