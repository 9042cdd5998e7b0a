"""The ``influence`` command: ``demo``, ``rank``, ``check`` and ``bench``.

Exit codes: 0 success, 1 a check or a benchmark failed (or training diverged),
2 a usage or input error, 3 an unexpected error (a bug, in influence or in the model's
own code: its traceback is printed), 130 interrupted (rerun the same command to resume).
Errors go to stderr as one line; warnings too (``influence rank: warning: …``). The data
formats are in ``DATA_FORMATS``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ._files import _image_shape, _usage, describe_model, load_data, load_model
from ._methods import METHODS, NEEDS_VALIDATION
from ._validation import describe

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adam")
LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mse",
    "mae",
    "huber",
    "log_cosh",
)
# --jit: fit's jit_compile ("auto": plain graphs for convolution layers without a GPU, else XLA).
JIT: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.1, "nesterov": 0.1, "rmsprop": 0.001, "adam": 0.001}
NOT_BENCHMARKS = {"screenshot"}  # helper scripts under benchmarks/ that `bench` runs only by name
DATA_FORMATS = """data files:
  .npz (numpy.savez): x_train (n, ...) and y_train (n,) or (n, k); validation data as
       x_val / y_val in the same file or in --val; optional noisy (n,) bool marks
       known-mislabeled samples and enables the found@k plot.
  .csv: a header row, numeric columns, one sample per row; the label is the last
       column unless --label-column NAME names another; validation data in --val
       (same columns).
  Integer inputs are cast to float32; integral float labels are cast to int for
  sparse_categorical_crossentropy (regression targets stay floats). Inputs of
  shape (n, H, W) or (n, H, W, C), or --image-shape, give an image grid in the report."""
CHECK_DATA_FORMATS = """data files:
  .npz (numpy.savez): x_train (n, ...) and y_train (n,) or (n, k); other arrays are ignored.
  .csv: a header row, numeric columns, one sample per row; the label is the last
       column unless --label-column NAME names another.
  Integer inputs are cast to float32; integral float labels are cast to int for
  sparse_categorical_crossentropy."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _learning_rate(args: argparse.Namespace) -> float:
    """--lr (or the optimizer's default), with --epsilon and --momentum checked: usage errors before TensorFlow
    is imported."""
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    if not lr > 0 or not np.isfinite(lr):
        raise _usage("lr", "rank", "a finite positive number", lr)
    if args.epsilon is not None and args.optimizer not in ("rmsprop", "adam"):
        raise _usage(
            "epsilon", "rank", "given only with --optimizer rmsprop or adam", f"{args.epsilon} with {args.optimizer}"
        )
    if args.epsilon is not None and not args.epsilon > 0:
        raise _usage("epsilon", "rank", "a positive number", args.epsilon)
    if args.momentum is not None and args.optimizer not in ("momentum", "nesterov", "rmsprop"):
        # It was ignored there without a word (adam's momentum is its beta_1, not a flag here).
        raise _usage(
            "momentum",
            "rank",
            "given only with --optimizer momentum, nesterov or rmsprop",
            f"{args.momentum} with {args.optimizer}",
        )
    if args.momentum is not None and not 0 <= args.momentum < 1:
        raise _usage("momentum", "rank", "a number in [0, 1)", args.momentum)
    if not args.weight_decay >= 0 or not np.isfinite(args.weight_decay):
        raise _usage("weight-decay", "rank", "a finite number ≥ 0", args.weight_decay)
    return lr


def _optimizer(args: argparse.Namespace, lr: float) -> Any:
    """The update rule of --optimizer at learning rate ``lr`` (from :func:`_learning_rate`)."""
    from . import optimizers

    decay = {"weight_decay": args.weight_decay} if args.weight_decay else {}
    if args.optimizer == "sgd":
        return optimizers.SGD(lr, **decay)
    if args.optimizer in ("momentum", "nesterov"):
        momentum = 0.9 if args.momentum is None else args.momentum
        return optimizers.SGD(lr, momentum=momentum, nesterov=args.optimizer == "nesterov", **decay)
    options = decay | ({} if args.epsilon is None else {"epsilon": args.epsilon})
    if args.optimizer == "rmsprop":
        return optimizers.RMSprop(lr, momentum=args.momentum or 0.0, **options)
    return optimizers.Adam(lr, **options)


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise _usage("method", "rank", f"one or more (comma-separated) of {', '.join(METHODS)}", repr(text))
    return tuple(dict.fromkeys(methods))


