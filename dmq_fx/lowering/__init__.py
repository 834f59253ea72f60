"""Layer 4, lowering: ``convert_fx`` and the integer modules a converted graph runs.

Imports :mod:`dmq_fx.quantize` and below; never :mod:`dmq_fx.methods`.
"""
