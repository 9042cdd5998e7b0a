"""TensorFlow ops replaced while the toolkit evaluates a model.

Keras 3's TensorFlow backend calls ``tf.nn.moments`` (LayerNormalization,
GroupNormalization), ``tf.nn.experimental.stateless_dropout`` (Dropout) and
``tf.random.stateless_uniform`` / ``stateless_normal`` (AlphaDropout,
GaussianNoise, GaussianDropout) at trace time. They are fine for training a
network and wrong for what this toolkit does with it:

- ``tf.nn.moments`` computes the variance around ``stop_gradient(mean)``. The
  first derivative is still exact (∂var/∂mean = 0 at the mean), the second is
  not: H·v through a LayerNormalization was off by up to 20 % against finite
  differences through retraining. :func:`exact_moments` computes the same
  values with every derivative exact.
- ``stateless_dropout`` draws its uniforms in the input's dtype, and XLA's
  stateless generator differs from the plain-graph kernel. So one recorded seed
  gave different masks in float32 and float64 (a float64 check of a float32 run
  checked another run) and under XLA and plain graphs (a program falling back
  from XLA would replay other masks). :func:`portable_dropout` draws the mask
  from a counter-based integer hash of (seed, element index): the same bits in
  every dtype, graph mode and device. The noise layers' uniform and normal
  draws have the same problem and get the same cure.

The replacements act only inside :func:`exact_ops`, which
:class:`~influence.model_function.ModelFunction` enters around every model
call; elsewhere (the user's own Keras training) the originals run unchanged.
The switch is thread-local, so replica threads of a ``tf.distribute`` strategy
each see their own state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from ._tensors import exact_tensor

_state = threading.local()
_install_lock = threading.Lock()
_ORIGINALS: dict[str, Callable[..., Any]] = {}
_installed = False


def exact_moments(x, axes, shift=None, keepdims=False, name=None):
    """``tf.nn.moments`` without its ``stop_gradient``: same values, exact derivatives of every order."""
    del shift  # tf.nn.moments ignores it as well
    with tf.name_scope(name or "exact_moments"):
        low = x.dtype in (tf.float16, tf.bfloat16)  # statistics in float32, as tf.nn.moments does
        y = tf.cast(x, tf.float32) if low else x
        mean = tf.reduce_mean(y, axes, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(y, mean), axes, keepdims=True)
        if not keepdims:
            mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        if low:
            mean, variance = tf.cast(mean, x.dtype), tf.cast(variance, x.dtype)
        return mean, variance


def _mix32(h: tf.Tensor) -> tf.Tensor:
    """A bijective 32-bit integer hash (Wellons' "lowbias32"); uint32 arithmetic wraps identically everywhere."""
    shift = tf.bitwise.right_shift
    h = tf.bitwise.bitwise_xor(h, shift(h, tf.constant(16, tf.uint32)))
    h = h * tf.constant(0x7FEB352D, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, shift(h, tf.constant(15, tf.uint32)))
    h = h * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(h, shift(h, tf.constant(16, tf.uint32)))


def portable_uniform(shape, seed) -> tf.Tensor:
    """Uniform float32 numbers in [0, 1) of ``shape`` from a two-int ``seed``, identical in every graph mode.

    Element k gets hash(k, seed): 24 random bits, so every value is exact in float32.
    """
    seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), tf.constant(1 << 32, tf.int64)), tf.uint32)
    key = _mix32(tf.bitwise.bitwise_xor(_mix32(seed[0]), seed[1] + tf.constant(0x9E3779B9, tf.uint32)))
    count = tf.reduce_prod(tf.cast(shape, tf.int32))
    index = tf.cast(tf.range(count), tf.uint32)
    bits = _mix32(tf.bitwise.bitwise_xor(_mix32(index + key), key))
    uniform = tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.float32) * (1.0 / (1 << 24))
    return tf.reshape(uniform, shape)


