"""The house holds (docs/architecture.md): every import of the code, read with ``ast``, goes only where the drawing
allows, and the allowed imports between folders form no cycle."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "train_multi_task_counter_stream.py"

# unit -> the units it may import (besides itself); docs/architecture.md, "Rules"
BELOW_TRAINING = {"weighting", "models", "loaders", "losses", "metrics", "runtime"}
ALLOWED = {
    "script": {"training", "runtime"},
    "experiments": {"training"} | BELOW_TRAINING,
    "benchmarks": {"training"} | BELOW_TRAINING,
    "training": BELOW_TRAINING,
    "weighting": {"losses", "models", "runtime"},
    "loaders": {"runtime"},
    "models": set(),
    "losses": set(),
    "metrics": set(),
    "runtime": set(),
}
UNITS = {"train_multi_task_counter_stream": "script", **{name: name for name in ALLOWED if name != "script"}}


def unit_of_module(dotted):
    """The unit a module name belongs to; None for anything outside the project (torch, numpy, the stdlib)."""
    return UNITS.get(dotted.split(".")[0])


def unit_of_file(path):
    relative = path.relative_to(REPO)
    return unit_of_module(".".join(relative.with_suffix("").parts))


def imported_units(source, own_unit):
    """The project units that ``source`` imports (relative imports stay in ``own_unit``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(unit_of_module(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(own_unit if node.level else unit_of_module(node.module))
    return found - {None}


def violations(source, unit):
    """The units ``source`` (a file of ``unit``) imports that the drawing does not allow."""
    return sorted(imported_units(source, unit) - {unit} - ALLOWED[unit])


def code_files():
    files = [REPO / SCRIPT, REPO / "losses.py", REPO / "metrics.py"]
    for folder in ("experiments", "benchmarks", "training", "weighting", "loaders", "models", "runtime"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def test_every_code_file_belongs_to_a_unit_of_the_drawing():
    top_level = sorted(p.name for p in REPO.glob("*.py"))
    assert top_level == ["conftest.py", "losses.py", "metrics.py", SCRIPT]
    assert all(unit_of_file(path) for path in code_files())
    assert len(code_files()) >= 70  # the globs found the code


@pytest.mark.parametrize("path", code_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_imports_follow_the_drawing(path):
    unit = unit_of_file(path)
    assert not violations(path.read_text(), unit), \
        f"{path.relative_to(REPO)} ({unit}) imports {violations(path.read_text(), unit)}; allowed: {sorted(ALLOWED[unit])}"


def test_the_check_catches_an_upward_import():
    """The rule above can fail: a loss weighting reaching into the training package, a model importing a loader,
    and anything importing the training script."""
    assert violations("from training.loop import train_epoch\n", "weighting") == ["training"]
    assert violations("def f():\n    from loaders import LOADERS\n", "models") == ["loaders"]
    assert violations("import train_multi_task_counter_stream as script\n", "experiments") == ["script"]
    assert violations("from . import lenet\nimport torch\n", "models") == []


def test_the_allowed_imports_form_no_cycle():
    visiting, done = set(), set()

    def visit(unit, path):
        assert unit not in visiting, f"cycle: {' -> '.join(path + [unit])}"
        if unit in done:
            return
        visiting.add(unit)
        for other in ALLOWED[unit]:
            visit(other, path + [unit])
        visiting.discard(unit)
        done.add(unit)
    for unit in ALLOWED:
        visit(unit, [])
