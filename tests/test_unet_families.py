"""The UNets people run, tiny and random: SDXL (base and refiner), LCM, SD 2.x, ControlNet and
T2I-Adapter residuals, attention masks and LoRA scales as nested inputs, and a UNet wrapped in
another module or mounted under a prefix."""

import copy

import pytest
import torch
from layer_values import (
    lowered_layer_outputs,
    node_values,
    reference_inputs,
    simulated_layer_outputs,
    without_rounding_ties,
)

import dmq_fx
from dmq_fx.graph.meta import ANNOTATION_KEY, quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_SD, TINY_SDXL, build_unet, example_inputs
from dmq_fx.metrics import sqnr_db

#: SDXL's refiner: text-and-time embeddings with 5 time ids (aesthetic score), no first-level
#: attention
TINY_SDXL_REFINER = dict(
    TINY_SDXL,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    projection_class_embeddings_input_dim=16 + 5 * 8,
)
TINY_LCM = dict(TINY_SD, time_cond_proj_dim=8)
TINY_SD2 = dict(
    TINY_SD, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True
)


def _ip_adapter_unet(clip_dim=12):
    """TINY_SD with an IP-Adapter (``encoder_hid_dim_type="ip_image_proj"``): its image
    projection and the cross-attention processors' ``to_k_ip`` / ``to_v_ip``, random, loaded by
    diffusers' own loader from an IP-Adapter state dict."""
    unet = build_unet(TINY_SD)
    cfg, g = unet.config, torch.Generator().manual_seed(5)
    cross = cfg.cross_attention_dim
    image_proj = {
        "proj.weight": 0.2 * torch.randn(4 * cross, clip_dim, generator=g),
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        level = 0 if name.startswith("mid") else int(name.split(".")[1])
        widths = cfg.block_out_channels
        hidden = {"mid": widths[-1], "up_": widths[::-1][level], "dow": widths[level]}[name[:3]]
        for kind in ("to_k_ip", "to_v_ip"):
            ip[f"{key_id}.{kind}.weight"] = 0.2 * torch.randn(hidden, cross, generator=g)
        key_id += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip}])
    return unet.eval()


def _residuals(model, batch, g, intrablock=False):
    """ControlNet-style residuals: one per down-block output and one for the middle block;
    T2I-Adapter's: one per down block (``down_intrablock_additional_residuals``)."""
    a, k = example_inputs(model, batch=batch)
    shapes = []
    hooks = [
        model.down_blocks[i].register_forward_hook(
            lambda m, i, o: shapes.append([t.shape for t in o[1]])
        )
        for i in range(len(model.down_blocks))
    ]
    with torch.no_grad():
        model(*a, **k)
    for h in hooks:
        h.remove()
    if intrablock:  # one per down block, its last output
        return [torch.randn(s[0], generator=g) for s in shapes]  # a list: diffusers pops it
    down = [torch.randn(model.conv_in.out_channels, 1, 1).expand(batch, -1, *a[0].shape[2:])]
    down = [torch.randn(batch, model.conv_in.out_channels, *a[0].shape[2:], generator=g)]
    down += [torch.randn(s, generator=g) for block in shapes for s in block]
    mid_shape = shapes[-1][-1]
    return tuple(0.1 * d for d in down), 0.1 * torch.randn(mid_shape, generator=g)


