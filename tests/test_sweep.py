"""The Table 2 sweep and its table: aggregation of synthetic results, rendering, the sweep's command line, and
one tiny real sweep end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import make_table2
import plot_accuracy_vs_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"optimizer": "Adam", "lr": 0.001, "batch_size": 512, "lr_schedule": "halve_30_60_90"}


def fake_run(runs_dir, method, setting, seed, acc, epochs=100, subset=None, name=None):
    """Writes a results.json as the training script does (only the keys the table reads)."""
    out = Path(runs_dir) / (name or f"{setting}/{method}/seed{seed}")
    out.mkdir(parents=True)
    results = {"command": "python train_multi_task_counter_stream.py", "git_commit": "abc123", "device": "cpu (test)",
               "seed": seed, "epochs": epochs, "method": method, "setting": setting, "subset": subset,
               "num_params": 24490, "num_weights": 24350, "params_x": 1.0041, "weights_x": 1.0041, "best_epoch": epochs,
               "val_acc_mean": acc, "test_acc_mean": acc, "test_acc_per_task": [acc, acc],
               "test_acc_mean_last": acc - 1.0, "wall_time_s": 10.0, "params": PARAMS}
    (out / "results.json").write_text(json.dumps(results))
    return out


@pytest.fixture
def runs(tmp_path):
    for seed, acc in enumerate([95.0, 96.0, 97.0]):
        fake_run(tmp_path, "ch_mod", "2digits", seed, acc)
    for seed, acc in enumerate([90.0, 90.5]):
        fake_run(tmp_path, "uniform_scaling", "2digits", seed, acc)
    fake_run(tmp_path, "controlnet", "4digits", 0, 94.0)
    fake_run(tmp_path, "gumbel_matrix", "9digits", 0, 80.0)
    return tmp_path


def sweep(*args):
    return subprocess.run([sys.executable, str(REPO / "reproduce_table2.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_aggregate_mean_sample_std_difference_and_mark(runs):
    table = make_table2.aggregate(runs)
    assert table["protocol"] == {"epochs": 100, "subset": None, "protocol": "held_out"} and table["num_runs"] == 7
    cell = table["rows"]["ch_mod"]["2digits"]
    assert cell["n"] == 3 and cell["seeds"] == [0, 1, 2]
    assert cell["acc_mean"] == pytest.approx(96.0) and cell["acc_std"] == pytest.approx(1.0)  # ddof=1
    assert cell["acc_last_mean"] == pytest.approx(95.0)
    assert cell["paper_acc"] == 95.87 and cell["diff"] == pytest.approx(0.13)
    assert cell["outside_2std"] is False and cell["params_x"] == pytest.approx(1.0041)
    uniform = table["rows"]["uniform_scaling"]["2digits"]
    assert uniform["acc_std"] == pytest.approx(0.5 / 2 ** 0.5) and uniform["outside_2std"] is True
    single = table["rows"]["controlnet"]["4digits"]
    assert single["n"] == 1 and single["acc_std"] is None and single["outside_2std"] is None
    assert single["note"] == "n=1, no std"
    missing = table["rows"]["gradnorm"]["9digits"]
    assert missing["n"] == 0 and missing["acc_mean"] is None and missing["paper_acc"] == 74.66
    assert table["wall_time"]["seconds"] == pytest.approx(70.0) and "wall_time_s" in table["wall_time"]["source"]


def test_mixed_protocols_are_kept_apart(runs):
    fake_run(runs, "ch_mod", "2digits", 0, 50.0, epochs=1, subset=300, name="smoke/seed0")
    table = make_table2.aggregate(runs)  # the protocol with most runs: 100 epochs, full data
    cell = table["rows"]["ch_mod"]["2digits"]
    assert cell["n"] == 3 and cell["acc_mean"] == pytest.approx(96.0)
    assert cell["other_protocols"] == [{"epochs": 1, "subset": 300, "protocol": "held_out", "n": 1, "acc_mean": 50.0}]
    assert {"epochs": 1, "subset": 300, "protocol": "held_out", "runs": 1} in table["protocols_found"]
    chosen = make_table2.aggregate(runs, protocol=(1, 300, "held_out"))
    assert chosen["num_runs"] == 1 and chosen["rows"]["ch_mod"]["2digits"]["acc_mean"] == 50.0
    assert chosen["rows"]["uniform_scaling"]["2digits"]["n"] == 0
    markdown = make_table2.render_markdown(table, "cmd")
    assert "other protocols" in markdown and "2digits/ch_mod: protocol held_out, epochs 1, subset 300, n=1, acc 50.00" \
        in markdown


def test_markdown_table_cells_and_header(runs, tmp_path):
    out_dir = tmp_path / "results"
    assert make_table2.main(["--runs_dir", str(runs), "--out_dir", str(out_dir)]) == 0
    markdown = (out_dir / "table2.md").read_text()
    main_table = markdown.split("at the last epoch")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table.splitlines() if line.startswith("| ")}
    assert list(rows)[1:10] == list(make_table2.PAPER_METHODS)  # the paper's row order, after the header row
    assert list(rows)[10:] == [f"{m} (ours, not in the paper)" for m in make_table2.EXTRA_METHODS]
    gumbel = rows["gumbel_matrix (ours, not in the paper)"]
    assert gumbel.count("| – |") == 3 and "80.00 (n=1, no std) (not in the paper) |" in gumbel
    assert "1.004 (–)" in gumbel
    assert "96.00 ± 1.00 (95.87, +0.13) |" in rows["ch_mod"] and "1.004 (1.004)" in rows["ch_mod"]
    assert "90.25 ± 0.35 (95.30, -5.05) † [n=2] |" in rows["uniform_scaling"]
    assert "94.00 (n=1, no std) (94.64, -0.64)" in rows["controlnet"]
    assert rows["gradnorm"].count("| – |") == 4
    for text in ("Protocol: held_out (trained on MNIST train[:50k], validation split train[50k:]), 100 epochs, full "
                 "data, seeds 0, 1, 2", "Acc: test accuracy (%) at the best-validation epoch", "Adam, lr 0.001, batch 512", "cpu (test)",
                 "`abc123`", "sum of the shown runs' wall_time_s", "Generated by: `python make_table2.py"):
        assert text in markdown
    table = json.loads((out_dir / "table2.json").read_text())
    assert table["rows"]["ch_mod"]["2digits"]["acc_std"] == pytest.approx(1.0)


def test_plot(runs, tmp_path):
    pytest.importorskip("matplotlib")
    make_table2.write_tables(make_table2.aggregate(runs), tmp_path)
    out = tmp_path / "plot.png"
    assert plot_accuracy_vs_params.main(["--table", str(tmp_path / "table2.json"), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert plot_accuracy_vs_params.main([]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_dry_run_lists_cells_and_their_state(tmp_path):
    fake_run(tmp_path, "ch_mod", "2digits", 0, 90.0, epochs=3, subset=50)
    (tmp_path / "2digits/ch_mod/seed1").mkdir(parents=True)
    (tmp_path / "2digits/ch_mod/seed1/checkpoint.pt").write_bytes(b"")
    fake_run(tmp_path, "controlnet", "2digits", 0, 90.0, epochs=5, subset=50)
    proc = sweep("--dry_run", "--methods", "ch_mod,controlnet", "--settings", "2digits", "--seeds", "0,1,2",
                 "--epochs", 3, "--subset", 50, "--runs_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    states = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines()[:-1]}
    assert states == {"2digits/ch_mod/seed0": "done", "2digits/ch_mod/seed1": "resume",
                      "2digits/ch_mod/seed2": "start", "2digits/controlnet/seed0": "conflict",
                      "2digits/controlnet/seed1": "start", "2digits/controlnet/seed2": "start"}
    assert "6 cell(s) (3 epochs, subset 50): 1 done, 1 to resume, 3 to start, 1 in conflict" in proc.stdout
    assert not (tmp_path / "sweep.json").exists()


def test_bad_methods_exit_2_with_the_valid_choices(tmp_path):
    proc = sweep("--methods", "ch_mod,controlnett", "--runs_dir", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'controlnett'" in proc.stderr
    assert ",".join(make_table2.METHODS) in proc.stderr


def test_failing_cell_is_reported_and_the_exit_code_is_1(tmp_path):
    out = tmp_path / "2digits/ch_mod/seed0"
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = sweep("--methods", "ch_mod", "--settings", "2digits", "--seeds", 1, "--epochs", 1, "--subset", 100,
                 "--runs_dir", tmp_path, "--no_table", "--device", "cpu")
    assert proc.returncode == 1
    failure = next(line for line in proc.stderr.splitlines() if line.startswith("FAILED"))
    assert failure.startswith("FAILED 2digits/ch_mod/seed0 (exit 1): error:") and "checkpoint.pt" in failure
    assert "error:" in (out / "stderr.txt").read_text()
    log = json.loads((tmp_path / "sweep.json").read_text())
    assert log["invocations"][0]["cells_run"] == 1 and log["invocations"][0]["cells_failed"] == 1


def test_tiny_real_sweep_end_to_end(tmp_path):
    runs_dir, out_dir = tmp_path / "runs", tmp_path / "results"
    args = ["--methods", "uniform_scaling,ch_mod", "--settings", "2digits", "--seeds", 1, "--epochs", 1,
            "--subset", 300, "--runs_dir", runs_dir, "--out_dir", out_dir, "--device", "cpu"]
    proc = sweep(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("uniform_scaling", "ch_mod"):
        results = json.loads((runs_dir / f"2digits/{method}/seed0/results.json").read_text())
        assert (results["method"], results["epochs"], results["subset"], results["seed"]) == (method, 1, 300, 0)
    table = json.loads((out_dir / "table2.json").read_text())
    assert table["protocol"] == {"epochs": 1, "subset": 300} and table["num_runs"] == 2
    assert table["rows"]["ch_mod"]["2digits"]["note"] == "n=1, no std"
    assert "from sweep.json (1 invocation(s)" in (out_dir / "table2.md").read_text()

    again = sweep(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 done, 0 to resume, 0 to start" in again.stdout
    log = json.loads((runs_dir / "sweep.json").read_text())
    assert [item["cells_run"] for item in log["invocations"]] == [2, 0]
    assert log["total_wall_s"] == pytest.approx(sum(item["wall_s"] for item in log["invocations"]))
