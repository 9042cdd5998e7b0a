"""Every script under examples/ runs and its claims hold (each ends in asserts of what it prints).

They run in this process (runpy), so TensorFlow is imported once for all of them.
"""

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("s[0-9]_*.py"))


def test_there_is_one_example_per_scenario():
    assert [p.name[:2] for p in EXAMPLES] == ["s1", "s2", "s3", "s4", "s5", "s6"], EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_its_claims_hold(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip(), f"{path.name} printed nothing"