def _inputs(family, model, batch, seed):
    a, k = example_inputs(model, batch=batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if family == "lcm":
        k["timestep_cond"] = torch.randn(batch, 8, generator=g)
    elif family == "sdxl-refiner":
        # 5 time ids (size, crop, aesthetic score), so the pooled text has 16 entries
        k["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 16, generator=g),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 6.0]]).repeat(batch, 1),
        }
    elif family == "controlnet":
        k["down_block_additional_residuals"], k["mid_block_additional_residual"] = _residuals(
            model, batch, g
        )
    elif family == "t2i-adapter":
        k["down_intrablock_additional_residuals"] = _residuals(model, batch, g, intrablock=True)
    elif family == "ip-adapter":
        k["added_cond_kwargs"] = {"image_embeds": [torch.randn(batch, 1, 12, generator=g)]}
    elif family == "masked-lora-scale":
        k["encoder_attention_mask"] = torch.ones(batch, k["encoder_hidden_states"].shape[1])
        k["encoder_attention_mask"][:, -2:] = 0
        k["cross_attention_kwargs"] = {"scale": 0.5}
    return a, k


FAMILIES = {
    "sdxl": TINY_SDXL,
    "sdxl-refiner": TINY_SDXL_REFINER,
    "lcm": TINY_LCM,
    "sd2": TINY_SD2,
    "controlnet": TINY_SD,
    "t2i-adapter": TINY_SD,
    "masked-lora-scale": TINY_SD,
    "ip-adapter": None,  # _ip_adapter_unet
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_traces_exactly_and_quantizes(family):
    model = _ip_adapter_unet() if family == "ip-adapter" else build_unet(FAMILIES[family])
    example = _inputs(family, model, 2, 0)
    graph = dmq_fx.trace(model, *example)
    a, k = _inputs(family, model, 3, 1)
    with torch.no_grad():
        fp = model(*a, **copy.deepcopy(k)).sample
        torch.testing.assert_close(graph(*a, **k).sample, fp, atol=1e-5, rtol=1e-4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(8, 8), *example)
    data = [_inputs(family, model, 4, s) for s in range(2, 5)]
    dmq_fx.calibrate(prepared, data, progress=False)
    ref, nat = dmq_fx.convert_fx(prepared, "reference"), dmq_fx.convert_fx(prepared, "x86")
    with torch.no_grad():
        sim = prepared(*a, **k).sample
    assert sqnr_db(fp, sim) > 20  # W8A8 on a random-weight UNet
    # every layer of both lowerings equals the simulation on identical inputs
    env_ref, env_nat, env_sim = (node_values(g, a, k) for g in (ref, nat, prepared))
    x0s = without_rounding_ties(prepared, ref, reference_inputs(ref, env_ref))
    ref_out = lowered_layer_outputs(ref, env_ref, x0s)
    nat_out = lowered_layer_outputs(nat, env_nat, x0s)
    sim_out = simulated_layer_outputs(prepared, env_sim, ref, x0s)
    assert set(ref_out) == {n.target for n in quantized_layer_nodes(prepared)} != set()
    for name, r in ref_out.items():
        step = (r.max() - r.min()).item() / 255
        assert (nat_out[name] - r).abs().max().item() <= 0.01 * step, name
        assert (sim_out[name] - r).abs().max().item() <= 0.01 * step, name


class _Wrapped(torch.nn.Module):
    """A UNet inside a user's module, called with its own argument names."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, c, added):
        return self.unet(x, t, encoder_hidden_states=c, added_cond_kwargs=added).sample


class _Prefixed(torch.nn.Module):
    """A UNet under a prefix, as LDM-style checkpoints mount it (``model.diffusion_model``)."""

    def __init__(self, unet):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet

    def forward(self, x, t, c, added):
        return self.model.diffusion_model(x, t, c, added_cond_kwargs=added, return_dict=False)[0]


def _decisions(prepared, prefix):
    return {
        n.target.removeprefix(prefix): (
            n.meta[ANNOTATION_KEY].weight_bits,
            n.meta[ANNOTATION_KEY].act_bits,
            tuple(n.meta[ANNOTATION_KEY].input_groups),
        )
        for n in quantized_layer_nodes(prepared)
    }


def test_float_layers_are_found_by_role_wherever_the_unet_sits():
    unet = build_unet(TINY_SDXL)
    (x, t), k = example_inputs(unet)
    flat = (x, t, k["encoder_hidden_states"], k["added_cond_kwargs"])
    mapping = dmq_fx.get_default_qconfig_mapping(8, 8)
    bare = _decisions(dmq_fx.prepare_fx(unet, mapping, (x, t), k), "")
    wrapped = _decisions(dmq_fx.prepare_fx(_Wrapped(unet), mapping, flat), "unet.")
    prefix = "model.diffusion_model."
    prefixed = _decisions(dmq_fx.prepare_fx(_Prefixed(unet), mapping, flat), prefix)
    assert bare == wrapped == prefixed
    float_roles = ("conv_in", "conv_out", "time_embedding", "add_embedding")
    assert not any(n.startswith(float_roles) or "time_emb_proj" in n for n in bare)
    assert any(n.startswith("down_blocks") for n in bare)
    # an entry for a module's exact name wins over its role
    mapping.set_module_name("unet.conv_in", dmq_fx.get_default_qconfig(8, 8))
    assert "conv_in" in _decisions(dmq_fx.prepare_fx(_Wrapped(unet), mapping, flat), "unet.")


def test_nested_inputs_are_checked_by_name():
    unet = build_unet(TINY_SD)
    a, k = _inputs("masked-lora-scale", unet, 2, 0)
    graph = dmq_fx.trace(unet, a, k)
    assert k["cross_attention_kwargs"] == {"scale": 0.5}  # diffusers pops it; not from ours
    with pytest.raises(dmq_fx.InputMismatchError, match=r"cross_attention_kwargs\['scale'\]"):
        graph(*a, **{**k, "cross_attention_kwargs": {"scale": 1.0}})
    with pytest.raises(dmq_fx.InputMismatchError, match="keys \\['scale'\\]"):
        graph(*a, **{**k, "cross_attention_kwargs": {}})
    sdxl = build_unet(TINY_SDXL)
    a, k = example_inputs(sdxl)
    graph = dmq_fx.trace(sdxl, a, k)
    added = {"text_embeds": k["added_cond_kwargs"]["text_embeds"]}
    with pytest.raises(dmq_fx.InputMismatchError, match="added_cond_kwargs.*time_ids"):
        graph(*a, **{**k, "added_cond_kwargs": added})
    controlnet = build_unet(TINY_SD)
    a, k = _inputs("controlnet", controlnet, 2, 0)
    graph = dmq_fx.trace(controlnet, a, k)
    short = k["down_block_additional_residuals"][:-1]
    with pytest.raises(dmq_fx.InputMismatchError, match="down_block_additional_residuals"):
        graph(*a, **{**k, "down_block_additional_residuals": short})
