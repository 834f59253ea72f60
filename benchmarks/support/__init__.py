"""dmq_fx_bench: what the benchmarks, tests and quickstart need beyond dmq_fx itself.

The committed reference models (``reference_models``, read from ``benchmarks/models`` of the
source checkout), the Fashion-MNIST loader (``datasets``) and the paired image metrics
(``evaluation``). Installed beside dmq_fx from ``benchmarks/support``; not part of dmq_fx's API.
"""
