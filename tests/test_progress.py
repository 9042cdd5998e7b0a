"""One progress rule for every public function: None shows a bar once a loop has run a while."""

import inspect
import time

import influence as inf
from influence import _progress
from influence._progress import progress_bar


def test_the_rule_quick_loops_stay_silent_long_ones_report(capsys, monkeypatch):
    list(progress_bar(range(3), progress=None, desc="quick"))
    assert capsys.readouterr().err == ""
    list(progress_bar(range(3), progress=True, desc="asked"))
    assert "asked" in capsys.readouterr().err
    monkeypatch.setattr(_progress, "DELAY_S", 0.05)
    for _ in progress_bar(range(3), progress=None, desc="long"):
        time.sleep(0.05)
    assert "long" in capsys.readouterr().err
    for _ in progress_bar(range(3), progress=False, desc="off"):
        time.sleep(0.05)
    assert capsys.readouterr().err == ""


def test_public_functions_share_the_default():
    """actual_removal_effect showed bars by default while rank did not: every default is now None."""
    defaults = {}
    for name in inf.__all__:
        obj = getattr(inf, name)
        if callable(obj) and not inspect.isclass(obj) and "progress" in inspect.signature(obj).parameters:
            defaults[name] = inspect.signature(obj).parameters["progress"].default
    assert {"unrolled", "rank", "actual_removal_effect", "greedy_removal", "optimize_training_inputs"} <= set(defaults)
    assert set(defaults.values()) == {None}, defaults
