"""Tracing diffusers UNets into module-level FX graphs.

``torch.fx.symbolic_trace`` cannot trace diffusers UNets: their forwards branch in Python on
shapes, dtypes and ``torch.is_tensor``. :class:`ValueTracer` gives every proxy the concrete value
the example inputs produce, so Python control flow is decided on the example (and specialised),
while tensor ops and shape arithmetic are still recorded as graph nodes. Branches that depend on
something other than the batch size are protected by an input check in the graph: a call with
another spatial size or dtype raises :class:`InputMismatchError` instead of answering wrongly.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import math
import operator
import os
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.fx import _symbolic_trace
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from dmq_fx.errors import InputMismatchError, TraceError
from dmq_fx.graph import graph_ops
from dmq_fx.graph.meta import ANNOTATION_KEY, GraphState
from dmq_fx.graph.model_identity import model_config, unet_paths, weights_fingerprint

__all__ = ["ValueTracer", "trace", "TIMESTEP_ARG_NAMES"]

#: forward() parameter names treated as the diffusion timestep.
TIMESTEP_ARG_NAMES = ("timestep", "timesteps")

_TORCH_DIR = os.path.dirname(torch.__file__)
_FX_DIR = os.path.dirname(fx.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(__file__))  # the dmq_fx package


# True in the thread (and context) running a trace. torch.fx patches ``Module.__call__`` for the
# whole process while it traces, and ``torch.is_tensor`` must see through proxies: both patched
# entry points check this variable, so another thread running a model meanwhile gets the real
# behaviour.
_TRACING: contextvars.ContextVar[bool] = contextvars.ContextVar("dmq_fx_tracing", default=False)
_REAL_IS_TENSOR = torch.is_tensor
_PATCH_LOCK = threading.Lock()
_patch_users = 0


def _is_tensor(obj: Any) -> bool:
    """``torch.is_tensor`` that sees the value of a proxy, in the tracing thread only."""
    if _TRACING.get() and isinstance(obj, _ValueProxy):
        return isinstance(obj.value, torch.Tensor)
    return _REAL_IS_TENSOR(obj)


@contextlib.contextmanager
def _tracing_context():
    """Mark this context as tracing and install the proxy-aware ``torch.is_tensor`` (once for
    concurrent traces); the real one is back on every exit, KeyboardInterrupt included."""
    global _patch_users
    with _PATCH_LOCK:
        if _patch_users == 0:
            torch.is_tensor = _is_tensor
        _patch_users += 1
    token = _TRACING.set(True)
    try:
        yield
    finally:
        _TRACING.reset(token)
        with _PATCH_LOCK:
            _patch_users -= 1
            if _patch_users == 0:
                torch.is_tensor = _REAL_IS_TENSOR


@contextlib.contextmanager
def _unpatched_module_calls():
    """Lift fx's patches of ``Module.__call__`` / ``__getattr__`` to run a leaf module for real."""
    patched_call, patched_getattr = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    torch.nn.Module.__call__ = _symbolic_trace._orig_module_call
    torch.nn.Module.__getattr__ = _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = patched_call, patched_getattr


#: Ops whose result depends only on a tensor's metadata, not on its values.
_METADATA_ATTRS = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "ndim",
        "layout",
        "is_cuda",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "requires_grad",
    }
)
_METADATA_METHODS = frozenset(
    {
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "is_floating_point",
        "is_complex",
        "is_contiguous",
        "element_size",
        "get_device",
    }
)
_METADATA_FUNCTIONS = (torch.is_floating_point, torch.is_complex, torch.numel, len)


def _is_metadata_op(kind: str, target: Any, args: tuple) -> bool:
    if kind == "call_function" and target is getattr:
        return args[1] in _METADATA_ATTRS
    if kind == "call_method":
        return target in _METADATA_METHODS
    return kind == "call_function" and any(target is f for f in _METADATA_FUNCTIONS)


def _python_scalar(arg: Any) -> Any:
    return arg.item() if isinstance(arg, np.generic) else arg


def _concrete(arg: Any) -> Any:
    return map_aggregate(arg, lambda a: a.value if isinstance(a, fx.Proxy) else a)


