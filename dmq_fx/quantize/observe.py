"""The two base calibration stages: min-max activation ranges and weight qparams.

``observe_activations`` runs the batches once with every activation observer on (the moving
min / max of torch.ao's observers); ``observe_weights`` observes each weight group once (the MSE
grid search of :class:`~dmq_fx.observers.MSEGridSearchPerChannelObserver` runs here).
"""

from __future__ import annotations

import torch
from torch import fx
from tqdm.auto import tqdm

from dmq_fx.graph.meta import ANNOTATION_KEY, quantized_layer_nodes
from dmq_fx.passes import weight_before_quantization, weight_quantizer
from dmq_fx.quantize import distributed
from dmq_fx.quantize.modes import input_quantizers, set_quantizer_mode
from dmq_fx.quantize.stage import CalibrationContext, FunctionStage

__all__ = ["OBSERVE_ACTIVATIONS", "OBSERVE_WEIGHTS", "observe_activations", "observe_weights"]


def observe_activations(gm: fx.GraphModule, ctx: CalibrationContext) -> None:
    """Run the batches with activation observers on and every quantizer passing float through."""
    set_quantizer_mode(gm, "float", which="weights")
    set_quantizer_mode(gm, "observe", which="activations")
    batches = tqdm(ctx.batches, desc="observe activations", disable=not ctx.progress)
    with torch.no_grad(), distributed.RangeRecorder(input_quantizers(gm)) as ranges:
        for args, kwargs in batches:
            gm(*args, **kwargs)
            ranges.next_batch()
    distributed.sync_activation_ranges(ranges)  # no-op in one process


def observe_weights(gm: fx.GraphModule, ctx: CalibrationContext) -> None:
    """Observe each weight group once and compute its qparams (the MSE search runs here).

    A learned rounding belongs to the qparams it was learned with, so it is dropped here.
    """
    nodes = quantized_layer_nodes(gm)
    with torch.no_grad():
        for node in tqdm(nodes, desc="observe weights", disable=not ctx.progress):
            layer = gm.get_submodule(node.target)
            grouped = weight_quantizer(layer)
            parts = grouped.split(weight_before_quantization(layer))
            node.meta[ANNOTATION_KEY].adaround = False
            for g, (fq, part) in enumerate(zip(grouped.fake_quants, parts)):
                grouped.set_rounding(g, None)
                set_quantizer_mode([fq], "observe")
                fq(part)
                set_quantizer_mode([fq], "float")


OBSERVE_ACTIVATIONS = FunctionStage("observe_activations", observe_activations)
OBSERVE_WEIGHTS = FunctionStage("observe_weights", observe_weights)
