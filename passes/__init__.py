"""FX graph passes of dmq_fx (installed as ``dmq_fx.passes``).

Each pass is a function ``GraphModule -> GraphModule`` that reads the ``node.meta["dmq_fx"]``
annotations written by :func:`dmq_fx.annotate.annotate_quantization`.
"""

from .insert_quantizers import GroupedWeightFakeQuantize, input_quantizer_name, insert_quantizers

__all__ = ["GroupedWeightFakeQuantize", "input_quantizer_name", "insert_quantizers"]
