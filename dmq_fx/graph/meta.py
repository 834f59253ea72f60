"""The metadata contract: what dmq_fx keeps in ``node.meta`` and ``GraphModule.meta``.

Every module reads and writes the annotation through this one: the key, the per-layer record
(:class:`LayerQuantSpec`, written by :func:`dmq_fx.quantize.annotate.annotate_quantization`)
and the accessor for the layers that carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.ao.quantization import QConfig

__all__ = [
    "ANNOTATION_KEY",
    "ConvertedFrom",
    "GraphState",
    "LayerQuantSpec",
    "graph_state",
    "quantized_layer_nodes",
]

#: the key of dmq_fx's records in ``node.meta`` and ``GraphModule.meta``
ANNOTATION_KEY = "dmq_fx"


@dataclass
class LayerQuantSpec:
    """How one Conv2d / Linear node is quantized (stored in ``node.meta["dmq_fx"]``)."""

    qconfig: QConfig
    module_type: str
    weight_bits: int
    weight_qscheme: torch.qscheme
    act_bits: int
    #: input channel count of each group with its own activation and weight quantizers: one
    #: group, or one per input of a skip concatenation (Q-Diffusion's shortcut split).
    input_groups: tuple[int, ...]
    #: Q-Diffusion's shortcut split: one input group per input of a skip concatenation
    split: bool = False
    #: with LES: the layer that owns this layer's ``tau`` (layers reading the same tensor, such
    #: as q, k and v, share one so that 1/tau can fold into the norm before them).
    les_owner: str | None = None
    #: (min, max) of tau, recorded by convert_fx when it folds tau away (for summary()).
    les_tau: tuple[float, float] | None = None
    #: with PTS: the options of the layer's PowerOfTwoVotingObserver (max_shift, kappa,
    #: selection); its input quantizers then use per-channel power-of-two steps.
    pts: dict | None = None
    #: with per-timestep activation tables: the input quantizers keep one set of qparams (and
    #: PTS exponents) per calibrated timestep, chosen by the timestep of the call.
    timestep_table: bool = False
    #: the weights carry a rounding learned by block reconstruction (AdaRound / FBR)
    adaround: bool = False
    #: set by convert_fx: how LES was lowered ("norm": 1/tau folded into the norm before the
    #: layer; "step": merged into a per-channel quantize step tau * s)
    les_lowering: str | None = None
    #: set by convert_fx: how PTS was lowered ("shift": integer shifts; "dequant")
    pts_lowering: str | None = None

    @property
    def rewrites(self) -> list[str]:
        """The DMQ rewrites of the layer as display strings (``summary()``'s ``dmq`` column),
        derived from the fields above."""
        out = ["split"] if self.split else []
        if self.pts is not None:
            out.append(f"pts:{self.pts_lowering}" if self.pts_lowering else "pts")
        if self.timestep_table:
            out.append("t-table")
        if self.les_owner is not None:
            out.append(f"les:{self.les_lowering}" if self.les_lowering else "les")
        if self.adaround:
            out.append("adaround")
        return out


def quantized_layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of ``gm`` that carry a :class:`LayerQuantSpec`, in graph order."""
    return [n for n in gm.graph.nodes if isinstance(n.meta.get(ANNOTATION_KEY), LayerQuantSpec)]


@dataclass
class ConvertedFrom:
    """What a converted graph keeps of the calibrated graph it came from (what ``save`` writes):
    the learned state, the settings record (or why ``save`` cannot describe the graph), the
    backend."""

    state: dict[str, torch.Tensor]
    record: dict | None
    record_error: str | None
    backend: str


@dataclass
class GraphState:
    """The record of a dmq_fx graph, in ``GraphModule.meta["dmq_fx"]`` (torch.ao keeps the
    same kind of record as attributes of its observed graph). Plain data only."""

    #: the traced model's class, ``module.qualname``
    model_class: str
    #: the graph's inputs, in order
    input_names: list[str]
    example_shapes: dict[str, tuple[int, ...]]
    #: JSON description of the example inputs (load re-traces with inputs like them)
    example_spec: dict[str, dict]
    model_config: Any
    weights_fingerprint: str
    #: qualified names of the diffusers UNets inside the traced model ("" for the model itself):
    #: where the default mapping's float roles (conv_in, conv_out, embeddings) are looked up
    unet_paths: list[str] = field(default_factory=list)
    #: None (traced), "prepared", "calibrated" or "converted"
    state: str | None = None
    #: the prepare_fx flags the graph was prepared with
    prepare_flags: dict[str, Any] | None = None
    #: names of the calibration stages run, in order
    stages_run: list[str] = field(default_factory=list)
    #: qualified names of the float parameters calibration changed (``tune_float_params``):
    #: part of the learned state, unlike the other float weights
    tuned_parameters: list[str] = field(default_factory=list)
    #: converted graphs: the lowering backend and what they came from
    backend: str | None = None
    converted_from: ConvertedFrom | None = None


def graph_state(gm: Any) -> GraphState | None:
    """The :class:`GraphState` of a dmq_fx graph; None for anything else."""
    if not isinstance(gm, fx.GraphModule):
        return None
    record = gm.meta.get(ANNOTATION_KEY)
    return record if isinstance(record, GraphState) else None
