"""Output-sensitivity weights of the reconstruction loss (dmq_fx.methods.output_sensitivity)."""

import pytest
import torch
from conftest import calibration_data
from dmq_fx.passes import weight_before_quantization, weight_quantizer
from torch import fx

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs
from dmq_fx.graph.units import capture_unit_inputs, reconstruction_units, unit_graph
from dmq_fx.methods import adaround as adaround_module
from dmq_fx.methods.adaround import AdaRound
from dmq_fx.methods.fbr import FBR, fbr_loss
from dmq_fx.methods.output_sensitivity import output_sensitivity
from dmq_fx.quantize.modes import quantizer_mode


class _Scaled(torch.nn.Module):
    """y = c * (A x), then an integer side value: the Jacobian of y in h = A x is diag(c)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("c", torch.tensor([0.0, 1.0, 3.0]))

    def forward(self, x):
        h = self.lin(x)
        return h * self.c, x.argmax(1)


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_sensitivity_is_the_jacobians_squared_column_norms():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_Scaled())
    batches = [((torch.randn(32, 4),), {}) for _ in range(2)]
    nodes = [_node(gm, "lin"), _node(gm, "argmax")]
    lin, argmax = output_sensitivity(gm, nodes, batches, None, probes=200, seed=0)
    assert argmax is None  # an integer value has no sensitivity
    assert lin.shape == (64, 3)
    assert lin.mean().item() == pytest.approx(1.0)
    # diag(J^T J) = c^2 = (0, 1, 9), scaled to mean 1: (0, 0.3, 2.7)
    per_channel = lin.mean(0)
    assert per_channel[0].item() == 0.0
    assert per_channel[1:].tolist() == pytest.approx([0.3, 2.7], rel=0.05)
    # cut where captured inputs are cut, deterministic with the seed
    again = output_sensitivity(gm, nodes[:1], batches, 40, probes=200, seed=0)[0]
    assert torch.equal(again, output_sensitivity(gm, nodes[:1], batches, 40, 200, 0)[0])
    assert again.shape == (40, 3)
    with pytest.raises(dmq_fx.CalibrationError, match="probes must be >= 1, got 0"):
        output_sensitivity(gm, nodes, batches, None, probes=0)
    with pytest.raises(dmq_fx.ConfigError, match="sensitivity_probes must be >= 1, got 0"):
        AdaRound(output_sensitivity=True, sensitivity_probes=0)


def test_fbr_loss_weighs_the_output_errors_only():
    torch.manual_seed(0)
    out, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    layer, layer_target = torch.randn(2, 5), torch.randn(2, 5)
    plain = fbr_loss([out], [target], [layer], [layer_target], layer_weight=0.8)
    layer_term = 0.8 * (layer - layer_target).pow(2).sum(1).mean()
    zero = fbr_loss([out], [target], [layer], [layer_target], 0.8, output_weights=[out * 0])
    assert zero.item() == pytest.approx(layer_term.item())
    twice = torch.full_like(out, 2.0)
    doubled = fbr_loss([out], [target], [layer], [layer_target], 0.8, output_weights=[twice])
    assert doubled.item() == pytest.approx(2 * plain.item() - layer_term.item())
    with pytest.raises(ValueError, match="output_weights and outputs differ"):
        fbr_loss([out], [target], output_weights=[])


def _prepared():
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(3, 8), a, k)
    data = calibration_data(model)
    dmq_fx.calibrate(prepared, data, ("observe_activations", "observe_weights"), progress=False)
    return prepared, data


@pytest.mark.parametrize("stage", ["adaround", "fbr"])
def test_the_weights_drive_the_learned_rounding(stage, monkeypatch):
    """With every weight 0 the output loss gives no gradient and the rounding stays at nearest
    (no regulariser, no layer loss); the real weights, shaped like the unit's captured
    outputs with mean 1, move it."""
    options = dict(iterations=40, reg_weight=0.0, output_sensitivity=True, sensitivity_probes=2)
    make = {
        "adaround": lambda: AdaRound(**options),
        "fbr": lambda: FBR(layer_weight=0.0, step_lr=0.0, **options),
    }[stage]
    real = adaround_module.output_sensitivity
    seen = []

    def recorded(*args, **kwargs):
        weights = real(*args, **kwargs)
        seen.append(weights)
        return weights

    def zero(*args, **kwargs):
        return [None if w is None else torch.zeros_like(w) for w in real(*args, **kwargs)]

    roundings = {}
    for name, fn in (("real", recorded), ("zero", zero)):
        monkeypatch.setattr(adaround_module, "output_sensitivity", fn)
        gm, data = _prepared()
        unit = next(u for u in reconstruction_units(gm) if u.kind == "block")
        make().learn_unit(gm, unit, data, seed=0)
        layer = weight_quantizer(gm.get_submodule(unit.layers[0].target))
        learned = layer.rounding(0).clone()
        fq = layer.fake_quants[0]
        w = layer.split(weight_before_quantization(gm.get_submodule(unit.layers[0].target)))[0]
        scaled = w / fq.scale.reshape(-1, *[1] * (w.dim() - 1))
        nearest = (scaled - torch.floor(scaled) >= 0.5).to(learned.dtype)
        roundings[name] = (learned, nearest)
    learned, nearest = roundings["zero"]
    assert torch.equal(learned, nearest)
    learned, nearest = roundings["real"]
    assert not torch.equal(learned, nearest)
    # the weights the real run used: per output, the unit's captured output shape, mean 1
    gm, data = _prepared()
    unit = next(u for u in reconstruction_units(gm) if u.kind == "block")
    sub, inputs, outputs = unit_graph(gm, unit)
    with quantizer_mode(gm, "float"), torch.no_grad():
        captured = sub(*capture_unit_inputs(gm, inputs, data, None).values)
    for w, out in zip(seen[0], captured):
        assert w.shape == out.shape
        assert w.mean().item() == pytest.approx(1.0)
