"""Flat <-> nested helpers for weight lists (``model.trainable_variables`` order)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

Weights = list[tf.Tensor]


def flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Concatenate tensors into one vector of shape (sum of sizes,)."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(vector: tf.Tensor, like: Sequence[tf.Tensor]) -> Weights:
    """Split a flat vector into tensors shaped like ``like``."""
    sizes = [int(np.prod(t.shape)) for t in like]
    parts = tf.split(vector, sizes)
    return [tf.reshape(p, t.shape) for p, t in zip(parts, like)]


def dot(a: Sequence[tf.Tensor], b: Sequence[tf.Tensor]) -> tf.Tensor:
    """Inner product of two weight lists (scalar)."""
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])


def axpy(alpha: float | tf.Tensor, x: Sequence[tf.Tensor], y: Sequence[tf.Tensor]) -> Weights:
    """alpha * x + y, element by element."""
    return [alpha * xi + yi for xi, yi in zip(x, y)]


def size(tensors: Sequence[tf.Tensor]) -> int:
    """Total number of entries."""
    return int(sum(np.prod(t.shape) for t in tensors))
