"""dmq_fx: post-training quantization of diffusers UNets as torch.fx graph passes.

The workflow mirrors torch.ao's: ``trace`` (optional), ``prepare_fx``, ``calibrate``,
``convert_fx``, then ``summary`` to inspect the result.
"""

from . import adaround, blocks, calibration, datasets, fbr, les, pts
from .adaround import AdaRound
from .calibrate import DEFAULT_STAGES, PREPARE_FLAGS, PRESETS, STAGES, calibrate
from .convert import BACKENDS, convert_fx
from .errors import (
    CalibrationError,
    ConfigError,
    ConvertError,
    DMQError,
    InputMismatchError,
    LoadError,
    TimestepOutOfGridError,
    TraceError,
)
from .fbr import FBR
from .les import LearnLES, SmoothQuantScales
from .pipeline import QuantizationConfig, QuantizedUNet, quantize_pipeline
from .prepare import prepare_fx
from .qconfig import get_default_qconfig, get_default_qconfig_mapping
from .report import QuantReport, report
from .serialization import load, save
from .summary import QuantSummary, summary
from .tracing import trace

__version__ = "0.1.0"

__all__ = [
    "AdaRound",
    "BACKENDS",
    "DEFAULT_STAGES",
    "PREPARE_FLAGS",
    "PRESETS",
    "STAGES",
    "CalibrationError",
    "ConfigError",
    "ConvertError",
    "DMQError",
    "FBR",
    "InputMismatchError",
    "LoadError",
    "LearnLES",
    "SmoothQuantScales",
    "TimestepOutOfGridError",
    "TraceError",
    "adaround",
    "blocks",
    "calibrate",
    "calibration",
    "datasets",
    "fbr",
    "les",
    "pts",
    "convert_fx",
    "get_default_qconfig",
    "get_default_qconfig_mapping",
    "prepare_fx",
    "QuantSummary",
    "QuantReport",
    "report",
    "QuantizationConfig",
    "QuantizedUNet",
    "quantize_pipeline",
    "load",
    "save",
    "summary",
    "trace",
]
