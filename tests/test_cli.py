"""The ``influence`` command: subprocess runs (exit codes, files, resume after an interruption) and
in-process runs of ``main`` for help, errors, CSV data, ``check`` and ``bench``.

Subprocesses pay TensorFlow's import (~10 s here), so the independent ones start together.
"""

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from influence import cli, runs
from influence._files import UsageError
from influence.checks import GradientCheck
from influence.demo import noisy_digits
from influence.optimizers import SGD, Adam, RMSprop

PNG = b"\x89PNG\r\n\x1a\n"
RANK_FLAGS = [
    "--method",
    "unrolled",
    "--epochs",
    "2",
    "--batch-size",
    "10",
    "--lr",
    "0.5",
    "--verify",
    "2",
    "--image-shape",
    "4x4",
    "--no-progress",
]


def influence_command() -> list[str]:
    script = Path(sys.executable).with_name("influence")
    return [str(script)] if script.exists() else [sys.executable, "-m", "influence.cli"]


def start(args, cwd, **env):
    # one TensorFlow thread each: the subprocesses run beside each other and beside this process
    environment = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        **env,
    }
    return subprocess.Popen(
        influence_command() + [str(a) for a in args],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def error_lines(err: str) -> list[str]:
    """stderr lines that are not TensorFlow's start-up chatter or progress bars."""
    noise = ("WARNING: All log messages", "I0000", "E0000", "W0000", "To enable the following")
    return [line for line in err.splitlines() if line.strip() and not line.startswith(noise)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny image-like data (60 train / 30 val samples of 4x4, 3 classes, 6 labels flipped) and a model file."""
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16))
    y = rng.integers(0, 3, 90)
    x = (centers[y] + 0.5 * rng.normal(size=(90, 16))).astype(np.float32)
    noisy = np.zeros(60, bool)
    noisy[:6] = True
    y_train = y[:60].copy()
    y_train[:6] = (y_train[:6] + 1) % 3
    np.savez(folder / "data.npz", x_train=x[:60], y_train=y_train, x_val=x[60:], y_val=y[60:], noisy=noisy)
    np.savez(folder / "val.npz", x_val=x[60:], y_val=y[60:])
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    model.save(folder / "model.keras")
    columns = [f"f{j}" for j in range(16)]
    pd.DataFrame(x[:60], columns=columns).assign(label=y_train).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(x[60:], columns=columns).assign(label=y[60:]).to_csv(folder / "val.csv", index=False)
    return folder


def in_process(args):
    """``influence.cli.main`` in this process (TensorFlow already imported): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_runs(files):
    """The subprocesses start first and run while the uninterrupted reference runs in this process;
    the interrupted run is then resumed (here, from its shards on disk)."""
    rank = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", *RANK_FLAGS]
    interrupted = start(rank + ["--out", files / "resumed"], files, **{runs.STOP_AFTER_ENV: "2"})
    check = start(["check", "--model", files / "model.keras", "--data", files / "data.npz", "--samples", "8"], files)
    results = {"reference": in_process(rank + ["--out", files / "reference"])}
    results.update(interrupted=finish(interrupted), check=finish(check))
    results["shards after interruption"] = runs.ShardStore(files / "resumed" / "shards").entry_count
    results["resumed"] = in_process(rank + ["--out", files / "resumed"])
    (files / "resumed" / "shards" / "notes.txt").write_text("mine")
    results["restarted"] = in_process(rank + ["--out", files / "resumed", "--restart"])
    return results


def test_interrupted_run_exits_130_and_keeps_its_shards(cli_runs):
    code, _, err = cli_runs["interrupted"]
    assert code == cli.EXIT_INTERRUPTED, err
    assert error_lines(err)[-1] == (
        "influence rank: interrupted (stopped after 2 shard(s) (INFLUENCE_STOP_AFTER_SHARDS)); "
        "rerun the same command to resume"
    )
    assert cli_runs["shards after interruption"] == 2  # the training fingerprint and the unrolled ranking


def test_restart_recomputes_every_shard_and_keeps_files_it_did_not_write(cli_runs, files):
    """--restart removed the whole shards/ folder, a user's notes in it too."""
    code, _, err = cli_runs["restarted"]
    assert code == 0, err
    assert "resuming" not in err and "0 reused, 7 computed" in err
    assert (files / "resumed" / "shards" / "notes.txt").read_text() == "mine"


def test_resumed_run_equals_an_uninterrupted_run(cli_runs, files):
    assert cli_runs["reference"][0] == 0, cli_runs["reference"][2]
    code, out, err = cli_runs["resumed"]
    assert code == 0, err
    assert "resuming: 2 shard(s)" in err and "2 reused, 5 computed" in err  # baseline + 4 retrainings
    assert "[train] loaded the recorded run" in err  # not trained again
    for name in ("scores.csv", "scores.parquet", "verification.csv"):
        read = pd.read_parquet if name.endswith("parquet") else pd.read_csv
        pd.testing.assert_frame_equal(read(files / "resumed" / name), read(files / "reference" / name))
    assert out.strip().endswith("index.html")


def test_finished_run_is_not_retrained(cli_runs, files, tmp_path):
    shutil.copytree(files / "reference", tmp_path / "again")
    code, _, err = in_process(
        [
            "rank",
            "--model",
            files / "model.keras",
            "--data",
            files / "data.npz",
            *RANK_FLAGS,
            "--out",
            tmp_path / "again",
        ]
    )
    assert code == 0 and "[train] skipped: every result is on record" in err and "0 computed" in err


def test_corrupted_shard_is_recomputed_with_identical_results(cli_runs, files, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(files / "reference", out)
    shard = next((out / "shards").glob("removal-*.npz"))
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    (next((out / "shards").glob("trajectory-*")) / "arrays.npz").unlink()  # the saved run is damaged too
    args = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", *RANK_FLAGS, "--out", out]
    code, _, err = in_process(args)
    assert code == 0, err
    assert "corrupted (checksum mismatch)" in err and "1 computed, 1 corrupted" in err
    assert "could not load the saved run" in err and "[train] 2 epoch(s)" in err  # trained again, same weights
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "verification.csv"), pd.read_csv(files / "reference" / "verification.csv")
    )


def test_rank_writes_report_scores_and_images(cli_runs, files):
    assert cli_runs["reference"][0] == 0
    out = files / "reference"
    html = (out / "index.html").read_text()
    for section in ("summary", "harmful", "helpful", "distribution", "verification", "found-at-k", "per-class"):
        assert f'<section id="{section}">' in html
    sources = [s.split('"')[0] for s in html.split('<img src="')[1:]]
    assert len(sources) == 2 * 24 + 3  # two grids (60 samples ≥ 24) and three figures
    assert all((out / s).read_bytes()[:8] == PNG for s in sources)
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 60 and scores["rank"].tolist() == list(range(60))
    assert scores["noisy"].sum() == 6
    pd.testing.assert_frame_equal(scores, pd.read_csv(out / "scores.csv"), check_dtype=False)
    assert len(pd.read_csv(out / "verification.csv")) == 4


def test_rank_learns_sample_weights_for_the_report(cli_runs, files, tmp_path):
    out = tmp_path / "weights"
    shutil.copytree(files / "reference", out)  # the ranking and verification are on record: only weights run
    args = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", *RANK_FLAGS, "--out", out]
    code, _, err = in_process([*args, "--learn-weights", "2"])
    assert code == 0, err
    assert "[weights] learning all 60 sample weights, 2 outer steps, penalty 0.1" in err  # the library's default
    assert "[train] loaded the recorded run" in err
    html = (out / "index.html").read_text()
    assert '<section id="learned-weights">' in html and "learned weight " in html
    sources = [s.split('"')[0] for s in html.split('<img src="')[1:]]
    assert len(sources) == 3 * 24 + 4  # the harmful, helpful and lowest-weight grids, four figures
    assert all((out / s).read_bytes()[:8] == PNG for s in sources)
    learned = pd.read_csv(out / "learned_weights.csv")
    assert learned["index"].tolist() == list(range(60)) and learned["noisy"].sum() == 6
    assert learned["learned_weight"].between(0, 1).all() and (learned["learned_weight"] < 1).any()
    # Another penalty is another result: the saved weights (λ = 0.1) are not reused for λ = 0.
    code, _, err = in_process([*args, "--learn-weights", "2", "--learn-weights-penalty", "0"])
    assert code == 0, err
    assert "penalty 0" in err and "1 computed" in err, err
    unpenalized = pd.read_csv(out / "learned_weights.csv")["learned_weight"]
    assert not np.allclose(unpenalized, learned["learned_weight"], rtol=0, atol=1e-6)


def test_rank_selects_learned_weights_on_held_out_validation_samples(cli_runs, files, tmp_path):
    out = tmp_path / "held"
    shutil.copytree(files / "reference", out)
    args = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", *RANK_FLAGS, "--out", out]
    code, _, err = in_process(
        [*args, "--learn-weights", "4", "--learn-weights-holdout", "0.25", "--learn-weights-penalty", "0.5"]
    )
    assert code == 0, err
    assert (
        "[weights] learning all 60 sample weights, 4 outer steps, 25% of the validation samples held out, penalty 0.5"
        in err
    )
    section = re.search(r'<section id="learned-weights">.*?</section>', (out / "index.html").read_text(), re.S)
    assert "the lowest loss on 25% of the validation samples held out of the learning" in section.group(0)
    learned = pd.read_csv(out / "learned_weights.csv")
    assert learned["learned_weight"].between(0, 1).all()


def test_check_passes_with_exit_0(cli_runs):
    code, out, err = cli_runs["check"]
    assert code == 0, err
    assert "gradient check passed" in out


def test_demo_data_are_digits_with_flipped_labels():
    data = noisy_digits()
    assert data.x_train.shape == (1000, 64) and data.x_val.shape == (400, 64) and len(data.x_test) == 397
    assert data.x_train.dtype == np.float32 and 0 <= data.x_train.min() and data.x_train.max() <= 1
    assert data.flipped.sum() == 100
    assert np.all(data.y_train[data.flipped] != data.clean_labels[data.flipped])
    assert np.all(data.y_train[~data.flipped] == data.clean_labels[~data.flipped])
    np.testing.assert_array_equal(noisy_digits().y_train, data.y_train)  # fixed seeds


@pytest.mark.slow
def test_demo_quick_writes_the_report(tmp_path):
    code, out, err = finish(start(["demo", "--quick", "--out", tmp_path / "demo"], tmp_path))
    assert code == 0, err
    for stage in ("[rank] unrolled, influence_function", "[train] 2 epoch(s)", "[verify]", "[report]"):
        assert stage in err
    html = (tmp_path / "demo" / "index.html").read_text()
    assert "scikit-learn digits" in html and "found@k" in html and "Pearson r" in html
    assert len(pd.read_csv(tmp_path / "demo" / "scores.csv")) == 300
    code, _, err = finish(start(["demo", "--quick", "--out", tmp_path / "demo"], tmp_path))
    assert code == 0 and "[train] skipped: every result is on record" in err


@pytest.mark.slow
def test_input_error_is_one_line_with_exit_2(files):
    code, _, err = finish(start(["rank", "--model", files / "model.keras", "--data", files / "missing.npz"], files))
    assert code == 2
    lines = error_lines(err)
    assert lines == [
        "influence rank: error: The 'data' parameter of influence rank must be an existing file. "
        f"Got {lines[0].split('Got ')[1].split(' (no such file)')[0]} (no such file) instead."
    ]
    assert "missing.npz" in lines[0]


# --- in process -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["demo"], ["rank"], ["check"], ["bench"]])
def test_help_exits_0_and_documents_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(command + ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    expected = {"rank": "--label-column", "check": "--directions", "bench": "--quick", "demo": "--restart"}
    assert expected.get(command[0] if command else "", "Exit codes") in out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--optimizer", "nesterov", "--lr", "0.2"], SGD(0.2, momentum=0.9, nesterov=True)),
        (["--optimizer", "momentum", "--momentum", "0.5"], SGD(0.1, momentum=0.5)),
        (["--optimizer", "adam", "--epsilon", "1e-5"], Adam(0.001, epsilon=1e-5)),
        (["--optimizer", "rmsprop"], RMSprop(0.001)),
        (["--optimizer", "rmsprop", "--momentum", "0.5"], RMSprop(0.001, momentum=0.5)),  # it was dropped
    ],
)
def test_optimizer_flags_build_the_named_update_rule(flags, expected):
    args = cli.build_parser().parse_args(["rank", "--model", "m.keras", "--data", "d.npz", *flags])
    assert cli._optimizer(args, cli._learning_rate(args)) == expected


