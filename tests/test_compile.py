"""torch.compile of converted graphs (dmq_fx.compile) and the x86 lowering's fallback warning.

Compiling a tiny UNet takes one to two minutes on one core; the test that runs by default
compiles the DMQ-structured graph once (LES as per-channel steps, PTS as shifts, split
concatenations, int8 kernels) with a dynamic batch; the others are marked slow.
"""

import warnings

import pytest
import torch

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.lowering import convert as convert_module
from dmq_fx.metrics import sqnr_db

#: the documented bound: compiled vs eager at least this far above the quantization error
MARGIN_DB = 15.0
DMQ_STRUCTURE = ["smoothquant", "observe_activations", "vote_pts", "observe_weights"]


def _converted(config, backend="x86", stages=None, bits=(4, 8), **flags):
    model = build_unet(config)
    args, kwargs = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(*bits), args, kwargs, **flags
    )
    data = [example_inputs(model, batch=4, seed=s) for s in range(2)]
    dmq_fx.calibrate(prepared, data, stages or dmq_fx.DEFAULT_STAGES, progress=False)
    return model, dmq_fx.convert_fx(prepared, backend=backend)


def _check_against_eager(model, quantized, compiled, batches, timestep=None):
    for batch in batches:
        args, kwargs = example_inputs(model, batch=batch, seed=10 + batch)
        if timestep is not None:
            args = (args[0], timestep)
        out = compiled(*args, **kwargs).sample  # first: compiling must not need an eager call
        with torch.no_grad():
            fp, eager = model(*args, **kwargs).sample, quantized(*args, **kwargs).sample
        assert out.shape == eager.shape
        assert sqnr_db(eager, out) >= sqnr_db(fp, eager) + MARGIN_DB, batch


def test_dmq_structured_graph_compiles_in_one_graph_for_every_batch_size():
    torch._dynamo.reset()
    model, quantized = _converted(TINY_DDPM, stages=DMQ_STRUCTURE, les=True, pts="skip")
    rows = dmq_fx.summary(quantized).rows
    rewrites = ",".join(r["dmq"] for r in rows)
    assert "les:step" in rewrites and "pts:shift" in rewrites and "split" in rewrites
    assert any(r["form"] == "int8" for r in rows)
    compiled = dmq_fx.compile(quantized, dynamic=True)
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    _check_against_eager(model, quantized, compiled, batches=(4, 3))
    # fullgraph=True: one graph, compiled once, serves every batch size above 1 ...
    assert graphs["unique_graphs"] - before == 1
    # ... and batch 1 gets its own (torch.compile specialises sizes 0 and 1)
    _check_against_eager(model, quantized, compiled, batches=(1,))
    assert graphs["unique_graphs"] - before == 2
    assert compiled.quantized is quantized


def test_compile_refuses_a_graph_that_is_not_converted():
    model = build_unet(TINY_DDPM)
    args, kwargs = example_inputs(model, batch=2)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(8, 8), args, kwargs)
    with pytest.raises(dmq_fx.ConvertError, match="convert_fx.*'prepared'"):
        dmq_fx.compile(prepared)


def test_compile_uses_the_cpp_wrapper_unless_told_otherwise(monkeypatch):
    from dmq_fx.lowering import compile as compile_module

    seen = []
    monkeypatch.setattr(
        compile_module.torch, "compile", lambda model, **kw: seen.append(kw["options"]) or model
    )
    _, quantized = _converted(TINY_DDPM)
    dmq_fx.compile(quantized)
    dmq_fx.compile(quantized, options={"cpp_wrapper": False, "max_autotune": True})
    assert seen == [{"cpp_wrapper": True}, {"cpp_wrapper": False, "max_autotune": True}]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_conditional_unet_compiles_in_both_forms(backend):
    """x86: the DMQ structure on a text-conditional UNet (LES folded into LayerNorms before
    q / k / v, per-channel steps elsewhere, PTS shifts); reference: plain min-max."""
    torch._dynamo.reset()
    flags = {"stages": DMQ_STRUCTURE, "les": True, "pts": "skip"} if backend == "x86" else {}
    model, quantized = _converted(TINY_SD, backend=backend, **flags)
    if backend == "x86":
        rewrites = ",".join(r["dmq"] for r in dmq_fx.summary(quantized).rows)
        assert "les:norm" in rewrites and "les:step" in rewrites
    _check_against_eager(model, quantized, dmq_fx.compile(quantized, dynamic=True), (4, 2))


