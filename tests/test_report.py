"""The HTML report: sections, valid image references, saved scores, metrics and argument errors."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import influence as inf
from influence.report import Verification, correlations, found_at_k, per_class_table, render_report, save_scores
from influence.report.metrics import class_labels

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("summary", "harmful", "helpful", "distribution", "verification", "found-at-k", "per-class", "files")


class _Refs(HTMLParser):
    """Collects ids, image sources and link targets of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.images, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


def parse(path: Path) -> _Refs:
    refs = _Refs()
    refs.feed(path.read_text())
    return refs


def assert_valid_references(page: Path, refs: _Refs):
    for src in refs.images:
        assert not src.startswith(("http:", "https:", "/")), src
        assert (page.parent / src).read_bytes()[:8] == PNG, src
    for href in refs.links:
        assert href.startswith("#") or (page.parent / href).is_file(), href


def fake_table(n=40, method="unrolled", seed=0, n_classes=4):
    """A rank table as influence.rank returns it, from random scores."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(scale=1e-3, size=n)
    label = rng.integers(0, n_classes, n)
    predicted = np.where(rng.random(n) < 0.8, label, (label + 1) % n_classes)
    table = pd.DataFrame(
        {
            "index": np.arange(n),
            "score": -effect,
            "removal_effect": effect,
            "label": label,
            "predicted_label": predicted,
            "train_loss": rng.random(n),
        }
    )
    table = table.sort_values("score", ascending=False).reset_index(drop=True)
    table.insert(1, "rank", np.arange(n))
    table.attrs.update(method=method, seconds=0.25, val_loss=0.5)
    return table


@pytest.fixture
def image_report(tmp_path):
    table = fake_table()
    noise = np.zeros(40, bool)
    noise[table["index"][:3]] = True  # the three most harmful are known-noisy
    noise[table["index"].iloc[-1]] = True
    top = table["index"][:4].to_numpy()
    verification = Verification(
        indices=top,
        predicted=table["removal_effect"][:4],
        actual=table["removal_effect"][:4] * 1.1,
        kinds=["most harmful"] * 2 + ["random"] * 2,
    )
    images = np.random.default_rng(1).random((40, 5, 5))
    path = render_report(
        tmp_path,
        table,
        summary={"data": "random 5x5", "model": "none"},
        images=images,
        verification=verification,
        noise_mask=noise,
        clean_labels=np.arange(40) % 4,
        comparison={"loss": fake_table(method="loss", seed=2)},
        top=6,
    )
    return path, table, noise


def test_report_has_every_section_and_valid_image_references(image_report):
    path, _, _ = image_report
    refs = parse(path)
    for section in SECTIONS:
        assert section in refs.ids
    assert_valid_references(path, refs)
    harmful = [s for s in refs.images if "harmful" in s]
    assert len(harmful) == 6 and len([s for s in refs.images if "helpful" in s]) == 6
    for figure in ("score_distribution.png", "removal_scatter.png", "found_at_k.png"):
        assert any(s.endswith(figure) for s in refs.images)


def test_report_cards_show_labels_scores_effects_and_noise(image_report):
    path, table, _ = image_report
    text = path.read_text()
    index, label, predicted = (int(table[c].iloc[0]) for c in ("index", "label", "predicted_label"))
    card = re.search(rf'<figure class="card noisy" id="sample-{index}">.*?</figure>', text, re.S).group(0)
    assert f"label {label} → pred" in card and f">{predicted}</span>" in card
    assert f"score {table['score'].iloc[0]:.3g}" in card and f"Δ val loss {table['removal_effect'].iloc[0]:.3g}" in card
    assert f"flipped; true {index % 4}" in card  # the clean label of a flipped sample
    assert "known-noisy in top 4" in text and "3 of 4 (75%)" in text
    assert "Pearson r = 1.000," in text  # actual = 1.1 × predicted; one format, 1.000 (was "1" or "1.00")


def test_scores_saved_as_csv_and_parquet(image_report):
    path, table, noise = image_report
    for loaded in (pd.read_csv(path.parent / "scores.csv"), pd.read_parquet(path.parent / "scores.parquet")):
        np.testing.assert_array_equal(loaded["index"], table["index"])
        np.testing.assert_allclose(loaded["score"], table["score"])
        np.testing.assert_array_equal(loaded["noisy"], noise[table["index"]])
    both = pd.read_parquet(path.parent / "all_methods.parquet")
    assert {"score_unrolled", "score_loss", "rank_loss"} <= set(both.columns) and len(both) == 40
    verification = pd.read_csv(path.parent / "verification.csv")
    assert list(verification.columns) == ["index", "kind", "predicted_effect", "actual_effect"]


def test_scores_without_a_parquet_engine_are_saved_as_csv_only(tmp_path, monkeypatch):
    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", no_engine)
    with pytest.warns(UserWarning, match="install pyarrow"):
        path = render_report(tmp_path, fake_table(), summary={})
    assert (tmp_path / "scores.csv").is_file() and not (tmp_path / "scores.parquet").exists()
    assert_valid_references(path, parse(path))  # the Files section links only what exists


def test_tabular_report_shows_a_table_instead_of_images(tmp_path):
    features = np.random.default_rng(0).normal(size=(40, 3))
    path = render_report(tmp_path, fake_table(), summary={}, features=features, feature_names=["age", "bmi", "bp"])
    refs = parse(path)
    assert not any("harmful" in s for s in refs.images)
    harmful = re.search(r'<section id="harmful">.*?</section>', path.read_text()).group(0)
    assert "<table>" in harmful and '<th class="">bmi</th>' in harmful
    assert "No retraining was run" in path.read_text() and "No known-noisy samples" in path.read_text()
    assert_valid_references(path, refs)


def test_regression_table_has_no_per_class_table(tmp_path):
    table = fake_table()
    table["label"] = np.linspace(0.1, 3.3, 40)
    table["predicted_label"] = np.nan
    path = render_report(tmp_path, table, summary={})
    per_class = re.search(r'<section id="per-class">.*?</section>', path.read_text()).group(0)
    assert "continuous targets" in per_class and "<table" not in per_class


def test_images_with_two_channels_are_shown_by_their_first_channel(tmp_path):
    """(n, H, W, 2) images crashed the report after ranking: matplotlib has no 2-channel colour model."""
    images = np.random.default_rng(0).random((40, 4, 4, 2))
    path = render_report(tmp_path, fake_table(), summary={}, images=images, top=3)
    assert "Images have 2 channels: the tiles show channel 0 in grey." in path.read_text()
    assert_valid_references(path, parse(path))


def test_few_samples_split_between_disjoint_grids_with_unique_ids(tmp_path):
    """With 5 samples both grids showed all 5 (helpful ones as "most harmful") and repeated ids sample-2…"""
    table = fake_table(n=5)
    path = render_report(tmp_path, table, summary={}, images=np.random.default_rng(0).random((5, 3, 3)))
    refs = parse(path)
    assert len(refs.ids) == len(set(refs.ids))
    cards = {sid: re.findall(r'id="sample-(\d+)"', re.search(rf'<section id="{sid}">.*?</section>', path.read_text())
             .group(0)) for sid in ("harmful", "helpful")}  # fmt: skip
    assert cards["harmful"] == [str(i) for i in table["index"][:3]]
    assert cards["helpful"] == [str(i) for i in table["index"][:2:-1]]
    assert "Most harmful 3 training samples" in path.read_text()


def test_top_ranked_samples_with_a_positive_effect_are_not_called_most_harmful():
    """verification.csv marked every top-ranked row "most harmful", even samples whose removal raises the loss."""
    from influence.report.job import verification_indices

    table = pd.DataFrame(
        {"index": [4, 3, 2, 0, 1], "rank": np.arange(5), "removal_effect": [-0.01, 0.0004, 0.001, 0.006, 0.04]}
    )
    indices, kinds = verification_indices(table, top=4, random=1, seed=0)
    assert list(indices) == [4, 3, 2, 0, 1]
    assert list(kinds) == ["most harmful"] + ["top-ranked (helpful)"] * 3 + ["random"]


def test_the_loss_not_integral_values_decides_whether_labels_are_classes(tmp_path):
    """Integral regression targets (counts, scores) got a "Per class" table."""
    table = fake_table()
    table["label"] = table["label"].astype(np.float64)  # 0., 1., 2., 3.: integral targets of an mse run
    table["predicted_label"] = np.nan
    path = render_report(tmp_path, table, summary={}, loss="mse")
    per_class = re.search(r'<section id="per-class">.*?</section>', path.read_text()).group(0)
    assert "continuous targets" in per_class and "<table" not in per_class
    assert class_labels(table["label"], "sparse_categorical_crossentropy") is not None
    soft = pd.Series([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])  # the class of the largest entry
    np.testing.assert_array_equal(class_labels(soft, "categorical_crossentropy"), [2, 0])
    assert class_labels(soft) is None and class_labels(soft, "mse") is None


def test_numbers_that_are_not_whole_never_read_as_whole():
    """A Pearson r of 0.99996 was printed as "r = 1" (the figure's title said 1.000)."""
    from influence.report.html import fmt

    assert [fmt(0.99996, 3), fmt(-0.99996, 3), fmt(2.99996), fmt(123.96)] == ["1.00", "-1.00", "3.000", "124.0"]
    assert [fmt(1.0, 3), fmt(0.976, 3), fmt(0.5), fmt(1e-5, 3), fmt(12345.7)] == [
        "1",
        "0.976",
        "0.5",
        "1e-05",
        "1.235e+04",
    ]


def test_soft_labels_are_json_lists_in_the_csv_and_their_class_in_the_page(tmp_path):
    """scores.csv held numpy's multi-line repr of each label; the page showed a soft label's first 6 entries."""
    table = fake_table(n=6, n_classes=8)
    soft = np.full((6, 8), 0.02)
    soft[np.arange(6), 7 - np.arange(6)] = 0.86  # the largest entry among the last ones
    table["label"] = list(soft[table["index"]])
    path = render_report(tmp_path, table, summary={}, images=np.zeros((6, 2, 2)), loss="categorical_crossentropy")
    saved = pd.read_csv(tmp_path / "scores.csv")
    assert len(saved) == 6
    np.testing.assert_allclose([json.loads(v) for v in saved["label"]], soft[saved["index"]])
    first = int(table["index"][0])
    card = re.search(rf'id="sample-{first}">.*?</figure>', path.read_text(), re.S).group(0)
    assert f"label {7 - first} → pred" in card


def test_float32_labels_keep_their_precision_in_the_csv(tmp_path):
    """float32 soft labels were written with float64 digits: 0.1 became 0.10000000149011612."""
    table = fake_table(n=3, n_classes=3)
    soft = np.array([[0.1, 0.2, 0.7]] * 3, dtype=np.float32)
    table["label"] = list(soft)
    save_scores(tmp_path, table)
    text = (tmp_path / "scores.csv").read_text()
    assert '"[0.1, 0.2, 0.7]"' in text
    saved = pd.read_csv(tmp_path / "scores.csv")
    assert (np.array([json.loads(v) for v in saved["label"]], dtype=np.float32) == soft).all()


@pytest.mark.parametrize(
    ("method", "note"),
    [
        ("unrolled", "Δ val loss = predicted change of validation loss if the sample were removed"),
        ("tracin", "uncalibrated, use it as a score, not as a prediction of removal."),
        ("loss", "Score = the training loss at the final weights; loss predicts no removal effect"),
    ],
)
def test_the_column_note_says_what_each_methods_effect_is(tmp_path, method, note):
    """Every method's note said "predicted change of validation loss if the sample were removed"."""
    table = fake_table(method=method)
    if method == "loss":
        table["removal_effect"] = np.nan
    harmful = re.search(r'<section id="harmful">.*?</section>', render_report(tmp_path, table, summary={}).read_text())
    assert note in harmful.group(0)
    assert ("if the sample were removed" in harmful.group(0)) == (method == "unrolled")


@pytest.fixture(scope="module")
def small_run():
    """A real recorded run on 30 random samples and its unrolled ranking (neither is mutated by the tests)."""
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 4)).astype(np.float32), rng.integers(0, 3, 30)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    traj = inf.fit(model, x, y, optimizer=inf.optimizers.SGD(0.5), batch_size=10, epochs=2)
    return model, traj, x, y, inf.rank(traj, x, y, x[:10], y[:10], method="unrolled")


