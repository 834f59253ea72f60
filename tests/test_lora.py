"""LoRA on a quantized UNet: float low-rank branches beside the quantized layers."""

import copy

import pytest
import torch
from conftest import calibration_data
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_SD, build_unet, example_inputs
from dmq_fx.metrics import sqnr_db
from dmq_fx.workflow.lora import lora_adapters

#: attention projections (LayerNorm -> to_q: LES folded into the norm), GroupNorm -> proj_in,
#: resnet convs (split concatenations with PTS in the up blocks) and shortcuts
#: B scaled so the LoRA moves the float output by about half its norm (a style LoRA's size)
SIZE = 0.2
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "conv_shortcut"]


def _with_lora(unet, seed, rank=4, alpha=8):
    torch.manual_seed(seed)
    lora_unet = copy.deepcopy(unet)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    lora_unet.add_adapter(config)
    with torch.no_grad():
        for name, p in lora_unet.named_parameters():
            if "lora_B" in name:
                p.mul_(SIZE)
    return lora_unet, get_peft_model_state_dict(lora_unet)


@pytest.fixture(scope="module")
def setup():
    unet = build_unet(TINY_SD)
    a, k = example_inputs(unet, batch=4)
    prepared = dmq_fx.prepare_fx(
        unet, dmq_fx.get_default_qconfig_mapping(4, 8), a, k, **dmq_fx.PREPARE_FLAGS["dmq"]
    )
    stages = [dmq_fx.LearnLES(iterations=5), "observe_activations", "vote_pts", "observe_weights"]
    dmq_fx.calibrate(prepared, calibration_data(unet), stages, progress=False)
    return unet, prepared


def _out(model, seed=11):
    a, k = example_inputs(build_unet(TINY_SD), batch=3, seed=seed)
    with torch.no_grad():
        return model(*a, **k).sample


@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_lora_on_the_quantized_unet_follows_float_lora(setup, backend):
    unet, prepared = setup
    lora_unet, state = _with_lora(unet, seed=0)
    quantized = dmq_fx.convert_fx(prepared, backend)
    plain = _out(quantized)
    dmq_fx.load_lora(quantized, state, scale=1.0, lora_alpha=8)
    fp, fp_lora, q, q_lora = _out(unet), _out(lora_unet), plain, _out(quantized)
    effect = fp_lora - fp
    assert 0.1 < effect.norm() / fp.norm() < 1  # a visible, not overwhelming, change
    # the LoRA's effect reproduced, and quantized + LoRA as close to float + LoRA as without
    assert sqnr_db(effect, q_lora - q) >= 10
    assert sqnr_db(fp_lora, q_lora) >= sqnr_db(fp, q) - 3
    summary = dmq_fx.summary(quantized).rows
    assert any("les:norm" in r["dmq"] for r in summary)  # tau folded into A there
    assert any("pts:" in r["dmq"] for r in summary)


def test_several_adapters_scales_and_removal(setup, tmp_path):
    unet, prepared = setup
    _, state_a = _with_lora(unet, seed=1)
    _, state_b = _with_lora(unet, seed=2)
    quantized = dmq_fx.convert_fx(prepared, "x86")
    plain = _out(quantized)
    only_a = _out(dmq_fx.load_lora(copy.deepcopy(quantized), state_a, "a"))
    # a diffusers-style file: "unet." prefix, safetensors
    save_file({f"unet.{k}": v.contiguous() for k, v in state_b.items()}, tmp_path / "b.st")
    dmq_fx.load_lora(quantized, state_a, "a")
    dmq_fx.load_lora(quantized, tmp_path / "b.st", "b", scale=0.5)
    assert lora_adapters(quantized) == ["a", "b"]
    both = _out(quantized)
    assert not torch.allclose(both, only_a)
    dmq_fx.set_adapters(quantized, ["a"])
    torch.testing.assert_close(_out(quantized), only_a, atol=1e-6, rtol=0)
    dmq_fx.set_adapters(quantized, ["a", "b"], [1.0, 0.0])
    torch.testing.assert_close(_out(quantized), only_a, atol=1e-6, rtol=0)
    dmq_fx.set_lora_scale(quantized, "b", 0.5)
    torch.testing.assert_close(_out(quantized), both, atol=1e-6, rtol=0)
    dmq_fx.remove_lora(quantized, "a")
    dmq_fx.remove_lora(quantized, "b")
    assert lora_adapters(quantized) == []
    assert torch.equal(_out(quantized), plain)  # the graph is back as converted
    assert not any("_lora" in n.name for n in quantized.graph.nodes)


