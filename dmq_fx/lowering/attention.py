"""Attention with small heads, lowered to batched matrix products over cache-sized chunks.

Attention stays float in a lowered graph, and in a small UNet it is what caps the speed-up: the
DDPM-CIFAR10 UNet has 32 heads of 8 channels, where the CPU flash-attention kernel of
``scaled_dot_product_attention`` spends most of its time in tiny blocked products (an 8-deep
reduction per score). Written as two batched products and a softmax over a few heads at a
time, the scores of a chunk stay in cache and both products are ordinary gemms (the second as
``V^T P^T``, whose long side is the sequence, not the 8-wide head); ``benchmarks/attention.py``
measures both ways per shape. Same arithmetic up to float rounding (scores in float32,
softmax over the key axis), no mask, no dropout. The chunks pay for narrow heads and short
sequences only; at a call whose shape is outside :func:`runs_chunked`'s bound the op runs the
library kernel.

:func:`lower_small_head_attention` is the rewrite ``convert_fx`` applies to x86 / onednn
graphs (the reference form stays the simulation's arithmetic); the attention itself
is the custom op ``dmq_fx::chunked_attention`` (with a fake kernel), so ``torch.compile`` keeps
it as one opaque call instead of unrolling the chunk loop, and a dynamic batch needs no
recompile. :func:`dmq_fx.export_onnx` writes it back as ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

__all__ = [
    "MAX_CHUNKED_HEAD_DIM",
    "MAX_CHUNKED_WORK",
    "chunked_attention",
    "chunked_products",
    "lower_small_head_attention",
    "runs_chunked",
]

#: widest head the rewrite takes (``benchmarks/attention.py``, 2 cores AVX-512: heads of 16
#: channels gain at 49 x 49 scores and lose at 256 x 256)
MAX_CHUNKED_HEAD_DIM = 16

#: most work per head (head channels x queries x keys) the chunks run: 8 x 256 x 256, where they
#: were 1.4x faster than the flash kernel; beyond it (8 x 1024 x 1024, 16 x 256 x 256) they lost
MAX_CHUNKED_WORK = 8 * 256 * 256

#: scores per chunk: 256K floats (1 MiB), about one core's L2
_CHUNK_SCORES = 1 << 18

_SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def runs_chunked(length: int, keys: int, head: int, device: str = "cpu") -> bool:
    """Whether the op computes in chunks at this shape (else it calls the library kernel): the
    shape is the call's, so a graph traced at one resolution and run at another still picks
    the faster way. On the CPU only (where the bound was measured; a reference-form graph on a
    GPU keeps the GPU's attention kernels)."""
    return (
        device == "cpu"
        and head <= MAX_CHUNKED_HEAD_DIM
        and head * length * keys <= MAX_CHUNKED_WORK
    )


def chunked_products(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention as batched products over chunks of heads, whatever the shape (the op's
    chunked path; ``benchmarks/attention.py`` times it against the flash kernel)."""
    *batch, length, head = query.shape
    keys, value_head = key.shape[-2], value.shape[-1]
    q = (query * scale).reshape(-1, length, head)
    k = key.reshape(-1, keys, head)
    v_t = value.reshape(-1, keys, value_head).transpose(1, 2)
    out_t = query.new_empty(q.shape[0], value_head, length)
    step = max(1, _CHUNK_SCORES // (length * keys))
    for i in range(0, q.shape[0], step):
        probs = torch.bmm(q[i : i + step], k[i : i + step].transpose(1, 2)).softmax(-1)
        torch.bmm(v_t[i : i + step], probs.transpose(1, 2), out=out_t[i : i + step])
    return _output_view(out_t, batch)


@torch.library.custom_op("dmq_fx::chunked_attention", mutates_args=())
def _chunked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    if runs_chunked(query.shape[-2], key.shape[-2], query.shape[-1], query.device.type):
        return chunked_products(query, key, value, scale)
    return F.scaled_dot_product_attention(query, key, value, scale=scale).contiguous()


def _output_view(out_t: torch.Tensor, batch: list) -> torch.Tensor:
    """``(n, Dv, L)`` storage seen as ``(*batch, L, Dv)``: no copy (the graph's next op, the
    heads' transpose and reshape, copies anyway)."""
    return out_t.transpose(1, 2).reshape(*batch, out_t.shape[2], out_t.shape[1])


@_chunked_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    *batch, length, head = query.shape
    if not runs_chunked(length, key.shape[-2], head, query.device.type):
        return query.new_empty(*batch, length, value.shape[-1])
    n = query.numel() // (head * length)
    return _output_view(query.new_empty(n, value.shape[-1], length), batch)


def chunked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``scaled_dot_product_attention(query, key, value, scale=scale)`` without mask or dropout,
    as chunked batched products where :func:`runs_chunked` says they are faster, else by the
    library kernel (see the module docstring). ``scale`` defaults to ``1 / sqrt(head_dim)``, as
    there."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return _chunked_attention(query, key, value, float(scale))


_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _arguments(node: fx.Node) -> dict:
    """An attention node's arguments by name, positional or keyword."""
    return dict(zip(_SDPA_ARGUMENTS, node.args)) | dict(node.kwargs)


def _takes(node: fx.Node) -> bool:
    """A float32 attention without mask, dropout, causality or grouped heads, on heads of at
    most :data:`MAX_CHUNKED_HEAD_DIM` channels (read from the traced shapes)."""
    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return False
    bound = _arguments(node)
    if bound.get("attn_mask") is not None or bound.get("dropout_p", 0.0) != 0.0:
        return False
    if bound.get("is_causal", False) or bound.get("enable_gqa", False):
        return False
    metas = [getattr(bound.get(n), "meta", {}).get("tensor_meta") for n in _SDPA_ARGUMENTS[:3]]
    if any(m is None or m.dtype != torch.float32 or len(m.shape) < 3 for m in metas):
        return False
    q, k, v = (m.shape for m in metas)
    if q[:-2] != k[:-2] or k[:-1] != v[:-1] or q[-1] != k[-1]:
        return False  # broadcast or grouped heads: left to the library kernel
    return q[-1] <= MAX_CHUNKED_HEAD_DIM


def lower_small_head_attention(gm: fx.GraphModule) -> int:
    """Matches ``scaled_dot_product_attention`` calls that :func:`_takes` accepts and rewrites
    each into :func:`chunked_attention` on the same query, key, value and scale. Returns how
    many it rewrote."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _takes(node):
            continue
        bound = _arguments(node)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(
                chunked_attention,
                tuple(bound[n] for n in _SDPA_ARGUMENTS[:3]),
                {"scale": bound.get("scale")},
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count
