"""Layer 5, workflow: one-call pipelines, calibration data from a sampler, save / load,
reports, summaries and the pt2e bridge.

Imports every layer below.
"""