def test_lora_errors_are_named(setup):
    unet, prepared = setup
    _, state = _with_lora(unet, seed=3)
    quantized = dmq_fx.convert_fx(prepared, "x86")
    with pytest.raises(dmq_fx.ConfigError, match="converted graph"):
        dmq_fx.load_lora(prepared, state)
    key = next(iter(state))
    bad = {f"nowhere.{key}": state[key]}
    with pytest.raises(dmq_fx.LoadError, match="nowhere"):
        dmq_fx.load_lora(quantized, bad)
    with pytest.raises(dmq_fx.LoadError, match="no up"):
        dmq_fx.load_lora(quantized, {k: v for k, v in state.items() if "lora_A" in k})
    before = _out(quantized)
    dmq_fx.load_lora(quantized, state, "x")
    with pytest.raises(dmq_fx.ConfigError, match="loaded already"):
        dmq_fx.load_lora(quantized, state, "x")
    with pytest.raises(dmq_fx.ConfigError, match="no adapter named 'y'"):
        dmq_fx.set_adapters(quantized, ["y"])
    dmq_fx.remove_lora(quantized, "x")
    assert torch.equal(_out(quantized), before)


def test_each_branch_equals_peft_on_the_layers_float_input(setup):
    """Per layer: the branch's output on the graph's own tensors equals peft's
    ``scaling * B(A(x))`` on the float input ``x`` those tensors stand for (``x / tau`` where LES
    went into the norm; the concatenation of a split layer's inputs)."""
    from layer_values import node_values

    from dmq_fx.graph.meta import ANNOTATION_KEY, graph_state
    from dmq_fx.workflow.lora import LoRABranches

    unet, prepared = setup
    lora_unet, state = _with_lora(unet, seed=4)
    quantized = dmq_fx.load_lora(dmq_fx.convert_fx(prepared, "reference"), state, lora_alpha=8)
    a, k = example_inputs(unet, batch=2, seed=5)
    env = node_values(quantized, a, k)
    tau_state = graph_state(quantized).converted_from.state
    checked = {"norm": 0, "split": 0}
    for node in quantized.graph.nodes:
        if node.op != "call_module" or not isinstance(
            quantized.get_submodule(node.target), LoRABranches
        ):
            continue
        name = node.target.removesuffix("_lora")
        x = torch.cat([env[s] for s in node.args], 1)
        checked["split"] += len(node.args) > 1
        layer_node = next(
            n for n in quantized.graph.nodes if n.op == "call_module" and n.target == name
        )
        spec = layer_node.meta[ANNOTATION_KEY]
        if spec.les_lowering == "norm":
            owner = spec.les_owner
            tau = next(
                v
                for key, v in tau_state.items()
                if key.startswith(f"{owner}.") and key.endswith("les.tau")
            )
            x = x * (tau.view(-1, 1, 1) if x.dim() == 4 else tau)
            checked["norm"] += 1
        peft_layer = lora_unet.get_submodule(name)
        with torch.no_grad():
            expected = peft_layer.lora_B["default"](peft_layer.lora_A["default"](x))
            expected = expected * peft_layer.scaling["default"]
        got = env[node]
        torch.testing.assert_close(
            got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()
        )
    assert checked["norm"] > 0 and checked["split"] > 0


def test_a_quantized_pipeline_takes_loras_as_the_float_one_does(tmp_path):
    """``pipe.load_lora_weights`` / ``set_adapters`` / ``unload_lora_weights`` on a quantized
    pipeline (diffusers calls QuantizedUNet's adapter methods)."""
    import numpy as np
    import tiny_pipelines
    from diffusers import DDIMScheduler

    pipe = tiny_pipelines._sd(tmp_path, build_unet(TINY_SD), DDIMScheduler(clip_sample=False))
    config = {"preset": "minmax", "weight_bits": 8, "num_inference_steps": 3, "batch_size": 8}
    q = dmq_fx.quantize_pipeline(pipe, config, calibration={"prompts": ["a cat"]}, progress=False)
    _, state = _with_lora(pipe.unet, seed=5, alpha=4)
    lora_file = {f"unet.{k}": v for k, v in state.items()}
    call = dict(num_inference_steps=3, height=16, width=16, output_type="np", guidance_scale=4.0)

    def images(p):
        return p("a cat", generator=torch.Generator().manual_seed(1), **call).images

    plain = images(q)
    q.load_lora_weights(dict(lora_file), adapter_name="style")
    assert q.get_list_adapters() == {"unet": ["style"]}
    with_lora = images(q)
    assert np.abs(with_lora - plain).mean() > 1e-3
    q.set_adapters(["style"], [0.0])
    np.testing.assert_allclose(images(q), plain, atol=1e-6)
    q.set_adapters(["style"], [1.0])
    np.testing.assert_allclose(images(q), with_lora, atol=1e-6)
    # the float pipeline with the same LoRA, loaded by diffusers itself
    float_lora = tiny_pipelines._sd(tmp_path, build_unet(TINY_SD), DDIMScheduler(clip_sample=False))
    float_lora.load_lora_weights(dict(lora_file), adapter_name="style")
    fp, fp_lora = images(pipe), images(float_lora)
    # quantized + LoRA against float + LoRA: within 3 dB (x1.41 in amplitude) of the
    # quantized pipeline's own distance to the float one
    assert np.abs(with_lora - fp_lora).mean() <= 1.41 * np.abs(plain - fp).mean()
    q.unload_lora_weights()
    assert q.get_list_adapters().get("unet", []) == []
    np.testing.assert_array_equal(images(q), plain)


