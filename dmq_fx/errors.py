"""Exceptions raised by dmq_fx.

Every error derives from :class:`DMQError`, so ``except dmq_fx.DMQError`` catches all of them; each
also derives from the builtin a Python user would expect (``ValueError``, ``RuntimeError``), so code
written against torch.ao keeps working.
"""

from __future__ import annotations


class DMQError(Exception):
    """Base class of every error raised by dmq_fx."""


class TraceError(DMQError, RuntimeError):
    """The model could not be traced into a graph that reproduces it."""


class InputMismatchError(DMQError, ValueError):
    """A traced or quantized graph was called with inputs it was not traced for."""


class ConfigError(DMQError, ValueError):
    """A qconfig, bit width, backend or other setting is not supported."""


class CalibrationError(DMQError, RuntimeError):
    """Calibration could not run on the data given."""


class ConvertError(DMQError, RuntimeError):
    """A prepared model could not be lowered to a static quantized graph."""


class TimestepOutOfGridError(InputMismatchError):
    """A graph with per-timestep activation tables was called at a timestep outside the grid of
    timesteps it was calibrated on (or with several timesteps in one lowered call)."""


class LoadError(DMQError, ValueError):
    """A saved quantization file cannot be loaded: another format or version, corrupted, or
    made for another model (class, config or weights)."""


class ReferenceFormWarning(UserWarning):
    """``convert_fx(backend="x86")`` lowered layers in the exact but slower reference form
    because int8 kernels could saturate on this CPU (no VNNI / AMX)."""
