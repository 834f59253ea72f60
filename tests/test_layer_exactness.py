"""Per-layer exactness of lowered graphs for every preset.

For each quantized layer of a graph calibrated with a preset, the x86 lowering, the reference
lowering and the simulation get the same float input (see ``layer_values``) and must agree
within 1% of the layer's 8-bit output step: LES folded into a norm or merged into the quantize
step, AdaRound / FBR roundings, PTS as integer shifts and dequantized per channel, split
concatenations and per-timestep tables. (Min-max graphs: ``test_convert``.)
"""

import functools

import pytest
import torch
from conftest import calibration_data, cheap_stages
from layer_values import (
    folded_norm_outputs,
    layer_nodes,
    lowered_layer_outputs,
    node_values,
    reference_inputs,
    simulated_layer_outputs,
    without_rounding_ties,
)

import dmq_fx
from dmq_fx.graph.meta import ANNOTATION_KEY, quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs

GRID = [100, 500, 900]


@functools.cache
def graphs(preset: str, wb: int, ab: int, tables: bool = False):
    """(model, simulation, reference lowering, x86 lowering) for ``preset`` at W``wb``A``ab``."""
    model = build_unet(TINY_DDPM if tables else TINY_SD)
    with torch.no_grad():  # trained-like norm affines (a fresh model's are 1 and 0)
        g = torch.Generator().manual_seed(3)
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.bias is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    spec = dmq_fx.PRESETS[preset]
    a, k = example_inputs(model, batch=4)
    data = calibration_data(model)
    if tables:  # one timestep of the grid per sample, as a sampler's batches cover them
        data = [((x, torch.tensor(GRID + [GRID[i]])), kw) for i, ((x, _), kw) in enumerate(data)]
    prepared = dmq_fx.prepare_fx(
        model,
        dmq_fx.get_default_qconfig_mapping(wb, ab),
        a,
        k,
        timestep_tables=tables,
        **spec.prepare_flags,
    )
    dmq_fx.calibrate(prepared, data, cheap_stages(preset), progress=False)
    return model, prepared, dmq_fx.convert_fx(prepared, "reference"), dmq_fx.convert_fx(prepared)


def output_step(y: torch.Tensor) -> float:
    return (y.max() - y.min()).item() / 255


def specs(gm):
    return {name: node.meta[ANNOTATION_KEY] for name, node in layer_nodes(gm).items()}


CASES = {
    # preset, weight bits, activation bits, per-timestep tables; what the case must contain
    "les": ("les", 4, 8, False),
    "adaround": ("adaround", 4, 8, False),
    "pts-shift": ("pts", 4, 8, False),
    "pts-dequant": ("pts", 8, 8, False),
    "dmq": ("dmq", 4, 6, False),
    "eda-dm": ("eda-dm", 4, 8, False),
    "dmq+eda": ("dmq+eda", 4, 8, False),
    "tables": ("minmax", 4, 8, True),
    "tables-pts": ("pts", 4, 8, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_layer_agrees_across_lowerings_and_simulation(case):
    model, sim, ref, nat = graphs(*CASES[case])
    a, k = example_inputs(model, batch=3, seed=7)
    if CASES[case][3]:
        a = (a[0], torch.tensor(GRID[1]))  # a lowered table graph takes one timestep per call
    env_ref, env_nat, env_sim = (node_values(g, a, k) for g in (ref, nat, sim))
    x0s = without_rounding_ties(sim, ref, reference_inputs(ref, env_ref))
    ref_out = lowered_layer_outputs(ref, env_ref, x0s)
    nat_out = lowered_layer_outputs(nat, env_nat, x0s)
    sim_out = simulated_layer_outputs(sim, env_sim, ref, x0s)
    quantized = {n.target for n in quantized_layer_nodes(sim)}
    assert quantized and set(ref_out) == set(nat_out) == set(sim_out) == quantized
    for name, r in ref_out.items():
        step = output_step(r)
        assert (nat_out[name] - r).abs().max().item() <= 0.01 * step, (name, "x86")
        assert (sim_out[name] - r).abs().max().item() <= 0.01 * step, (name, "simulation")


@pytest.mark.parametrize("case", ["les", "dmq"])
def test_norms_that_absorbed_les_divide_by_tau(case):
    """``les:norm`` layers: the lowered norm's output is the simulation's norm output divided
    by tau (its weight and bias divided), within float32 rounding."""
    model, sim, ref, _ = graphs(*CASES[case])
    a, k = example_inputs(model, batch=3, seed=7)
    folded = folded_norm_outputs(sim, ref, node_values(ref, a, k))
    assert len(folded) == sum(s.les_lowering == "norm" for s in specs(ref).values()) > 0
    for norm, (lowered, expected) in folded.items():
        scale = expected.abs().max().item()
        assert (lowered - expected).abs().max().item() <= 1e-5 * scale, norm


def test_the_cases_cover_every_lowering_form():
    """What the exactness test above exercises, so that a change of a default cannot quietly
    drop a lowering from it."""
    forms = {}
    for case, args in CASES.items():
        _, _, _, nat = graphs(*args)
        layers = specs(nat)
        forms[case] = {
            "les": {s.les_lowering for s in layers.values()} - {None},
            "pts": {s.pts_lowering for s in layers.values()} - {None},
            "split": any(len(s.input_groups) > 1 for s in layers.values()),
            "adaround": any(s.adaround for s in layers.values()),
            "tables": all(s.timestep_table for s in layers.values()),
        }
    assert forms["les"]["les"] == {"norm", "step"} and forms["dmq"]["les"] == {"norm", "step"}
    assert forms["pts-shift"]["pts"] == {"shift"} and forms["dmq"]["pts"] == {"shift"}
    assert forms["pts-dequant"]["pts"] == {"dequant"}
    assert forms["tables-pts"]["pts"] == {"dequant"} and forms["tables-pts"]["tables"]
    assert forms["tables"]["tables"] and forms["tables"]["split"]
    assert all(forms[c]["adaround"] for c in ("adaround", "dmq", "eda-dm", "dmq+eda"))
    assert all(forms[c]["split"] for c in CASES)
