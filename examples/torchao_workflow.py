"""dmq_fx's parts inside torch.ao's own FX workflow (prepare_fx / convert_fx).

    python examples/torchao_workflow.py

For a team that already quantizes with ``torch.ao.quantization.quantize_fx``, on the committed
fashion28 model at W8A8:

1. ``dmq_fx.trace`` makes the diffusers UNet a GraphModule that torch.ao's tracer re-traces
   (torch.ao cannot trace a raw diffusers UNet);
2. LES scales (here SmoothQuant's, from dmq_fx's ``smoothquant`` stage; ``learn_les`` gives the
   learned ones) are applied to that float graph with ``dmq_fx.passes.rescale_for_les``;
3. dmq_fx's observers go into an ordinary torch.ao ``QConfigMapping``: the MSE grid-search
   weight observer and the moving-average activation observer on every conv and linear, and
   the ``PowerOfTwoVotingObserver`` on the skip-connection convs, voting after the first pass;
4. torch.ao's ``prepare_fx``, calibration and ``convert_fx`` do the rest.

What torch.ao's lowering cannot keep (checked by tests/test_torchao_workflow.py):
- the power-of-two channel steps: torch.ao quantizes per tensor, so the skip convs get the
  plain step ``s`` (their voted exponents are dropped); dmq_fx's ``convert_fx`` keeps them.
  And a skip conv fed by another quantized conv (an encoder shortcut after a downsampler) gets
  no PTS observer at all: torch.ao reuses the producer's output observer as its input observer;
- ranges below 8 bits: a 6-bit activation observer's 0..63 becomes 0..255 after convert_fx, and
  4-bit weights can reach +8 (FINDINGS); use 8-bit qconfigs with torch.ao, dmq_fx's own
  ``convert_fx`` for W4A8 / W4A6;
- torch.ao quantizes each conv's output too (one more rounding than dmq_fx's float outputs).
"""

from __future__ import annotations

import copy
import warnings

import torch
from diffusers import DDIMScheduler
from dmq_fx.observers import PowerOfTwoVotingObserver
from dmq_fx.passes import rescale_for_les, skip_connection_layers
from dmq_fx_bench.reference_models import load_fashion28
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import dmq_fx
from dmq_fx.methods.les import learned_taus
from dmq_fx.quantize.qconfig import FLOAT_MODULE_NAME_REGEXES, FLOAT_MODULE_NAMES
from dmq_fx.workflow.calibration_data import collect_calibration_data


def torchao_mapping(graph: torch.fx.GraphModule, bits: int = 8) -> QConfigMapping:
    """torch.ao mapping with dmq_fx observers: conv / linear quantized, DMQ's float layers
    (docs/methods/quantizers.md)
    kept float, PTS voting observers on the skip-connection convs."""
    qconfig = dmq_fx.get_default_qconfig(bits, bits)
    mapping = QConfigMapping()  # no global qconfig: adds, cats, the timestep path stay float
    mapping.set_object_type(torch.nn.Conv2d, qconfig).set_object_type(torch.nn.Linear, qconfig)
    for name in FLOAT_MODULE_NAMES:
        mapping.set_module_name(name, None)
    for regex in FLOAT_MODULE_NAME_REGEXES:
        mapping.set_module_name_regex(regex, None)
    pts = PowerOfTwoVotingObserver.with_args(
        dtype=torch.quint8, quant_min=0, quant_max=2**bits - 1, ch_axis=1
    )
    for node in skip_connection_layers(graph):
        mapping.set_module_name(str(node.target), QConfig(activation=pts, weight=qconfig.weight))
    return mapping


def calibrate_with_torchao(unet, taus, example, batches, bits: int = 8):
    """Steps 1-3 of the module docstring and torch.ao's prepare_fx and calibration; returns
    torch.ao's calibrated graph (PTS votes counted)."""
    graph = rescale_for_les(dmq_fx.trace(unet, *example), taus)
    mapping = torchao_mapping(graph, bits)
    with warnings.catch_warnings():
        # torch.ao FX mode is deprecated in torch 2.13 (its successor is torchao's pt2e); this
        # example shows that API on purpose, so its deprecation notices are expected here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        prepared = prepare_fx(graph, mapping, tuple(example[0]))
        voters = [m for m in prepared.modules() if isinstance(m, PowerOfTwoVotingObserver)]
        with torch.no_grad():
            for args, kwargs in batches:  # pass 1: ranges
                prepared(*args, **kwargs)
            for v in voters:
                v.start_voting()
            for args, kwargs in batches:  # pass 2: PTS votes
                prepared(*args, **kwargs)
        for v in voters:
            v.finish_voting()
    return prepared


def quantize_with_torchao(unet, taus, example, batches, bits: int = 8):
    """Steps 1-4: torch.ao's converted graph."""
    prepared = calibrate_with_torchao(unet, taus, example, batches, bits)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # as above
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return convert_fx(prepared)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    unet, scheduler = load_fashion28()
    data = collect_calibration_data(
        unet, DDIMScheduler.from_config(scheduler.config), samples_per_step=4, progress=False
    )
    example = next(data.batches(8, shuffle=False))
    batches = list(data.batches(32))

    # LES scales from dmq_fx (SmoothQuant's here: fast; learn_les for DMQ's learned ones)
    les_graph = dmq_fx.prepare_fx(
        unet, dmq_fx.get_default_qconfig_mapping(8, 8), *example, les=True
    )
    dmq_fx.calibrate(les_graph, batches, ["smoothquant"], progress=False)
    taus = learned_taus(les_graph)

    torchao_graph = quantize_with_torchao(unet, taus, example, batches)
    dmq_graph = dmq_fx.convert_fx(
        dmq_fx.calibrate(copy.deepcopy(les_graph), batches, progress=False), "x86"
    )
    args, kwargs = next(data.batches(16, seed=1))
    with torch.no_grad():
        fp = unet(*args, **kwargs).sample
        graphs = {"torch.ao convert_fx": torchao_graph, "dmq_fx convert_fx": dmq_graph}
        for name, graph in graphs.items():
            out = graph(*args, **kwargs).sample
            sqnr = 10 * torch.log10(fp.pow(2).sum() / (out - fp).pow(2).sum())
            print(f"{name}: eps SQNR against float {sqnr:.1f} dB")


if __name__ == "__main__":
    main()
