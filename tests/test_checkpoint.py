import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import calibration_data

import dmq_fx
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs
from dmq_fx.quantize.state import learned_state


def _prepared(model):
    a, k = example_inputs(model, batch=4)
    return dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 6), a, k, les=True)


def _stages(interrupt_at=None):
    class InterruptedFBR(dmq_fx.FBR):
        def learn_unit(self, gm, unit, batches, *, seed):
            if seed - self.seed == interrupt_at:
                raise KeyboardInterrupt
            return super().learn_unit(gm, unit, batches, seed=seed)

    fbr = (InterruptedFBR if interrupt_at is not None else dmq_fx.FBR)(
        iterations=3, max_samples=8, step_lr=1e-2
    )
    return [
        dmq_fx.LearnLES(iterations=3, max_samples=8),
        "observe_activations",
        "observe_weights",
        fbr,
    ]


def _same_result(a, b):
    sa, sb = learned_state(a), learned_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ra = [n.meta["dmq_fx"].rewrites for n in quantized_layer_nodes(a)]
    assert ra == [n.meta["dmq_fx"].rewrites for n in quantized_layer_nodes(b)]


def test_interrupted_calibration_resumes_bit_identically(tmp_path):
    model = build_unet(TINY_DDPM)
    data = calibration_data(model)
    reference = dmq_fx.calibrate(_prepared(model), data, _stages(), progress=False)
    interrupted = _prepared(model)
    with pytest.raises(KeyboardInterrupt):
        dmq_fx.calibrate(
            interrupted, data, _stages(interrupt_at=4), progress=False, checkpoint_dir=tmp_path
        )
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["stage"] == 3 and progress["units"] == 4  # FBR, four units done
    assert not list(tmp_path.glob("*.tmp"))
    resumed = dmq_fx.calibrate(
        _prepared(model), data, _stages(), progress=False, checkpoint_dir=tmp_path
    )
    _same_result(resumed, reference)
    with torch.no_grad():
        a, k = example_inputs(model, batch=2, seed=9)
        assert torch.equal(resumed(*a, **k).sample, reference(*a, **k).sample)
    # a finished run resumes as finished; other data is refused
    again = dmq_fx.calibrate(
        _prepared(model), data, _stages(), progress=False, checkpoint_dir=tmp_path
    )
    _same_result(again, reference)
    with pytest.raises(dmq_fx.CalibrationError, match="other stages or data"):
        dmq_fx.calibrate(
            _prepared(model), data[:2], _stages(), progress=False, checkpoint_dir=tmp_path
        )


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import dmq_fx
    from dmq_fx.quantize.checkpoint import CalibrationCheckpoint
    if len(sys.argv) > 3:  # "kill": SIGKILL this process once progress.json records the
        # second finished AdaRound unit (a real kill: no cleanup, no finally)
        write_progress = CalibrationCheckpoint._set_progress
        def set_progress(self, stage, units):
            write_progress(self, stage, units)
            if stage == 2 and units >= 2:
                os.kill(os.getpid(), signal.SIGKILL)
        CalibrationCheckpoint._set_progress = set_progress
    from conftest import calibration_data
    from dmq_fx.quantize.state import learned_state
    from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs
    from safetensors.torch import save_file
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=4)
    prepared = dmq_fx.prepare_fx(model, dmq_fx.get_default_qconfig_mapping(4, 8), a, k)
    adaround = dmq_fx.AdaRound(iterations=30, max_samples=8)
    stages = ["observe_activations", "observe_weights", adaround]
    dmq_fx.calibrate(prepared, calibration_data(model), stages, progress=False,
                     checkpoint_dir=sys.argv[1])
    save_file(learned_state(prepared), sys.argv[2])
    """
)


def test_killed_process_resumes_to_the_uninterrupted_result(tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    script = tmp_path / "calibrate.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    run = [sys.executable, str(script)]
    subprocess.run(
        [*run, str(tmp_path / "clean"), str(tmp_path / "clean.st")], check=True, timeout=600
    )
    killed = subprocess.run(
        [*run, str(tmp_path / "ckpt"), str(tmp_path / "resumed.st"), "kill"], timeout=600
    )
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert (state["stage"], state["units"]) == (2, 2)  # killed inside AdaRound
    assert not (tmp_path / "resumed.st").exists()
    subprocess.run(
        [*run, str(tmp_path / "ckpt"), str(tmp_path / "resumed.st")], check=True, timeout=600
    )
    clean, resumed = load_file(str(tmp_path / "clean.st")), load_file(str(tmp_path / "resumed.st"))
    assert clean.keys() == resumed.keys()
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
