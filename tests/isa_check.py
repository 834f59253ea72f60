"""Run by test_convert under ``ONEDNN_MAX_CPU_ISA=AVX2``: onednn's AVX2 int8 kernels, whatever
the CPU. Prints what it checked; any failure raises."""

import sys
import warnings

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from conftest import prepared_and_calibrated  # noqa: E402
from layer_values import lowered_layer_outputs, node_values, reference_inputs  # noqa: E402

import dmq_fx  # noqa: E402
import dmq_fx.lowering.convert as convert_module  # noqa: E402
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs  # noqa: E402
from dmq_fx.lowering.quantized_modules import (  # noqa: E402
    QuantizedLayer,
    cpu_has_int8_dot_product,
)

torch.set_num_threads(1)
warnings.simplefilter("ignore", dmq_fx.ReferenceFormWarning)


def worst_layer_error(sim, model, native) -> float:
    """The largest |x86 - reference| of any layer on identical inputs, in output steps."""
    ref = dmq_fx.convert_fx(sim, "reference")
    a, k = example_inputs(model, batch=2, seed=7)
    env_ref, env_nat = node_values(ref, a, k), node_values(native, a, k)
    x0s = reference_inputs(ref, env_ref)
    ref_out = lowered_layer_outputs(ref, env_ref, x0s)
    nat_out = lowered_layer_outputs(native, env_nat, x0s)
    return max(
        (nat_out[n] - r).abs().max().item() / ((r.max() - r.min()).item() / 255)
        for n, r in ref_out.items()
    )


def main() -> None:
    assert not cpu_has_int8_dot_product(), "AVX2 kernels were not detected as saturating"
    model = build_unet(TINY_DDPM)
    for wb, ab in ((8, 8), (8, 7), (4, 8)):
        sim = prepared_and_calibrated(model, wb, ab)
        native = dmq_fx.convert_fx(sim, "x86")
        forms = {m.form for m in native.modules() if isinstance(m, QuantizedLayer)}
        assert forms == ({"reference"} if (wb, ab) == (8, 8) else {"int8"}), (wb, ab, forms)
        assert worst_layer_error(sim, model, native) <= 0.01, (wb, ab)
    # without the fallback, W8A8's int8 kernels saturate: the bound is what keeps them exact
    convert_module.cpu_has_int8_dot_product = lambda: True
    sim = prepared_and_calibrated(model, 8, 8)
    forced = dmq_fx.convert_fx(sim, "x86")
    assert {m.form for m in forced.modules() if isinstance(m, QuantizedLayer)} == {"int8"}
    assert worst_layer_error(sim, model, forced) > 0.01
    print("checked: saturation, detection, fallback exact, forced int8 wrong")


if __name__ == "__main__":
    main()
