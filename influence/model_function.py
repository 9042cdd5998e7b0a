"""A Keras 3 model seen as a pure function ``f(weights, x)``.

Keras 3 variables are not ``tf.Variable``s, so ``tf.autodiff.ForwardAccumulator``
rejects them (DESIGN §4). We differentiate functionally instead: weights are
plain tensors passed to ``model.stateless_call``; the model's own variables are
never touched. This module also knows which models mix samples within a batch
(BatchNorm in training mode), where per-sample tricks are wrong.
"""

from __future__ import annotations

import json
import re
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ._exact_ops import exact_ops
from ._graphs import graph_function
from ._validation import describe, param_error

# Layers whose training-mode output for one sample depends on the other samples.
COUPLING_LAYER_CLASSES = ("BatchNormalization", "SyncBatchNormalization")

_SEED_STATE_SUFFIX = "seed_generator_state"
# Name scopes of TensorFlow ops whose internal stop_gradient leaves every derivative exact:
# logsumexp subtracts a stopped max that cancels algebraically, whatever its value.
_EXACT_STOP_GRADIENT_SCOPES = ("ReduceLogSumExp",)
# Ops whose registered gradient is not the derivative of their value. ImageProjectiveTransform
# (Keras's RandomTranslation, RandomZoom, RandomRotation in training mode) back-projects the
# output gradient through the inverse transform instead of transposing the interpolation:
# off by 51 % (bilinear) and 65 % (nearest) from the exact transpose for a shift of (0.37, -0.61).
_APPROXIMATE_GRADIENT_OPS = ("ImageProjectiveTransformV2", "ImageProjectiveTransformV3")
# Ops that run function graphs, and the attributes naming those graphs (inspected for overrides too).
_FUNCTION_ATTRS = {
    "While": ("body",),
    "StatelessWhile": ("body",),
    "If": ("then_branch", "else_branch"),
    "StatelessIf": ("then_branch", "else_branch"),
    "PartitionedCall": ("f",),
    "StatefulPartitionedCall": ("f",),
}
# The name scope of every model call (ops are named "model/dense/MatMul").
_CALL_SCOPE = "model"
# Spread seeds of different dropout layers apart so their masks differ.
_SEED_STRIDE = 1_000_003