def test_epsilon_without_an_adaptive_optimizer_is_a_usage_error():
    args = cli.build_parser().parse_args(["rank", "--model", "m.keras", "--data", "d.npz", "--epsilon", "1e-5"])
    with pytest.raises(
        UsageError,
        match=r"'epsilon' parameter of influence rank must be given only with "
        r"--optimizer rmsprop or adam. Got 1e-05 with sgd instead",
    ):
        cli._learning_rate(args)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--momentum", "0.5"], "must be given only with --optimizer momentum, nesterov or rmsprop. Got 0.5 with sgd"),
        (["--optimizer", "adam", "--momentum", "0.5"], "Got 0.5 with adam"),
        (["--optimizer", "momentum", "--momentum", "1.5"], r"must be a number in \[0, 1\). Got 1.5"),
    ],
)
def test_momentum_where_no_update_rule_takes_it_is_a_usage_error(flags, match):
    """--momentum was silently ignored with sgd, adam and rmsprop."""
    args = cli.build_parser().parse_args(["rank", "--model", "m.keras", "--data", "d.npz", *flags])
    with pytest.raises(UsageError, match=match):
        cli._learning_rate(args)


def test_demo_accepts_no_progress():
    args = cli.build_parser().parse_args(["demo", "--quick", "--no-progress"])
    assert args.no_progress and args.handler is cli.cmd_demo


