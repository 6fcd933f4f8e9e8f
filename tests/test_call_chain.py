"""benchmarks/call_chain.py counts what it says on a toy project with a known call graph: the chain to the step, the
entries into other modules made by the chain's own functions, the modules entered and the opens of the param file."""
import sys

from runtime.files import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import call_chain  # noqa: E402

TOY = {
    "train_multi_task_counter_stream.py": "from toy_pkg import a\n\n\ndef main(argv):\n    return a.run(argv)\n",
    "toy_pkg/__init__.py": "",
    "toy_pkg/a.py": """import json

import torch

from toy_pkg import b


def run(argv):
    json.load(open(argv[1]))
    b.helper()
    b.helper()
    return step(b.read(argv[1]))


def step(text):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    optimizer.zero_grad()
    raise AssertionError("the measurement ends at the step's zero_grad")
""",
    "toy_pkg/b.py": "def helper():\n    return inner()\n\n\ndef inner():\n    return 1\n\n\n"
                    "def read(path):\n    with open(path) as file:\n        return file.read()\n",
    "tests/test_toy.py": "",  # not the project's code
}


def test_a_toy_projects_chain_entries_and_opens(tmp_path, monkeypatch):
    for name, text in TOY.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "params.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(call_chain, "RUNS", {"toy": ("params.json", [])})
    monkeypatch.delitem(sys.modules, "toy_pkg", raising=False)
    try:
        figures = call_chain.measure(tmp_path.resolve(), "toy")
    finally:
        for name in ("toy_pkg", "toy_pkg.a", "toy_pkg.b"):
            sys.modules.pop(name, None)
    assert figures["chain"] == ["train_multi_task_counter_stream.main", "toy_pkg.a.run", "toy_pkg.a.step"]
    # main -> a.run once; a.run -> b.helper twice and b.read once; b.helper -> b.inner is not the chain's own call,
    # a.run -> a.step stays in its module
    assert figures["entries_per_module"] == {"toy_pkg.b": 3, "toy_pkg.a": 1}
    assert figures["entries"] == 4 and figures["modules_entered"] == 3
    assert figures["param_file_opens"] == 2  # json.load(open(...)) and b.read


def test_a_file_outside_the_project_or_in_its_tests_is_no_module(tmp_path):
    assert call_chain.module_of(str(tmp_path / "training" / "config.py"), tmp_path) == "training.config"
    assert call_chain.module_of(str(tmp_path / "distributed.py"), tmp_path) == "runtime.distributed"  # its old name
    assert call_chain.module_of(str(tmp_path / "loaders" / "__init__.py"), tmp_path) == "loaders"
    assert call_chain.module_of(str(tmp_path / "tests" / "test_x.py"), tmp_path) is None
    assert call_chain.module_of("/usr/lib/python3/json/__init__.py", tmp_path) is None