def _validation_data(data: dict[str, np.ndarray], methods: Sequence[str], verify: int, learn_weights: int) -> bool:
    """Whether validation data was given; a usage error when a method, --verify or --learn-weights needs it."""
    given = [key for key in ("x_val", "y_val") if key in data]
    if len(given) == 1:
        raise _usage("val", "rank", "a file with both x_val and y_val (or both in --data)", f"only {given[0]}")
    if given:
        return True
    needing = [m for m in methods if m in NEEDS_VALIDATION]
    if needing:
        free = ", ".join(m for m in METHODS if m not in NEEDS_VALIDATION)
        raise _usage(
            "val",
            "rank",
            f"a file with x_val and y_val (or those arrays in --data) for method {', '.join(needing)} "
            f"(methods {free} need none)",
            "no validation data",
        )
    options = (
        ("verify", verify, "verification compares validation losses"),
        ("learn-weights", learn_weights, "the weights descend the validation loss"),
    )
    for flag, value, why in options:
        if value:
            raise _usage(flag, "rank", f"0 without validation data ({why}; give --val or x_val/y_val in --data)", value)
    return False


def cmd_rank(args: argparse.Namespace) -> int:
    # Every argument is checked before the model loads and TensorFlow is imported (seconds, and log
    # lines): a usage error is answered at once, on one line.
    methods = _methods(args.method)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise _usage(name.replace("_", "-"), "rank", "a positive int", getattr(args, name))
    for name in ("verify", "learn_weights", "seed"):
        if getattr(args, name) < 0:
            raise _usage(name.replace("_", "-"), "rank", "a non-negative int", getattr(args, name))
    holdout = args.learn_weights_holdout
    if holdout and (not 0 < holdout < 1 or not args.learn_weights):
        raise _usage(
            "learn-weights-holdout", "rank", "0, or a fraction in (0, 1) together with --learn-weights", holdout
        )
    if not args.input_gradient_penalty >= 0 or not np.isfinite(args.input_gradient_penalty):
        raise _usage("input-gradient-penalty", "rank", "a finite number ≥ 0", args.input_gradient_penalty)
    penalty = args.learn_weights_penalty
    if penalty is not None and (not penalty >= 0 or not np.isfinite(penalty) or not args.learn_weights):
        raise _usage("learn-weights-penalty", "rank", "a finite number ≥ 0 together with --learn-weights", penalty)
    shape = _image_shape(args.image_shape, "rank")
    lr = _learning_rate(args)
    _check_out(args.out, "rank")
    data = load_data(args, "rank", need_val=False)
    has_val = _validation_data(data, methods, args.verify, args.learn_weights)
    x = data["x_train"]
    images = None
    if shape is not None:
        if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
            raise _usage(
                "image-shape", "rank", f"a shape with {int(np.prod(x.shape[1:]))} values", repr(args.image_shape)
            )
        images = x.reshape(len(x), *shape)
    elif x.ndim in (3, 4):
        images = x
    noisy = data.get("noisy")
    if noisy is not None and (noisy.shape != (len(x),) or noisy.dtype != np.bool_):
        # An int array passed as truthiness: np.arange(n) marked every sample but one as noisy.
        raise _usage("data", "rank", f"a boolean 'noisy' array of shape ({len(x)},)", describe(noisy))
    model = load_model(args.model, "rank", safe_mode=not args.no_safe_mode)
    from .report.job import RankingJob, run_ranking

    optimizer = _optimizer(args, lr)
    job = RankingJob(
        out_dir=Path(args.out),
        model=model,
        x_train=x,
        y_train=data["y_train"],
        x_val=data.get("x_val"),
        y_val=data.get("y_val"),
        optimizer=optimizer,
        loss=args.loss,
        from_logits=args.from_logits,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        input_gradient_penalty=args.input_gradient_penalty,
        training=not args.inference_mode,
        jit_compile=JIT[args.jit],
        methods=methods,
        verify_top=args.verify,
        verify_random=args.verify,
        learn_weights_steps=args.learn_weights,
        learn_weights_holdout=args.learn_weights_holdout,
        learn_weights_penalty=args.learn_weights_penalty,
        summary={
            "data": f"{args.data}{' + ' + args.val if args.val else ''}: {len(x)} train / "
            + (f"{len(data['x_val'])} validation" if has_val else "no validation")
            + f" samples of shape {tuple(x.shape[1:])}",
            "model": f"{args.model} ({describe_model(model)})",
            "training": f"influence.fit: {args.optimizer} {optimizer!r}, batch {args.batch_size}, "
            f"{args.epochs} epoch(s), seed {args.seed}, loss {args.loss}{' (logits)' if args.from_logits else ''}"
            + (f" + {args.input_gradient_penalty:g}·‖∂loss/∂x‖²" if args.input_gradient_penalty else "")
            + (", layers in inference mode" if args.inference_mode else "")
            + f", {_steps_text(model, args.jit)}",
        },
        images=images,
        features=None if images is not None else x,
        feature_names=[str(c) for c in data["columns"]] if "columns" in data else None,
        noise_mask=None if noisy is None else noisy.astype(bool),
        progress=not args.no_progress,
        restart=args.restart,
    )
    outcome = run_ranking(job)
    print(f"{outcome.report}")
    return EXIT_OK


