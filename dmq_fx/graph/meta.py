"""The metadata contract: what dmq_fx keeps in ``node.meta`` and ``GraphModule.meta``.

Every module reads and writes the annotation through this one: the key, the per-layer record
(:class:`LayerQuantSpec`, written by :func:`dmq_fx.quantize.annotate.annotate_quantization`)
and the accessor for the layers that carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.ao.quantization import QConfig

__all__ = ["ANNOTATION_KEY", "LayerQuantSpec", "quantized_layer_nodes"]

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
    #: DMQ rewrites applied to the layer, shown by summary() ("split", "les", later "pts").
    rewrites: list[str] = field(default_factory=list)
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


def quantized_layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of ``gm`` that carry a :class:`LayerQuantSpec`, in graph order."""
    return [n for n in gm.graph.nodes if isinstance(n.meta.get(ANNOTATION_KEY), LayerQuantSpec)]