class ModelFunction:
    """Wrap a built Keras 3 model as ``outputs = f(weights, x)``.

    Args:
        model: a built ``keras.Model`` (Sequential, functional or subclassed).
        func: name of the public function using it, for error messages.

    Attributes:
        model: the Keras model (its variables are only read, never written).
        dtype: dtype of the trainable weights (``tf.float32`` or ``tf.float64``).
        weights: current trainable weights as tensors, ``model.trainable_variables`` order.
        non_trainable: current non-trainable values (read at each call; see :meth:`pin_state`).
    """

    def __init__(self, model: keras.Model, *, func: str = "ModelFunction") -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(param_error("model", func, "a keras.Model", describe(model)))
        if not model.built or not model.trainable_variables:
            raise ValueError(
                param_error(
                    "model", func, "a built Keras model with trainable weights", "an unbuilt or weightless model"
                )
            )
        self.model = model
        self.func = func
        self.dtype = tf.as_dtype(model.trainable_variables[0].dtype)
        mixed = {tf.as_dtype(v.dtype) for v in model.trainable_variables}
        if len(mixed) > 1:
            raise ValueError(
                param_error(
                    "model", func, "a model whose trainable weights share one dtype", sorted(d.name for d in mixed)
                )
            )
        if not self.dtype.is_floating:
            raise TypeError(param_error("model", func, "floating-point weights", self.dtype.name))
        _check_single_input_and_output(model, func)
        _check_stateless(model, func)
        _check_input_precision(model, self.dtype, func)
        _check_no_mixed_precision(model, func)
        self._pinned: list[tf.Tensor] | None = None
        self._seed_slots = seed_state_slots(model)
        # stateless_call hands ``training`` to ``call`` as it is; a subclassed ``call(self, x)``
        # without it raised TypeError (``model(x, training=...)`` drops it for such models).
        self._takes_training = bool(getattr(model, "_call_has_training_arg", True))

    @property
    def draws_random(self) -> bool:
        """Whether the model has layers drawing random numbers in training mode (Dropout, noise)."""
        return bool(self._seed_slots)

    @property
    def weights(self) -> list[tf.Tensor]:
        return [tf.convert_to_tensor(v.value) for v in self.model.trainable_variables]

    @property
    def non_trainable(self) -> list[tf.Tensor]:
        """The model's non-trainable values (moving statistics, seeds): read at each call, unless pinned.

        Read live, as ``weights`` is: a function kept across ``model.set_weights`` or a Keras
        ``fit`` follows the model (a copy taken once made outputs and H·v through BatchNorm stale).
        """
        if self._pinned is not None:
            return self._pinned
        return [tf.convert_to_tensor(v.value) for v in self.model.non_trainable_variables]

    def pin_state(self) -> ModelFunction:
        """Fix the non-trainable values at their current values, as constants (returns ``self``).

        A compiled :class:`~influence.program.Program` pins them: its recorded run keeps the
        moving statistics it was trained with, whatever the model's variables hold later.
        """
        self._pinned = [tf.convert_to_tensor(v.value) for v in self.model.non_trainable_variables]
        return self

    def state_for_seed(self, seed: int | tf.Tensor | None) -> list[tf.Tensor]:
        """Non-trainable state with every random layer's seed set from ``seed``.

        The same seed gives the same dropout masks: that is how a recorded step
        is replayed exactly in the reverse pass and in finite-difference checks.
        """
        if seed is None or not self._seed_slots:
            return self.non_trainable
        state = list(self.non_trainable)
        for k, i in enumerate(self._seed_slots):
            dtype = state[i].dtype
            base = tf.cast(seed, dtype) + tf.cast(k * _SEED_STRIDE, dtype)
            state[i] = tf.stack([base, tf.zeros([], dtype)])
        return state

    def __call__(
        self,
        weights: Sequence[tf.Tensor],
        x: tf.Tensor,
        *,
        training: bool = False,
        seed: int | tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Model outputs for inputs ``x`` (B, ...) under ``weights``.

        Normalization statistics and dropout masks come from :mod:`influence._exact_ops`
        (exact second derivatives; the same masks in every dtype and graph mode).
        """
        mode = {"training": training} if self._takes_training else {}
        # Under a scope of ours: a layer named after a private class ("__square") is not a valid *root*
        # name scope, which it would be in a graph function that calls the model first thing.
        with exact_ops(), tf.name_scope(_CALL_SCOPE):
            outputs, _ = self.model.stateless_call(list(weights), self.state_for_seed(seed), x, **mode)
        return _one_output(outputs, self.func)


def _one_output(outputs: Any, func: str) -> tf.Tensor:
    """The output tensor; a dict or list around one tensor is unwrapped, several are refused.

    Subclassed models declare no outputs, so their structure shows only here, on the first call.
    """
    if tf.is_tensor(outputs):
        return outputs
    leaves = tf.nest.flatten(outputs)
    if len(leaves) == 1 and tf.is_tensor(leaves[0]):
        return leaves[0]
    raise _several(func, len(leaves), "outputs")


def seed_state_slots(model: keras.Model) -> list[int]:
    """Positions in ``model.non_trainable_variables`` of the random layers' seed states (dropout, noise)."""
    return [i for i, v in enumerate(model.non_trainable_variables) if v.path.endswith(_SEED_STATE_SUFFIX)]


def _check_single_input_and_output(model: keras.Model, func: str) -> None:
    """Per-sample losses and input gradients assume one input tensor and one output tensor."""
    for kind in ("inputs", "outputs"):
        try:
            tensors = getattr(model, kind)
        except (AttributeError, ValueError):  # subclassed models declare neither
            continue
        if isinstance(tensors, (list, tuple)) and len(tensors) > 1:
            raise _several(func, len(tensors), kind)


def _check_stateless(model: keras.Model, func: str) -> None:
    """A stateful RNN carries its state from batch to batch: a step is then not a function of (w, batch)."""
    layers = model._flatten_layers(include_self=False, recursive=True)
    stateful = [layer.name for layer in layers if getattr(layer, "stateful", False) is True]
    if stateful:
        raise ValueError(
            param_error(
                "model",
                func,
                "a model without stateful layers (each step must depend on its weights and batch only)",
                f"stateful layer(s) {', '.join(stateful)}; build them with stateful=False",
            )
        )


def _several(func: str, count: int, kind: str) -> ValueError:
    return ValueError(
        param_error(
            "model",
            func,
            "a model with one input and one output",
            f"a model with {count} {kind}; concatenate them into one tensor (e.g. "
            "keras.layers.Concatenate) or wrap the model so it takes and returns one",
        )
    )


def _check_input_precision(model: keras.Model, dtype: tf.DType, func: str) -> None:
    """A float64 model whose Input is float32 silently rounds its inputs (DESIGN §4): refuse it."""
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):  # subclassed models declare no inputs
        return
    for tensor in inputs:
        input_dtype = tf.as_dtype(tensor.dtype)
        if input_dtype.is_floating and input_dtype.size < dtype.size:
            raise ValueError(
                param_error(
                    "model",
                    func,
                    f"a model whose inputs are as precise as its {dtype.name} weights",
                    f"a {input_dtype.name} Input that rounds inputs before the first layer; build it with "
                    f"keras.Input(..., dtype='{dtype.name}') or use influence.as_float64(model)",
                )
            )


