"""A fresh machine is green: the one set-up command, CI that uses only it, the README's commands equal to CI's,
tests that write only into temporary folders, and complete --help texts."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loaders import mnist

REPO = Path(__file__).resolve().parents[1]
SETUP_COMMAND = "pip install -r requirements.txt"
TEST_COMMAND = "python -m pytest -q tests"


def requirement_lines():
    return [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.split("#")[0].strip()]


def test_requirements_pin_torch_and_list_every_package_the_code_imports():
    """One exact torch release: pip takes the local CPU wheel of it where one is in its find-links, PyPI's CUDA
    build on a GPU machine; a range would let pip on a CPU machine pull a newer CUDA build (several GB)."""
    names = {re.split(r"[<>=!~ ]", line)[0].lower(): line for line in requirement_lines()}
    assert names["torch"] == "torch==2.13.0"
    assert {"numpy", "tqdm", "pillow", "matplotlib", "pytest"} <= set(names)


def readme_quick_start():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def ci_commands():
    return [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_quick_start_is_set_up_main_job_and_tests():
    setup, main_job, tests = readme_quick_start()
    assert setup == SETUP_COMMAND and tests == TEST_COMMAND
    assert re.fullmatch(r"python train_multi_task_counter_stream\.py --param_file=params/\S+\.json --epochs 100",
                        main_job)
    assert (REPO / main_job.split("--param_file=")[1].split()[0]).is_file()


def test_ci_runs_exactly_the_readme_commands_in_a_fresh_virtual_environment():
    commands = ci_commands()
    setup, _, tests = readme_quick_start()
    assert commands.count(setup) == 1 and commands[-1] == tests
    assert commands.index(setup) < len(commands) - 1
    script = "\n".join(commands)
    assert "set -euo pipefail" in script
    assert re.search(r'venv="\$\(mktemp -d\)"', script) and "trap 'rm -rf \"$venv\"' EXIT" in script
    creation = [c for c in commands if "-m venv" in c]
    assert creation == ['"${PYTHON:-python3}" -m venv "$venv"']  # no --system-site-packages
    assert commands.index('source "$venv/bin/activate"') < commands.index(setup)
    assert not [c for c in commands if "pip install" in c and c != setup]


def test_the_suite_uses_a_temporary_data_root():
    """conftest.py points MTL_DATA_ROOT at a temporary folder unless the caller chose one: never <repo>/data."""
    root = Path(os.environ["MTL_DATA_ROOT"]).resolve()
    assert mnist.data_root() == root and root != (REPO / "data").resolve()


def entry_points():
    """Every script with a ``__main__`` block that builds an ArgumentParser: (module name, its file)."""
    found = []
    for path in sorted([*REPO.glob("*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("loaders/*.py"),
                        *REPO.glob("experiments/**/*.py")]):
        text = path.read_text()
        if "__main__" in text and "ArgumentParser(" in text and path.name != "conftest.py":
            found.append(path)
    return found


def test_the_entry_points_are_found():
    names = {p.relative_to(REPO).as_posix() for p in entry_points()}
    assert {"train_multi_task_counter_stream.py", "experiments/table2_sweep.py", "experiments/table2.py",
            "experiments/figure3.py", "experiments/gumbel_clusters.py", "experiments/plots/allocation.py",
            "benchmarks/bench_train.py", "loaders/clevr_like.py"} <= names


@pytest.mark.parametrize("path", entry_points(), ids=lambda p: str(p.relative_to(REPO)))
def test_help_shows_the_docstrings_whole_first_paragraph(path):
    relative = path.relative_to(REPO)
    command = ([sys.executable, "-m", ".".join(relative.with_suffix("").parts)]
               if relative.parts[0] in ("loaders", "experiments") else [sys.executable, str(path)])
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    description = " ".join(proc.stdout.split("\n\n")[1].split())
    assert re.search(r"[.!?][\"')]*$", description), f"{relative}: --help description ends mid-sentence: {description}"
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    if "description=__doc__" in path.read_text():  # argparse rewraps it, also after a hyphen
        assert "".join(description.split()) == "".join(docstring.split("\n\n")[0].split())