def test_methods_are_comma_separated_and_deduplicated():
    assert cli._methods("unrolled, loss,unrolled") == ("unrolled", "loss")


def run_main(args, capsys):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "{f}/data.txt"], "The 'data' parameter of influence rank must be a .npz or .csv file. Got"),
        (["--data", "{f}/val.npz"], "must be a file with arrays x_train and y_train. Got"),
        (
            ["--data", "{f}/data.npz", "--method", "unrolled,magic"],
            "The 'method' parameter of influence rank must be one or more",
        ),
        (
            ["--data", "{f}/data.npz", "--image-shape", "4by4"],
            "The 'image-shape' parameter of influence rank must be HxW",
        ),
        (["--data", "{f}/data.npz", "--image-shape", "5x5"], "must be a shape with 16 values. Got '5x5' instead."),
        (["--data", "{f}/train.csv"], "The 'val' parameter of influence rank must be a file with x_val and y_val"),
        (
            ["--data", "{f}/train.csv", "--method", "loss,tracin"],
            "must be a file with x_val and y_val (or those arrays in --data) for method tracin (methods "
            "self_influence, margin, loss need none). Got no validation data instead.",
        ),
        (
            ["--data", "{f}/train.csv", "--method", "margin", "--verify", "2"],
            "The 'verify' parameter of influence rank must be 0 without validation data",
        ),
        (
            ["--data", "{f}/train.csv", "--method", "margin", "--learn-weights", "3"],
            "The 'learn-weights' parameter of influence rank must be 0 without validation data",
        ),
        (
            ["--data", "{f}/data.npz", "--learn-weights-holdout", "0.3"],
            "The 'learn-weights-holdout' parameter of influence rank must be 0, or a fraction in (0, 1) together "
            "with --learn-weights. Got 0.3 instead.",
        ),
        (
            ["--data", "{f}/data.npz", "--learn-weights", "2", "--learn-weights-holdout", "1"],
            "The 'learn-weights-holdout' parameter of influence rank must be 0, or a fraction",
        ),
        (
            ["--data", "{f}/data.npz", "--learn-weights", "2", "--learn-weights-penalty", "-1"],
            "The 'learn-weights-penalty' parameter of influence rank must be a finite number ≥ 0 together with "
            "--learn-weights. Got -1.0 instead.",
        ),
        (
            ["--data", "{f}/data.npz", "--learn-weights-penalty", "0.1"],
            "The 'learn-weights-penalty' parameter of influence rank must be a finite number ≥ 0 together with",
        ),
        (
            ["--data", "{f}/data.npz", "--learn-weights", "-1"],
            "The 'learn-weights' parameter of influence rank must be a non-negative int. Got -1",
        ),
        (["--data", "{f}/train.csv", "--val", "{f}/val.csv", "--label-column", "y"], "The 'label-column' parameter"),
        (
            ["--data", "{f}/data.npz", "--label-column", "y"],  # it was ignored without a word
            "The 'label-column' parameter of influence rank must be given only with CSV data (.npz files name "
            "their arrays). Got 'y' instead.",
        ),
        (
            ["--data", "{f}/data.npz", "--seed", "-5"],  # "expected non-negative integer", after the model loaded
            "The 'seed' parameter of influence rank must be a non-negative int. Got -5 instead.",
        ),
        (
            ["--data", "{f}/data.npz", "--epochs", "0"],
            "The 'epochs' parameter of influence rank must be a positive int. Got 0",
        ),
        (
            ["--data", "{f}/data.npz", "--lr", "-1"],
            "The 'lr' parameter of influence rank must be a finite positive number. Got -1.0 instead.",
        ),
        (
            ["--data", "{f}/data.npz", "--lr", "inf"],  # was reported as SGD's learning_rate, not as the flag
            "The 'lr' parameter of influence rank must be a finite positive number. Got inf instead.",
        ),
        (
            ["--data", "{f}/data.npz", "--input-gradient-penalty", "-0.5"],
            "The 'input-gradient-penalty' parameter of influence rank must be a finite number ≥ 0. Got -0.5",
        ),
    ],
)
def test_rank_input_errors_exit_2_with_one_line(files, capsys, extra, message):
    args = ["rank", "--model", files / "model.keras", "--out", files / "errors"] + [a.format(f=files) for a in extra]
    code, captured = run_main(args, capsys)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("influence rank: error: ") and message in lines[0]


