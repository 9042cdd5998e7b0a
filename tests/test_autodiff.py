"""Second-order building blocks agree with dense references and float64 finite differences."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp

import influence as inf
from influence import _tree, autodiff
from influence.losses import get_loss


def _loss_fns(model, x, y, loss_name, from_logits=False):
    fn = inf.ModelFunction(model)
    loss = get_loss(loss_name, from_logits=from_logits)
    x, y = tf.constant(x), tf.constant(y)

    def mean_loss(w):
        return loss.mean(y, fn(w, x))

    def per_sample(w):
        return loss(y, fn(w, x))

    def mixed(w, inputs):
        return loss.mean(y, fn(w, inputs))

    return fn, mean_loss, per_sample, mixed


def _random_like(weights, seed=3):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=w.shape)) for w in weights]


@pytest.mark.parametrize("case", ["regression", "classification"])
def test_hvp_matches_dense_hessian_reverse_and_finite_differences(case, classifier, regressor, class_data, reg_data):
    model, (x, y, _, _), name = (
        (regressor, reg_data, "mse")
        if case == "regression"
        else (classifier, class_data, "sparse_categorical_crossentropy")
    )
    fn, mean_loss, _, _ = _loss_fns(model, x, y, name)
    w = fn.weights
    v = _random_like(w)
    forward = _tree.flatten(autodiff.hvp(mean_loss, w, v)).numpy()
    reverse = _tree.flatten(autodiff.hvp_reverse(mean_loss, w, v)).numpy()
    dense = (autodiff.hessian(mean_loss, w) @ _tree.flatten(v)[:, None])[:, 0].numpy()
    assert np.allclose(forward, reverse, rtol=1e-10, atol=1e-13)
    assert np.allclose(forward, dense, rtol=1e-10, atol=1e-13)
    # H v = ∇_w (∇L(w)·v): check it against float64 finite differences of that scalar.
    flat_v = _tree.flatten(v)

    def grad_dot_v(flat_w):
        weights = _tree.unflatten(tf.constant(flat_w), w)
        return float(_tree.dot(autodiff.gradient(mean_loss, weights), v))

    chk = inf.check_gradient(grad_dot_v, _tree.flatten(w).numpy(), forward, directions=3)
    assert chk.ok, chk
    assert chk.max_rel_error <= 1e-6
    assert flat_v.dtype == tf.float64


def test_second_derivatives_are_exact_through_layer_normalization_in_a_users_own_loss(class_data):
    """A loss_fn written with model.stateless_call (not ModelFunction) reached tf.nn.moments, whose
    stop_gradient made H·v through LayerNormalization 25 % wrong."""
    x, y, _, _ = class_data
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((x.shape[1],), dtype="float64"), keras.layers.Dense(4, dtype="float64"),
                              keras.layers.LayerNormalization(dtype="float64"),
                              keras.layers.Dense(3, activation="softmax", dtype="float64")])  # fmt: skip
    state = [v.value for v in model.non_trainable_variables]
    x_t, y_t = tf.constant(x), tf.constant(y)

    def loss_fn(w):
        p, _ = model.stateless_call(list(w), state, x_t)
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_t, p))

    def inputs_loss_fn(w, inputs):
        p, _ = model.stateless_call(list(w), state, inputs)
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_t, p))

    w = [tf.constant(v.numpy()) for v in model.trainable_variables]
    v = _random_like(w)
    eps = 1e-5
    plus = autodiff.gradient(loss_fn, _tree.axpy(eps, v, w))
    minus = autodiff.gradient(loss_fn, _tree.axpy(-eps, v, w))
    fd = ((_tree.flatten(plus) - _tree.flatten(minus)) / (2 * eps)).numpy()
    dense = (autodiff.hessian(loss_fn, w) @ _tree.flatten(v)[:, None])[:, 0].numpy()
    for name, hv in [("hvp", autodiff.hvp(loss_fn, w, v)), ("hvp_reverse", autodiff.hvp_reverse(loss_fn, w, v))]:
        np.testing.assert_allclose(_tree.flatten(hv).numpy(), fd, rtol=1e-6, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(dense, fd, rtol=1e-6, atol=1e-9, err_msg="hessian")
    # The mixed product ∇_x(∇_w L·v) against a finite difference of ∇_w L·v along x.
    mixed = autodiff.mixed_product(inputs_loss_fn, w, x_t, v).numpy()
    direction = np.random.default_rng(1).normal(size=x.shape)

    def grad_dot_v(inputs):
        return float(_tree.dot(autodiff.gradient(lambda ws: inputs_loss_fn(ws, tf.constant(inputs)), w), v))

    along = (grad_dot_v(x + eps * direction) - grad_dot_v(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(np.sum(mixed * direction), along, rtol=1e-6)


def test_mixed_product_matches_jacobian_contraction_and_finite_differences(classifier, class_data):
    x, y, _, _ = class_data
    fn, _, _, mixed = _loss_fns(classifier, x, y, "sparse_categorical_crossentropy")
    w = fn.weights
    v = _random_like(w)
    xt = tf.constant(x)
    fast = autodiff.mixed_product(mixed, w, xt, v).numpy()
    with tf.GradientTape() as outer:
        outer.watch(xt)
        with tf.GradientTape() as inner:
            inner.watch(w)
            value = mixed(w, xt)
        flat = _tree.flatten(inner.gradient(value, w))
    jac = outer.jacobian(flat, xt)  # (P, B, d)
    reference = autodiff.jacobian_vjp(jac, _tree.flatten(v), out_ndim=1).numpy()
    assert np.allclose(fast, reference, rtol=1e-10, atol=1e-14)

    def grad_dot_v(inputs):
        return float(_tree.dot(autodiff.gradient(lambda ww: mixed(ww, tf.constant(inputs)), w), v))

    chk = inf.check_gradient(grad_dot_v, x, fast)
    assert chk.ok, chk


def test_per_sample_dots_equal_a_loop_over_samples(classifier, class_data):
    x, y, _, _ = class_data
    fn, _, per_sample, _ = _loss_fns(classifier, x, y, "sparse_categorical_crossentropy")
    loss = get_loss("sparse_categorical_crossentropy")
    w = fn.weights
    v = _random_like(w)
    vectorized = autodiff.per_sample_dots(per_sample, w, v).numpy()
    looped = []
    for j in range(len(x)):
        g = autodiff.gradient(
            lambda ww, j=j: loss.mean(tf.constant(y[j : j + 1]), fn(ww, tf.constant(x[j : j + 1]))), w
        )
        looped.append(float(_tree.dot(g, v)))
    assert vectorized.shape == (len(x),)
    assert np.allclose(vectorized, looped, rtol=1e-10, atol=1e-14)


def test_newton_step_solves_a_quadratic_exactly():
    # Linear regression with MSE is quadratic in w: one Newton step reaches least squares.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    y = x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 + 0.01 * rng.normal(size=(20, 1))
    model = inf.as_float64(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))
    fn, mean_loss, _, _ = _loss_fns(model, x, y, "mse")
    w_new = autodiff.newton_step(mean_loss, fn.weights)
    design = np.hstack([x, np.ones((20, 1))])
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    assert np.allclose(w_new[0].numpy(), solution[:3], atol=1e-10)
    assert np.allclose(w_new[1].numpy(), solution[3], atol=1e-10)
    grad_after = _tree.flatten(autodiff.gradient(mean_loss, w_new)).numpy()
    assert np.max(np.abs(grad_after)) < 1e-10


def test_hessian_is_symmetric_and_refuses_large_models(classifier, class_data):
    x, y, _, _ = class_data
    fn, mean_loss, _, _ = _loss_fns(classifier, x, y, "sparse_categorical_crossentropy")
    h = autodiff.hessian(mean_loss, fn.weights).numpy()
    assert h.shape == (_tree.size(fn.weights),) * 2
    assert np.allclose(h, h.T, atol=1e-12)
    big = [tf.zeros([200, 200])]
    with pytest.raises(ValueError, match="'weights' parameter of hessian must be at most 20000 parameters"):
        autodiff.hessian(lambda w: tf.reduce_sum(w[0]), big)


def test_newton_step_reports_a_singular_hessian():
    w = [tf.constant([1.0, 2.0], dtype=tf.float64)]
    with pytest.raises(ValueError, match="'damping' parameter of newton_step must be large enough"):
        autodiff.newton_step(lambda ww: tf.reduce_sum(ww[0]), w)


def test_newton_step_reports_a_numerically_singular_hessian_and_solves_when_damped():
    # Softmax regression: H is singular along "shift every logit together" (cond ~1e16 in float64);
    # an undamped solve returned an arbitrary component along it (norm 3.7 against a 3.6 step).
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 2)), rng.integers(0, 3, 12)
    model = inf.as_float64(keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]))
    fn, mean_loss, _, _ = _loss_fns(model, x, y, "sparse_categorical_crossentropy", from_logits=True)
    with pytest.raises(ValueError, match="'damping' parameter of newton_step must be large enough"):
        autodiff.newton_step(mean_loss, fn.weights)
    damped = autodiff.newton_step(mean_loss, fn.weights, damping=0.1)
    h = autodiff.hessian(mean_loss, fn.weights).numpy() + 0.1 * np.eye(9)
    g = _tree.flatten(autodiff.gradient(mean_loss, fn.weights)).numpy()
    expected = _tree.flatten(fn.weights).numpy() - np.linalg.solve(h, g)
    assert np.allclose(_tree.flatten(damped).numpy(), expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ split models (S3)


def _split_models():
    keras.utils.set_random_seed(4)
    model_0 = inf.as_float64(keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh")]))
    model_1 = inf.as_float64(keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")]))
    return model_0, model_1


def test_vjp_chain_equals_the_joined_models_gradient():
    model_0, model_1 = _split_models()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 5)))
    y = tf.constant([0, 2, 1, 1])
    loss = get_loss("sparse_categorical_crossentropy")
    chain = autodiff.vjp_chain([model_0, model_1], x, lambda out: loss.mean(y, out))
    params = model_0.trainable_variables + model_1.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss.mean(y, model_1(model_0(x)))
    joined = tape.gradient(value, [x, *params])
    assert np.allclose(chain.input_grad.numpy(), joined[0].numpy(), rtol=1e-12, atol=1e-15)
    got = chain.stage_grads[0] + chain.stage_grads[1]
    for a, b in zip(got, joined[1:]):
        assert np.allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("keras_loss", ["function", "object"])
def test_vjp_chain_differentiates_a_keras_cross_entropy_of_a_softmax_stage(keras_loss):
    """Keras computes the cross-entropy of a softmax output from the logits it attaches to that output
    (``_keras_logits``): the loss was not connected to the watched probabilities, and every gradient
    came back as zeros without a word."""
    model_0, model_1 = _split_models()
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 5)))
    y = np.array([0, 2, 1, 1])
    if keras_loss == "function":
        loss = lambda out: tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out))  # noqa: E731
    else:
        loss = lambda out: keras.losses.SparseCategoricalCrossentropy()(y, out)  # noqa: E731
    chain = autodiff.vjp_chain([model_0, model_1], x, loss)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = get_loss("sparse_categorical_crossentropy").mean(tf.constant(y), model_1(model_0(x)))
    expected = tape.gradient(value, [x, *model_0.trainable_variables])
    assert np.abs(chain.input_grad.numpy()).max() > 1e-3
    # Keras's loss objects compute in float32 even for a float64 model: agreement to float32 round-off.
    rtol = 1e-12 if keras_loss == "function" else 1e-5
    np.testing.assert_allclose(chain.input_grad.numpy(), expected[0].numpy(), rtol=rtol, atol=1e-12)
    for got, want in zip(chain.stage_grads[0], expected[1:]):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=rtol, atol=1e-12)


def test_vjp_chain_accepts_an_upstream_gradient_and_custom_gradient_callables():
    model_0, model_1 = _split_models()

    @tf.custom_gradient
    def clipped_square(h):
        def grad(upstream):
            return upstream * 2 * h

        return h * h, grad

    x = tf.constant(np.random.default_rng(1).normal(size=(3, 5)))
    upstream = tf.constant(np.random.default_rng(2).normal(size=(3, 3)))
    chain = autodiff.vjp_chain([model_0, clipped_square, model_1], x, upstream)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model_1(model_0(x) ** 2)
    expected = tape.gradient(out, x, output_gradients=upstream)
    assert np.allclose(chain.input_grad.numpy(), expected.numpy(), rtol=1e-12)
    assert chain.stage_grads[1] == []
    with pytest.raises(ValueError, match=r"'upstream' parameter of vjp_chain must be a gradient of shape \(3, 3\)"):
        autodiff.vjp_chain([model_0, model_1], x, tf.zeros([3, 2], tf.float64))
    with pytest.raises(ValueError, match="'stages' parameter of vjp_chain must be a non-empty list"):
        autodiff.vjp_chain([], x, upstream)


def test_vjp_chain_refuses_a_vector_loss_and_casts_an_upstream_of_another_precision():
    """A vector-valued upstream function was summed without a word; a loss that ignores the output gave
    None, which output_gradients reads as ones; a float32 upstream tensor for a float64 chain raised raw."""
    model_0, model_1 = _split_models()
    x = tf.constant(np.random.default_rng(1).normal(size=(3, 5)))
    with pytest.raises(ValueError, match=r"must be a function returning a scalar loss. Got shape \(3,\)"):
        autodiff.vjp_chain([model_0, model_1], x, lambda out: tf.reduce_sum(out, axis=1))
    ignored = autodiff.vjp_chain([model_0, model_1], x, lambda out: tf.constant(1.0, tf.float64))
    assert np.all(ignored.input_grad.numpy() == 0)
    upstream = np.random.default_rng(2).normal(size=(3, 3))
    exact = autodiff.vjp_chain([model_0, model_1], x, tf.constant(upstream))
    rounded = autodiff.vjp_chain([model_0, model_1], x, tf.constant(upstream, tf.float32))
    assert rounded.input_grad.dtype == tf.float64
    np.testing.assert_allclose(rounded.input_grad.numpy(), exact.input_grad.numpy(), rtol=1e-6)


def test_stop_gradient_stage_blocks_the_input_gradient():
    model_0, model_1 = _split_models()
    x = tf.constant(np.ones((2, 5)))
    chain = autodiff.vjp_chain(
        [model_0, tf.stop_gradient, model_1], x, tf.constant([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], tf.float64)
    )
    assert np.all(chain.input_grad.numpy() == 0)
    assert all(np.all(g.numpy() == 0) for g in chain.stage_grads[0])
    assert any(np.any(g.numpy() != 0) for g in chain.stage_grads[2])


def test_jacobian_contraction_helpers_have_the_documented_axes():
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(3, 4, 2)))
    x = tf.constant(rng.normal(size=(4, 2)))

    def f(inputs):  # out shape (3, 5) from in shape (4, 2)
        return tf.tanh(tf.einsum("oij,ij->oi", a, inputs))[:, :, None] * tf.ones([1, 1, 5], tf.float64)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out = f(x)
    jac = tape.jacobian(out, x)  # (3, 4, 5, 4, 2)? no: out is (3, 4, 5)
    u = tf.constant(rng.normal(size=out.shape))
    assert np.allclose(
        autodiff.jacobian_vjp(jac, u, out_ndim=3).numpy(), tape.gradient(out, x, output_gradients=u).numpy()
    )
    t = tf.constant(rng.normal(size=x.shape))
    with tf.autodiff.ForwardAccumulator(x, t) as acc:
        out2 = f(x)
    assert np.allclose(autodiff.jacobian_jvp(jac, t, in_ndim=2).numpy(), acc.jvp(out2).numpy())
    with pytest.raises(ValueError, match="'cotangent' parameter of jacobian_vjp must be shape"):
        autodiff.jacobian_vjp(jac, t, out_ndim=3)
    with pytest.raises(ValueError, match="'tangent' parameter of jacobian_jvp must be shape"):
        autodiff.jacobian_jvp(jac, u, in_ndim=2)
    # A float32 cotangent of a float64 Jacobian is cast (it failed inside MatMul), and a numpy one works too.
    np.testing.assert_allclose(
        autodiff.jacobian_vjp(jac, u.numpy().astype(np.float32), out_ndim=3).numpy(),
        autodiff.jacobian_vjp(jac, u.numpy().astype(np.float32).astype(np.float64), out_ndim=3).numpy(),
        rtol=1e-14,
    )


def test_vjp_chain_refuses_a_stage_with_several_outputs_by_name():
    """A list of outputs was stacked into one tensor, and the backward pass failed inside MatMul."""
    inputs = keras.Input((3,), dtype="float64")
    two_heads = keras.Model(inputs, [keras.layers.Dense(2, dtype="float64")(inputs)] * 2)
    with pytest.raises(ValueError, match=r"'stages' parameter of vjp_chain .* Got stage 0 returning 2 outputs"):
        inf.vjp_chain([two_heads], np.ones((4, 3)), lambda out: tf.reduce_sum(out))


def test_batch_jacobian_vjp_matches_per_sample_gradients():
    model = mlp(3, 2, hidden=(4,))
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 3)))
    u = tf.constant(np.random.default_rng(1).normal(size=(5, 2)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out = model(x)
    bj = tape.batch_jacobian(out, x)  # (5, 2, 3)
    expected = tape.gradient(out, x, output_gradients=u)
    assert np.allclose(autodiff.batch_jacobian_vjp(bj, u, out_ndim=1).numpy(), expected.numpy())


def test_helpers_take_a_models_variables_as_their_current_values():
    """model.trainable_variables (Keras 3 variables) crashed hvp, per_sample_dots, newton_step and mixed_product."""
    keras.utils.set_random_seed(0)
    model = inf.as_float64(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    variables = model.trainable_variables
    tensors = [tf.convert_to_tensor(v) for v in variables]

    def loss(w):
        return tf.reduce_sum(w[0] ** 2) * tf.reduce_sum(w[1] ** 2 + 1.0)

    v = [tf.ones(t.shape, tf.float64) for t in tensors]
    pairs = [
        (inf.hvp(loss, variables, v), inf.hvp(loss, tensors, v)),
        (inf.newton_step(loss, variables, damping=1.0), inf.newton_step(loss, tensors, damping=1.0)),
        ([inf.per_sample_dots(lambda w: tf.stack([loss(w)]), variables, v)],
         [inf.per_sample_dots(lambda w: tf.stack([loss(w)]), tensors, v)]),
        ([inf.mixed_product(lambda w, x: loss(w) * tf.reduce_sum(x), variables, tf.ones((1, 3), tf.float64), v)],
         [inf.mixed_product(lambda w, x: loss(w) * tf.reduce_sum(x), tensors, tf.ones((1, 3), tf.float64), v)]),
    ]  # fmt: skip
    for from_variables, from_tensors in pairs:
        for a, b in zip(from_variables, from_tensors):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_model_function_follows_the_models_non_trainable_state_unless_pinned():
    """It copied BatchNorm's moving statistics once: after set_weights its outputs were up to 1.9 off the model's."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    fn, pinned = inf.ModelFunction(model), inf.ModelFunction(model).pin_state()
    before = model(x).numpy()
    model.set_weights([w + (5.0 if "moving" in v.path else 0.1) for w, v in zip(model.get_weights(), model.weights)])
    np.testing.assert_array_equal(fn(fn.weights, x).numpy(), model(x).numpy())
    assert np.abs(model(x).numpy() - before).max() > 0.5  # the change is visible…
    moved_weights_old_stats = pinned(pinned.weights, x).numpy()  # …and a pinned function keeps the old statistics
    assert not np.allclose(moved_weights_old_stats, model(x).numpy())


