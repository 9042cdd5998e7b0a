"""``tf.function`` for functions traced once per model, by design.

Every new model (or run set-up) gets its own compiled program, traced on first use; a
refit of the same model reuses it. TensorFlow counts traces per Python code object,
across instances, so a script fitting five fresh models was told five times that
``Program._run_and_record`` "triggered tf.function retracing" (three long log lines
each). The functions made here opt out of that warning; tracing itself is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf


def graph_function(python_function: Callable[..., Any], **options: Any) -> Any:
    """``tf.function(python_function, **options)`` without TensorFlow's frequent-retracing warning."""
    function = tf.function(python_function, **options)
    # A private flag of tf.function (TensorFlow 2.x); harmless where a version lacks it.
    function._omit_frequent_tracing_warning = True
    return function