def _check_no_mixed_precision(model: keras.Model, func: str) -> None:
    """Refuse layers that compute in another dtype than their weights (mixed_bfloat16, mixed_float16).

    Training, hypergradients and their checks would silently run in half precision: removal
    effects 0.7 % and input gradients 1 % off the float32 run's, and a float64 check then fails.
    """
    mixed = [
        f"{layer.name} ({policy.name})"
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if (policy := getattr(layer, "dtype_policy", None)) is not None
        and getattr(policy, "compute_dtype", None) != getattr(policy, "variable_dtype", None)
    ]
    if mixed:
        raise ValueError(
            param_error(
                "model",
                func,
                "a model that computes in its weights' dtype",
                f"mixed-precision layer(s) {_listed(mixed)}; build it under keras.config.set_dtype_policy('float32')",
            )
        )


def coupling_layers(model: keras.Model) -> list[str]:
    """Names of layers that mix samples within a batch in training mode.

    A frozen BatchNormalization (``trainable=False``, as in a frozen backbone) is not one: Keras 3
    runs it on its moving statistics even in training mode.
    """
    return [
        layer.name
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if type(layer).__name__ in COUPLING_LAYER_CLASSES and layer.trainable
    ]


def couples_samples(fn: ModelFunction, x: tf.Tensor, *, training: bool, outputs: np.ndarray | None = None) -> bool:
    """Numerical probe: does changing some samples change the outputs of the others?

    Catches coupling from layers we do not know by name. Two probes: the first half of the
    batch changed, then the second, each time with the other half's outputs compared bit for
    bit, so any two samples in different halves are probed both ways (a probe of sample 0
    alone missed a layer that mixes in the batch's largest row). All calls share one seed so
    dropout masks are identical. Real-valued inputs are bumped by 1; integer inputs (token
    ids) take the next sample's row instead, which stays a valid id. ``outputs``: the
    model's outputs at ``x`` with seed 0, when the caller has them.
    """
    n = int(x.shape[0])
    if n < 2:
        return False
    out_a = np.asarray(fn(fn.weights, x, training=training, seed=0)) if outputs is None else outputs
    first = np.arange(n) < n // 2
    rows = None if x.dtype.is_floating else np.asarray(x)
    for changed in (first, ~first):
        per_row = changed.reshape((n,) + (1,) * (x.shape.rank - 1))  # broadcasts over each sample's axes
        if rows is None:
            bumped = x + tf.constant(per_row, x.dtype)
        else:
            bumped_rows = np.where(per_row, np.roll(rows, -1, axis=0), rows)
            if np.array_equal(bumped_rows, rows):  # every row alike: nothing to swap in
                continue
            bumped = tf.constant(bumped_rows)
        out_b = np.asarray(fn(fn.weights, bumped, training=training, seed=0))
        if not np.array_equal(out_a[~changed], out_b[~changed]):
            return True
    return False