def test_building_blocks_refuse_per_sample_losses_short_vectors_and_bad_damping(regressor, reg_data):
    """A per-sample loss was summed (H·v 5x too large for B=5), a short vector zipped away (mixed_product 0.76 off),
    damping=nan gave NaN weights, and (3, 4) targets were reshaped into (4, 3) predictions."""
    x, y, _, _ = reg_data
    fn, mse = inf.ModelFunction(regressor), get_loss("mse")
    w = fn.weights
    v = _random_like(w)
    per_sample = lambda w_: mse(tf.constant(y), fn(w_, tf.constant(x)))  # noqa: E731
    mean = lambda w_: mse.mean(tf.constant(y), fn(w_, tf.constant(x)))  # noqa: E731
    for call in (
        lambda: inf.hvp(per_sample, w, v),
        lambda: inf.hessian(per_sample, w),
        lambda: inf.newton_step(per_sample, w),
        lambda: inf.mixed_product(lambda w_, xx: mse(tf.constant(y), fn(w_, xx)), w, tf.constant(x), v),
    ):
        with pytest.raises(ValueError, match="'loss_fn' parameter of .* must be a function returning a scalar loss"):
            call()
    with pytest.raises(ValueError, match="'per_sample_loss_fn' parameter of per_sample_dots must be a function"):
        inf.per_sample_dots(mean, w, v)
    for call in (
        lambda: inf.mixed_product(lambda w_, xx: mse.mean(tf.constant(y), fn(w_, xx)), w, tf.constant(x), v[:2]),
        lambda: autodiff.hvp_reverse(mean, w, v[:1]),
        lambda: inf.hvp(mean, w, v[:2]),
    ):
        with pytest.raises(
            ValueError, match=r"'vector' parameter of \w+ must be a list of 4 tensors shaped like the weights"
        ):
            call()
    with pytest.raises(TypeError, match="'inputs' parameter of mixed_product must be floating-point inputs"):
        inf.mixed_product(
            lambda w_, xx: mse.mean(y, fn(w_, tf.cast(xx, w_[0].dtype))), w, tf.constant([[1, 2, 3, 4]]), v
        )
    for damping in (np.nan, np.inf, -1.0):
        with pytest.raises(ValueError, match="'damping' parameter of newton_step must be a finite number ≥ 0"):
            inf.newton_step(mean, w, damping=damping)
    outputs = tf.zeros((4, 3), tf.float64)
    with pytest.raises(ValueError, match=r"targets of shape \(3, 4\) do not match predictions of shape \(4, 3\)"):
        mse(tf.zeros((3, 4), tf.float64), outputs)
    assert mse(tf.zeros((4,), tf.float64), tf.zeros((4, 1), tf.float64)).shape == (4,)  # (B,) for (B, 1): as ever


def test_python_lists_keep_their_float64_values(regressor, reg_data):
    """hvp's vector and vjp_chain's upstream as Python lists went through float32 (0.6 → 0.60000001)."""
    x, y, _, _ = reg_data
    fn = inf.ModelFunction(regressor)
    weights = [tf.constant(w) for w in regressor.get_weights()]

    def loss_fn(w):
        return inf.losses.get_loss("mse").mean(y, fn(w, x))

    as_lists = [np.full(w.shape, 0.6).tolist() for w in weights]
    as_arrays = [np.full(w.shape, 0.6) for w in weights]
    for got, expected in zip(inf.hvp(loss_fn, weights, as_lists), inf.hvp(loss_fn, weights, as_arrays)):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
    upstream = np.full((len(x), 2), 0.1)
    by_list = inf.vjp_chain([regressor], x, upstream.tolist())
    by_array = inf.vjp_chain([regressor], x, upstream)
    np.testing.assert_array_equal(by_list.input_grad.numpy(), by_array.input_grad.numpy())
    for got, expected in zip(by_list.stage_grads[0], by_array.stage_grads[0]):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
