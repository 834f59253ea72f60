from conftest import prepared_and_calibrated

import dmq_fx
from dmq_fx.annotate import quantized_layer_nodes
from dmq_fx.summary import COLUMNS
from dmq_fx.unet_configs import TINY_DDPM, build_unet, example_inputs


def test_summary_rows_follow_the_graph_state():
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 6), a, k)
    s = dmq_fx.summary(prepared)
    assert s.header["state"] == "prepared"
    assert len(s.rows) == len(quantized_layer_nodes(prepared))
    assert {r["form"] for r in s.rows} == {"observing"}
    calibrated = prepared_and_calibrated(model, 4, 6)
    converted = dmq_fx.convert_fx(calibrated, "reference")
    rows = {r["node"]: r for r in dmq_fx.summary(converted).rows}
    assert list(dmq_fx.summary(converted).rows[0]) == list(COLUMNS)
    shortcut = rows["up_blocks_0_resnets_0_conv_shortcut"]
    assert (shortcut["dmq"], shortcut["act"], shortcut["form"]) == ("split", "6b x2", "reference")
    conv = rows["down_blocks_0_resnets_0_conv1"]
    assert conv["weight"] == "4b per-channel affine" and conv["act"] == "6b"
    layer = converted.get_submodule("down_blocks.0.resnets.0.conv1")
    assert conv["act_scale"] == f"{layer.act_qparams[0][0]:.3g}"
    assert conv["act_zp"] == str(layer.act_qparams[0][1])
    text = str(dmq_fx.summary(converted))
    assert text.splitlines()[0].startswith("state: converted")
    assert "backend: reference" in text and "up_blocks_0_resnets_0_conv_shortcut" in text
