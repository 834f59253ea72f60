"""dmq_fx: post-training quantization of diffusers UNets as torch.fx graph passes."""

from .errors import (
    CalibrationError,
    ConfigError,
    ConvertError,
    DMQError,
    InputMismatchError,
    TraceError,
)
from .tracing import trace

__all__ = [
    "CalibrationError",
    "ConfigError",
    "ConvertError",
    "DMQError",
    "InputMismatchError",
    "TraceError",
    "trace",
]