class _ValueProxy(fx.Proxy):
    """An FX proxy that also carries the concrete value its node computes on the example."""

    def __init__(self, node: fx.Node, tracer: ValueTracer, value: Any = None):
        super().__init__(node, tracer)
        self.value = value
        #: whether the value depends on tensor values (not only on shapes, dtypes, devices)
        self.data_dependent = False

    def __getattr__(self, name: str) -> _ValueAttribute:
        return _ValueAttribute(self, name)

    def __len__(self) -> int:
        if isinstance(self.value, torch.Tensor):
            raise TraceError(
                f"{self.tracer.location()}: len() of the tensor '{self.node.name}' would fix its "
                f"first dimension (usually the batch size) in the graph; use tensor.shape[0]"
            )
        return len(self.value)

    def __iter__(self):
        if isinstance(self.value, torch.Tensor):
            raise TraceError(
                f"{self.tracer.location()}: iterating over the tensor '{self.node.name}' would "
                f"fix its first dimension (usually the batch size) in the graph; use unbind()"
            )
        return iter([self[i] for i in range(len(self.value))])

    def __iadd__(self, other: Any) -> fx.Proxy:
        # ``x += y`` on a tensor is in place in eager mode, and what else holds ``x`` sees the
        # sum (diffusers adds T2I-Adapter residuals to a down block's output that is also in its
        # skip connections): an ``operator.iadd`` node keeps that, fx's default ``x + y`` not
        if isinstance(self.value, torch.Tensor):
            return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})
        return self + other

    def __index__(self) -> int:
        self.tracer.check_specialisable(self, "use as an index")
        return operator.index(self.value)

    def __int__(self) -> int:
        self.tracer.check_specialisable(self, "int()")
        return int(self.value)

    def __float__(self) -> float:
        self.tracer.check_specialisable(self, "float()")
        return float(self.value)


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    """``proxy.attr``: a lazily created getattr node whose value is ``getattr(value, attr)``."""

    def __init__(self, root: _ValueProxy, attr: str):
        fx.proxy.Attribute.__init__(self, root, attr)

    @property
    def value(self) -> Any:
        return getattr(self.root.value, self.attr)

    @property
    def data_dependent(self) -> bool:
        if self.attr in _METADATA_ATTRS:
            return False
        return self.root.data_dependent or isinstance(self.root.value, torch.Tensor)

    @data_dependent.setter
    def data_dependent(self, flag: bool) -> None:
        pass  # derived from the root


