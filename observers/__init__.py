"""torch.ao observers of dmq_fx (installed as ``dmq_fx.observers``)."""

from .histogram import HistogramRangeObserver
from .mse import MSEGridSearchPerChannelObserver
from .pts import PowerOfTwoFakeQuantize, PowerOfTwoVotingObserver, candidate_errors
from .timestep_table import (
    TimestepOutOfGridError,
    TimestepTableFakeQuantize,
    nearest_grid_index,
)

__all__ = [
    "HistogramRangeObserver",
    "MSEGridSearchPerChannelObserver",
    "PowerOfTwoFakeQuantize",
    "PowerOfTwoVotingObserver",
    "TimestepOutOfGridError",
    "TimestepTableFakeQuantize",
    "nearest_grid_index",
    "candidate_errors",
]
