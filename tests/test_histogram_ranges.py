"""Histogram activation ranges (activation_ranges="histogram")."""

import pytest
import torch
from dmq_fx.observers import HistogramRangeObserver
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
)

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs


def _error(x, observer):
    scale, zero_point = observer.calculate_qparams()
    q = torch.fake_quantize_per_tensor_affine(
        x, float(scale), int(zero_point), observer.quant_min, observer.quant_max
    )
    return float((q - x).pow(2).mean())


def _observed(cls, x, bits):
    observer = cls(dtype=torch.quint8, quant_min=0, quant_max=2**bits - 1)
    for chunk in x.chunk(4):
        observer(chunk)
    return observer


def test_histogram_range_searches_for_the_quantizers_own_levels():
    # heavy-tailed (Laplace) activations: the rare large values stretch min / max
    # (torch.ao's search is greedy and stops at the first worse step, so the gain varies from
    # sample to sample: 0-27% at 6 bits over seeds 0-3; this sample shows it clearly)
    gen = torch.Generator().manual_seed(2)
    sign = torch.randint(0, 2, (20000,), generator=gen) * 2 - 1
    x = torch.empty(20000).exponential_(generator=gen) * sign
    for bits in (8, 6, 4):
        ours = _observed(HistogramRangeObserver, x, bits)
        assert ours.dst_nbins == 2**bits
        minmax = _error(x, _observed(MinMaxObserver, x, bits))
        if bits == 8:  # little to gain with 256 levels, but nothing lost
            assert _error(x, ours) <= minmax
        else:  # far better where the levels are few, and than torch.ao's 256-level search
            torch_ao = _error(x, _observed(HistogramObserver, x, bits))
            assert _error(x, ours) < 0.8 * min(minmax, torch_ao), bits
    # at 8 bits it is torch.ao's observer
    ours, theirs = _observed(HistogramRangeObserver, x, 8), _observed(HistogramObserver, x, 8)
    assert [float(v) for v in ours.calculate_qparams()] == [
        float(v) for v in theirs.calculate_qparams()
    ]


def test_histogram_ranges_in_the_default_mapping(tmp_path):
    model = build_unet(TINY_DDPM)
    data = [example_inputs(model, batch=4, seed=s) for s in range(3)]
    mapping = dmq_fx.get_default_qconfig_mapping(4, 6, activation_ranges="histogram")
    prepared = dmq_fx.prepare_fx(model, mapping, *data[0])
    dmq_fx.calibrate(prepared, data, progress=False)
    observers = [
        m.activation_post_process
        for name, m in prepared.named_modules()
        if name.endswith("_input_quant")
    ]
    assert observers and all(isinstance(o, HistogramRangeObserver) for o in observers)
    assert all(o.dst_nbins == 64 for o in observers)
    converted = dmq_fx.convert_fx(prepared, "x86")
    a, k = example_inputs(model, batch=2, seed=9)
    with torch.no_grad():
        assert converted(*a, **k).sample.shape == model(*a, **k).sample.shape
    # save / load rebuild the histogram observers without being told
    dmq_fx.save(converted, tmp_path / "h.safetensors")
    loaded = dmq_fx.load(tmp_path / "h.safetensors", model)
    with torch.no_grad():
        assert torch.equal(loaded(*a, **k).sample, converted(*a, **k).sample)
    with pytest.raises(dmq_fx.ConfigError, match="'mse'"):
        dmq_fx.get_default_qconfig_mapping(4, 8, activation_ranges="mse")


@pytest.mark.parametrize("ranges", ["minmax", "histogram"])
def test_quantize_pipeline_observes_the_configured_activation_ranges(ranges):
    from diffusers import DDIMScheduler, DDPMPipeline

    from dmq_fx.graph.meta import ANNOTATION_KEY, quantized_layer_nodes

    pipe = DDPMPipeline(unet=build_unet(TINY_DDPM), scheduler=DDIMScheduler())
    fast = {"num_inference_steps": 4, "samples_per_step": 4, "batch_size": 8}
    config = {"preset": "minmax", "act_bits": 6, "activation_ranges": ranges, **fast}
    q = dmq_fx.quantize_pipeline(pipe, config, progress=False)
    observers = {
        type(n.meta[ANNOTATION_KEY].qconfig.activation())
        for n in quantized_layer_nodes(q.unet.graph)
    }
    expected = HistogramRangeObserver if ranges == "histogram" else MovingAverageMinMaxObserver
    assert observers == {expected}


def test_quantization_config_names_a_bad_activation_ranges_value():
    with pytest.raises(dmq_fx.ConfigError, match="activation_ranges must be one of .* got 'mse'"):
        dmq_fx.QuantizationConfig(activation_ranges="mse")