def test_unreadable_model_file_exits_2(files, tmp_path, capsys):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    code, captured = run_main(["check", "--model", broken, "--data", files / "data.npz"], capsys)
    assert code == 2
    assert captured.err.startswith("influence check: error: The 'model' parameter of influence check must be a")
    assert "(not a zip archive)" in captured.err  # Keras said "File not found" of a file that exists


def test_check_rejects_zero_samples(files, capsys):
    args = ["check", "--model", files / "model.keras", "--data", files / "data.npz", "--samples", "0"]
    code, captured = run_main(args, capsys)
    assert code == 2
    assert captured.err == (
        "influence check: error: The 'samples' parameter of influence check must be a positive int. Got 0 instead.\n"
    )


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["rank", "--data", "x.npz"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["influence rank: error: the following arguments are required: --model (see 'influence rank --help')"]


def test_an_unknown_flag_is_reported_by_its_subcommand(files, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check", "--model", "m.keras", "--data", "d.npz", "--val", "v.npz"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["influence check: error: unrecognized arguments: --val v.npz (see 'influence check --help')"]


def test_help_texts_are_plain_and_check_documents_only_its_own_data(capsys):
    for command in ("demo", "check"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert ":func:" not in text and "``" not in text
    assert "--val" not in text and "noisy" not in text  # check reads training data only


def test_a_file_that_is_not_an_npz_archive_is_called_that(tmp_path, capsys):
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    code, captured = run_main(["check", "--model", "m.keras", "--data", tmp_path / "broken.npz"], capsys)
    assert code == 2 and "must be a .npz file (numpy.savez writes a zip archive)" in captured.err
    assert "pickled" not in captured.err


def test_rank_on_csv_shows_a_feature_table(files, tmp_path, capsys):
    out = tmp_path / "csv"
    args = [
        "rank",
        "--model",
        files / "model.keras",
        "--data",
        files / "train.csv",
        "--val",
        files / "val.csv",
        "--method",
        "loss",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        out,
    ]
    code, captured = run_main(args, capsys)
    assert code == 0, captured.err
    html = (out / "index.html").read_text()
    assert '<th class="">f0</th>' in html and "sample-" not in html  # a table, no image cards
    assert len(pd.read_parquet(out / "scores.parquet")) == 60


def test_rank_trains_with_an_input_gradient_penalty(files, tmp_path, capsys):
    out = tmp_path / "penalty"
    args = ["rank", "--model", files / "model.keras", "--data", files / "train.csv", "--out", out, "--no-progress"]
    plain = tmp_path / "plain"
    code, captured = run_main(args + ["--method", "self_influence", "--input-gradient-penalty", "0.3"], capsys)
    assert code == 0, captured.err
    assert "+ 0.3·‖∂loss/∂x‖²" in (out / "index.html").read_text()
    args[args.index(out)] = plain
    assert run_main(args + ["--method", "self_influence"], capsys)[0] == 0
    scores = [pd.read_parquet(d / "scores.parquet").sort_values("index")["score"].to_numpy() for d in (out, plain)]
    assert not np.allclose(*scores)  # the penalty changed the run, hence the scores


def test_rank_without_validation_data_for_methods_that_need_none(files, tmp_path, capsys):
    out = tmp_path / "no-val"
    args = ["rank", "--model", files / "model.keras", "--data", files / "train.csv", "--out", out, "--no-progress"]
    code, captured = run_main(args + ["--method", "loss,margin,self_influence"], capsys)
    assert code == 0, captured.err
    html = (out / "index.html").read_text()
    assert "60 train / no validation samples" in html and "— (no validation data)" in html
    assert len(pd.read_csv(out / "all_methods.csv")) == 60 and not (out / "verification.csv").exists()


def report_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "shards" not in p.parts}


def test_rerun_with_other_settings_replaces_the_previous_report_and_keeps_other_files(cli_runs, files, tmp_path):
    out = tmp_path / "rerun"
    shutil.copytree(files / "reference", out)  # unrolled, verified, image grids
    (out / "notes.txt").write_text("mine")
    (out / "images" / "mine.png").write_bytes(PNG)
    base = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", "--out", out]
    loss_only = ["--method", "loss", "--epochs", "2", "--batch-size", "10", "--lr", "0.5", "--no-progress"]
    mine = {"notes.txt", "images/mine.png", ".report-files.json"}
    only_loss = {"index.html", "scores.csv", "scores.parquet", "images/score_distribution.png", "images/found_at_k.png"}

    code, _, err = in_process(base + loss_only)
    assert code == 0, err
    assert report_files(out) == only_loss | mine  # no verification.csv, removal plot or image grids left over
    assert "[train] loaded the recorded run" in err  # the shards still serve the new settings

    code, _, err = in_process(base + RANK_FLAGS)  # back to the first settings: resumed, nothing recomputed
    assert code == 0 and "[train] skipped: every result is on record" in err and "0 computed" in err
    assert report_files(out) == report_files(files / "reference") | {"notes.txt", "images/mine.png"}
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "verification.csv"), pd.read_csv(files / "reference" / "verification.csv")
    )

    (out / ".report-files.json").unlink()  # a folder reported before the job kept a list of its files
    assert in_process(base + loss_only)[0] == 0
    assert report_files(out) == only_loss | mine


