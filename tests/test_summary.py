from conftest import prepared_and_calibrated

import dmq_fx
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs
from dmq_fx.workflow.summary import COLUMNS


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


def test_summary_shows_les_tau_and_its_folded_form():
    from dmq_fx.passes import LESScale

    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(8, 8), a, k, les=True)
    les = prepared.get_submodule("down_blocks.0.resnets.0.conv1_les")
    assert isinstance(les, LESScale)
    les.tau.data.fill_(2.0)
    les.tau.data[0] = 0.5
    rows = {r["node"]: r for r in dmq_fx.summary(prepared).rows}
    assert rows["down_blocks_0_resnets_0_conv1"]["les_tau"] == "0.5..2"
    assert rows["down_blocks_0_resnets_0_conv1"]["dmq"] == "les"
    assert rows["down_blocks_0_resnets_0_conv2"]["les_tau"] == "1"
    dmq_fx.calibrate(prepared, [(a, k)], progress=False)
    converted = {r["node"]: r for r in dmq_fx.summary(dmq_fx.convert_fx(prepared)).rows}
    conv1 = converted["down_blocks_0_resnets_0_conv1"]
    assert (conv1["les_tau"], conv1["dmq"]) == ("0.5..2", "les:step")  # SiLU before it
    assert converted["up_blocks_0_resnets_0_conv_shortcut"]["dmq"] == "split,les:step"
