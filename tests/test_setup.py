"""The README's two set-up commands and CI stay in step; the package imports cleanly."""

import re
import subprocess
import sys
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


def test_public_functions_stay_callable_after_their_same_named_modules_load():
    # `influence.rank` and `influence.one_step` are functions in modules of the same name; importing
    # the module first (as the CLI does) used to replace the function by the module.
    script = (
        "from influence.rank import NEEDS_VALIDATION\n"
        "import influence.one_step\n"
        "import influence as inf\n"
        "assert callable(inf.rank) and inf.rank.__name__ == 'rank', inf.rank\n"
        "assert callable(inf.one_step) and inf.one_step.__name__ == 'one_step', inf.one_step\n"
        "assert 'unrolled' in dir(inf) and 'importlib' not in dir(inf) and 'Any' not in dir(inf)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
