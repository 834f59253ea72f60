"""Small-head attention in lowered graphs: the chunked op, the convert rewrite, the export form."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.lowering import attention
from dmq_fx.lowering.attention import chunked_attention, lower_small_head_attention
from dmq_fx.lowering.export_form import export_form
from dmq_fx.metrics import sqnr_db


@pytest.mark.parametrize(
    "q_shape, keys, value_dim, scale",
    [
        ((2, 4, 64, 8), 64, 8, None),  # one chunk
        ((3, 5, 200, 8), 200, 8, None),  # 15 heads, 6 per chunk: a short last chunk
        ((2, 3, 40, 16), 77, 16, 0.3),  # cross-attention, explicit scale
        ((40, 100, 8), 150, 4, None),  # 3-d (heads folded into the batch), narrower values
        ((2, 2, 300, 8), 300, 8, None),  # beyond the chunks' bound: the flash kernel
        ((2, 2, 16, 32), 16, 32, None),  # too wide a head: the flash kernel
    ],
)
def test_chunked_attention_is_scaled_dot_product_attention(q_shape, keys, value_dim, scale):
    torch.manual_seed(0)
    q = torch.randn(q_shape)
    k = torch.randn(*q_shape[:-2], keys, q_shape[-1])
    v = torch.randn(*q_shape[:-2], keys, value_dim)
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = chunked_attention(q, k, v, scale=scale)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the chunked path itself, at every shape (the op picks it only inside the bound)
    chunked = attention.chunked_products(q, k, v, scale or q_shape[-1] ** -0.5)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


def test_chunks_run_only_where_they_were_faster():
    assert attention.runs_chunked(256, 256, 8) and attention.runs_chunked(49, 49, 16)
    assert not attention.runs_chunked(256, 256, 16)  # measured slower
    assert not attention.runs_chunked(1024, 1024, 8)
    assert not attention.runs_chunked(16, 16, 32)
    assert not attention.runs_chunked(256, 256, 8, device="cuda")  # GPUs keep their kernels


@pytest.mark.parametrize("length", [200, 300], ids=["chunks", "flash"])
def test_chunked_attention_op_schema_and_fake_kernel(length):
    q, k, v = (torch.randn(2, 3, length, 8) for _ in range(3))
    # the fake kernel's strides must match the real one's on both paths, or compiled graphs
    # assert on them (the autograd / AOT checks are left out: the op has no backward, and
    # the AOT check trips over the virtual device another test registers; compiling is
    # tested in test_compile)
    torch.library.opcheck(
        attention._chunked_attention, (q, k, v, 0.5), test_utils=("test_schema", "test_faketensor")
    )


def _traced(fn, *args):
    gm = fx.symbolic_trace(fn)
    ShapeProp(gm).propagate(*args)
    return gm


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_rewrite_takes_small_float_heads_only():
    q8, q32 = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 32)
    mask = torch.zeros(16, 16, dtype=torch.bool)

    def plain(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def masked(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    small = _traced(plain, q8, q8, q8)
    assert lower_small_head_attention(small) == 1
    assert _targets(small) == [chunked_attention]
    small.recompile()
    torch.testing.assert_close(small(q8, q8, q8), plain(q8, q8, q8), rtol=1e-5, atol=1e-5)
    for gm in (
        _traced(plain, q32, q32, q32),  # wide heads: the library kernel is faster
        _traced(plain, q8.double(), q8.double(), q8.double()),  # not float32
        _traced(masked, q8, q8, q8, mask),
        _traced(causal, q8, q8, q8),
    ):
        assert lower_small_head_attention(gm) == 0
        assert chunked_attention not in _targets(gm)


@pytest.mark.parametrize("config", [TINY_DDPM, TINY_SD], ids=["ddpm", "sd"])
def test_convert_chunks_the_small_head_attention_and_export_writes_it_back(config):
    model = build_unet(config)
    args, kwargs = example_inputs(model, batch=2)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(8, 8), args, kwargs)
    sdpa = [n for n in prepared.graph.nodes if n.target in attention._SDPA_TARGETS]
    assert sdpa  # both tiny configs have heads of 8 or 16 channels
    dmq_fx.calibrate(prepared, [(args, kwargs)], progress=False)
    quantized = dmq_fx.convert_fx(prepared, backend="x86")
    reference = dmq_fx.convert_fx(prepared, backend="reference")
    assert not any(t is chunked_attention for t in _targets(reference))  # the specification
    assert _targets(quantized).count(chunked_attention) == len(sdpa)
    assert not any(t in attention._SDPA_TARGETS for t in _targets(quantized))
    exported = export_form(quantized)
    assert _targets(exported).count(F.scaled_dot_product_attention) == len(sdpa)
    assert chunked_attention not in _targets(exported)
    with torch.no_grad():
        fp, ref = model(*args, **kwargs).sample, quantized(*args, **kwargs).sample
        out = exported(*args, **kwargs).sample
    # the export form moves a few integers at .5 ties (its documented rounding), nothing more
    assert sqnr_db(ref, out) >= sqnr_db(fp, ref) + 3.0
