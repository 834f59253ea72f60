"""Fuzzed diffusers UNet configs: trace matches eager, and prepare / calibrate / convert work,
with the lowered graph within the documented bound of its simulation; only the named errors in
``ACCEPTED`` may refuse a config, and most drawn configs must convert.

Hypothesis profiles (``tests/conftest.py``): ``ci`` (default) draws a fixed, derandomized set
of examples; ``HYPOTHESIS_PROFILE=long`` draws many more, randomly, for local runs.
"""

import torch
from conftest import LOWERED_MIN_SQNR_DB
from diffusers import UNet2DConditionModel, UNet2DModel
from hypothesis import given
from hypothesis import strategies as st

import dmq_fx
from dmq_fx.metrics import sqnr_db

DOWN_2D = ["DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"]
UP_2D = {"DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}
UP_2D["ResnetDownsampleBlock2D"] = "ResnetUpsampleBlock2D"
DOWN_COND = ["DownBlock2D", "CrossAttnDownBlock2D"]
UP_COND = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}


@st.composite
def unet_configs(draw):
    conditional = draw(st.booleans())
    levels = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([4, 8]))
    channels = tuple(groups * draw(st.integers(1, 3)) for _ in range(levels))
    kinds = DOWN_COND if conditional else DOWN_2D
    down = tuple(draw(st.sampled_from(kinds)) for _ in range(levels))
    up = tuple((UP_COND if conditional else UP_2D)[d] for d in reversed(down))
    config = dict(
        sample_size=draw(st.sampled_from([8, 16])),
        in_channels=draw(st.integers(1, 4)),
        out_channels=draw(st.integers(1, 4)),
        layers_per_block=draw(st.integers(1, 2)),
        block_out_channels=channels,
        norm_num_groups=groups,
        down_block_types=down,
        up_block_types=up,
        resnet_time_scale_shift=draw(st.sampled_from(["default", "scale_shift"])),
    )
    if conditional:
        config["cross_attention_dim"] = draw(st.sampled_from([8, 12, 16]))
        config["attention_head_dim"] = draw(st.sampled_from([2, 4]))
        return UNet2DConditionModel, config
    config["attention_head_dim"] = draw(st.sampled_from([None, 4]))
    return UNet2DModel, config


def _inputs(cls, config, batch, seed):
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    sample = torch.randn(batch, config["in_channels"], size, size, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    kwargs = {}
    if cls is UNet2DConditionModel:
        kwargs["encoder_hidden_states"] = torch.randn(
            batch, 5, config["cross_attention_dim"], generator=g
        )
    return (sample, timestep), kwargs


#: the dmq_fx errors a drawn config may raise instead of converting, and why that is right.
#: Empty today: every config the strategy draws is one dmq_fx supports, so any error fails.
ACCEPTED: dict[type, str] = {}
#: the share of drawn configs that must convert and meet the bound
MIN_CONVERTED = 0.8


def quantize_or_refuse(cls, config, bits, pts) -> str:
    """``"converted"`` or the accepted error's class name; asserts everything else."""
    torch.manual_seed(0)
    model = cls(**config).eval()  # (diffusers accepts every config the strategy draws)
    example = _inputs(cls, config, 2, 0)
    graph = dmq_fx.trace(model, *example)  # checks the example against eager
    a, k = _inputs(cls, config, 3, 1)
    with torch.no_grad():
        fp = model(*a, **k).sample
        assert torch.allclose(graph(*a, **k).sample, fp, atol=1e-5, rtol=1e-4)
    data = [_inputs(cls, config, 4, s) for s in range(2, 5)]
    try:
        prepared = dmq_fx.prepare_fx(
            model,
            dmq_fx.get_default_qconfig_mapping(*bits),
            *example,
            pts="skip" if pts else None,
        )
        dmq_fx.calibrate(prepared, data, "pts" if pts else "minmax", progress=False)
        lowered = dmq_fx.convert_fx(prepared, "x86")
    except tuple(ACCEPTED) as e:
        assert str(e), type(e).__name__
        return type(e).__name__
    with torch.no_grad():
        sim = prepared(*a, **k).sample
        low = lowered(*a, **k).sample
    # the documented end-to-end bound between lowering and simulation (conftest)
    assert sqnr_db(sim, low) >= LOWERED_MIN_SQNR_DB
    return "converted"


def test_fuzzed_unets_trace_and_quantize():
    outcomes = []

    @given(unet_configs(), st.sampled_from([(8, 8), (4, 8), (4, 6)]), st.booleans())
    def draw(drawn, bits, pts):
        outcomes.append(quantize_or_refuse(*drawn, bits, pts))

    draw()
    assert outcomes, "no example was drawn"
    converted = outcomes.count("converted") / len(outcomes)
    assert converted >= MIN_CONVERTED, outcomes