def _raw_attribute(obj: Any, name: str) -> Any:
    """``getattr(obj, name)`` without fx's patched ``Module.__getattr__`` (which, for a
    parameter, would ask the tracer for a proxy again: ``self.linear.weight.dtype`` recursed)."""
    if isinstance(obj, torch.nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            if name in table:
                return table[name]
    return getattr(obj, name)


class ValueTracer(fx.Tracer):
    """An FX tracer whose proxies carry the concrete values of the example inputs.

    Leaf modules are those of ``torch.nn`` (as in ``torch.fx``), so every Conv2d, Linear, GroupNorm
    and LayerNorm becomes a ``call_module`` node named after its qualified name, while diffusers
    blocks, attention processors and resamplers are traced through.
    """

    def __init__(self, example_values: Mapping[str, Any]):
        super().__init__(autowrap_modules=(math,))
        self._example_values = dict(example_values)
        self.failed_module: str | None = None

    # -- values ---------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> _ValueProxy:
        return _ValueProxy(node, self)

    def create_proxy(
        self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None
    ):  # noqa: D102 (fx signature)
        value = self._compute(kind, target, args, kwargs)
        # numpy scalars (diffusers computes some constants with numpy) become Python numbers:
        # the same double, and a literal fx's generated code can print.
        args, kwargs = map_aggregate((args, kwargs), _python_scalar)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.value = value
        if isinstance(value, torch.Tensor):
            proxy.node.meta["tensor_meta"] = _extract_tensor_metadata(value)
        if kind != "placeholder" and not _is_metadata_op(kind, target, args):
            inputs: list[Any] = []
            map_aggregate((args, kwargs), lambda a: inputs.append(a))
            proxy.data_dependent = any(
                isinstance(a, _ValueProxy)
                and (a.data_dependent or isinstance(a.value, torch.Tensor))
                for a in inputs
            )
        return proxy

    def location(self) -> str:
        """The module being traced and the model's line now executing, as text."""
        line = _model_line(traceback.extract_stack())
        return f"module '{self.scope.module_path or '<root>'}' at {line}"

    def check_specialisable(self, proxy: _ValueProxy, what: str) -> None:
        """Raise TraceError if fixing ``proxy``'s value in the graph would depend on data."""
        if proxy.data_dependent or isinstance(proxy.value, torch.Tensor):
            raise TraceError(
                f"{self.location()}: {what} on the tensor values of '{proxy.node.name}' is "
                f"Python control flow that depends on data, so a traced graph would be wrong "
                f"for other inputs. Make the branch depend on shapes only (or use torch.where), "
                f"or keep that module out of the trace."
            )

    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            if target in self._example_values:
                return self._example_values[target]
            return args[0] if args else None  # a specialised argument: its default
        if kind == "get_attr":
            obj = self.root
            for atom in target.split("."):
                obj = _raw_attribute(obj, atom)
            return obj
        args, kwargs = _concrete(args), _concrete(kwargs)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            with _unpatched_module_calls():
                return self.root.get_submodule(target)(*args, **kwargs)
        raise TraceError(f"unexpected node kind {kind!r}")

    def to_bool(self, obj: fx.Proxy) -> bool:
        self.check_specialisable(obj, "a Python condition")
        return bool(obj.value)

    def keys(self, obj: fx.Proxy) -> Any:
        return list(obj.value.keys())

    def iter(self, obj: fx.Proxy):
        return iter(obj)

    def call_module(self, m, forward, args, kwargs):
        if not _TRACING.get():  # another thread calling a module while fx's patch is in place
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m) or "<root>"
            raise

    # -- inputs ---------------------------------------------------------------------------------
    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        params = list(inspect.signature(inspect.unwrap(root_fn)).parameters)
        offset = 1 if is_module else 0
        params = params[offset:]  # drop ``self``
        if len(params) + offset != len(args) or not params:
            return fn, args
        args = list(args)
        for i, pname in enumerate(params):
            arg = args[offset + i]
            if isinstance(arg, _ValueProxy) and isinstance(arg.value, (Mapping, tuple, list)):
                args[offset + i] = self._unpack(arg, pname)
        sample = args[offset]
        if isinstance(sample, _ValueProxy) and isinstance(sample.value, torch.Tensor):
            graph_ops.check_input(
                sample, tuple(sample.value.shape[1:]), sample.value.dtype, params[0]
            )
            for i, pname in enumerate(params):
                if pname in TIMESTEP_ARG_NAMES and isinstance(args[offset + i], _ValueProxy):
                    args[offset + i] = graph_ops.normalize_timestep(args[offset + i], sample)
        return fn, args

    def _unpack(self, proxy: _ValueProxy, name: str) -> Any:
        """A dict / tuple / list input as the same container of per-entry proxies, so the
        model's own code (``"text_embeds" in added_cond_kwargs``, ``.get``, ``.pop``, tuple
        unpacking) runs on a real container while its tensors stay graph inputs.

        The graph checks the container's keys or length at call time; numbers, strings and None
        inside it are fixed as constants, checked at call time too (``graph_ops``).
        """
        value = proxy.value
        is_dict = isinstance(value, Mapping)
        structure = ("dict", tuple(value)) if is_dict else ("sequence", len(value))
        self.create_proxy("call_function", graph_ops.check_structure, (proxy, structure, name), {})
        entries = {}
        for key, item in value.items() if is_dict else enumerate(value):
            label = f"{name}[{key!r}]"
            entry = self.create_proxy("call_function", operator.getitem, (proxy, key), {})
            if isinstance(item, (Mapping, tuple, list)):
                entry = self._unpack(entry, label)
            elif not isinstance(item, torch.Tensor):
                if not (item is None or isinstance(item, (bool, int, float, str))):
                    raise TraceError(
                        f"input '{label}' is a {type(item).__name__}; nested inputs may hold "
                        f"tensors, numbers, strings, None, dicts, tuples and lists"
                    )
                self.create_proxy(
                    "call_function", graph_ops.check_constant, (entry, item, label), {}
                )
                entry = item
            entries[key] = entry
        if is_dict:
            return dict(entries)
        return type(value)(entries.values())


