"""torch.ao observers of dmq_fx (installed as ``dmq_fx.observers``)."""

from .mse import MSEGridSearchPerChannelObserver
from .pts import PowerOfTwoFakeQuantize, PowerOfTwoVotingObserver, candidate_errors

__all__ = [
    "MSEGridSearchPerChannelObserver",
    "PowerOfTwoFakeQuantize",
    "PowerOfTwoVotingObserver",
    "candidate_errors",
]
