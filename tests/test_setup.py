"""The README's two set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_starts_with_an_install_and_demo_command_and_a_test_command():
    main_job, tests = _readme_commands()
    assert "pip install -e ." in main_job and main_job.endswith("influence demo")
    assert 'pip install -e ".[test]"' in tests and tests.endswith("python -m pytest")


def test_ci_runs_the_readmes_install_and_test_commands_and_fails_on_no_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    _, tests = _readme_commands()
    assert 'pip install -e ".[test]"' in ci
    assert "python -m pytest" in ci
    assert '"$status" -eq 5' in ci
    assert tests.split("&& ")[-1] in ci
