import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmq_fx.quantize.bitpacking import pack_bits, unpack_bits

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), as_bool=st.booleans())
def test_unpack_gives_back_what_pack_packed(shape, seed, as_bool):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    packed = pack_bits(bits if as_bool else bits.to(torch.int64))
    assert packed.dtype == torch.uint8 and packed.shape == (-(-bits.numel() // 8),)
    out = unpack_bits(packed, bits.shape)
    assert out.dtype == torch.uint8 and torch.equal(out, bits.to(torch.uint8))


def test_bit_order_is_little_endian_within_a_byte():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert pack_bits(bits).tolist() == [1 + 128, 1 + 2]


def test_bad_values_and_sizes_raise():
    with pytest.raises(ValueError, match="0 / 1"):
        pack_bits(torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="float"):
        pack_bits(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        unpack_bits(pack_bits(torch.ones(9, dtype=torch.bool)), (8,))
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int64), (9,))
