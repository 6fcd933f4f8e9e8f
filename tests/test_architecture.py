"""The house holds (docs/architecture.md): every import of the code, read with ``ast``, goes only where the drawing
allows, and the allowed imports between folders form no cycle; one run's step and the weightings are written for one
process, and a single run on the CPU imports none of the engines around the step."""
import ast
import json
import os
import subprocess
import sys
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
    "weighting": {"losses", "models"},
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


# the layers around one run's step, imported only when asked for (docs/architecture.md, "The training package")
ENGINES = ("training.ddp", "training.engine", "training.stacked", "training.step_graph", "weighting.batched")


def imported_modules(source):
    """The dotted names of the modules ``source`` imports (``from a import b``: ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_step_is_written_for_one_process():
    """training/loop.py imports neither the process group (runtime.distributed) nor an engine: what torchrun
    changes comes in through its ``processes`` argument (training/ddp.py)."""
    imported = imported_modules((REPO / "training" / "loop.py").read_text())
    assert not {name for name in imported if name.startswith("runtime")} | (set(ENGINES) & imported), imported
    assert "training.ddp" in imported_modules((REPO / "training" / "trainer.py").read_text())  # the run's layer


def model_modules(source):
    """The modules of models/ that ``source`` imports (``from models import lenet`` imports ``models.lenet``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.ImportFrom) and node.module == "models":
            names += [f"models.{alias.name}" for alias in node.names
                      if (REPO / "models" / f"{alias.name}.py").exists()]
        found.update(name for name in names if name.split(".")[0] == "models")
    return found


# What training/ takes from models/: anywhere the registry (``models``: build_model, the model names, parameter
# counts) and the training hooks (models/hooks.py); a model's own module only where the param file's schema reads its
# options (config.py: backbones, router options, dropouts) and in the round-robin protocol of the Gumbel-matrix MNIST
# net (round_robin.py). Everything else about a model reaches training/ through its hooks and capabilities.
MODELS_FOR_TRAINING = {"models", "models.hooks"}
MODEL_MODULES_IN_TRAINING = {
    "config": {"models.backbones", "models.gumbel_matrix", "models.lenet"},
    "round_robin": {"models.gumbel_matrix"},
}


@pytest.mark.parametrize("path", sorted((REPO / "training").rglob("*.py")), ids=lambda p: p.name)
def test_training_takes_from_models_only_the_registry_and_the_hooks(path):
    allowed = MODELS_FOR_TRAINING | MODEL_MODULES_IN_TRAINING.get(path.stem, set())
    assert model_modules(path.read_text()) <= allowed, \
        f"training/{path.name} imports {sorted(model_modules(path.read_text()) - allowed)}; allowed: {sorted(allowed)}"


def test_the_check_of_models_in_training_can_fail():
    assert model_modules("from models.gumbel_matrix import GumbelMatrixRouter\n") == {"models.gumbel_matrix"}
    assert model_modules("def f():\n    from models import lenet, build_model\n") == {"models", "models.lenet"}
    assert model_modules("import models.lenet as lenet\nfrom training import optim\n") == {"models.lenet"}


def test_the_engines_hold_no_method_of_a_model():
    """The stacked engine calls the models' training hooks (models/hooks.py) on the stacked model, which runs them
    per replica: no Gumbel-matrix temperature, budget or allocation code in training/engine.py or training/stacked.py,
    and stacked.py finds the modules with random draws of their own by their ``random_draws`` (models/hooks.py):
    it imports no model and names no model class."""
    for name in ("engine", "loop", "step_graph"):
        imported = imported_modules((REPO / "training" / f"{name}.py").read_text())
        assert not {module for module in imported if module.startswith("models")}, (name, imported)
    source = (REPO / "training" / "stacked.py").read_text()
    assert model_modules(source) == {"models.hooks"}
    classes = {node.name for path in (REPO / "models").rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ClassDef)}
    names = {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)} | \
        {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)}
    assert {"GumbelMatrixRouter", "SenerKoltunDropout"} <= classes and not names & (classes - {"TrainingHooks"})


def test_the_check_of_the_step_can_fail():
    assert "runtime.distributed" in imported_modules("from runtime import distributed\n")
    assert "training.ddp" in imported_modules("def f():\n    from training import ddp\n")


def test_a_single_cpu_run_imports_no_engine(tmp_path):
    """One seed of a weighting on task gradients (GradNorm), one short epoch on the CPU, in a fresh interpreter:
    the DDP layer, the stacked engine, the CUDA graph and the stacked weightings stay unimported."""
    params = tmp_path / "gradnorm.json"
    params.write_text(json.dumps({"exp_id": "gradnorm", "method": "gradnorm", "setting": "2digits",
                                  "batch_size": 128, "lr_schedule": "none"}))
    code = ("import json, sys\nimport train_multi_task_counter_stream as script\n"
            f"code = script.main(['--param_file', {str(params)!r}, '--epochs', '1', '--subset', '300', "
            f"'--device', 'cpu', '--out', {str(tmp_path / 'run')!r}])\n"
            "print(json.dumps([code, sorted(sys.modules)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, modules = json.loads(proc.stdout.splitlines()[-1])
    assert code == 0 and "training.loop" in modules and "weighting.gradnorm" in modules
    assert not set(ENGINES) & set(modules), sorted(set(ENGINES) & set(modules))