def _bind(
    model: torch.nn.Module, example_inputs: Sequence[Any], example_kwargs: Mapping[str, Any]
) -> inspect.BoundArguments:
    sig = inspect.signature(model.forward)
    try:
        return sig.bind(*example_inputs, **example_kwargs)
    except TypeError as e:
        raise InputMismatchError(
            f"example inputs do not match {type(model).__name__}.forward{sig}: {e}"
        ) from None


def _fresh(provided: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs with their dicts, tuples and lists copied (not their tensors): diffusers pops
    entries from ``cross_attention_kwargs``, and the user's dict must not change."""

    def copy_containers(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: copy_containers(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(copy_containers(v) for v in value)
        return value

    return {k: copy_containers(v) for k, v in provided.items()}


def _describe(value: Any) -> str:
    """An input as text: tensors by shape and dtype, containers by their entries."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {value.dtype}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def _eager_error(model: torch.nn.Module, provided: Mapping[str, Any]) -> str | None:
    """The error of an eager forward on the example inputs (None if it runs)."""
    try:
        with torch.no_grad():
            model(**_fresh(provided))
    except Exception as e:  # any failure: reported to the user with the module and line
        return f"{type(e).__name__}: {e}"
    return None


def _model_line(frames: traceback.StackSummary) -> str:
    """The innermost frame outside torch and dmq_fx, i.e. the model's own line, as text."""
    own = [f for f in frames if not f.filename.startswith((_TORCH_DIR, _FX_DIR, _OWN_DIR))]
    if not own:
        return "an unknown line"
    return f"{own[-1].filename}:{own[-1].lineno} ({(own[-1].line or '').strip()})"


def _flatten_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_tensors(o)]
    return []


def trace(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    check: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` into a module-level :class:`torch.fx.GraphModule`.

    Args:
        model: a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``) or any module whose
            Python control flow depends on shapes and dtypes but not on tensor values. It is
            never modified: the graph owns a deep copy (in eval mode).
        example_inputs: positional inputs of one forward call, e.g. ``(sample, timestep)``.
        example_kwargs: keyword inputs, e.g. ``{"encoder_hidden_states": ctx}``.
        check: run the graph on the example and compare with eager execution.

    The graph accepts any batch size (the timestep as a number, 0-d or 1-d tensor), every other
    dimension and the dtype of the first input are fixed to the example's (a call with another
    raises :class:`InputMismatchError`), parameters that were not passed are fixed to their
    defaults, and ``return_dict`` keeps its meaning.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trace() expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})
    bound = _bind(model, example_inputs, example_kwargs)
    sig = inspect.signature(model.forward)
    if "return_dict" in sig.parameters:
        bound.arguments.pop("return_dict", None)
    provided = dict(bound.arguments)
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceError(f"{type(model).__name__}.forward takes *{name}; name its inputs")
    first = next(iter(sig.parameters))
    if first not in provided or not isinstance(provided[first], torch.Tensor):
        raise InputMismatchError(
            f"the first input '{first}' of {type(model).__name__}.forward must be a tensor"
        )
    example_values = dict(provided)
    concrete_args = {
        n: p.default for n, p in sig.parameters.items() if n not in provided and n != "return_dict"
    }
    if "return_dict" in sig.parameters:
        example_values["return_dict"] = False  # trace the tuple branch; format_output re-wraps

    root = copy.deepcopy(model).eval()
    tracer = ValueTracer(example_values)
    try:
        with _tracing_context(), torch.no_grad():
            graph = tracer.trace(root, concrete_args=concrete_args)
    except TraceError:
        raise
    except Exception as e:
        where = tracer.failed_module or "<root>"
        line = _model_line(traceback.extract_tb(e.__traceback__))
        eager_error = _eager_error(root, provided)
        if eager_error is not None:  # the inputs, not the tracing, are at fault
            shapes = ", ".join(f"{k}: {_describe(v)}" for k, v in provided.items())
            raise InputMismatchError(
                f"the example inputs ({shapes}) do not run through {type(model).__name__} even "
                f"without tracing: module '{where}' failed at {line}: {eager_error}. Pass inputs "
                f"of the shapes and dtypes the model takes."
            ) from e
        raise TraceError(
            f"could not trace {type(model).__name__}: module '{where}' failed at {line}: "
            f"{type(e).__name__}: {e}. dmq_fx decides Python control flow on the example inputs; "
            f"code that needs tensor *values* (not shapes) cannot be traced: make that module a "
            f"function of shapes only, or quantize its children separately."
        ) from e

    _restore_specialised_args(graph, concrete_args)
    output_class = None
    if "return_dict" in sig.parameters:
        with torch.no_grad():  # on the copy: the user's model keeps its mode and state
            eager = root(**_fresh(provided), return_dict=True)
        if not isinstance(eager, tuple):
            output_class = f"{type(eager).__module__}.{type(eager).__qualname__}"
        _wrap_output(graph, output_class)
    gm = fx.GraphModule(root, graph, class_name=f"Traced{type(model).__name__}")
    # Nodes that only fed Python control flow (shape checks, numel) are dead now.
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta[ANNOTATION_KEY] = GraphState(
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        input_names=list(provided),
        example_shapes={
            k: tuple(v.shape) for k, v in provided.items() if isinstance(v, torch.Tensor)
        },
        # what dmq_fx.save records, so that dmq_fx.load can re-trace the same graph
        example_spec=_example_spec(provided),
        model_config=model_config(model),
        weights_fingerprint=weights_fingerprint(model),
        unet_paths=unet_paths(model),
    )
    if check:
        _check_against_eager(gm, root, provided)
    return gm


def _example_spec(provided: Mapping[str, Any]) -> dict[str, dict]:
    """JSON description of the example inputs: tensors by shape and dtype, others by value."""
    return {name: _value_spec(value) for name, value in provided.items()}


def _value_spec(value: Any) -> dict:
    """One input as JSON: ``{"shape", "dtype"}``, ``{"value"}``, ``{"dict": {key: spec}}``,
    ``{"list" | "tuple": [spec, ...]}``, or ``{"unsupported": type}``."""
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _value_spec(v) for k, v in value.items()}}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_value_spec(v) for v in value]}
    return {"unsupported": type(value).__name__}


def _restore_specialised_args(graph: fx.Graph, concrete_args: Mapping[str, Any]) -> None:
    """Give fx's ``name_1`` placeholders of unpassed arguments their own names back, and turn
    fx's ``_assert_is_none`` (which dead-code elimination would drop) into a kept check."""
    for node in graph.nodes:
        if node.op == "placeholder" and node.target not in concrete_args:
            base = node.target.rsplit("_", 1)[0]
            if base in concrete_args:
                node.target = base
        elif node.op == "call_function" and node.target is _symbolic_trace._assert_is_none:
            node.target = graph_ops.check_is_none
            node.args = (node.args[0], node.args[0].target)


def _wrap_output(graph: fx.Graph, output_class: str | None) -> None:
    output = next(n for n in graph.nodes if n.op == "output")
    return_dict = next(
        n for n in graph.nodes if n.op == "placeholder" and n.target == "return_dict"
    )
    return_dict.args = (True,)  # default of the placeholder, as in diffusers
    if output_class is None:
        return
    graph_ops.register_output_class(output_class)
    with graph.inserting_before(output):
        wrapped = graph.call_function(
            graph_ops.format_output, (output.args[0], return_dict, output_class)
        )
    output.args = (wrapped,)


def _check_against_eager(
    gm: fx.GraphModule, root: torch.nn.Module, provided: Mapping[str, Any]
) -> None:
    extra = {}
    if "return_dict" in inspect.signature(root.forward).parameters:
        extra["return_dict"] = False
    with torch.no_grad():
        expected = _flatten_tensors(root(**_fresh(provided), **extra))
        got = _flatten_tensors(gm(**_fresh(provided), **extra))
    if len(expected) != len(got) or any(
        e.shape != g.shape or (e - g).abs().max() > 1e-5 * max(e.abs().max().item(), 1e-12)
        for e, g in zip(expected, got)
    ):
        raise TraceError(
            f"the traced graph of {type(root).__name__} does not reproduce eager execution on "
            f"the example inputs; the model has data-dependent control flow dmq_fx cannot trace"
        )
