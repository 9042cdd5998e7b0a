"""The README's table of bad inputs: every row is raised here, and the README must show it.

Run ``python tests/test_bad_input_table.py`` to print the Markdown table for README.md.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import mlp  # noqa: E402

import influence as inf  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
rng = np.random.default_rng(0)
X, Y = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
XV, YV = rng.normal(size=(4, 5)), rng.integers(0, 3, 4)
LOSS = "sparse_categorical_crossentropy"


def _model():
    return mlp(5, 3, out_activation="softmax")


def _traj():
    return inf.fit(_model(), X, Y, loss=LOSS, batch_size=4)


def _bn_model():
    return inf.as_float64(
        keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(4),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )


def _two_input_model():
    a, b = keras.Input((3,), dtype="float64"), keras.Input((2,), dtype="float64")
    joined = keras.layers.Concatenate()([a, b])
    return keras.Model([a, b], keras.layers.Dense(3, activation="softmax", dtype="float64")(joined))


# (what the user did, call, exception type, the message's distinctive part)
CASES = [
    (
        "NaN in x_train",
        lambda: inf.fit(_model(), np.full((8, 5), np.nan), Y, loss=LOSS),
        ValueError,
        "The 'x_train' parameter of fit must be finite (no NaN or Inf). Got 40 non-finite value(s) instead.",
    ),
    (
        "empty training data",
        lambda: inf.fit(_model(), np.zeros((0, 5)), Y[:0], loss=LOSS),
        ValueError,
        "The 'x_train' parameter of fit must be a non-empty array.",
    ),
    (
        "strings as inputs",
        lambda: inf.fit(_model(), np.array([["a"] * 5] * 8), Y, loss=LOSS),
        TypeError,
        "The 'x_train' parameter of fit must be a numeric array.",
    ),
    (
        "x and y of different lengths",
        lambda: inf.fit(_model(), X, Y[:5], loss=LOSS),
        ValueError,
        "The 'y_train' parameter of fit must be as long as 'x_train' (8 samples). Got 5 samples instead.",
    ),
    (
        "wrong feature count",
        lambda: inf.fit(_model(), np.zeros((8, 7)), Y, loss=LOSS),
        ValueError,
        "The 'x_train' parameter of fit must be samples of shape (5,) (the model's input shape). Got samples of shape (7,) instead.",
    ),
    (
        "label out of range",
        lambda: inf.fit(_model(), X, Y + 3, loss=LOSS),
        ValueError,
        "The 'y_train' parameter of fit must be class labels in [0, 2] (the model has 3 outputs).",
    ),
    (
        "class indices with an MSE loss",
        lambda: inf.fit(_model(), X, Y, loss="mse"),
        ValueError,
        "The 'y_train' parameter of fit must be targets of shape (3,) per sample for loss 'mse' (class indices need "
        "loss='sparse_categorical_crossentropy'). Got targets of shape () instead.",
    ),
    (
        "unknown loss",
        lambda: inf.fit(_model(), X, Y, loss="hinge"),
        ValueError,
        "The 'loss' parameter of fit must be one of 'mse', 'mean_squared_error', 'mae', 'mean_absolute_error'",
    ),
    (
        "Keras optimizer instead of a pure one",
        lambda: inf.fit(_model(), X, Y, loss=LOSS, optimizer=keras.optimizers.Adam()),
        ValueError,
        "The 'optimizer' parameter of fit must be an influence.optimizers optimizer (SGD, RMSprop, Adam)",
    ),
    (
        "negative batch size",
        lambda: inf.fit(_model(), X, Y, loss=LOSS, batch_size=-3),
        ValueError,
        "The 'batch_size' parameter of fit must be a positive int. Got -3 instead.",
    ),
    (
        "BatchNorm in training mode",
        lambda: inf.fit(_bn_model(), X, Y, loss=LOSS),
        ValueError,
        "The 'model' parameter of fit must be a model whose samples do not interact in training mode",
    ),
    (
        "float64 weights behind a float32 Input",
        lambda: inf.fit(keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, dtype="float64")]), X, Y, loss=LOSS),
        ValueError,
        "The 'model' parameter of fit must be a model whose inputs are as precise as its float64 weights.",
    ),
    (
        "not a Keras model",
        lambda: inf.one_step("model.keras", LOSS, X, Y, XV, YV),
        TypeError,
        "The 'model' parameter of one_step must be a keras.Model. Got 'model.keras' instead.",
    ),
    (
        "unknown one_step method",
        lambda: inf.one_step(_model(), LOSS, X, Y, XV, YV, method="exact"),
        ValueError,
        "The 'method' parameter of one_step must be one of 'hvp', 'jacobian'. Got 'exact' instead.",
    ),
    (
        "label gradient with class labels",
        lambda: inf.one_step(_model(), LOSS, X, Y, XV, YV, wrt="labels"),
        ValueError,
        "The 'wrt' parameter of one_step must be 'inputs' or 'sample_weights' for integer class labels.",
    ),
    (
        "validation features differ from training",
        lambda: inf.one_step(_model(), LOSS, X, Y, XV[:, :3], YV),
        ValueError,
        "The 'x_val' parameter of one_step must be samples of shape (5,) (the shape of x_train's samples).",
    ),
    (
        "data that is not the trajectory's",
        lambda: inf.unrolled(_traj(), X[:5], Y[:5], XV, YV),
        ValueError,
        "The 'x_train' parameter of unrolled must be the data the trajectory was recorded on (8 samples of shape (5,)).",
    ),
    (
        "shuffled or relabelled training data",
        lambda: inf.unrolled(_traj(), X[::-1], Y[::-1], XV, YV),
        ValueError,
        "The 'x_train' parameter of unrolled must be the data the trajectory was recorded on, in its order.",
    ),
    (
        "logits model with a probability loss",
        lambda: inf.fit(mlp(5, 3), X, Y, loss=LOSS),
        ValueError,
        "The 'loss' parameter of fit must be a loss with from_logits=True for a model whose outputs are not "
        "probabilities",
    ),
    (
        "one-hot labels with a sparse loss",
        lambda: inf.fit(_model(), X, np.eye(3)[Y], loss=LOSS),
        ValueError,
        "The 'y_train' parameter of fit must be class indices, one per sample, for a sparse (integer-label) loss.",
    ),
    (
        "two-input model",
        lambda: inf.fit(_two_input_model(), X, Y, loss=LOSS),
        ValueError,
        "The 'model' parameter of fit must be a model with one input and one output. Got a model with 2 inputs;",
    ),
    (
        "unknown memory strategy",
        lambda: inf.unrolled(_traj(), X, Y, XV, YV, strategy="fast"),
        ValueError,
        "The 'strategy' parameter of unrolled must be 'auto', 'store_all', 'checkpointed', 'replay' or a MemoryStrategy.",
    ),
    (
        "unknown ranking method",
        lambda: inf.rank(_traj(), X, Y, XV, YV, method="shapley"),
        ValueError,
        "The 'method' parameter of rank must be one of 'unrolled', 'influence_function', 'tracin', 'self_influence', 'margin', 'loss'.",
    ),
    (
        "ranking without validation data",
        lambda: inf.rank(_traj(), X, Y),
        ValueError,
        "The 'x_val' parameter of rank must be validation data for method 'unrolled'. Got None instead.",
    ),
    (
        "too little damping for the exact solver",
        lambda: inf.rank(_traj(), X, Y, XV, YV, method="influence_function", solver="exact", damping=0.0),
        ValueError,
        "The 'damping' parameter of rank must be above",
    ),
    (
        "gradient of the wrong shape",
        lambda: inf.check_gradient(lambda z: float(z.sum()), np.zeros(3), np.zeros(4)),
        ValueError,
        "The 'grad' parameter of check_gradient must be the shape of x (3,). Got shape (4,) instead.",
    ),
    (
        "labels optimised on a class-index run",
        lambda: inf.optimize_training_inputs(_traj(), X, Y, XV, YV, [0], target="labels"),
        ValueError,
        "The 'target' parameter of optimize_training_inputs must be 'inputs' for a run on class-index labels",
    ),
    (
        "standardized inputs in the default [0, 1] box",
        lambda: inf.optimize_training_inputs(_traj(), X, Y, XV, YV, [0]),
        ValueError,
        "The 'bounds' parameter of optimize_training_inputs must be a (low, high) box that holds the starting inputs",
    ),
    (
        "missing saved trajectory",
        lambda: inf.load_trajectory("/nonexistent/run"),
        FileNotFoundError,
        "The 'path' parameter of load_trajectory must be a folder written by save_trajectory.",
    ),
]


def _message(call, error):
    with pytest.raises(error) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("what, call, error, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_the_documented_message(what, call, error, expected):
    message = _message(call, error)
    assert expected in message
    row = f"| {what} | `{error.__name__}` |"
    readme = README.read_text()
    assert row in readme, f"README.md lacks the row for: {what}"
    assert expected.replace("|", "\\|") in readme


def test_numerical_trouble_in_the_reverse_pass_names_the_step():
    # Covered in detail by tests/test_unroll.py; here only the README row.
    assert "| adjoint turns NaN/Inf in the reverse pass | `FloatingPointError` |" in README.read_text()


def table() -> str:
    lines = ["| bad input | error | what the user sees |", "|---|---|---|"]
    for what, call, error, expected in CASES:
        _message(call, error)  # make sure it still raises
        lines.append(f"| {what} | `{error.__name__}` | {expected.replace('|', chr(92) + '|')} |")
    lines.append(
        "| adjoint turns NaN/Inf in the reverse pass | `FloatingPointError` | unrolled: the adjoint became "
        "NaN/Inf at step 5 of the reverse pass (learning rate 0.3). Hint: … |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
