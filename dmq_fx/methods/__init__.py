"""Layer 3, the methods: one algorithm per module (LES, SmoothQuant, PTS, AdaRound, FBR, TDAC)
as calibration stages, and the one explicit preset table (:mod:`dmq_fx.methods.presets`).

Imports :mod:`dmq_fx.quantize` and below.
"""