def require_seeded_randomness(fn: ModelFunction, x: tf.Tensor, *, training: bool, func: str) -> np.ndarray:
    """Refuse a forward pass that differs between two calls with the same seed; the outputs at ``x`` (seed 0).

    Keras layers draw their noise (Dropout, GaussianNoise, …) from the seed each step records;
    a layer calling ``tf.random.normal`` itself draws new numbers on every call, so no recorded
    run could be replayed, and the sample-interaction probe would misread the noise as coupling.
    """
    first = np.asarray(fn(fn.weights, x, training=training, seed=0))
    again = np.asarray(fn(fn.weights, x, training=training, seed=0))
    if not np.array_equal(first, again, equal_nan=True):
        raise ValueError(
            param_error(
                "model",
                func,
                "a model whose forward pass is fixed by its seed (training mode replays each step's noise)",
                "one whose outputs differ between two calls with the same seed: a layer draws random numbers "
                "outside Keras's seeded generators (e.g. tf.random.normal in call()); draw them with "
                "keras.random.normal(shape, seed=self.seed_generator) and a keras.random.SeedGenerator",
            )
        )
    return first


def require_independent_samples(fn: ModelFunction, x: tf.Tensor | None, *, training: bool, func: str, why: str) -> None:
    """Refuse models whose samples interact when a per-sample trick is about to be used."""
    if not training:
        return
    outputs = None if x is None else require_seeded_randomness(fn, x, training=training, func=func)
    names = coupling_layers(fn.model)
    if not names and x is not None and couples_samples(fn, x, training=training, outputs=outputs):
        names = ["(found numerically: one sample's input changes other samples' outputs)"]
    if names:
        raise ValueError(
            param_error(
                "model",
                func,
                f"a model whose samples do not interact in training mode ({why} would be wrong)",
                f"a model with sample-mixing layer(s) {', '.join(names)}; use training=False "
                "(moving statistics) or replace BatchNormalization by LayerNormalization",
            )
        )


class GradientOverrideWarning(UserWarning):
    """The model's forward pass contains ``stop_gradient``, a custom gradient, or an op whose
    registered gradient is only approximate (image transforms of random-augmentation layers).

    Hypergradients then follow the overridden gradient, not the true derivative of
    retraining, unless the override happens to be exact; :func:`influence.check_unrolled`
    measures whether it is. Silence it with
    ``warnings.simplefilter("ignore", influence.GradientOverrideWarning)``.
    """


# Forward passes already inspected: model -> {(layers, training, input dtype, input shape): found}.
_inspections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Models already warned about: model -> {(layers, training)}.
_inspected: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layers_key(model: keras.Model) -> tuple:
    """Which layers the model holds and how each is configured: part of the keys of every cache
    kept per model (graph inspections, compiled programs).

    A model edited after a cache entry was made (``Sequential.pop``/``add``, a Dropout's ``rate``
    or a layer's dtype policy changed) then gets a new entry instead of the stale one: a refit
    after ``rate`` went from 0.1 to 0.6 trained with 0.1, silently.
    """
    return tuple(
        (id(layer), _config_text(layer)) for layer in model._flatten_layers(include_self=False, recursive=True)
    )


def _config_text(layer: keras.layers.Layer) -> str:
    try:
        config = layer.get_config()
    except Exception:  # noqa: BLE001 - a custom layer without get_config: its identity must do
        return ""
    return json.dumps(config, sort_keys=True, default=repr)


