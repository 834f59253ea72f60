"""Layer 2, quantization: qconfigs, the per-layer decision (annotate), prepare, the quantizer
modes, the graph's typed state, the base calibration stages and the calibration driver's
building blocks (stage protocol, checkpoints, distributed synchronisation).

Imports :mod:`dmq_fx.graph`, :mod:`dmq_fx.observers` and :mod:`dmq_fx.passes`.
"""
