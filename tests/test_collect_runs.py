"""experiments/collect_runs.py: finished runs are copied for committing, never over another copy, and only when
their commit names code in this checkout's history."""
import json
import subprocess

import pytest

from experiments import collect_runs
from runtime.files import REPO

HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def make_run(root, relative, commit=HEAD, finished=True):
    run = root / relative
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.0}\n')
    (run / "checkpoint.pt").write_bytes(b"resume state")
    if finished:
        (run / "results.json").write_text(json.dumps({"git_commit": commit, "test_acc_mean": 50.0}))
    return run


@pytest.fixture
def sweep(tmp_path):
    source = tmp_path / "runs"
    make_run(source, "9digits/controlnet/seed0")
    make_run(source, "9digits/ch_mod/seed0", commit=HEAD + "-dirty")
    make_run(source, "9digits/mgda/seed0", commit="0123456789abcdef0123456789abcdef01234567")  # a rebased-away commit
    make_run(source, "9digits/kendall/seed0", finished=False)
    return source, tmp_path / "results"


def test_clean_finished_runs_are_copied_without_checkpoints_and_unclean_ones_refused(sweep, capsys):
    source, destination = sweep
    assert collect_runs.main([str(source), str(destination)]) == 1
    out = capsys.readouterr().out
    copied = destination / "9digits" / "controlnet" / "seed0"
    assert sorted(p.name for p in copied.iterdir()) == ["metrics.jsonl", "results.json"]
    assert (copied / "results.json").read_text() == (source / "9digits/controlnet/seed0/results.json").read_text()
    assert "9digits/controlnet/seed0: copied" in out
    assert f"9digits/ch_mod/seed0: refused: its commit is '{HEAD}-dirty', not a clean one" in out
    assert "9digits/mgda/seed0: refused: its commit 0123456789ab is not in this checkout's history" in out
    assert "kendall" not in out  # still training: no results.json yet
    assert sorted(p.name for p in (destination / "9digits").iterdir()) == ["controlnet"]


def test_a_second_collect_skips_identical_copies_and_never_overwrites_a_different_one(tmp_path, capsys):
    source, destination = tmp_path / "runs", tmp_path / "results"
    make_run(source, "2digits/controlnet/seed0")
    make_run(source, "2digits/mgda/seed0")
    assert collect_runs.main([str(source), str(destination)]) == 0
    kept = destination / "2digits" / "mgda" / "seed0" / "metrics.jsonl"
    kept.write_text("committed earlier\n")
    capsys.readouterr()
    assert collect_runs.main([str(source), str(destination)]) == 1
    out = capsys.readouterr().out
    assert "2digits/controlnet/seed0: already there" in out
    assert "2digits/mgda/seed0: differs:" in out and "left as it is" in out
    assert kept.read_text() == "committed earlier\n"


def test_allow_unclean_and_dry_run(sweep, capsys):
    source, destination = sweep
    assert collect_runs.main([str(source), str(destination), "--dry_run", "--allow_unclean"]) == 0
    assert capsys.readouterr().out.count("copied (dry run)") == 3 and not destination.exists()
    assert collect_runs.main([str(source), str(destination), "--allow_unclean"]) == 0
    assert len(list(destination.rglob("results.json"))) == 3


def test_a_source_that_is_no_folder_is_one_line_exit_2(tmp_path, capsys):
    assert collect_runs.main([str(tmp_path / "nowhere"), str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere is not a folder" in err