def gradient_overrides(fn: ModelFunction, input_spec: tf.TensorSpec, *, training: bool) -> dict[str, list[str]]:
    """Ops of the traced forward pass whose gradient is not autodiff's derivative of their value.

    Returns ``{"stop_gradient": [...], "custom_gradient": [...], "approximate_gradient": [...],
    "reduced_precision": [...], "discretized": [...]}`` (op names; the third: ops whose registered
    gradient is only approximate; the fourth: where the pass computes in a narrower float than its
    input, e.g. TensorFlow's ResizeBilinear, which returns float32 for float64 images, so a float64
    check through it is only float32-precise; the last: casts of floats to integers, e.g. an
    Embedding fed float token ids, through which every gradient is 0). Op names carry the layer's name scope (e.g.
    ``"detached_scale/StopGradient"``, or ``"rnn/while/cell/StopGradient"`` inside a recurrent
    layer's loop). Left out: TensorFlow's own exact uses (logsumexp's stopped max), and ops whose
    input does not depend on the weights or inputs along floating-point tensors (or tensor lists,
    which carry a sequence into a loop). Traced once per model, mode and input signature.
    """
    key = (
        layers_key(fn.model),
        bool(training),
        tf.as_dtype(input_spec.dtype).name,
        tuple(input_spec.shape.as_list()),
    )
    try:
        done = _inspections.setdefault(fn.model, {})
    except TypeError:  # an unhashable model: inspect every time
        done = {}
    if key not in done:

        def forward(weights: list[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
            return fn(weights, x, training=training, seed=0)

        weight_specs = [tf.TensorSpec(w.shape, w.dtype) for w in fn.weights]
        graph = graph_function(forward).get_concrete_function(weight_specs, input_spec).graph
        # The explicit arguments come first among the graph's inputs, captured constants after them.
        differentiable = {t.name for t in graph.inputs[: len(weight_specs) + 1]}
        found: dict[str, list[str]] = {
            "stop_gradient": [],
            "custom_gradient": [],
            "approximate_gradient": [],
            "reduced_precision": [],
            "discretized": [],
        }
        _find_overrides(graph, differentiable, found)
        done[key] = {kind: [_layer_named(site, fn.model) for site in sites] for kind, sites in found.items()}
    return {kind: list(names) for kind, names in done[key].items()}


def overrides_at(fn: ModelFunction, x: np.ndarray | tf.Tensor, *, training: bool) -> dict[str, list[str]]:
    """:func:`gradient_overrides` for inputs shaped like ``x`` (only its shape and dtype are read)."""
    return gradient_overrides(fn, tf.TensorSpec([None, *x.shape[1:]], tf.as_dtype(x.dtype)), training=training)


def _find_overrides(graph: Any, differentiable: set[str], found: dict[str, list[str]]) -> None:
    """Add the overrides of ``graph`` (and of the loop bodies, branches and calls in it) to ``found``."""
    for op in graph.get_operations():
        for body, carries in _called_graphs(graph, op, differentiable):
            _find_overrides(body, carries, found)
        if op.type in ("StopGradient", "PreventGradient"):
            kind = "stop_gradient"
            if any(f"/{scope}/" in f"/{op.name}" for scope in _EXACT_STOP_GRADIENT_SCOPES):
                continue
        elif op.type == "IdentityN" and _has_custom_gradient(op):
            kind = "custom_gradient"
        elif op.type in _APPROXIMATE_GRADIENT_OPS:
            kind = "approximate_gradient"
        elif _narrowed_to(op):
            kind = "reduced_precision"
        elif op.type == "Cast" and op.inputs[0].dtype.is_floating and op.outputs[0].dtype.is_integer:
            kind = "discretized"
        else:
            continue
        if any(_depends_on(t, differentiable) for t in op.inputs):
            found[kind].append(_narrowing_site(op) if kind == "reduced_precision" else _op_name(op))
    found["discretized"] = list(dict.fromkeys(found["discretized"]))


def _layer_named(site: str, model: keras.Model) -> str:
    """``site`` with the layer's own name: a graph's name scope may carry a suffix ("dropout_1" for "dropout").

    ``site`` is an op name ("dropout_1/Cast") or a described site ("layer dropout_1 (…)").
    """
    prefix, rest = ("layer ", site[6:]) if site.startswith("layer ") else ("", site)
    scope, sep, tail = rest.partition(" " if prefix else "/")
    names = {layer.name for layer in model._flatten_layers()}
    base = re.sub(r"_\d+$", "", scope)
    if scope not in names and base in names:
        return f"{prefix}{base}{sep}{tail}"
    return site


def _op_name(op: tf.Operation) -> str:
    return op.name.removeprefix(f"{_CALL_SCOPE}/")


def _narrowed_to(op: tf.Operation) -> str | None:
    """The float type ``op`` returns when it is narrower than its widest float input (float64 in, float32 out)."""
    widths = [t.dtype.size for t in op.inputs if t.dtype.is_floating]
    narrow = [t.dtype.name for t in op.outputs if widths and t.dtype.is_floating and t.dtype.size < max(widths)]
    return narrow[0] if narrow else None


def _narrowing_site(op: tf.Operation) -> str:
    """Where precision is lost, in the user's words: the layer whose inputs Keras casts down, else the op."""
    narrow = _narrowed_to(op)
    if op.type == "Cast":  # Keras casts a layer's inputs to the layer's dtype outside its name scope
        layers = {_op_name(c).split("/")[0] for c in op.outputs[0].consumers()}
        if len(layers) == 1:
            return f"layer {layers.pop()} (its inputs cast to {narrow})"
    return f"{_op_name(op)} (returns {narrow})"


def _called_graphs(graph: Any, op: tf.Operation, differentiable: set[str]) -> list[tuple[Any, set[str]]]:
    """Function graphs ``op`` runs (while bodies, if branches, calls), each with its inputs that carry a derivative.

    A loop variable carries one when its initial value does, or when the body computes it from one
    that does: a recurrent state starts at zeros and depends on x from the second step on.
    """
    attrs = _FUNCTION_ATTRS.get(op.type)
    if attrs is None:
        return []
    outer = list(op.inputs)[1:] if "If" in op.type else list(op.inputs)  # an If's first input is its condition
    outer_live = [_depends_on(t, differentiable) for t in outer]  # shared by an If's two branches
    out = []
    for attr in attrs:
        function = graph._get_function(op.get_attr(attr).name)
        body = getattr(function, "graph", None)
        if body is None or len(body.inputs) < len(outer):
            continue
        live = outer_live
        while "While" in op.type:  # to a fixed point: each pass can only turn more loop variables on
            carries = {t.name for t, on in zip(body.inputs, live) if on}
            more = [on or _depends_on(t, carries) for on, t in zip(live, body.outputs)]
            if more == live:
                break
            live = more
        out.append((body, {t.name for t, on in zip(body.inputs, live) if on}))
    return out


def _depends_on(tensor: tf.Tensor, sources: set[str]) -> bool:
    """Whether ``tensor`` is computed from ``sources`` along floating-point tensors (or tensor lists).

    Integer tensors carry no derivative, so a stop_gradient on, say, a cast of a
    string length changes nothing and is not reported; neither do ``ones_like`` and
    ``zeros_like``, whose values depend on a shape only. Tensor lists (``variant``) do:
    they carry a recurrent layer's input sequence into its loop.
    """
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if not (t.dtype.is_floating or t.dtype == tf.variant) or t.name in seen:
            continue
        if t.name in sources:
            return True
        seen.add(t.name)
        if t.op.type not in _SHAPE_ONLY_OPS:
            stack.extend(t.op.inputs)
    return False


# Ops whose value depends on their input's shape, not its values: nothing flows back through them.
_SHAPE_ONLY_OPS = frozenset({"OnesLike", "ZerosLike"})


def _has_custom_gradient(op: tf.Operation) -> bool:
    try:
        return bool(op.get_attr("_gradient_op_type"))
    except ValueError:  # no such attribute: an ordinary IdentityN
        return False


def warn_gradient_overrides(
    fn: ModelFunction, x: np.ndarray | tf.Tensor, *, training: bool, func: str, stacklevel: int = 3
) -> None:
    """Warn once per model, set of layers and mode when hypergradients follow an overridden gradient (DESIGN §4).

    ``stop_gradient`` inside the model makes training's gradient a function of weights
    and inputs that autodiff does not differentiate through, at any order: H·v, the
    validation gradient and input gradients then miss those terms, and the results can
    differ from retraining by tens of percent. A custom gradient is exact only when its
    gradient function is the derivative of its value and is itself differentiable.
    """
    model = fn.model
    try:
        seen = _inspected.setdefault(model, set())
    except TypeError:  # an unhashable model: inspect every time
        seen = set()
    key = (layers_key(model), bool(training))
    if key in seen:
        return
    seen.add(key)
    found = overrides_at(fn, x, training=training)
    parts = []
    if found["stop_gradient"]:
        parts.append(
            f"stop_gradient at {_listed(found['stop_gradient'])}: derivatives through it are taken as zero, "
            "so removal effects and input gradients miss every term that passes through the stopped value"
        )
    if found["custom_gradient"]:
        parts.append(
            f"a custom gradient at {_listed(found['custom_gradient'])}: the results are exact only if its "
            "gradient function is the true derivative of its value and is itself differentiable (H·v "
            "differentiates it again)"
        )
    if found["approximate_gradient"]:
        parts.append(
            f"an approximate gradient at {_listed(found['approximate_gradient'])} (TensorFlow's gradient of an "
            "image transform, as in RandomTranslation, RandomZoom and RandomRotation, is not its exact "
            "transpose): input gradients through it are wrong, and so are removal effects when weights come "
            "before it; augment the data outside the model, or put the layer before every weight and leave "
            "input gradients aside"
        )
    if parts:
        warnings.warn(
            f"{func}: the model overrides autodiff with {'; and '.join(parts)}. Hypergradients then follow "
            "these gradients, not the derivative of retraining; verify them with influence.check_unrolled "
            "(float64 finite differences through retraining) before trusting them.",
            GradientOverrideWarning,
            stacklevel=stacklevel,
        )
    warn_reduced_precision(fn, x, training=training, func=func, stacklevel=stacklevel + 1)


def warn_reduced_precision(
    fn: ModelFunction, x: np.ndarray | tf.Tensor, *, training: bool, func: str, stacklevel: int = 3
) -> None:
    """Warn when the model computes part of its forward pass in a float narrower than its weights.

    Float64 checks call this on their float64 copy: a float32 model with a Resizing layer
    computes in float32 anyway, but its float64 copy does not become float64 there.
    """
    found = overrides_at(fn, x, training=training)
    if found["reduced_precision"]:
        warnings.warn(
            reduced_precision_note(found["reduced_precision"], fn, func), RuntimeWarning, stacklevel=stacklevel
        )


def integer_casts(fn: ModelFunction, x: np.ndarray | tf.Tensor, *, training: bool) -> list[str]:
    """Ops of the forward pass that cast floats computed from the weights or inputs to integers.

    Gradients through them are 0: an ``Embedding`` fed token ids as floats (a ``keras.Input``
    left at float32) gives an input gradient of 0 and finite differences that jump between ids.
    """
    return overrides_at(fn, x, training=training)["discretized"]


def discretized_note(casts: list[str]) -> str:
    """Why an input gradient through ``casts`` (from :func:`integer_casts`) is 0."""
    return (
        f"the model casts floats to integers at {_listed(casts)} (token ids given as floats to an Embedding?), "
        "so gradients through them are 0 and input_grad is 0 there. Declare the ids as integers "
        "(keras.Input(shape, dtype='int32')): input_grad is then None, as for token ids, and removal effects "
        "are unchanged"
    )


def reduced_precision_note(sites: list[str], fn: ModelFunction, func: str) -> str:
    """Why results through ``sites`` (found by :func:`gradient_overrides`) are less precise than the model's dtype."""
    dtype = fn.dtype.name
    shown = "; ".join(sites[:3]) + (f"; and {len(sites) - 3} more" if len(sites) > 3 else "")
    return (
        f"{func}: the {dtype} model computes in a narrower float type at: {shown}. Keras casts a layer's inputs "
        f"to the layer's own dtype (a layer left at float32 in a {dtype} model computes in float32), and "
        "TensorFlow's image resizing returns float32 whatever its input. Values and gradients through them are "
        f"only as precise as that type, so a {dtype} finite-difference check through them cannot meet 1e-6 "
        "(measured on a digits convolution + Resizing model: 2e-2 to 9e-2). Give every layer the model's dtype "
        "(influence.as_float64 does) and resize the data outside the model."
    )


def _listed(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
