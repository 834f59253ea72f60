"""0 / 1 tensors stored eight to a byte, 4-bit integers two to a byte.

A learned rounding (AdaRound, FBR) is one bit per weight; kept as uint8 it is a quarter of the
float model's size again, held from the stage that learns it to ``convert_fx`` (on SD 1.5,
820 MiB of a 3.3 GiB model). Packed it is 1/32 of the float weights.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "pack_nibbles", "unpack_bits", "unpack_nibbles"]

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``bits`` (bool, or integers that are all 0 or 1) flattened and packed into a 1-D uint8
    tensor of ``ceil(numel / 8)`` bytes, element ``i`` at bit ``i % 8`` of byte ``i // 8``.

    Raises ValueError for a value other than 0 / 1 (it would not survive the packing)."""
    flat = bits.detach().reshape(-1)
    if flat.dtype != torch.bool:
        if flat.is_floating_point() or flat.is_complex():
            raise ValueError(f"pack_bits takes bool or integer 0 / 1 tensors, got {flat.dtype}")
        if bool(((flat != 0) & (flat != 1)).any()):
            raise ValueError("pack_bits takes 0 / 1 values only")
    flat = flat.to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The uint8 0 / 1 tensor of ``shape`` that :func:`pack_bits` packed into ``packed``."""
    shape = torch.Size(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed bits are a 1-D uint8 tensor, got {packed.dtype} {packed.dim()}-D")
    if packed.numel() != -(-shape.numel() // 8):
        raise ValueError(
            f"{packed.numel()} packed bytes do not hold a tensor of shape {tuple(shape)}"
        )
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[: shape.numel()].reshape(shape)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15, flattened, two to a byte (element ``2i`` in the low nibble)."""
    flat = values.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The uint8 tensor of ``shape`` that :func:`pack_nibbles` packed."""
    flat = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)
    return flat[: torch.Size(shape).numel()].reshape(shape)
