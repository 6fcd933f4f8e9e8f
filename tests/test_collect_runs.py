"""experiments/collect_runs.py: finished runs are copied for committing, never over another copy, and only when
their commit names code in this checkout's history."""
import json
import os
import subprocess

import pytest

from experiments import collect_runs
from runtime.files import REPO



@pytest.fixture(scope="module")
def head():
    """This checkout's HEAD commit; the tests that need git history are skipped outside a full git checkout."""
    if collect_runs.checkout_problem():
        pytest.skip(collect_runs.checkout_problem())
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def make_run(root, relative, commit, finished=True):
    run = root / relative
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.0}\n')
    (run / "checkpoint.pt").write_bytes(b"resume state")
    if finished:
        (run / "results.json").write_text(json.dumps({"git_commit": commit, "test_acc_mean": 50.0}))
    return run


@pytest.fixture
def sweep(tmp_path, head):
    source = tmp_path / "runs"
    make_run(source, "9digits/controlnet/seed0", head)
    make_run(source, "9digits/ch_mod/seed0", head + "-dirty")
    make_run(source, "9digits/mgda/seed0", "0123456789abcdef0123456789abcdef01234567")  # a rebased-away commit
    make_run(source, "9digits/kendall/seed0", head, finished=False)
    return source, tmp_path / "results", head


def test_clean_finished_runs_are_copied_without_checkpoints_and_unclean_ones_refused(sweep, capsys):
    source, destination, head = sweep
    assert collect_runs.main([str(source), str(destination)]) == 1
    out = capsys.readouterr().out
    copied = destination / "9digits" / "controlnet" / "seed0"
    assert sorted(p.name for p in copied.iterdir()) == ["metrics.jsonl", "results.json"]
    assert (copied / "results.json").read_text() == (source / "9digits/controlnet/seed0/results.json").read_text()
    assert "9digits/controlnet/seed0: copied" in out
    assert f"9digits/ch_mod/seed0: refused: its commit is '{head}-dirty', not a clean one" in out
    assert "9digits/mgda/seed0: refused: its commit 0123456789ab is not in this checkout's history" in out
    assert "kendall" not in out  # still training: no results.json yet
    assert sorted(p.name for p in (destination / "9digits").iterdir()) == ["controlnet"]


def test_a_second_collect_skips_identical_copies_and_never_overwrites_a_different_one(tmp_path, capsys, head):
    source, destination = tmp_path / "runs", tmp_path / "results"
    make_run(source, "2digits/controlnet/seed0", head)
    make_run(source, "2digits/mgda/seed0", head)
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
    source, destination, _ = sweep
    assert collect_runs.main([str(source), str(destination), "--dry_run", "--allow_unclean"]) == 0
    assert capsys.readouterr().out.count("copied (dry run)") == 3 and not destination.exists()
    assert collect_runs.main([str(source), str(destination), "--allow_unclean"]) == 0
    assert len(list(destination.rglob("results.json"))) == 3


def test_a_source_that_is_no_folder_is_one_line_exit_2(tmp_path, capsys):
    assert collect_runs.main([str(tmp_path / "nowhere"), str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere is not a folder" in err


@pytest.mark.parametrize("fake_git, reason", [
    ("exit 128", "is not a git checkout"),
    ("echo true", "is a shallow clone (git fetch --unshallow gives it its history)"),
])
def test_a_checkout_that_cannot_check_commits_says_why(tmp_path, monkeypatch, capsys, fake_git, reason):
    fake = tmp_path / "bin" / "git"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n{fake_git}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    collect_runs.checkout_problem.cache_clear()
    try:
        make_run(tmp_path / "runs", "2digits/mgda/seed0", "0123456789abcdef0123456789abcdef01234567")
        assert collect_runs.main([str(tmp_path / "runs"), str(tmp_path / "results")]) == 1
        assert f"refused: its commit 0123456789ab cannot be checked: {REPO} {reason}" in capsys.readouterr().out
    finally:
        collect_runs.checkout_problem.cache_clear()


def test_a_run_whose_metrics_end_before_its_last_epoch_is_refused(tmp_path, capsys, head):
    source = tmp_path / "runs"
    for name, epochs in (("whole", 1), ("short", 2)):
        run = make_run(source, f"2digits/{name}/seed0", head)
        (run / "results.json").write_text(json.dumps({"git_commit": head, "epochs": epochs}))
    assert collect_runs.main([str(source), str(tmp_path / "results")]) == 1
    out = capsys.readouterr().out
    assert "2digits/whole/seed0: copied" in out
    assert "2digits/short/seed0: refused: metrics.jsonl ends at epoch 1 of 2 (resume the run to write it whole)" in out
    assert not (tmp_path / "results" / "2digits" / "short").exists()
