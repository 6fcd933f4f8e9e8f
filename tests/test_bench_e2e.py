"""benchmarks/bench_e2e.py: its arguments, its schedule of processes (dry run) and its summary of the times. Nothing
is timed here."""
import sys

import pytest

from runtime.files import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_e2e  # noqa: E402


def test_the_arms_take_turns_in_abba_order():
    assert bench_e2e.schedule(["base", "head"], ["controlnet9", "single_task9"], 3) == [
        (0, "controlnet9", "base"), (0, "controlnet9", "head"), (0, "single_task9", "base"), (0, "single_task9", "head"),
        (1, "controlnet9", "head"), (1, "controlnet9", "base"), (1, "single_task9", "head"), (1, "single_task9", "base"),
        (2, "controlnet9", "base"), (2, "controlnet9", "head"), (2, "single_task9", "base"), (2, "single_task9", "head")]


def test_the_dry_run_prints_every_process_and_runs_none(capsys):
    assert bench_e2e.main(["--base", "HEAD", "--dry_run", "--runs", "single_task9", "--arms", "base_tunables,head",
                           "--repeats", "2", "--epochs", "3", "--subset", "500"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert [line.split()[3] for line in lines] == ["base_tunables", "head", "head", "base_tunables"]
    assert f"GLIBC_TUNABLES={bench_e2e.TUNABLES} <base>/train_multi_task_counter_stream.py" in lines[0]
    assert "GLIBC_TUNABLES" not in lines[1]
    assert lines[1].endswith("--param_file " + str(REPO / "params/mmnist_9digits_single_task.json")
                             + " --epochs 3 --subset 500 --seed 0 --device cpu --out <tmp>")


def test_every_process_gets_its_arms_allocator_environment(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.top_pad=1")  # the caller's own setting never leaks in
    assert "GLIBC_TUNABLES" not in bench_e2e.environment("base", 1)
    assert "GLIBC_TUNABLES" not in bench_e2e.environment("head", 1)
    assert bench_e2e.environment("base_tunables", 2)["GLIBC_TUNABLES"] == bench_e2e.TUNABLES
    assert bench_e2e.environment("head_default_malloc", 1)["OMP_NUM_THREADS"] == "1"


def test_the_summary_pairs_each_repetition_with_the_first_arms():
    metrics = [{"epoch": 1, "train_loss": 2.0}]
    times = {"base": {"epoch_cpu_s": [5.0, 6.0, 5.5], "epochs_s": [10.0, 12.0, 11.0], "cpu_s": [11.0, 13.0, 12.0],
                      "process_s": [12.0, 14.0, 13.0], "minor_faults": [9e5, 8e5, 1e6], "metrics": [metrics] * 3},
             "head": {"epoch_cpu_s": [4.0, 4.2, 4.4], "epochs_s": [8.0, 6.0, 9.9], "cpu_s": [9.0, 9.0, 9.0],
                      "process_s": [10.0, 8.0, 12.0], "minor_faults": [1e5, 1e5, 1e5],
                      "metrics": [metrics, metrics, [{"epoch": 1, "train_loss": 2.5}]]}}
    out = bench_e2e.summary(times, ["base", "head"])
    assert out["base"]["median_epochs_s"] == 11.0 and out["head"]["median_epochs_s"] == 8.0
    assert out["head"]["ratio_epochs_s"]["paired"] == [0.8, 0.5, 0.9]
    assert out["head"]["ratio_epochs_s"]["median"] == 0.8 and out["head"]["ratio_epochs_s"]["of_medians"] == 0.727
    assert out["head"]["ratio_epochs_s"]["min"] == 0.5 and out["head"]["ratio_epochs_s"]["max"] == 0.9
    assert out["head"]["ratio_epoch_cpu_s"]["paired"] == [0.8, 0.7, 0.8]
    assert out["head"]["identical"] is False and out["base"]["repeatable"] is True
    assert out["final_train_loss"] == 2.0


@pytest.mark.parametrize("argv, message", [
    (["--runs", "controlnet9,resnet"], "--runs: unknown run 'resnet'; valid choices: controlnet9,"),
    (["--arms", "head"], "--arms: name two or more to compare"),
    (["--arms", "base,head,jemalloc"], "--arms: unknown arm 'jemalloc'"),
    (["--base", "no-such-revision-xyz"], "--base: 'no-such-revision-xyz' is not a revision"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_e2e.main(argv + ["--dry_run"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error