def test_report_from_a_real_rank_table(tmp_path, small_run):
    model, traj, x, y, table = small_run
    path = render_report(tmp_path, table, summary={}, images=x.reshape(30, 2, 2), top=5)
    assert "ranked by unrolled" in path.read_text()
    assert_valid_references(path, parse(path))
    assert len(pd.read_parquet(tmp_path / "scores.parquet")) == 30


def test_found_at_k_counts_noisy_samples_in_rank_order():
    table = pd.DataFrame({"index": [3, 0, 2, 1], "rank": [0, 1, 2, 3]})
    noise = np.array([False, True, False, True])  # samples 1 and 3
    np.testing.assert_allclose(found_at_k(table, noise), [0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(found_at_k(table, np.zeros(4, bool)), 0)


def test_correlations_and_undefined_cases():
    pearson, spearman = correlations([1, 2, 3, 4], [1, 4, 9, 16])
    assert spearman == pytest.approx(1.0) and 0.95 < pearson < 1
    assert np.isnan(correlations([1, 2], [1, 2])[0])  # too few points
    assert np.isnan(correlations([1, 1, 1], [1, 2, 3])[1])  # constant


def test_per_class_table_counts():
    table = fake_table(n=40, n_classes=4)
    noise = np.zeros(40, bool)
    noise[:8] = True
    out = per_class_table(table, noise)
    assert list(out["class"]) == [0, 1, 2, 3]
    assert out["samples"].sum() == 40 and out["noisy"].sum() == 8
    assert out["in top 8"].sum() == 8
    labels = table["label"].to_numpy()
    expected = (table["predicted_label"] == table["label"])[labels == 2].mean()
    assert out.loc[out["class"] == 2, "accuracy (given labels)"].item() == pytest.approx(expected)


def test_class_labels_from_one_hot_and_real_targets():
    np.testing.assert_array_equal(class_labels(pd.Series([[0, 1, 0], [1, 0, 0]])), [1, 0])
    np.testing.assert_array_equal(class_labels(pd.Series([2.0, 1.0])), [2, 1])
    assert class_labels(pd.Series([0.5, 1.0])) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"table": [1, 2]}, TypeError, r"The 'table' parameter of render_report must be a pandas DataFrame"),
        ({"table": pd.DataFrame({"index": [0]})}, ValueError, r"'table' parameter .* columns .* Got one without rank"),
        (
            {"images": np.zeros((3, 4, 4))},
            ValueError,
            r"The 'images' parameter of render_report must be an array with one entry per training sample \(40\)",
        ),
        ({"noise_mask": np.zeros(39, bool)}, ValueError, r"'noise_mask' parameter"),
        ({"top": 0}, ValueError, r"The 'top' parameter of render_report must be a positive int. Got 0 instead."),
        (
            {"verification": (1, 2)},
            TypeError,
            r"The 'verification' parameter of render_report must be an influence.report.Verification",
        ),
    ],
)
def test_render_report_rejects_bad_arguments(tmp_path, kwargs, error, match):
    arguments = {"table": fake_table(), "summary": {}} | kwargs
    with pytest.raises(error, match=match):
        render_report(tmp_path, **arguments)