def test_check_at_relu_kinks_hints_at_jitter_which_moves_off_them(tmp_path):
    """A fresh Conv2D+ReLU model on digits: blank patches sit exactly at ReLU's 0 (zero bias), the check
    failed there and advised adding noise, which the command could not do."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])  # fmt: skip
    model.save(tmp_path / "relu.keras")
    np.savez(tmp_path / "digits.npz", x_train=(x[:16] / 16).reshape(-1, 8, 8, 1), y_train=y[:16])
    base = ["check", "--model", tmp_path / "relu.keras", "--data", tmp_path / "digits.npz", "--samples", "16"]
    code, out, _ = in_process(base)
    assert code == 1 and "not smooth at this point" in out and "rerun with --jitter 1e-2" in out
    code, out, _ = in_process([*base, "--jitter", "1e-2"])
    assert code == 0 and "passed" in out and "hint" not in out


def test_check_failure_exits_1(files, monkeypatch, capsys):
    failed = GradientCheck(
        ok=False,
        max_rel_error=0.3,
        rel_errors=np.array([0.3]),
        finite_difference=np.ones(1),
        analytic=np.ones(1),
        steps=np.ones(1),
        rtol=1e-6,
    )
    monkeypatch.setattr("influence.checks.check_input_gradient", lambda *a, **k: failed)
    code, captured = run_main(["check", "--model", files / "model.keras", "--data", files / "data.npz"], capsys)
    assert code == 1 and "FAILED" in captured.out


@pytest.fixture
def bench_dir(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "fast.py").write_text("import sys, pathlib\npathlib.Path('ran.txt').write_text(' '.join(sys.argv[1:]))\n")
    (folder / "broken.py").write_text("raise SystemExit(3)\n")
    (folder / "_helpers.py").write_text("")
    return folder


def test_bench_runs_named_script_with_quick(bench_dir, capsys):
    code, captured = run_main(["bench", "--dir", bench_dir, "--quick", "fast"], capsys)
    assert code == 0
    assert (bench_dir.parent / "ran.txt").read_text() == "--quick"
    # --out-dir reaches the script (as an absolute path: scripts run from the folder above theirs)
    code, captured = run_main(["bench", "--dir", bench_dir, "--out-dir", "elsewhere", "fast"], capsys)
    assert code == 0
    assert (bench_dir.parent / "ran.txt").read_text() == f"--out-dir {os.path.abspath('elsewhere')}"


def test_bench_runs_scripts_of_a_nested_relative_folder(bench_dir, monkeypatch, capsys):
    """--dir sub/bdir ran 'sub/bdir/fast.py' from sub/, i.e. sub/sub/bdir/fast.py: no such file."""
    nested = bench_dir.parent / "sub" / "bdir"
    nested.mkdir(parents=True)
    shutil.copy(bench_dir / "fast.py", nested / "fast.py")
    monkeypatch.chdir(bench_dir.parent)
    code, captured = run_main(["bench", "--dir", "sub/bdir", "fast"], capsys)
    assert code == 0, captured.err
    assert (nested.parent / "ran.txt").read_text() == ""


def test_bench_reports_failures_and_unknown_names(bench_dir, capsys):
    code, captured = run_main(["bench", "--dir", bench_dir], capsys)
    assert code == 1 and "failed: broken" in captured.err
    code, captured = run_main(["bench", "--dir", bench_dir, "nope"], capsys)
    assert code == 2 and "The 'name' parameter of influence bench must be one of broken, fast" in captured.err
    code, captured = run_main(["bench", "--dir", bench_dir, "--list"], capsys)
    assert code == 0 and captured.out.split() == ["broken", "fast"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(files, tmp_path):
    """A real SIGKILL once the first verification shards exist, then the same command again."""
    out, reference = tmp_path / "killed", tmp_path / "reference"
    flags = ["--method", "unrolled", "--epochs", "3", "--batch-size", "10", "--verify", "20", "--no-progress"]
    base = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", *flags]
    process = start(base + ["--out", out], files)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "shards").glob("removal-*.npz"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert 2 <= len(list((out / "shards").glob("removal-*.npz"))) < 40  # killed in the middle of verification
    assert not (out / "index.html").exists()
    assert finish(start(base + ["--out", out], files))[0] == 0
    assert finish(start(base + ["--out", reference], files))[0] == 0
    for name in ("scores.csv", "verification.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(reference / name))


@pytest.mark.parametrize(
    ("loss", "label_dtype"), [("sparse_categorical_crossentropy", np.int64), ("mse", np.float64), ("huber", np.float64)]
)
def test_integral_csv_labels_are_class_indices_only_for_the_sparse_loss(tmp_path, loss, label_dtype):
    # A CSV reads every column as float: integral regression targets (counts, scores) must stay floats.
    pd.DataFrame({"a": [0.5, 1.5, 2.5], "target": [3.0, 140.0, 25.0]}).to_csv(tmp_path / "d.csv", index=False)
    args = cli.build_parser().parse_args(
        ["rank", "--model", "m.keras", "--data", str(tmp_path / "d.csv"), "--loss", loss]
    )
    data = cli.load_data(args, "rank", need_val=False)
    assert data["y_train"].dtype == label_dtype and data["y_train"].tolist() == [3, 140, 25]


def test_check_passes_from_logits_on_and_refuses_bad_labels(files, tmp_path, capsys):
    keras.utils.set_random_seed(0)
    logits = keras.Sequential([keras.Input((16,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
    logits.save(tmp_path / "logits.keras")
    base = ["check", "--model", tmp_path / "logits.keras", "--samples", "4", "--directions", "2"]
    code, captured = run_main(base + ["--data", files / "data.npz"], capsys)
    assert code == 2 and "from_logits=True for a model whose outputs are not probabilities" in captured.err
    code, captured = run_main(base + ["--data", files / "data.npz", "--from-logits"], capsys)
    assert code == 0 and "sparse_categorical_crossentropy (logits)" in captured.out
    data = dict(np.load(files / "data.npz"))
    np.savez(tmp_path / "bad.npz", **{**data, "y_train": data["y_train"] + 5})
    code, captured = run_main(base + ["--data", tmp_path / "bad.npz", "--from-logits"], capsys)
    assert code == 2 and "class labels in [0, 2] (the model has 3 outputs)" in captured.err
    code, captured = run_main(base + ["--data", files / "data.npz", "--loss", "mse"], capsys)
    assert code == 2 and "targets of shape (3,) per sample for loss 'mse'" in captured.err


def test_usage_errors_are_answered_before_tensorflow_is_imported(files):
    """Importing TensorFlow costs seconds and prints log lines: argument errors must not wait for it."""
    int_noisy = files / "int_noisy.npz"
    with np.load(files / "data.npz") as data:
        np.savez(int_noisy, **{k: data[k] for k in data.files if k != "noisy"}, noisy=np.arange(60))
    cases = [
        ["rank", "--model", files / "model.keras", "--data", files / "data.npz", "--epochs", "0"],
        ["rank", "--model", files / "model.keras", "--data", files / "data.npz", "--lr", "-1"],
        [
            "rank",
            "--model",
            files / "model.keras",
            "--data",
            files / "data.npz",
            "--optimizer",
            "sgd",
            "--epsilon",
            "1",
        ],
        ["rank", "--model", files / "missing.keras", "--data", files / "data.npz"],
        ["rank", "--model", files / "model.keras", "--data", files / "train.csv", "--method", "unrolled"],
        ["check", "--model", files / "missing.keras", "--data", files / "data.npz"],
        ["rank", "--model", files / "model.keras", "--data", files / "data.npz", "--seed", "-5"],
        ["check", "--model", files / "model.keras", "--data", files / "data.npz", "--seed", "-1"],
        # An existing file as --out gave "[Errno 20] Not a directory: '…/shards'" after training.
        ["rank", "--model", files / "model.keras", "--data", files / "data.npz", "--out", files / "data.npz"],
        # An int 'noisy' array was read as truthiness (np.arange(n): all but one sample "noisy").
        ["rank", "--model", files / "model.keras", "--data", int_noisy],
    ]
    script = (
        "import sys\nfrom influence import cli\n"
        f"codes = [cli.main([str(a) for a in args]) for args in {[[str(a) for a in c] for c in cases]!r}]\n"
        "print(codes, 'tensorflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=files)
    assert done.stdout.strip() == f"{[2] * len(cases)} False", done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == len(cases)  # one line each, no TensorFlow log lines
    assert "'out' parameter of influence rank must be a folder for the report" in done.stderr
    assert "must be a boolean 'noisy' array of shape (60,)" in done.stderr


def test_a_validation_csv_is_matched_to_the_training_columns_by_name(tmp_path):
    """Matched by position, a validation CSV with its columns reordered was read as other features, silently."""
    import argparse

    from influence._files import UsageError, load_data

    rng = np.random.default_rng(0)
    train = pd.DataFrame(rng.normal(size=(6, 3)), columns=["a", "b", "c"]).assign(label=[0, 1] * 3)
    val = pd.DataFrame(rng.normal(size=(4, 3)), columns=["a", "b", "c"]).assign(label=[1, 0] * 2)
    train.to_csv(tmp_path / "train.csv", index=False)
    val[["label", "c", "a", "b"]].to_csv(tmp_path / "reordered.csv", index=False)  # the label first, too
    val.rename(columns={"b": "B"}).to_csv(tmp_path / "renamed.csv", index=False)

    def load(val_file):
        args = argparse.Namespace(data=str(tmp_path / "train.csv"), val=str(tmp_path / val_file), label_column=None,
                                  loss="sparse_categorical_crossentropy")  # fmt: skip
        return load_data(args, "rank", need_val=True)

    arrays = load("reordered.csv")
    np.testing.assert_allclose(arrays["x_val"], val[["a", "b", "c"]].to_numpy(np.float32))
    np.testing.assert_array_equal(arrays["y_val"], val["label"])
    with pytest.raises(UsageError, match="of influence rank must be a CSV with the training file's columns. Got one "
                       "without b and with other column"):  # fmt: skip
        load("renamed.csv")
    # Training arrays from an .npz (even one holding a 'columns' array): no names to match, read by position.
    np.savez(tmp_path / "train.npz", x_train=train[["a", "b", "c"]].to_numpy(), y_train=train["label"].to_numpy(),
             columns=np.array(["a", "b", "c"]))  # fmt: skip
    args = argparse.Namespace(data=str(tmp_path / "train.npz"), val=str(tmp_path / "renamed.csv"), label_column=None,
                              loss="sparse_categorical_crossentropy")  # fmt: skip
    np.testing.assert_allclose(load_data(args, "rank", need_val=True)["x_val"], val[["a", "b", "c"]].to_numpy())


def _model_file(folder: Path, name: str, middle) -> Path:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(6), middle, keras.layers.Dense(3)])
    model.save(folder / name)
    return folder / name


def test_batchnorm_and_lambda_models_rank_with_the_flags_the_errors_name(files, tmp_path, capsys):
    """The errors advised training=False and safe_mode=False, which the command had no flag for."""
    args = ["--data", files / "data.npz", "--method", "loss", "--from-logits", "--no-progress"]
    bn = ["rank", "--model", _model_file(tmp_path, "bn.keras", keras.layers.BatchNormalization()), *args]
    code, captured = run_main(bn + ["--out", tmp_path / "bn"], capsys)
    assert code == 2 and "(on the command line: --inference-mode for training=False)" in captured.err
    code, captured = run_main(bn + ["--out", tmp_path / "bn", "--inference-mode"], capsys)
    assert code == 0, captured.err
    assert "layers in inference mode" in (tmp_path / "bn" / "index.html").read_text()

    lam = _model_file(tmp_path, "lambda.keras", keras.layers.Lambda(lambda t: t * t))
    code, captured = run_main(["rank", "--model", lam, *args, "--out", tmp_path / "lam"], capsys)
    assert code == 2 and "(on the command line: --no-safe-mode for safe_mode=False)" in captured.err
    code, captured = run_main(["rank", "--model", lam, *args, "--out", tmp_path / "lam", "--no-safe-mode"], capsys)
    assert code == 0, captured.err
    check = ["check", "--model", lam, "--data", files / "data.npz", "--from-logits", "--samples", "4"]
    code, captured = run_main(check + ["--no-safe-mode"], capsys)  # its float64 copy rebuilt the Lambda too
    assert code == 0 and "gradient check passed" in captured.out, captured.err


def test_weight_decay_flag_reaches_the_update_rule():
    args = cli.build_parser().parse_args(["rank", "--model", "m", "--data", "d", "--optimizer", "adam"])
    args.weight_decay = 0.01
    assert cli._optimizer(args, cli._learning_rate(args)) == Adam(0.001, weight_decay=0.01)
    args.weight_decay = -1.0
    with pytest.raises(ValueError, match="'weight-decay' parameter of influence rank must be a finite number ≥ 0"):
        cli._learning_rate(args)


def test_data_errors_and_an_unusable_report_folder_come_before_training(files, tmp_path, capsys):
    """They came after training (minutes on real data): NaN in x_val, x_val of another shape, --out unwritable."""
    x_val = np.load(files / "data.npz")["x_val"]
    bad = {"nan.npz": x_val.copy(), "short.npz": x_val[:, :10]}
    bad["nan.npz"][0, 0] = np.nan
    for name, array in bad.items():
        np.savez(tmp_path / name, x_val=array, y_val=np.zeros(len(array), int))
    rank = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", "--no-progress"]
    expected = {
        "nan.npz": "The 'x_val' parameter of rank must be finite (no NaN or Inf)",
        "short.npz": "The 'x_val' parameter of rank must be samples of shape (16,)",
    }
    for name, message in expected.items():
        code, captured = run_main(rank + ["--val", tmp_path / name, "--out", tmp_path / "o"], capsys)
        assert code == 2 and message in captured.err and "[train]" not in captured.err, captured.err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, captured = run_main(rank + ["--out", blocker / "report"], capsys)
    assert code == 2 and "'out_dir' parameter of RankingJob must be a folder that can be created" in captured.err
    assert "[train]" not in captured.err


def _token_files(folder: Path, bad_id: int) -> tuple[Path, Path]:
    """An Embedding model (vocabulary 10) and token ids with one id ``bad_id``."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, (30, 6)), rng.integers(0, 3, 30)
    x[3, 2] = bad_id
    np.savez(folder / "tokens.npz", x_train=x[:20], y_train=y[:20], x_val=x[20:], y_val=y[20:])
    keras.utils.set_random_seed(0)
    embed = [keras.layers.Embedding(10, 4), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    keras.Sequential([keras.Input((6,), dtype="int32"), *embed]).save(folder / "tokens.keras")
    return folder / "tokens.keras", folder / "tokens.npz"


def test_token_id_models_get_one_line_errors_with_exit_2(tmp_path, capsys):
    """A token id outside the vocabulary raised TensorFlow's InvalidArgumentError as a traceback (exit 1), and
    check on an Embedding model an AttributeError ('NoneType' object has no attribute 'numpy')."""
    model, data = _token_files(tmp_path, bad_id=25)
    code, captured = run_main(
        ["rank", "--model", model, "--data", data, "--out", tmp_path / "o", "--no-progress"], capsys
    )
    assert code == 2 and "Traceback" not in captured.err, captured.err
    assert error_lines(captured.err)[-1] == (
        "influence rank: error: Embedding.call(): indices[3,2] = 25 is not in [0, 10) [Op:GatherV2]"
    )
    model, data = _token_files(tmp_path, bad_id=5)
    code, captured = run_main(["check", "--model", model, "--data", data], capsys)
    assert code == 2 and captured.err.startswith(
        "influence check: error: The 'model' parameter of check_input_gradient must be a model with floating-point "
        "inputs. Got a model with int32 inputs (token ids, e.g. into an Embedding, have no input gradient) instead."
    )


def test_unexpected_errors_keep_their_traceback_and_exit_3(files, monkeypatch, capsys):
    """A bug (here a NameError as a user's Lambda raises it) is neither a failed check (1) nor bad input (2)."""

    def buggy(args):  # as Keras wraps the error of a Lambda layer
        message = "name 'sclae' is not defined"
        raise NameError(f"Exception encountered when calling Lambda.call().\n\n\x1b[1m{message}\x1b[0m\n\nArguments "
                        "received by Lambda.call():\n  • inputs=tf.Tensor(shape=(32, 64), dtype=float32)")  # fmt: skip

    monkeypatch.setattr(cli, "cmd_check", buggy)
    code, captured = run_main(["check", "--model", files / "model.keras", "--data", files / "data.npz"], capsys)
    assert code == cli.EXIT_INTERNAL == 3
    assert "Traceback (most recent call last)" in captured.err
    assert captured.err.splitlines()[-1] == (
        "influence check: unexpected error: Lambda.call(): name 'sclae' is not defined (NameError; traceback above)"
    )


def test_an_interrupt_before_the_command_starts_is_one_line_and_exit_130(files, monkeypatch, capsys):
    """Ctrl-C in the first half second (imports) printed a KeyboardInterrupt traceback."""

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_quiet_tensorflow", interrupted)
    code, captured = run_main(["check", "--model", files / "model.keras", "--data", files / "data.npz"], capsys)
    assert code == 130
    assert captured.err == "influence check: interrupted; rerun the same command to resume\n"


def test_margin_on_regression_and_an_empty_holdout_are_refused_before_training(files, tmp_path, capsys):
    """Both came after training (and the other methods): margin needs class scores; a holdout of 0.01 of 4
    validation samples holds out none, and the message advised an (x, y) pair, which the command cannot take."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x_train=x[:20], y_train=x[:20, :1], x_val=x[20:], y_val=x[20:, :1])
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]).save(tmp_path / "reg.keras")
    rank = ["rank", "--model", tmp_path / "reg.keras", "--data", tmp_path / "reg.npz", "--out", tmp_path / "o"]
    code, captured = run_main(rank + ["--loss", "mse", "--method", "unrolled,margin", "--no-progress"], capsys)
    assert code == 2 and "[train]" not in captured.err
    assert "The 'method' parameter of rank must be a method other than 'margin' for loss 'mse'" in captured.err
    code, captured = run_main(
        rank + ["--loss", "mse", "--learn-weights", "2", "--learn-weights-holdout", "0.01", "--no-progress"], capsys
    )
    assert code == 2 and "[train]" not in captured.err
    assert error_lines(captured.err) == [
        "influence rank: error: The 'learn_weights_holdout' parameter of RankingJob must be a fraction that holds "
        "out at least one of the 4 validation samples and keeps at least one (holdout 0.01 holds out 0); give more "
        "validation samples or another fraction. Got 0.01 instead. (on the command line: --learn-weights-holdout "
        "for learn_weights_holdout)"
    ]


def test_a_float64_model_is_described_as_float64():
    """describe_model read model.dtype, the default policy's float32."""
    from influence._files import describe_model

    dense = keras.layers.Dense(2, dtype="float64")
    text = describe_model(keras.Sequential([keras.Input((3,), dtype="float64"), dense], name="m64"))
    assert text == "m64: Dense; 8 parameters, float64"


def test_warnings_are_one_line_on_stderr_and_listed_in_the_report(files, tmp_path, monkeypatch, capsys):
    """Warnings printed as Python's 'cli.py:238: RuntimeWarning: …' plus the source line, and the report
    did not mention them."""
    import importlib

    from influence import GradientOverrideWarning

    rank_module = importlib.import_module("influence.rank")  # run_ranking imports rank from it when it runs

    original = rank_module.rank

    def warning_rank(*args, **kwargs):
        warnings.warn("the model's forward pass uses\n  tf.stop_gradient", GradientOverrideWarning, stacklevel=2)
        return original(*args, **kwargs)

    monkeypatch.setattr(rank_module, "rank", warning_rank)
    args = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", "--method", "loss"]
    code, captured = run_main(args + ["--no-progress", "--out", tmp_path / "o"], capsys)
    assert code == 0, captured.err
    assert (
        "influence rank: warning: the model's forward pass uses tf.stop_gradient (GradientOverrideWarning)"
        in error_lines(captured.err)
    )
    assert "warnings.warn" not in captured.err
    summary = re.search(r'<section id="summary">.*?</section>', (tmp_path / "o" / "index.html").read_text())
    assert "GradientOverrideWarning: the model&#x27;s forward pass uses tf.stop_gradient" in summary.group(0)


def test_jit_flag_chooses_xla_or_plain_graphs_and_training_shows_progress(files, tmp_path, capsys):
    """A CNN trained 5-25x slower under XLA on CPU, and the command line could not turn XLA off; fit printed
    nothing while it trained."""
    from influence import load_trajectory

    out = tmp_path / "plain"
    args = ["rank", "--model", files / "model.keras", "--data", files / "data.npz", "--method", "loss", "--out", out]
    code, captured = run_main(args + ["--jit", "off", "--epochs", "3", "--batch-size", "5"], capsys)
    assert code == 0, captured.err
    assert "plain graphs (--jit off)" in (out / "index.html").read_text()
    assert load_trajectory(next((out / "shards").glob("trajectory-*"))).jit_compile is False
    assert "36/36" in captured.err and "training: 100%" in captured.err  # fit's bar: 3 epochs of 12 steps
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in args] + ["--jit", "yes"])
    assert exit_.value.code == 2 and "invalid choice: 'yes'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["rank", "--help"])
    assert "--jit {auto,on,off}" in capsys.readouterr().out