def test_kohya_files_load_through_diffusers_converter(setup):
    """A kohya-named LoRA (``lora_unet_...``, alpha = rank), converted by diffusers, gives the
    graph the peft state dict gives."""
    from diffusers.utils import convert_state_dict_to_kohya

    unet, prepared = setup
    _, state = _with_lora(unet, seed=6, alpha=4)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    assert all(k.startswith("lora_unet_") for k in kohya)
    from_peft = dmq_fx.load_lora(dmq_fx.convert_fx(prepared, "x86"), state, lora_alpha=4)
    from_kohya = dmq_fx.load_lora(dmq_fx.convert_fx(prepared, "x86"), kohya)
    assert torch.equal(_out(from_kohya), _out(from_peft))


def test_fused_lora_is_requantized_with_the_stored_steps(setup):
    """fuse=True merges the LoRA into the integer weights (W8A8 here: steps fine enough to hold
    it), states per layer how much of the delta survived, and remove_lora restores the
    integers."""
    from dmq_fx.workflow.lora import lora_weights

    unet, _ = setup
    a, k = example_inputs(unet, batch=4)
    prepared = dmq_fx.prepare_fx(unet, dmq_fx.get_default_qconfig_mapping(8, 8), a, k, les=True)
    stages = [dmq_fx.SmoothQuantScales(), "observe_activations", "observe_weights"]
    dmq_fx.calibrate(prepared, calibration_data(unet), stages, progress=False)
    _, state = _with_lora(unet, seed=7)
    quantized = dmq_fx.convert_fx(prepared, "x86")
    plain = _out(quantized)
    branch = _out(dmq_fx.load_lora(copy.deepcopy(quantized), state, lora_alpha=8))
    dmq_fx.load_lora(quantized, state, "fused", lora_alpha=8, fuse=True)
    assert not any("_lora" in n.name for n in quantized.graph.nodes)  # no branch
    fused = _out(quantized)
    # the fused graph follows the branch graph far closer than the LoRA's own effect
    assert sqnr_db(branch - plain, fused - plain) >= 10
    stated = quantized.meta["dmq_fx_lora"]["fused"]["sqnr_db"]
    assert set(stated) == set(lora_weights(state)) and min(stated.values()) > 10
    # by hand for one layer: the integer change against the intended delta W' - W
    name = "down_blocks.0.resnets.0.conv1"
    layer = quantized.get_submodule(name)
    down, up, _ = lora_weights(state)[name]
    tau = next(v for key, v in quantized.meta["dmq_fx"].converted_from.state.items()
               if key.startswith(f"{name}.") and key.endswith("les.tau"))  # fmt: skip
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * 2.0 * tau.view(1, -1, 1, 1)
    original = quantized.meta["dmq_fx_lora"]["fused"]["fused"][name][0]
    steps = layer.weight_scale_0.view(-1, 1, 1, 1)
    change = (layer.weight_int_0.int() - original.int()) * steps
    assert stated[name] == pytest.approx(sqnr_db(delta, change), abs=1e-3)
    with pytest.raises(dmq_fx.ConfigError, match="fused into the weights"):
        dmq_fx.set_lora_scale(quantized, "fused", 0.5)
    dmq_fx.remove_lora(quantized, "fused")
    assert torch.equal(_out(quantized), plain)


def test_files_written_by_diffusers_save_lora_weights_load(setup, tmp_path):
    """What ``StableDiffusionPipeline.save_lora_weights`` writes for a UNet LoRA loads, and
    gives the graph the peft state dict gives."""
    from diffusers import StableDiffusionPipeline

    unet, prepared = setup
    _, state = _with_lora(unet, seed=8, alpha=4)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state)
    (path,) = tmp_path.glob("*.safetensors")
    from_file = dmq_fx.load_lora(dmq_fx.convert_fx(prepared, "x86"), path)
    from_dict = dmq_fx.load_lora(dmq_fx.convert_fx(prepared, "x86"), state, lora_alpha=4)
    assert torch.equal(_out(from_file), _out(from_dict))
