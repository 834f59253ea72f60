import pytest
import torch
from conftest import assert_unchanged, state_snapshot
from diffusers.models.unets.unet_2d import UNet2DOutput

import dmq_fx
from dmq_fx.graph.unet_configs import (
    DDPM_CIFAR10,
    SD15,
    TINY_DDPM,
    TINY_SD,
    build_unet,
    example_inputs,
)

LAYER_TYPES = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm)

# Block types and options diffusers ships beyond the reference configs.
VARIANTS = {
    "scale_shift": dict(TINY_DDPM, resnet_time_scale_shift="scale_shift"),
    "linear_projection_2_layers": dict(
        TINY_SD, use_linear_projection=True, transformer_layers_per_block=2
    ),
    "head_dims_per_block": dict(TINY_SD, attention_head_dim=(2, 4)),
    "skip_blocks": dict(
        TINY_DDPM,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
        block_out_channels=(32, 32, 32),
    ),
    "resnet_updown": dict(
        TINY_DDPM, add_attention=False, downsample_type="resnet", upsample_type="resnet"
    ),
    "sd_class_embed_timestep": dict(TINY_SD, class_embed_type="timestep"),
}


def relative_max_error(ref, out):
    return ((ref - out).abs().max() / ref.abs().max()).item()


def assert_module_level(model, gm):
    """Every conv / linear / norm of the model is a call_module node with its own name."""
    expected = {n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert expected <= called, sorted(expected - called)[:5]


def test_tiny_unets_are_module_level_and_exact_at_batches_1_to_32(tiny_unet):
    args, kwargs = example_inputs(tiny_unet, batch=2)
    gm = dmq_fx.trace(tiny_unet, args, kwargs)
    assert_module_level(tiny_unet, gm)
    with torch.no_grad():
        for batch in (1, 2, 5, 32):
            a, k = example_inputs(tiny_unet, batch=batch, seed=batch)
            assert relative_max_error(tiny_unet(*a, **k).sample, gm(*a, **k).sample) <= 1e-5


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_other_diffusers_block_types_trace_exactly(name):
    model = build_unet(VARIANTS[name])
    a, k = example_inputs(model, batch=2)
    gm = dmq_fx.trace(model, a, k)
    assert_module_level(model, gm)
    a, k = example_inputs(model, batch=3, seed=1)
    with torch.no_grad():
        assert relative_max_error(model(*a, **k).sample, gm(*a, **k).sample) <= 1e-5


def test_ddpm_cifar10_config_graph_facts():
    model = build_unet(DDPM_CIFAR10)
    a, k = example_inputs(model, batch=1)
    gm = dmq_fx.trace(model, a, k)
    types = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            t = type(gm.get_submodule(n.target)).__name__
            types[t] = types.get(t, 0) + 1
    assert (types["Conv2d"], types["Linear"], types["GroupNorm"]) == (65, 48, 51)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name in (
        "down_blocks.1.attentions.0.to_q",
        "down_blocks.1.attentions.0.to_k",
        "down_blocks.1.attentions.0.to_v",
        "down_blocks.1.attentions.0.to_out.0",
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.0.upsamplers.0.conv",
        "up_blocks.0.resnets.1.conv_shortcut",
    ):
        assert name in targets
    skip_cats = [
        n
        for n in gm.graph.nodes
        if n.target is torch.cat and n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) == 1
    ]
    assert len(skip_cats) == 12
    assert all(len(c.users) == 2 for c in skip_cats)
    names = gm.code
    assert "up_blocks_0_resnets_1_conv_shortcut = self.up_blocks.0" not in names  # fx naming
    assert "up_blocks_0_resnets_1_conv_shortcut" in names
    a, k = example_inputs(model, batch=4, seed=3)
    with torch.no_grad():
        assert relative_max_error(model(*a, **k).sample, gm(*a, **k).sample) <= 1e-5


@pytest.mark.parametrize(
    "timestep",
    [7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 9, 11])],
    ids=["int", "float", "0d", "1d_len1", "1d_batch"],
)
def test_timestep_forms(timestep):
    model = build_unet(TINY_DDPM)
    gm = dmq_fx.trace(model, (torch.randn(2, 3, 16, 16), 10))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert relative_max_error(model(x, timestep).sample, gm(x, timestep).sample) <= 1e-5


def test_return_dict_is_honoured():
    model = build_unet(TINY_DDPM)
    gm = dmq_fx.trace(model, (torch.randn(2, 3, 16, 16), 10))
    x = torch.randn(1, 3, 16, 16)
    out = gm(x, 3)
    assert isinstance(out, UNet2DOutput) and out.sample.shape == x.shape
    tup = gm(x, 3, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.sample)


def test_other_spatial_size_or_dtype_raises_with_retrace_hint():
    model = build_unet(TINY_DDPM)
    gm = dmq_fx.trace(model, (torch.randn(2, 3, 16, 16), 10))
    with pytest.raises(
        dmq_fx.InputMismatchError,
        match=r"traced for shape \(B, 3, 16, 16\)"
        r".*Re-trace",
    ):
        gm(torch.randn(2, 3, 32, 32), 10)
    with pytest.raises(dmq_fx.InputMismatchError, match="torch.float64"):
        gm(torch.randn(2, 3, 16, 16, dtype=torch.float64), 10)


def test_unpassed_argument_raises_instead_of_being_ignored():
    model = build_unet(TINY_SD)
    a, k = example_inputs(model)
    gm = dmq_fx.trace(model, a, k)
    with pytest.raises(dmq_fx.InputMismatchError, match="'attention_mask' was not given"):
        gm(*a, **k, attention_mask=torch.ones(2, 7))
    # what pipelines pass explicitly as None is accepted
    out = gm(*a, **k, cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)
    with torch.no_grad():
        expected = model(*a, **k).sample
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-4)