def _steps_text(model: Any, jit: str) -> str:
    """How fit will run the steps, for the report's summary (XLA may still refuse a model's op)."""
    from .trajectory import resolve_jit_compile

    chosen = "XLA-compiled steps" if resolve_jit_compile(model, JIT[jit], func="influence rank") else "plain graphs"
    return f"{chosen} (--jit {jit})"


def cmd_check(args: argparse.Namespace) -> int:
    for name in ("samples", "directions"):
        if getattr(args, name) < 1:
            raise _usage(name, "check", "a positive int", getattr(args, name))
    if args.seed < 0:
        raise _usage("seed", "check", "a non-negative int", args.seed)
    if not args.jitter >= 0 or not np.isfinite(args.jitter):
        raise _usage("jitter", "check", "a finite number ≥ 0", args.jitter)
    data = load_data(args, "check", need_val=False)
    model = load_model(args.model, "check", safe_mode=not args.no_safe_mode)
    from .checks import check_input_gradient

    x, y = data["x_train"][: args.samples], data["y_train"][: args.samples]
    chk = check_input_gradient(
        model,
        args.loss,
        x,
        y,
        training=args.training,
        seed=args.seed,
        directions=args.directions,
        from_logits=args.from_logits,
        jitter=args.jitter,  # off the kinks: blank pixels sit exactly at an untrained ReLU's 0
    )
    loss = f"{args.loss}{' (logits)' if args.from_logits else ''}"
    print(f"input gradient of the mean {loss} over {len(x)} sample(s), float64, {args.directions} direction(s)")
    print(chk)
    if chk.at_kink and not args.jitter:
        print("hint: rerun with --jitter 1e-2 to check at inputs moved off the kinks")
    return EXIT_OK if chk.ok else EXIT_FAILED


