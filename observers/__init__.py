"""torch.ao observers of dmq_fx (installed as ``dmq_fx.observers``)."""

from .mse import MSEGridSearchPerChannelObserver

__all__ = ["MSEGridSearchPerChannelObserver"]