def test_data_dependent_control_flow_names_module_and_line():
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[0] > 100:  # shape-dependent: fine
                x = x * 2
            if x.sum() > 0:  # value-dependent: cannot be traced
                return self.lin(x)
            return x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()

        def forward(self, x):
            return self.gate(x)

    model = Outer()
    snap = state_snapshot(model)
    with pytest.raises(dmq_fx.TraceError, match=r"module 'gate' at .*test_tracing.py:\d+"):
        dmq_fx.trace(model, (torch.randn(2, 4),))
    assert_unchanged(model, snap)


def test_trace_never_modifies_the_model():
    model = build_unet(TINY_DDPM).train()
    snap = state_snapshot(model)
    gm = dmq_fx.trace(model, (torch.randn(2, 3, 16, 16), 10))
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert_unchanged(model, snap)


def test_bad_example_inputs_are_named():
    model = build_unet(TINY_DDPM)
    with pytest.raises(dmq_fx.InputMismatchError, match="do not match UNet2DModel.forward"):
        dmq_fx.trace(model, (torch.randn(2, 3, 16, 16), 10), {"no_such_arg": 1})
    with pytest.raises(dmq_fx.InputMismatchError, match="'sample'.*must be a tensor"):
        dmq_fx.trace(model, ([1, 2], 10))


@pytest.mark.slow
def test_stable_diffusion_15_full_size_traces_exactly():
    model = build_unet(SD15)
    a, k = example_inputs(model, batch=1, seq_len=77)
    gm = dmq_fx.trace(model, a, k)
    assert_module_level(model, gm)
    a, k = example_inputs(model, batch=2, seed=1, seq_len=77)
    with torch.no_grad():
        assert relative_max_error(model(*a, **k).sample, gm(*a, **k).sample) <= 1e-5


def test_traced_graph_retraces_with_torch_ao_prepare_fx():
    """torch.ao's own tracer re-traces the graph; the input checks and the timestep
    normalisation survive as single call_function nodes (``__torch_function__`` dispatch)."""
    import warnings

    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from dmq_fx.graph import graph_ops

    model = build_unet(TINY_DDPM)
    gm = dmq_fx.trace(model, (torch.randn(2, 3, 16, 16), torch.tensor([3, 4])))
    mapping = QConfigMapping().set_module_name("mid_block", get_default_qconfig("x86"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao FX mode's deprecation notices
        prepared = prepare_fx(gm, mapping, (torch.randn(2, 3, 16, 16), torch.tensor([3, 4])))
        prepared(torch.randn(2, 3, 16, 16), torch.tensor([3, 4]))
        quantized = convert_fx(prepared)
    targets = [n.target for n in quantized.graph.nodes if n.op == "call_function"]
    assert targets.count(graph_ops.check_input) == 1
    assert targets.count(graph_ops.normalize_timestep) == 1
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x, 5).sample
        out = quantized(x, 5).sample
    assert relative_max_error(ref, out) < 0.2  # mid_block in int8: close, not exact
    with pytest.raises(dmq_fx.InputMismatchError, match="traced for shape"):
        quantized(torch.randn(1, 3, 8, 8), 5)


def test_len_of_a_tensor_is_refused_with_its_location():
    class UsesLen(torch.nn.Module):
        def forward(self, x):
            return x * len(x)

    with pytest.raises(
        dmq_fx.TraceError, match=r"module '<root>' at .*test_tracing.py:\d+.*len\(\)"
    ):
        dmq_fx.trace(UsesLen(), (torch.randn(3, 4),))


def test_a_second_thread_runs_the_float_model_unchanged_during_a_trace():
    """trace patches nothing another thread can see: torch.fx's process-wide Module.__call__
    patch and dmq_fx's proxy-aware torch.is_tensor both pass other threads through."""
    import threading

    model = build_unet(TINY_SD)
    args, kwargs = example_inputs(model, batch=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: the same reduction order in both threads
    with torch.no_grad():
        expected = model(*args, **kwargs).sample
    real_is_tensor, real_call = torch.is_tensor, torch.nn.Module.__call__
    stop, results, errors = threading.Event(), [], []

    def run_float_model():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    results.append(model(*args, **kwargs).sample)
        except Exception as e:  # reported below; a thread's exception would be lost
            errors.append(e)

    worker = threading.Thread(target=run_float_model)
    worker.start()
    try:
        for _ in range(3):
            dmq_fx.trace(model, args, kwargs)
    finally:
        stop.set()
        worker.join()
        torch.set_num_threads(threads)
    assert not errors, errors
    assert len(results) >= 2  # the float model ran while traces were under way
    assert all(torch.equal(r, expected) for r in results)
    assert torch.is_tensor is real_is_tensor and torch.nn.Module.__call__ is real_call


def test_patches_are_restored_after_an_interrupted_trace():
    class Interrupting(torch.nn.Module):
        def forward(self, sample, timestep):
            raise KeyboardInterrupt

    real_is_tensor, real_call = torch.is_tensor, torch.nn.Module.__call__
    with pytest.raises(KeyboardInterrupt):
        dmq_fx.trace(Interrupting(), (torch.zeros(1, 4, 8, 8), 1))
    assert torch.is_tensor is real_is_tensor and torch.nn.Module.__call__ is real_call
    assert torch.is_tensor(torch.zeros(1)) and not torch.is_tensor(1.0)
