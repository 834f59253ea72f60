"""A stand-in accelerator for checking device handling on a CPU-only machine.

A tensor "on the virtual device" is a wrapper subclass that reports ``device`` ``virtual:0``
(torch's PrivateUse1 slot for an out-of-tree accelerator, set up here as a Python backend) and
computes on a CPU tensor inside. Every aten op on it goes through
:meth:`VirtualTensor.__torch_dispatch__`, which enforces an accelerator's rules: an op may not
mix virtual tensors with CPU tensors (0-dim CPU tensors and index tensors excepted, as on
CUDA), and reading a value on the host
(``.item()``, ``.tolist()``, ``.cpu()``, a copy to CPU) is counted as a host transfer.
:func:`on_virtual_device` is the context in which tensors can be created on (or moved to) the
device; :func:`module_to_virtual` is ``module.to(device)``.

Calibration code that creates a tensor without ``device=`` and combines it with the model's
activations fails here exactly as it would on a GPU, with the op named.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

# device hooks so that torch creates tensors on privateuseone (once per process)
if not hasattr(torch, "virtual"):
    _setup_privateuseone_for_python_backend(rename="virtual")
DEVICE = torch.device("virtual", 0)


def _empty_on_device(factory):
    """A PrivateUse1 kernel for an allocating op (what torch.tensor / new_tensor call below the
    Python dispatcher): the CPU tensor, wrapped."""

    def kernel(*args, **kwargs):
        return VirtualTensor(factory(*args, **{**kwargs, "device": torch.device("cpu")}))

    return kernel


_LIBRARY = torch.library.Library("aten", "IMPL")
_LIBRARY.impl("empty_strided", _empty_on_device(torch.ops.aten.empty_strided), "PrivateUse1")
_LIBRARY.impl(
    "empty.memory_format", _empty_on_device(torch.ops.aten.empty.memory_format), "PrivateUse1"
)


def _copy_from(src, dst, non_blocking=False):
    _unwrap(dst).copy_(_unwrap(src))
    return dst


_LIBRARY.impl("_copy_from", _copy_from, "PrivateUse1")

_aten = torch.ops.aten
#: ops whose index arguments may stay on the host (CUDA accepts CPU index tensors)
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
#: ops that move data between devices by design
_TRANSFER_OPS = {_aten.copy_.default, _aten._to_copy.default}
#: shape queries answered by the inner tensor
_METADATA_OPS = {
    _aten.sym_size.default: lambda t: t.size(),
    _aten.sym_stride.default: lambda t: t.stride(),
    _aten.sym_numel.default: lambda t: t.numel(),
    _aten.sym_storage_offset.default: lambda t: t.storage_offset(),
    _aten.dim.default: lambda t: t.dim(),
}


class DeviceMismatch(RuntimeError):
    """An op mixed tensors of the virtual device and the host."""


class _Counter(threading.local):
    host_reads = 0


COUNTER = _Counter()


class VirtualTensor(torch.Tensor):
    """A CPU tensor that says it lives on :data:`DEVICE`."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> VirtualTensor:
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=DEVICE,
            requires_grad=inner.requires_grad,
            # sizes asked of the inner tensor, so that resize_ (observers' buffers) works
            dispatch_sizes_strides_policy="sizes",
        )
        out.inner = inner
        return out

    def __repr__(self) -> str:
        return f"VirtualTensor({self.inner!r})"

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return VirtualTensor(inner_tensors["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_OPS:
            return _METADATA_OPS[func](args[0].inner)
        flat, _ = tree_flatten((args, kwargs))
        if func is _aten._local_scalar_dense.default:
            COUNTER.host_reads += 1
        elif func is _aten._to_copy.default and _target(kwargs) not in (None, DEVICE):
            COUNTER.host_reads += 1
            return func(_unwrap(args[0]), **kwargs)
        elif func is _aten.copy_.default and not isinstance(args[0], VirtualTensor):
            COUNTER.host_reads += 1
        elif func not in _TRANSFER_OPS:
            checked = flat if func not in _INDEX_OPS else [args[0], *flat[2:]]
            hosts = [
                t
                for t in checked
                if isinstance(t, torch.Tensor)
                and not isinstance(t, VirtualTensor)
                and t.dim() > 0
                and t.device.type == "cpu"
            ]
            if hosts:
                raise DeviceMismatch(
                    f"{func}: tensors on {DEVICE} and on the host (shape "
                    f"{tuple(hosts[0].shape)}, {hosts[0].dtype}) in one op"
                )
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func._schema.is_mutable and out is _unwrap(args[0]):
            return args[0]  # in place (resize_ included): the same tensor
        return tree_map(_wrap, out)


def _target(kwargs: dict) -> torch.device | None:
    device = kwargs.get("device")
    return None if device is None else torch.device(device)


def _unwrap(t):
    return t.inner if isinstance(t, VirtualTensor) else t


def _wrap(t):
    if isinstance(t, torch.Tensor) and not isinstance(t, VirtualTensor):
        return VirtualTensor(t)
    return t


class _Factories(TorchDispatchMode):
    """Creates tensors asked for on the virtual device (``device=`` or ``.to(device)``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _target(kwargs) == DEVICE or _target(kwargs) == torch.device(DEVICE.type):
            if any(isinstance(t, VirtualTensor) for t in tree_flatten(args)[0]):
                return func(*args, **kwargs)
            return VirtualTensor(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_virtual_device() -> Iterator[_Counter]:
    """Within: tensors may be created on :data:`DEVICE`; yields the host-read counter (reset)."""
    COUNTER.host_reads = 0
    with _Factories():
        yield COUNTER


def module_to_virtual(module: torch.nn.Module) -> torch.nn.Module:
    """``module.to(DEVICE)`` (in place, returns ``module``)."""
    return module._apply(lambda t: t if isinstance(t, VirtualTensor) else VirtualTensor(t))
