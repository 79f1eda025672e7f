"""Text for calibration and evaluation, and its cutting into token windows.

- ``embedded.py``: the default text, needing no download (the standard library's docstrings,
  dealt into calibration / evaluation modules) and the other-domain text (license prose);
- ``sources.py``: ``load_text``, which picks the embedded text, a user file or a hub dataset;
- ``windows.py``: token windows (calibration samples, evaluation windows) and the one check
  of a window length.
"""

from svdllm_plugin.data.embedded import EMBEDDED, SPLITS, embedded_text, other_domain_text
from svdllm_plugin.data.sources import load_text
from svdllm_plugin.data.windows import calibration_dataset, check_seq_len, eval_windows, spread_windows

__all__ = [
    "EMBEDDED",
    "SPLITS",
    "embedded_text",
    "load_text",
    "calibration_dataset",
    "check_seq_len",
    "eval_windows",
    "other_domain_text",
    "spread_windows",
]