def test_jit_choice_is_part_of_the_run_fingerprint_where_it_changes_the_run(files):
    """Resuming with another --jit must not reuse shards computed from other numbers; "auto" on a dense model
    is XLA, as every earlier run was, so their shards still match."""
    from influence.report.job import RankingJob

    def job(model, jit):
        x = np.zeros((4, *model.input_shape[1:]), np.float32)
        return RankingJob(files, model, x, np.zeros(4, int), None, None, SGD(0.1), jit_compile=jit)

    dense = keras.models.load_model(files / "model.keras")
    assert job(dense, "auto").fingerprint() == job(dense, True).fingerprint() != job(dense, False).fingerprint()
    keras.utils.set_random_seed(0)
    conv = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()])
    assert job(conv, "auto").fingerprint() == job(conv, False).fingerprint() != job(conv, True).fingerprint()


def test_csv_errors_name_the_file_line_column_or_flag_at_fault(files, tmp_path, capsys):
    """A missing value was reported as the API's 'x_train' not being finite; a label column read
    from the wrong place blamed 'y_train', or --label-column when that flag was not given."""
    train, val = pd.read_csv(files / "train.csv"), pd.read_csv(files / "val.csv")
    rank = ["rank", "--model", files / "model.keras", "--out", tmp_path / "out"]
    train.assign(f2=train["f2"].mask(train.index == 3)).to_csv(tmp_path / "missing.csv", index=False)
    code, captured = run_main(rank + ["--data", tmp_path / "missing.csv", "--val", files / "val.csv"], capsys)
    assert code == 2 and "without missing or infinite values" in captured.err
    assert "with 1 in column(s) f2, line(s) 5" in captured.err  # line 1 is the header
    train[["label", *train.columns[:-1]]].to_csv(tmp_path / "label_first.csv", index=False)
    code, captured = run_main(rank + ["--data", tmp_path / "label_first.csv", "--val", files / "val.csv"], capsys)
    assert code == 2 and "whose last column 'f15' holds non-integer values" in captured.err
    assert "--label-column NAME" in captured.err
    val.rename(columns={"label": "target"}).to_csv(tmp_path / "val_target.csv", index=False)
    code, captured = run_main(rank + ["--data", files / "train.csv", "--val", tmp_path / "val_target.csv"], capsys)
    assert code == 2 and "The 'val' parameter of influence rank must be a CSV with the label column of" in captured.err
