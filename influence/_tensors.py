"""Values as tensors of a given float type, without a detour through float32."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf


def exact_tensor(value: Any, dtype: Any) -> tf.Tensor:
    """``value`` as a tensor of ``dtype``: a tensor is cast; a Python number, a list or an array
    is converted straight to ``dtype``.

    ``tf.cast(0.3, tf.float64)`` converts the Python float to float32 first (0.30000001192…), and
    so does ``tf.convert_to_tensor`` for a list of floats: a float64 computation then starts 1e-8
    off its own references.
    """
    if tf.is_tensor(value):
        return tf.cast(value, dtype)
    return tf.constant(np.asarray(value), dtype)