def benchmark_dir(given: str | None) -> Path:
    """Where benchmark scripts live: ``--dir``, else the repository's ``benchmarks/``, else ./benchmarks."""
    if given is not None:  # absolute: the scripts run from its parent folder
        return Path(given).resolve()
    beside = Path(__file__).resolve().parents[1] / "benchmarks"
    return beside if beside.is_dir() else Path.cwd() / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    folder = benchmark_dir(args.dir)
    if not folder.is_dir():
        raise _usage("dir", "bench", "a folder of benchmark scripts", f"{str(folder)!r} (no such folder)")
    scripts = {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}
    benchmarks = [name for name in scripts if name not in NOT_BENCHMARKS]
    if args.list:
        print("\n".join(benchmarks))
        return EXIT_OK
    unknown = [name for name in args.names if name not in scripts]
    if unknown:
        raise _usage("name", "bench", f"one of {', '.join(benchmarks)}", repr(unknown[0]))
    failed = []
    for name in args.names or benchmarks:
        command = [sys.executable, str(scripts[name])] + (["--quick"] if args.quick else [])
        command += ["--out-dir", os.path.abspath(args.out_dir)] if args.out_dir else []
        print(f"[bench] {' '.join(command)}", flush=True)
        if subprocess.run(command, cwd=folder.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"influence bench: error: failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _check_out(out: str, command: str) -> None:
    """The report folder: a folder or a new path, not an existing file (the OS error named its shards/ child)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise _usage("out", command, "a folder for the report (created if missing)", f"{out!r}, an existing file")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_out(args.out, "demo")
    outcome = run_demo(args.out, quick=args.quick, restart=args.restart, progress=not args.no_progress)
    print(f"{outcome.report}")
    return EXIT_OK


# --- the parser --------------------------------------------------------------------------------------------


def _training_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (influence.fit; the model file gives the initial weights)")
    group.add_argument("--epochs", type=int, default=1, help="passes over the training data (default 1)")
    group.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="update rule (default sgd)")
    group.add_argument(
        "--lr", type=float, default=None, help="learning rate (default 0.1 for sgd/momentum, 0.001 for rmsprop/adam)"
    )
    group.add_argument(
        "--momentum",
        type=float,
        default=None,
        help="momentum for --optimizer momentum/nesterov (default 0.9) or rmsprop (default 0)",
    )
    group.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="epsilon of rmsprop/adam (default 1e-7, as Keras); 1e-5 gives more faithful rankings under adam",
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        metavar="LAMBDA",
        help="decoupled weight decay w ← w − lr·LAMBDA·w per step (default 0); for plain sgd it equals an L2 "
        "term LAMBDA/2·‖w‖², which fit refuses as a layer regularizer",
    )
    group.add_argument(
        "--inference-mode",
        action="store_true",
        help="train with layers in inference mode (influence.fit(training=False)): dropout off, "
        "BatchNormalization on its moving statistics, as models with BatchNormalization need",
    )
    group.add_argument(
        "--jit",
        choices=tuple(JIT),
        default="auto",
        help="XLA-compile the training and reverse steps (on) or run them as plain TensorFlow graphs (off); "
        "auto (default): off for models with convolution layers when no GPU is visible (XLA trained a small "
        "CNN 4.5-25x slower on 2 CPU cores), on otherwise (dense models' loops ran 1.6-6x faster)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the batch order and dropout masks (default 0)")
    group.add_argument(
        "--input-gradient-penalty",
        type=float,
        default=0.0,
        metavar="RHO",
        help="train on loss + RHO·‖∂loss/∂x‖² per sample (double backpropagation; default 0: the loss alone)",
    )


def _loss_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", choices=LOSSES, default=LOSSES[0], help=f"per-sample loss (default {LOSSES[0]})")
    parser.add_argument("--from-logits", action="store_true", help="the model outputs logits, not probabilities")


def _data_flags(parser: argparse.ArgumentParser, *, val: bool) -> None:
    parser.add_argument("--model", required=True, help="Keras model file (.keras)")
    parser.add_argument("--data", required=True, help="training data: .npz (x_train, y_train) or .csv")
    if val:
        parser.add_argument(
            "--val",
            help="validation data: .npz (x_val, y_val) or .csv; default: x_val/y_val in --data "
            "(needed by unrolled, influence_function, tracin and --verify)",
        )
    parser.add_argument("--label-column", help="CSV column holding the label (default: the last column)")
    parser.add_argument(
        "--no-safe-mode",
        action="store_true",
        help="let Keras run the Python code in the model file (Lambda layers; keras safe_mode=False): "
        "only for files you trust",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``influence`` argument parser."""
    parser = _Parser(
        prog="influence",
        description="Data debugging by hypergradients through recorded Keras training runs.",
        epilog="Exit codes: 0 ok, 1 check/benchmark failed, 2 usage or input error, 3 unexpected error (a traceback), "
        "130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter
    from . import demo as demo_module

    demo = commands.add_parser(
        "demo",
        help="find flipped labels in embedded digits and write reports/demo/index.html",
        description=_plain_text((demo_module.__doc__ or "").split("\n\n", 1)[-1]),
        formatter_class=fmt,
    )
    demo.add_argument("--out", default=demo_module.DEFAULT_OUT, help="report folder (default reports/demo)")
    demo.add_argument("--quick", action="store_true", help="a small smoke run (300 samples, 2 epochs)")
    demo.add_argument("--restart", action="store_true", help="discard saved shards instead of resuming")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=cmd_demo)

    rank = commands.add_parser(
        "rank",
        help="rank your training samples, most harmful first, and write an HTML report",
        description="Train the model in --model on --data with influence.fit (recording the run), rank the "
        "training samples by --method, optionally verify by retraining, and write DIR/index.html, "
        "DIR/scores.csv and DIR/scores.parquet. Validation data is needed by unrolled, influence_function, "
        "tracin and --verify, not by loss, margin or self_influence. Rerunning the same command resumes from "
        "DIR/shards; each run replaces the report files of the previous one (other files in DIR are kept).",
        epilog=DATA_FORMATS,
        formatter_class=fmt,
    )
    _data_flags(rank, val=True)
    rank.add_argument(
        "--method",
        default="unrolled",
        help=f"comma-separated, first one reported: {', '.join(METHODS)} (default unrolled)",
    )
    rank.add_argument(
        "--out", default=os.path.join("reports", "rank"), metavar="DIR", help="report folder (default reports/rank)"
    )
    rank.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="K",
        help="retrain without each of the K most harmful and K random samples (default 0)",
    )
    rank.add_argument(
        "--learn-weights",
        type=int,
        default=0,
        metavar="STEPS",
        help="learn all sample weights in [0, 1] through training (influence.learn_sample_weights, Adam 0.1) "
        "for STEPS outer steps and show them in the report (default 0: off)",
    )
    rank.add_argument(
        "--learn-weights-holdout",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="with --learn-weights: keep FRACTION of the validation samples out of the learning, show the "
        "weights of the step with the lowest loss on them and stop after 5 steps without improvement "
        "(default 0: learn on all, show the last step)",
    )
    rank.add_argument(
        "--learn-weights-penalty",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="with --learn-weights: pull the weights towards 1 with LAMBDA/2 · mean (c - 1)^2 "
        "(default: that of influence.learn_sample_weights; 0: off)",
    )
    rank.add_argument("--image-shape", help="reshape flat inputs to HxW or HxWxC for the image grid, e.g. 28x28")
    rank.add_argument("--restart", action="store_true", help="discard saved shards instead of resuming")
    rank.add_argument("--no-progress", action="store_true", help="no progress bars")
    _loss_flags(rank)
    _training_flags(rank)
    rank.set_defaults(handler=cmd_rank)

    check = commands.add_parser(
        "check",
        help="float64 finite-difference check of the model's input gradient",
        description="Rebuild the model in float64 and compare the tape gradient of the mean loss w.r.t. the "
        "inputs with central differences (Richardson extrapolation) along random directions. "
        "Exit 0 if it passes, 1 if not.",
        epilog=CHECK_DATA_FORMATS,
        formatter_class=fmt,
    )
    _data_flags(check, val=False)
    _loss_flags(check)
    check.add_argument("--samples", type=int, default=32, help="first N training samples to check (default 32)")
    check.add_argument("--directions", type=int, default=4, help="random unit directions (default 4)")
    check.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        metavar="SCALE",
        help="check at x + SCALE·z, z standard normal (seeded): moves inputs off ReLU kinks and max-pool ties",
    )
    check.add_argument("--training", action="store_true", help="training mode (dropout on, masks fixed by --seed)")
    check.add_argument("--seed", type=int, default=0, help="seed of the directions and dropout masks")
    check.set_defaults(handler=cmd_check)

    bench = commands.add_parser(
        "bench",
        help="run the benchmark scripts under benchmarks/",
        description="Run benchmark scripts (each in its own Python process); exit 1 if any fails. Without "
        "--quick or --out-dir they write the repository's committed reports (reports/benchmarks/); a full run takes "
        "minutes to an hour and, for one_step's Jacobian reference, up to ~12 GB of memory.",
    )
    bench.add_argument("names", nargs="*", metavar="NAME", help="scripts to run, without .py (default: all)")
    bench.add_argument("--quick", action="store_true", help="pass --quick (smoke-test sizes)")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--dir", help="folder of the scripts (default: the repository's benchmarks/)")
    bench.add_argument(
        "--out-dir", help="pass --out-dir: write the reports there (default: reports/benchmarks/, the committed ones)"
    )
    bench.set_defaults(handler=cmd_bench)
    return parser


def _plain_text(docstring: str) -> str:
    """A docstring for the terminal: Sphinx roles and double backticks dropped (``:func:`x``` → x)."""
    return re.sub(r"``([^`]+)``", r"\1", re.sub(r":\w+:`~?([^`]+)`", r"\1", docstring))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # name the subcommand and its --help, not the top-level parser's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    prefix = f"influence {args.command}"
    try:  # everything after parsing, imports included: a Ctrl-C at any time is answered in one line
        with warnings.catch_warnings():  # restores the default display for callers of main (tests)
            warnings.showwarning = partial(_show_warning, prefix)
            _quiet_tensorflow()
            return int(args.handler(args))
    except KeyboardInterrupt as exc:
        return _interrupted(prefix, exc)
    except Exception as exc:
        from .runs import RunInterrupted

        if isinstance(exc, RunInterrupted):
            return _interrupted(prefix, exc)
        code = _exit_code(exc)
        if code == EXIT_INTERNAL:  # not an error of the input: a bug (ours or the model's code), traceback kept
            traceback.print_exc()
            line = f"{prefix}: unexpected error: {_keras_message(str(exc))} ({type(exc).__name__}; traceback above)"
            print(line, file=sys.stderr)
        else:
            print(f"{prefix}: error: {_one_line(exc)}{_flags_for(exc, args.command)}", file=sys.stderr)
        return code


def _show_warning(prefix: str, message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """A warning as one line in the command's style, its category named unless a plain UserWarning:
    "influence rank: warning: … (GradientOverrideWarning)" instead of Python's file:line and source line."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    print(f"{prefix}: warning: {' '.join(str(message).split())}{kind}", file=sys.stderr)


def _interrupted(prefix: str, exc: BaseException) -> int:
    reason = f" ({exc})" if str(exc) else ""
    print(f"{prefix}: interrupted{reason}; rerun the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED


def _exit_code(exc: Exception) -> int:
    """The exit code of an error: failed runs 1, bad input 2 (TensorFlow's op errors too: they come from the
    data or the model file, e.g. a token id outside an Embedding's vocabulary), anything else a bug."""
    if isinstance(exc, (FloatingPointError, RuntimeError)):
        return EXIT_FAILED
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return EXIT_USAGE
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        if isinstance(exc, tf.errors.OpError):
            return EXIT_USAGE
    return EXIT_INTERNAL


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's Python-side warnings (e.g. retracing notices) out of the command's output."""
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)


# Library errors name the Python API's remedies; the command's flags for them, per command that has them.
_FLAG_FOR = (
    ("training=False", "--inference-mode", ("rank",)),
    ("safe_mode=False", "--no-safe-mode", ("rank", "check")),
    ("learn_weights_holdout", "--learn-weights-holdout", ("rank",)),
    ("weight_decay", "--weight-decay, with the regularizers removed from the model file,", ("rank",)),
)


def _flags_for(exc: BaseException, command: str) -> str:
    """Flags for the remedies an error names: " (on the command line: --inference-mode for training=False)"."""
    text = str(exc)
    named = [f"{flag} for {api}" for api, flag, commands in _FLAG_FOR if api in text and command in commands]
    return f" (on the command line: {'; '.join(named)})" if named else ""


def _one_line(exc: BaseException) -> str:
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        if isinstance(exc, tf.errors.OpError):
            return _keras_message(exc.message) or type(exc).__name__
    return " ".join(str(exc).split()) or type(exc).__name__


def _keras_message(text: str) -> str:
    """An error message from inside a Keras layer, on one line without its colour codes, TensorFlow's
    ``{{function_node …}}`` tags and Keras's argument dump: "Embedding.call(): indices[3,2] = 25 is not in
    [0, 10) [Op:GatherV2]"."""
    text = re.sub(r"\x1b\[[0-9;]*m|\{\{[^}]*\}\}", "", text).split("Arguments received by")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    layer = re.fullmatch(r"Exception encountered when calling (.+?)\.?", lines[0]) if lines else None
    if layer and len(lines) > 1:
        return f"{layer.group(1)}: {' '.join(lines[1:])}"
    return " ".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
