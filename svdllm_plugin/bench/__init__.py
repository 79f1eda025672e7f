"""`svdllm bench`'s library: measurements of real models (``measure``), their arithmetic (``macs``),
the table and plot (``report``), and the decode benchmark of random-weight models at real shapes
(``synthetic``, ``decode``, ``decode_output``; torch and transformers only, for a bare GPU machine).

Importing this package is light (no torch): the names below come from stdlib-only modules. The
command itself (arguments, checks) is ``svdllm_plugin/cli/bench.py``.
"""

from __future__ import annotations

from svdllm_plugin.bench.macs import decode_macs, linear_macs_per_token, prefill_macs, weight_bytes
from svdllm_plugin.bench.measure import Variant, benchmark, load_variant
from svdllm_plugin.bench.report import format_table, plot

__all__ = [
    "Variant",
    "load_variant",
    "benchmark",
    "format_table",
    "plot",
    "weight_bytes",
    "linear_macs_per_token",
    "prefill_macs",
    "decode_macs",
]
