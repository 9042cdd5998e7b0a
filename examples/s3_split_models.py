"""S3 — backprop by hand across two models.

A network split into ``model_0`` (x → hidden h) and ``model_1`` (h → class
probabilities), each run under its own tape (for memory or pipeline reasons).
The user wants ∂loss/∂θ0 and ∂loss/∂x by chaining: the gradient at h from
model_1, then backwards through model_0. This script shows:

(a) ``inf.vjp_chain([model_0, model_1], x, loss_of_output)`` — one VJP per stage
    (``output_gradients``), no Jacobian — equals the gradient of the joined model
    taken with one tape, for θ0, θ1 and x; an explicit upstream gradient
    ∂loss/∂h through model_0 alone gives the same ∂loss/∂θ0 and ∂loss/∂x;
(b) for those who do need full Jacobians, ``inf.autodiff.jacobian_vjp``,
    ``jacobian_jvp`` and ``batch_jacobian_vjp`` contract ``tape.jacobian`` /
    ``tape.batch_jacobian`` output along the documented axes, equal to the
    hand-written ``tf.tensordot`` / ``tf.einsum``, to the VJP of (a) and to
    forward mode (``tf.autodiff.ForwardAccumulator``).

Run: ``python examples/s3_split_models.py`` (about 6 s on 2 CPUs).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of the output

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import influence as inf

TOL = 1e-5  # float32: the two routes sum the same products in different orders


def rel_diff(a, b):
    """max |a − b| / max |b| over two (lists of) tensors that should be equal."""
    a, b = tf.nest.flatten(a), tf.nest.flatten(b)
    return max(float(np.abs(np.asarray(u) - np.asarray(v)).max() / np.abs(np.asarray(v)).max()) for u, v in zip(a, b))


def main():
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = tf.constant(digits.data[:16] / 16, tf.float32)
    y = digits.target[:16]
    model_0 = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="tanh")])
    model_1 = keras.Sequential([keras.Input((32,)), keras.layers.Dense(10, activation="softmax")])

    def loss_of_output(probabilities):
        # Keras's own loss works: on a softmax output Keras reads the logits it attached to the tensor
        # (`_keras_logits`); vjp_chain hands each stage a fresh tensor, so the loss stays connected to it.
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, probabilities))

    # Reference: the joined model, one tape over everything.
    joined = keras.Sequential([model_0, model_1])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = loss_of_output(joined(x))
    dx_ref, *dtheta_ref = tape.gradient(loss, [x, *model_0.trainable_variables, *model_1.trainable_variables])
    n0 = len(model_0.trainable_variables)

    # (a) The chain: a VJP per stage, each under its own tape.
    chain = inf.vjp_chain([model_0, model_1], x, loss_of_output)
    err_theta0 = rel_diff(chain.stage_grads[0], dtheta_ref[:n0])
    err_theta1 = rel_diff(chain.stage_grads[1], dtheta_ref[n0:])
    err_x = rel_diff(chain.input_grad, dx_ref)
    print(f"(a) vjp_chain vs joined-model tape: rel. diff dθ0 {err_theta0:.1e}, dθ1 {err_theta1:.1e}, dx {err_x:.1e}")

    # The same backwards step through model_0 alone, from an explicit gradient at h (computed by model_1's owner).
    h = model_0(x)
    with tf.GradientTape() as tape:
        tape.watch(h)
        loss_h = loss_of_output(model_1(h))
    dh = tape.gradient(loss_h, h)
    stage0 = inf.vjp_chain([model_0], x, dh)
    err_stage0 = max(rel_diff(stage0.stage_grads[0], dtheta_ref[:n0]), rel_diff(stage0.input_grad, dx_ref))
    print(f"    model_0 alone with upstream dloss/dh {tuple(dh.shape)}: rel. diff (dθ0, dx) {err_stage0:.1e}")

    # (b) Full Jacobians of model_0 and their contractions. tape.jacobian lays out output axes first:
    # J[b, k, b', i] = ∂h[b, k]/∂x[b', i], shape (16, 32, 16, 64); batch_jacobian keeps b = b': (16, 32, 64).
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        h = model_0(x)
    jac = tape.jacobian(h, x)
    batch_jac = tape.batch_jacobian(h, x)
    del tape
    vjp = inf.autodiff.jacobian_vjp(jac, dh, out_ndim=2)  # Σ_{b,k} dh[b,k] J[b,k,:,:] = ∂loss/∂x
    vjp_by_hand = tf.tensordot(dh, jac, axes=[[0, 1], [0, 1]])
    batch_vjp = inf.autodiff.batch_jacobian_vjp(batch_jac, dh, out_ndim=1)  # per sample: Σ_k dh[b,k] J[b,k,:]
    batch_vjp_by_hand = tf.einsum("bk,bki->bi", dh, batch_jac)
    tangent = tf.constant(np.random.default_rng(0).standard_normal(x.shape), tf.float32)
    jvp = inf.autodiff.jacobian_jvp(jac, tangent, in_ndim=2)  # Σ_{b',i} J[:,:,b',i] v[b',i]: shape of h
    jvp_by_hand = tf.tensordot(jac, tangent, axes=[[2, 3], [0, 1]])
    with tf.autodiff.ForwardAccumulator(x, tangent) as accumulator:  # forward mode: J·v without J
        jvp_forward = accumulator.jvp(model_0(x))
    errors = {
        "jacobian_vjp": rel_diff(vjp, vjp_by_hand),
        "batch_jacobian_vjp": rel_diff(batch_vjp, batch_vjp_by_hand),
        "jacobian_jvp": rel_diff(jvp, jvp_by_hand),
    }
    print(f"(b) J {tuple(jac.shape)}, batch J {tuple(batch_jac.shape)}; vs tensordot/einsum rel. diff: ", end="")
    print(", ".join(f"{name} {err:.1e}" for name, err in errors.items()))
    err_vjp_x = max(rel_diff(vjp, dx_ref), rel_diff(batch_vjp, dx_ref))
    err_jvp = rel_diff(jvp, jvp_forward)
    print(f"    both VJPs vs dloss/dx of (a): rel. diff {err_vjp_x:.1e}; jvp vs forward mode: rel. diff {err_jvp:.1e}")

    # Every claim printed above (float32 throughout, tolerance TOL).
    for name, err in [("θ0", err_theta0), ("θ1", err_theta1), ("x", err_x), ("model_0 alone", err_stage0)]:
        assert err < TOL, f"vjp_chain's d{name} should equal the joined model's gradient: rel. diff {err:.2e}"
    for name, err in errors.items():
        assert err < TOL, f"{name} should equal the hand-written contraction: rel. diff {err:.2e}"
    assert err_vjp_x < TOL, f"the Jacobian VJPs should equal dloss/dx: rel. diff {err_vjp_x:.2e}"
    assert err_jvp < TOL, f"jacobian_jvp should equal forward-mode J·v: rel. diff {err_jvp:.2e}"


if __name__ == "__main__":
    main()