def test_verification_rejects_mismatched_lengths():
    with pytest.raises(
        ValueError,
        match=r"The 'actual' parameter of Verification must be an array with one entry per index \(3\). Got 1 entries",
    ):
        Verification(indices=[1, 2, 3], predicted=[0.1, 0.2, 0.3], actual=[0.1])


def test_convergence_section_from_real_repair_curves(tmp_path, small_run, capsys, monkeypatch):
    from influence import _progress
    from influence.report.job import REPAIR_OPTIMIZERS, RankingJob, repair_curves

    monkeypatch.setattr(_progress, "DELAY_S", 0.0)  # any bar left on shows at once

    model, traj, x, y, table = small_run
    job = RankingJob(
        out_dir=tmp_path,
        model=model,
        x_train=x,
        y_train=y,
        x_val=x[:10],
        y_val=y[:10],
        optimizer=inf.optimizers.SGD(0.5),
        repair_steps=2,
        progress=False,
    )
    curves = repair_curves(traj, job, table["index"].to_numpy()[:3])
    assert "repair (" not in capsys.readouterr().err  # --no-progress reached the repair loops too
    assert set(curves["optimizer"]) == set(REPAIR_OPTIMIZERS) and len(curves) == 4 * 3
    first = curves[curves["step"] == 0]["val_loss"]
    assert np.allclose(first, first.iloc[0])  # every optimizer starts from the recorded run
    assert (curves[curves["step"] == 2]["val_loss"].to_numpy() < first.to_numpy()).all()  # repair lowers it
    path = render_report(tmp_path, table, summary={}, convergence=curves, top=5)
    refs = parse(path)
    assert "convergence" in refs.ids and "images/convergence.png" in refs.images
    assert_valid_references(path, refs)
    with pytest.raises(ValueError, match="'convergence' parameter of render_report must be a DataFrame with columns"):
        render_report(tmp_path, table, summary={}, convergence=curves.drop(columns="seconds"))


