"""``dmq_fx.pt2e``: dmq_fx's quantizer and learned state for torch.export / torchao pt2e users.

Importing it needs torchao (the ``pt2e`` extra); the implementation lives in
:mod:`dmq_fx.workflow.pt2e`.
"""

from dmq_fx.workflow.pt2e import DMQQuantizer, export_unet, prepare_float_model

__all__ = ["DMQQuantizer", "export_unet", "prepare_float_model"]