@pytest.mark.slow
def test_timestep_tables_compile_and_still_refuse_timesteps_outside_the_grid():
    torch._dynamo.reset()
    model = build_unet(TINY_DDPM)
    x = example_inputs(model, batch=4)[0][0]
    prepared = dmq_fx.prepare_fx(
        model,
        dmq_fx.get_default_qconfig_mapping(4, 8),
        (x, torch.tensor(500)),
        timestep_tables=True,
        les=True,
        pts="skip",
    )
    data = [((torch.randn_like(x), torch.tensor(t)), {}) for t in (100, 500, 900)]
    dmq_fx.calibrate(prepared, data, DMQ_STRUCTURE, progress=False)
    quantized = dmq_fx.convert_fx(prepared, backend="x86")
    compiled = dmq_fx.compile(quantized, dynamic=True)
    for t in (100, 480, 900):
        _check_against_eager(model, quantized, compiled, (4,), timestep=torch.tensor(t))
    with pytest.raises(dmq_fx.TimestepOutOfGridError):
        compiled(x, torch.tensor(999))


def _force_int8_dot_product(monkeypatch, available: bool) -> None:
    # the decision convert_fx takes from /proc/cpuinfo, forced so both paths run on every CPU
    monkeypatch.setattr(convert_module, "cpu_has_int8_dot_product", lambda: available)


def test_x86_lowering_warns_once_when_layers_fall_back_to_the_reference_form(monkeypatch):
    _force_int8_dot_product(monkeypatch, False)
    with pytest.warns(dmq_fx.ReferenceFormWarning) as caught:
        _, quantized = _converted(TINY_DDPM, bits=(8, 8))
    assert len(caught) == 1
    forms = [r["form"] for r in dmq_fx.summary(quantized).rows]
    message = str(caught[0].message)
    assert f"{forms.count('reference')} of {len(forms)} quantized layers" in message
    assert "act_bits=7" in message and "weight_bits=4" in message
    assert forms.count("reference") > 0


def test_x86_lowering_is_silent_when_every_layer_runs_int8(monkeypatch):
    _force_int8_dot_product(monkeypatch, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dmq_fx.ReferenceFormWarning)
        _, quantized = _converted(TINY_DDPM, bits=(8, 8))
    assert all(r["form"] == "int8" for r in dmq_fx.summary(quantized).rows)


def test_compiled_sdxl_graph_with_nested_inputs():
    """A graph with dict inputs (SDXL's added_cond_kwargs) compiles in one graph; a wrong dict
    raises the graph's own InputMismatchError before the compiled code runs."""
    from dmq_fx.graph.unet_configs import TINY_SDXL
    from dmq_fx.metrics import sqnr_db

    torch._dynamo.reset()
    model = build_unet(TINY_SDXL)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k)
    data = [example_inputs(model, batch=4, seed=s) for s in range(3)]
    dmq_fx.calibrate(prepared, data, progress=False)
    quantized = dmq_fx.convert_fx(prepared)
    compiled = dmq_fx.compile(quantized, dynamic=False)
    a2, k2 = example_inputs(model, batch=4, seed=7)
    with torch.no_grad():
        fp, eager = model(*a2, **k2).sample, quantized(*a2, **k2).sample
        out = compiled(*a2, **k2).sample
    assert sqnr_db(eager, out) >= sqnr_db(fp, eager) + 10  # the module docstring's bound
    missing = {"text_embeds": k2["added_cond_kwargs"]["text_embeds"]}
    with pytest.raises(dmq_fx.InputMismatchError, match="added_cond_kwargs"):
        compiled(*a2, **{**k2, "added_cond_kwargs": missing})
