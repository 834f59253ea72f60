"""Layer 1, the graph: tracing a diffusers UNet into a module-level FX graph, the ops the traced
graph calls, structural queries (skip connections, reconstruction units) and input capture.

Imports only :mod:`dmq_fx.errors`, torch and diffusers.
"""
