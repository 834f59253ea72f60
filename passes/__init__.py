"""FX graph passes of dmq_fx (installed as ``dmq_fx.passes``).

Each pass is a function ``GraphModule -> GraphModule`` that reads the ``node.meta["dmq_fx"]``
annotations written by :func:`dmq_fx.annotate.annotate_quantization`.
"""

from .insert_les_scales import (
    LESScale,
    ScaleWeightInputChannels,
    insert_les_scales,
    les_scale_name,
    les_units,
)
from .insert_quantizers import (
    GroupedWeightFakeQuantize,
    input_quantizer_name,
    insert_quantizers,
    integer_weight,
    weight_before_quantization,
    weight_quantizer,
)
from .skip_connections import skip_concatenations, skip_connection_layers

__all__ = [
    "GroupedWeightFakeQuantize",
    "LESScale",
    "ScaleWeightInputChannels",
    "input_quantizer_name",
    "integer_weight",
    "insert_les_scales",
    "insert_quantizers",
    "les_scale_name",
    "les_units",
    "skip_concatenations",
    "skip_connection_layers",
    "weight_before_quantization",
    "weight_quantizer",
]