def portable_dropout(x, rate, seed, rng_alg=None, noise_shape=None, name=None):
    """``tf.nn.experimental.stateless_dropout`` with the mask of :func:`portable_uniform`.

    Same semantics: an entry is kept when its uniform is ≥ ``rate`` and scaled by 1/(1 − rate);
    ``noise_shape`` broadcasts the mask.
    """
    del rng_alg  # one generator for all
    with tf.name_scope(name or "portable_dropout"):
        x = tf.convert_to_tensor(x)
        shape = tf.shape(x) if noise_shape is None else tf.convert_to_tensor(noise_shape, tf.int32)
        rate = exact_tensor(rate, x.dtype)  # a Python rate must not pass through float32
        keep = portable_uniform(shape, seed) >= tf.cast(rate, tf.float32)  # float32: one mask for every dtype
        scale = 1.0 / (1.0 - rate)
        return x * scale * tf.cast(keep, x.dtype)


def portable_stateless_uniform(shape, seed, minval=0, maxval=None, dtype=tf.float32, name=None, alg=None):
    """``tf.random.stateless_uniform`` for float dtypes from :func:`portable_uniform` (AlphaDropout, noise layers)."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:  # integer draws (shuffles, randint) are not part of a model's arithmetic
        return _ORIGINALS["stateless_uniform"](shape, seed, minval, maxval, dtype, name, alg or "auto_select")
    with tf.name_scope(name or "portable_uniform"):
        high = 1 if maxval is None else maxval
        low, high = exact_tensor(minval, dtype), exact_tensor(high, dtype)
        return low + (high - low) * tf.cast(portable_uniform(shape, seed), dtype)


def portable_stateless_normal(shape, seed, mean=0.0, stddev=1.0, dtype=tf.float32, name=None, alg=None):
    """``tf.random.stateless_normal`` by Box–Muller from :func:`portable_uniform` (GaussianNoise, GaussianDropout).

    Computed in float64 and then cast, so float32 and float64 runs draw the same numbers up to rounding.
    """
    del alg
    dtype = tf.as_dtype(dtype)
    with tf.name_scope(name or "portable_normal"):
        shape = tf.convert_to_tensor(shape, tf.int32)
        pair = tf.cast(portable_uniform(tf.concat([[2], shape], 0), seed), tf.float64)
        radius = tf.sqrt(-2.0 * tf.math.log(pair[0] + 0.5 / (1 << 24)))  # uniform in (0, 1): log is finite
        normal = tf.cast(radius * tf.cos(2.0 * np.pi * pair[1]), dtype)
        return exact_tensor(mean, dtype) + exact_tensor(stddev, dtype) * normal


_REPLACEMENTS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "moments": (tf.nn, "moments", exact_moments),
    "stateless_dropout": (tf.nn.experimental, "stateless_dropout", portable_dropout),
    "stateless_uniform": (tf.random, "stateless_uniform", portable_stateless_uniform),
    "stateless_normal": (tf.random, "stateless_normal", portable_stateless_normal),
}


def _dispatcher(key: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        chosen = _REPLACEMENTS[key][2] if getattr(_state, "depth", 0) > 0 else _ORIGINALS[key]
        return chosen(*args, **kwargs)

    call.__name__ = call.__qualname__ = key
    call.__doc__ = _ORIGINALS[key].__doc__
    return call


def _install() -> None:
    """Put the dispatchers in place once; outside :func:`exact_ops` they call TensorFlow's originals."""
    global _installed
    if _installed:  # every model call enters exact_ops: no lock once installed
        return
    with _install_lock:
        if _installed:
            return
        for key, (module, attribute, _replacement) in _REPLACEMENTS.items():
            _ORIGINALS[key] = getattr(module, attribute)
            setattr(module, attribute, _dispatcher(key))
        _installed = True  # only now: another thread must not skip a half-done installation


@contextlib.contextmanager
def exact_ops() -> Iterator[None]:
    """Within this block (this thread), the ops above are replaced; outside it, TensorFlow's run."""
    _install()
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
