"""benchmarks/bench_revisions.py: one run's step at this checkout against another revision, in one process."""
import json
import subprocess
import sys

import pytest

from runtime.files import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_revisions  # noqa: E402


def test_a_base_revision_is_imported_apart_from_this_checkout(tmp_path):
    """The base's modules come from its own folder, and this checkout's modules are back in place afterwards."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    import training.loop
    ours = training.loop
    base = bench_revisions.import_revision(tmp_path)
    assert base.loop.__file__ == str(tmp_path / "training" / "loop.py")
    assert base.loop.train_epoch.__globals__["__file__"] == str(tmp_path / "training" / "loop.py")
    assert sys.modules["training.loop"] is ours


def test_the_same_revision_trains_the_same_run_and_is_timed(tmp_path, capsys):
    """--base HEAD: both paths time a step of uniform scaling, and the results JSON names both commits."""
    out = tmp_path / "figures.json"
    assert bench_revisions.main(["--base", "HEAD", "--quick", "--device", "cpu", "--methods", "uniform_scaling",
                                 "--steps", "1", "--epochs", "1", "--out", str(out)]) == 0
    assert "uniform_scaling  ms/step base" in capsys.readouterr().out
    if out.exists():  # written only from a clean commit
        figures = json.loads(out.read_text())
        row = figures["methods"]["uniform_scaling"]
        assert min(row["ms_per_step"].values()) > 0 and min(row["head_over_base"].values()) > 0
        assert figures["git_commit"].startswith(figures["base_commit"])


def test_an_unknown_base_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        bench_revisions.main(["--base", "no-such-revision-xyz", "--methods", "uniform_scaling"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--base: 'no-such-revision-xyz' is not a revision" in error
