"""Every misuse named in one place: the exception type (all under dmq_fx.DMQError), a message
that names the culprit, and the user's model unchanged afterwards."""

import pytest
import torch
from conftest import assert_unchanged, calibration_data, state_snapshot
from diffusers import DDIMScheduler

import dmq_fx
from dmq_fx import errors
from dmq_fx.graph.unet_configs import TINY_DDPM, TINY_SD, build_unet, example_inputs
from dmq_fx.workflow.calibration_data import collect_calibration_data


class Gate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # needs a tensor value: cannot be traced
            return self.lin(x)
        return x


class Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x)


def _prepared(model, **flags):
    a, k = example_inputs(model, batch=4)
    return dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k, **flags)


def _bad_calls():
    ddpm = build_unet(TINY_DDPM)
    data = calibration_data(ddpm)
    nan = calibration_data(ddpm, n=2)
    nan[1][0][0][0, 0, 0, 0] = float("nan")
    inf = calibration_data(ddpm, n=2)
    inf[0][0][0][0, 1, 0, 0] = float("inf")
    a, _ = example_inputs(ddpm, batch=2)
    yield (
        "untraceable",
        Untraceable(),
        errors.TraceError,
        r"module 'gate' at .*test_errors.py",
        (lambda m: dmq_fx.trace(m, (torch.randn(2, 4),))),
    )
    yield (
        "wrong channels",
        ddpm,
        errors.InputMismatchError,
        r"sample: \(2, 4, 16, 16\).*conv_in",
        (lambda m: dmq_fx.trace(m, (torch.randn(2, 4, 16, 16), 10))),
    )
    yield (
        "wrong dtype",
        ddpm,
        errors.InputMismatchError,
        r"torch.int64.*conv_in",
        (lambda m: dmq_fx.trace(m, (torch.zeros(2, 3, 16, 16, dtype=torch.long), 10))),
    )
    for bits in (0, 1, 9, 16, 4.5):
        yield (
            f"weight bits {bits}",
            ddpm,
            errors.ConfigError,
            rf"weight_bits .*got {bits}",
            (lambda m, b=bits: dmq_fx.get_default_qconfig_mapping(b, 8)),
        )
    yield (
        "act bits 1",
        ddpm,
        errors.ConfigError,
        "act_bits .*got 1",
        (lambda m: dmq_fx.get_default_qconfig_mapping(4, 1)),
    )
    yield (
        "unknown preset",
        ddpm,
        errors.ConfigError,
        "unknown preset 'dmq2'",
        (lambda m: dmq_fx.calibrate(_prepared(m), data, "dmq2", progress=False)),
    )
    yield (
        "unknown stage",
        ddpm,
        errors.ConfigError,
        "unknown calibration stage 'vote'",
        (lambda m: dmq_fx.calibrate(_prepared(m), data, ["vote"], progress=False)),
    )
    yield (
        "stage needs a flag",
        ddpm,
        errors.ConfigError,
        "pts='skip'",
        (lambda m: dmq_fx.calibrate(_prepared(m), data, "pts", progress=False)),
    )
    yield (
        "convert before calibrate",
        ddpm,
        errors.ConvertError,
        "run dmq_fx.calibrate",
        (lambda m: dmq_fx.convert_fx(_prepared(m))),
    )
    yield (
        "empty data",
        ddpm,
        errors.CalibrationError,
        "no calibration batches",
        (lambda m: dmq_fx.calibrate(_prepared(m), [], progress=False)),
    )
    yield (
        "NaN",
        ddpm,
        errors.CalibrationError,
        "batch 1: input 0 contains NaN",
        (lambda m: dmq_fx.calibrate(_prepared(m), nan, progress=False)),
    )
    yield (
        "inf",
        ddpm,
        errors.CalibrationError,
        "batch 0: input 0 contains NaN or inf",
        (lambda m: dmq_fx.calibrate(_prepared(m), inf, progress=False)),
    )
    yield (
        "other batch shape",
        ddpm,
        errors.InputMismatchError,
        r"traced for shape \(B, 3, 16",
        (lambda m: dmq_fx.calibrate(_prepared(m), [((torch.randn(2, 3, 8, 8), 1), {})])),
    )
    yield (
        "not a prepared graph",
        ddpm,
        errors.CalibrationError,
        "expects the graph returned",
        (lambda m: dmq_fx.calibrate(m, data, progress=False)),
    )
    yield (
        "timestep outside the grid",
        ddpm,
        errors.TimestepOutOfGridError,
        "timestep 999 is out",
        (lambda m: _table_graph(m)(a[0], torch.tensor(999))),
    )
    yield (
        "unknown backend",
        ddpm,
        errors.ConvertError,
        "unknown backend 'cuda'",
        (lambda m: dmq_fx.convert_fx(_prepared(m), "cuda")),
    )


def _table_graph(model):
    data = collect_calibration_data(
        model, DDIMScheduler(), num_inference_steps=3, samples_per_step=2, progress=False
    )
    a, k = next(data.batches(2, shuffle=False))
    prepared = dmq_fx.prepare_fx(
        model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k, timestep_tables=True
    )
    return dmq_fx.calibrate(prepared, list(data.batches(4)), progress=False)


CASES = list(_bad_calls())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_misuse_raises_a_named_error_and_leaves_the_model_alone(case):
    _, model, error, message, call = case
    snapshot = state_snapshot(model)
    with pytest.raises(error, match=message) as info:
        call(model)
    assert isinstance(info.value, dmq_fx.DMQError)
    assert_unchanged(model, snapshot)


def test_loading_another_architecture_or_a_corrupted_file(tmp_path):
    model = build_unet(TINY_DDPM)
    prepared = dmq_fx.calibrate(_prepared(model), calibration_data(model), progress=False)
    dmq_fx.save(prepared, tmp_path / "q.safetensors")
    other = build_unet(TINY_SD)
    snapshot = state_snapshot(other)
    with pytest.raises(dmq_fx.LoadError, match="made for a .*UNet2DModel, got a .*Condition"):
        dmq_fx.load(tmp_path / "q.safetensors", other)
    assert_unchanged(other, snapshot)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(dmq_fx.LoadError, match="bad.safetensors: unreadable or corrupted"):
        dmq_fx.load(tmp_path / "bad.safetensors", model)


def test_hierarchy_lets_users_catch_by_kind():
    for cls in (
        errors.TraceError,
        errors.InputMismatchError,
        errors.ConfigError,
        errors.CalibrationError,
        errors.ConvertError,
        errors.LoadError,
        errors.TimestepOutOfGridError,
    ):
        assert issubclass(cls, dmq_fx.DMQError)
        assert issubclass(cls, (ValueError, RuntimeError))
        assert getattr(dmq_fx, cls.__name__) is cls
    assert issubclass(errors.TimestepOutOfGridError, errors.InputMismatchError)
