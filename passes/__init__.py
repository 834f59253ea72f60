"""FX graph passes of dmq_fx (installed as ``dmq_fx.passes``).

Each pass is a function ``GraphModule -> GraphModule``. ``insert_quantizers`` and
``insert_les_scales`` read the ``node.meta["dmq_fx"]`` annotations written by
:func:`dmq_fx.quantize.annotate.annotate_quantization`; ``rescale_for_les`` works on any float
graph (for
torch.ao's own prepare_fx / convert_fx).
"""

from dmq_fx.graph.skip_connections import skip_concatenations, skip_connection_layers

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
from .rescale_for_les import rescale_for_les

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
    "rescale_for_les",
    "skip_concatenations",
    "skip_connection_layers",
    "weight_before_quantization",
    "weight_quantizer",
]
