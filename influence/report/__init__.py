"""The data-debugging report (scenario S6): an HTML page with image grids, figures and tables.

- :func:`render_report` turns a :func:`influence.rank` table into ``index.html`` with
  PNG figures beside it and the scores as CSV and Parquet; it does not care how the
  table was made, so it can be tested on hand-made tables.
- :mod:`influence.report.job` is the resumable train → rank → verify → render job
  behind ``influence rank`` and ``influence demo``.
"""

from .metrics import Verification, correlations, found_at_k, per_class_table
from .render import render_report, save_scores

__all__ = ["Verification", "correlations", "found_at_k", "per_class_table", "render_report", "save_scores"]