def test_summary_counts_samples_outside_the_run(tmp_path):
    table = fake_table()
    table.attrs["outside_run"] = 3
    text = render_report(tmp_path / "a", table, summary={}).read_text()
    assert "3 samples of weight 0, listed last" in text
    table.attrs["outside_run"] = 0  # nothing to say when every sample was trained on
    assert "listed last" not in render_report(tmp_path / "b", table, summary={}).read_text()


def test_without_verification_the_report_says_why_and_how_to_get_it(tmp_path):
    def section(path, name):
        return re.search(rf'<section id="{name}">.*?</section>', path.read_text(), re.S).group(0)

    asked_for_none = render_report(tmp_path / "a", fake_table(), summary={})
    assert "--verify K on the command line" in section(asked_for_none, "verification")
    assert "a boolean 'noisy' array in the .npz" in section(asked_for_none, "found-at-k")
    loss = fake_table(method="loss")
    loss["removal_effect"] = np.nan
    no_effect = render_report(tmp_path / "b", loss, summary={})
    assert "loss predicts no removal effect to compare with" in section(no_effect, "verification")


def test_score_histogram_tick_labels_do_not_overlap(monkeypatch):
    """Scores from −0.015 to 0.006 printed nine overlapping labels such as '−0.0125'."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from influence.report import figures

    drawn = {}
    monkeypatch.setattr(figures, "_png", lambda fig: drawn.setdefault("fig", fig) and b"")
    rng = np.random.default_rng(0)
    figures.score_distribution(np.r_[rng.normal(-0.002, 0.002, 298), -0.0142, 0.0062], method="unrolled")
    fig = drawn["fig"]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax, low, high = fig.axes[0], *fig.axes[0].get_xlim()
    labels = [t for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]
    boxes = sorted((t.get_window_extent(canvas.get_renderer()) for t in labels), key=lambda b: b.x0)
    assert 3 <= len(boxes) <= 7 and all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


def learned_frame(n=40, seed=3):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"index": rng.permutation(n), "learned_weight": rng.random(n)})
    frame.attrs.update(val_loss=[0.5, 0.4, 0.35], seconds=[0.0, 0.1, 0.2], optimizer="Adam")
    return frame


def test_learned_weights_section_shows_the_lowest_weights_first(tmp_path):
    table, learned = fake_table(), learned_frame()
    noise = np.zeros(40, bool)
    noise[[3, 7]] = True
    images = np.random.default_rng(1).random((40, 5, 5))
    path = render_report(tmp_path, table, summary={}, images=images, noise_mask=noise, learned_weights=learned, top=6)
    refs = parse(path)
    assert "learned-weights" in refs.ids and "images/learned_weights.png" in refs.images
    assert len(refs.ids) == len(set(refs.ids))  # a sample in two grids has two distinct anchors
    assert_valid_references(path, refs)
    section = re.search(r'<section id="learned-weights">.*?</section>', path.read_text(), re.S).group(0)
    lowest = learned.sort_values("learned_weight")["index"].to_numpy()[:6]
    shown = [int(i) for i in re.findall(r"#(\d+)", section)]
    assert shown == lowest.tolist(), shown
    below = int((learned["learned_weight"] < 0.5).sum())
    assert f"Validation loss 0.5 → 0.35; {below} samples learned below 0.5" in section and "2 outer steps" in section
    saved = pd.read_csv(tmp_path / "learned_weights.csv")
    assert saved["index"].tolist() == list(range(40)) and saved["noisy"].sum() == 2
    np.testing.assert_allclose(saved["learned_weight"], learned.sort_values("index")["learned_weight"])


def held_out_frame(**attrs):
    frame = learned_frame()
    frame.attrs.update({"holdout_loss": [0.6, 0.45, 0.5], "best_step": 1, "holdout": 0.3, **attrs})
    return frame


def test_learned_weights_with_a_holdout_say_which_step_they_show(tmp_path):
    path = render_report(tmp_path, fake_table(), summary={}, learned_weights=held_out_frame(), top=6)
    section = re.search(r'<section id="learned-weights">.*?</section>', path.read_text(), re.S).group(0)
    assert "shown at step 1, the lowest loss on 30% of the validation samples held out" in section
    assert "held-out loss 0.6 → 0.45, validation loss (learned on) 0.5 → 0.4;" in section
    assert "check them on held-out data" not in section  # that caveat is for weights without a holdout


@pytest.mark.parametrize(
    "learned",
    [
        learned_frame().drop(columns="learned_weight"),
        learned_frame().iloc[:39],
        learned_frame().assign(index=np.arange(40) + 1),
        pd.DataFrame({"index": np.arange(40), "learned_weight": np.ones(40)}),  # no val_loss curve in attrs
        held_out_frame(holdout_loss=[0.6, 0.5]),  # a held-out curve shorter than the validation one
        held_out_frame(best_step=3),  # the step shown is not on the curve
        held_out_frame(best_step=None),
        np.ones(40),
    ],
)
def test_learned_weights_must_be_one_weight_per_sample_with_a_curve(tmp_path, learned):
    with pytest.raises(ValueError, match=r"'learned_weights' parameter of render_report must be a DataFrame"):
        render_report(tmp_path, fake_table(), summary={}, learned_weights=learned)
    assert not (tmp_path / "scores.csv").exists()  # refused before anything is written


def test_a_report_of_image_shaped_targets_is_written(tmp_path):
    """Image-to-image regression: each label cell is an (h, w, 1) array. Parquet took only 1-D list
    cells, so the report of a run that had worked throughout failed at its last file."""
    table = fake_table(n=4, n_classes=3)
    targets = np.random.default_rng(0).normal(size=(4, 3, 3, 1)).astype(np.float32)
    table["label"] = list(targets[table["index"]])
    render_report(tmp_path, table, summary={}, loss="mse")
    csv = pd.read_csv(tmp_path / "scores.csv")
    np.testing.assert_array_equal(np.array([json.loads(v) for v in csv["label"]], np.float32), targets[csv["index"]])
    parquet = pd.read_parquet(tmp_path / "scores.parquet")
    cells = [np.array(v.tolist() if hasattr(v, "tolist") else v) for v in parquet["label"]]
    rebuilt = np.array([np.stack([np.stack(list(row)) for row in cell]) for cell in cells], np.float32)
    np.testing.assert_array_equal(rebuilt, targets[parquet["index"]])


def test_a_ranking_of_equal_scores_says_it_ranks_nothing(tmp_path):
    """A saturated run (softmax outputs clipped) scores every sample 0: the report showed samples
    0–23 in index order as the "most harmful", without a word."""
    table = fake_table()
    table["score"], table["removal_effect"] = 0.0, 0.0
    harmful = re.search(r'<section id="harmful">.*?</section>', render_report(tmp_path, table, summary={}).read_text())
    assert "All 40 scores are equal (0)" in harmful.group(0)
