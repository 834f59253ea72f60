"""dmq_fx: post-training quantization of diffusers UNets as torch.fx graph passes.

The workflow mirrors torch.ao's: ``trace`` (optional), ``prepare_fx``, ``calibrate``,
``convert_fx``, then ``summary`` to inspect the result.
"""

import sys

from dmq_fx.errors import (
    CalibrationError,
    ConfigError,
    ConvertError,
    DMQError,
    InputMismatchError,
    LoadError,
    ReferenceFormWarning,
    TimestepOutOfGridError,
    TraceError,
)
from dmq_fx.graph import units as blocks
from dmq_fx.graph.tracing import trace
from dmq_fx.lowering.compile import compile
from dmq_fx.lowering.convert import BACKENDS, convert_fx
from dmq_fx.methods import adaround, fbr, les, pts
from dmq_fx.methods.adaround import AdaRound
from dmq_fx.methods.fbr import FBR
from dmq_fx.methods.float_tuning import TuneFloatParameters
from dmq_fx.methods.les import LearnLES, SmoothQuantScales
from dmq_fx.methods.mixed_precision import (
    MixedPrecision,
    mixed_precision_mapping,
    weight_sensitivity,
)
from dmq_fx.methods.presets import DEFAULT_STAGES, PREPARE_FLAGS, PRESETS, STAGES, Preset
from dmq_fx.quantize.modes import quantizer_mode, set_quantizer_mode
from dmq_fx.quantize.prepare import prepare_fx
from dmq_fx.quantize.qconfig import get_default_qconfig, get_default_qconfig_mapping
from dmq_fx.quantize.stage import CalibrationContext, Stage
from dmq_fx.version import __version__  # noqa: F401  (dmq_fx.__version__)
from dmq_fx.workflow import calibration_data as calibration
from dmq_fx.workflow.calibrate import calibrate
from dmq_fx.workflow.lora import load_lora, remove_lora, set_adapters, set_lora_scale
from dmq_fx.workflow.onnx_export import export_onnx
from dmq_fx.workflow.pipeline import QuantizationConfig, QuantizedUNet, quantize_pipeline
from dmq_fx.workflow.report import QuantReport, report
from dmq_fx.workflow.serialization import load, save
from dmq_fx.workflow.summary import QuantSummary, summary

# the module names of the flat layout, kept importable (``from dmq_fx.les import LearnLES``)
for _name, _module in {
    "adaround": adaround,
    "blocks": blocks,
    "calibration": calibration,
    "fbr": fbr,
    "les": les,
    "pts": pts,
}.items():
    sys.modules.setdefault(f"{__name__}.{_name}", _module)

__all__ = [
    "AdaRound",
    "BACKENDS",
    "DEFAULT_STAGES",
    "PREPARE_FLAGS",
    "PRESETS",
    "STAGES",
    "CalibrationContext",
    "Preset",
    "Stage",
    "quantizer_mode",
    "set_quantizer_mode",
    "CalibrationError",
    "ConfigError",
    "ConvertError",
    "DMQError",
    "FBR",
    "InputMismatchError",
    "LoadError",
    "ReferenceFormWarning",
    "LearnLES",
    "TuneFloatParameters",
    "MixedPrecision",
    "mixed_precision_mapping",
    "weight_sensitivity",
    "SmoothQuantScales",
    "TimestepOutOfGridError",
    "TraceError",
    "adaround",
    "blocks",
    "calibrate",
    "calibration",
    "fbr",
    "les",
    "pts",
    "compile",
    "convert_fx",
    "export_onnx",
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
    "load_lora",
    "remove_lora",
    "save",
    "set_adapters",
    "set_lora_scale",
    "summary",
    "trace",
]
