"""The Table 2 sweep and its table: aggregation of synthetic results, rendering, the sweep's command line, and
one tiny real sweep end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import table2
from experiments.plots import accuracy_vs_params as plot_accuracy_vs_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"optimizer": "Adam", "lr": 0.001, "batch_size": 512, "lr_schedule": "halve_30_60_90"}


def fake_run(runs_dir, method, setting, seed, acc, epochs=100, subset=None, name=None, **params):
    """Writes a results.json as the training script does (only the keys the table reads); ``params`` change the
    param file's keys."""
    out = Path(runs_dir) / (name or f"{setting}/{method}/seed{seed}")
    out.mkdir(parents=True)
    results = {"command": "python train_multi_task_counter_stream.py", "git_commit": "abc123", "device": "cpu (test)",
               "seed": seed, "epochs": epochs, "method": method, "setting": setting, "subset": subset,
               "num_params": 24490, "num_weights": 24350, "params_x": 1.0041, "weights_x": 1.0041, "best_epoch": epochs,
               "val_acc_mean": acc, "test_acc_mean": acc, "test_acc_per_task": [acc, acc],
               "test_acc_mean_last": acc - 1.0, "wall_time_s": 10.0, "params": {**PARAMS, **params}}
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
    return subprocess.run([sys.executable, "-m", "experiments.table2_sweep", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_aggregate_mean_sample_std_difference_and_mark(runs):
    table = table2.aggregate(runs)
    assert table["protocol"]["epochs"] == 100 and table["protocol"]["subset"] is None and table["num_runs"] == 7
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
    table = table2.aggregate(runs)  # the protocol with most runs: 100 epochs, full data
    cell = table["rows"]["ch_mod"]["2digits"]
    assert cell["n"] == 3 and cell["acc_mean"] == pytest.approx(96.0)
    assert cell["other_protocols"] == [{"protocol": 2, "n": 1, "acc_mean": 50.0}]
    assert [(p["epochs"], p["subset"], p["runs"], p["shown"]) for p in table["protocols_found"]] == \
        [(100, None, 7, True), (1, 300, 1, False)]
    chosen = table2.aggregate(runs, protocol=(1, 300))
    assert chosen["num_runs"] == 1 and chosen["rows"]["ch_mod"]["2digits"]["acc_mean"] == 50.0
    assert chosen["rows"]["uniform_scaling"]["2digits"]["n"] == 0
    markdown = table2.render_markdown(table, "cmd")
    assert "other protocols" in markdown and "- protocol 2: 1 runs, 1 epochs, subset 300" in markdown


def test_a_run_with_another_lr_is_another_protocol_never_pooled(runs, tmp_path, capsys):
    fake_run(runs, "ch_mod", "2digits", 3, 10.0, name="other_lr/seed3", lr=0.01)
    table = table2.aggregate(runs)
    cell = table["rows"]["ch_mod"]["2digits"]
    assert cell["n"] == 3 and cell["acc_mean"] == pytest.approx(96.0)
    other = table["protocols_found"][1]
    assert other["runs"] == 1 and "differs from the shown protocol in lr 0.01 (shown: 0.001)" in other["description"]
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(tmp_path / "t"), "--protocol", "2"]) == 0
    printed = capsys.readouterr().out
    assert "protocol 2: 1 runs, 100 epochs, full data  <- shown" in printed
    assert "protocol 1: 7 runs, 100 epochs, full data; differs from the shown protocol in lr 0.001 (shown: 0.01)" \
        in printed
    chosen = json.loads((tmp_path / "t" / "table2.json").read_text())
    assert chosen["rows"]["ch_mod"]["2digits"]["acc_mean"] == 10.0 and chosen["num_runs"] == 1
    assert chosen["command"].endswith("--epochs 100 --protocol 2")
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(tmp_path / "t"), "--protocol", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --protocol 3: ") and "allowed: 1 to 2" in err


def test_a_seed_found_twice_is_counted_once(runs):
    for copy in range(5):
        fake_run(runs, "ch_mod", "2digits", 0, 95.0, name=f"copies/{copy}/seed0")
    cell = table2.aggregate(runs)["rows"]["ch_mod"]["2digits"]
    assert cell["n"] == 3 and cell["seeds"] == [0, 1, 2] and cell["acc_mean"] == pytest.approx(96.0)
    notes = table2.aggregate(runs)["notes"]
    assert sum("seed 0 of " in note and "counted once" in note for note in notes) == 5


def test_no_table_is_written_from_no_runs_and_the_default_output_is_under_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "results"
    out.mkdir()
    (out / "table2.md").write_text("a good table")
    assert table2.main(["--runs_dir", str(tmp_path / "empty"), "--out_dir", str(out)]) == 1
    assert "nothing written" in capsys.readouterr().err and (out / "table2.md").read_text() == "a good table"
    assert table2.parse_args([]).out_dir.startswith("runs/")


def test_markdown_table_cells_and_header(runs, tmp_path):
    out_dir = tmp_path / "results"
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(out_dir)]) == 0
    markdown = (out_dir / "table2.md").read_text()
    main_table = markdown.split("## Every figure")[1].split("at the last epoch")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table.splitlines() if line.startswith("| ")}
    assert list(rows)[1:10] == list(table2.PAPER_METHODS)  # the paper's row order, after the header row
    assert list(rows)[10:11] == [f"{m} (ours, not in the paper)" for m in table2.EXTRA_METHODS]
    assert list(rows)[11:] == [f"{m} (beyond the paper)" for m in table2.BEYOND_METHODS]
    gumbel = rows["gumbel_matrix (ours, not in the paper)"]
    assert gumbel.count("| – |") == 3 and "80.00 (n=1, no std) (not in the paper) |" in gumbel
    assert "1.004 (–)" in gumbel
    assert "96.00 ± 1.00 (95.87, +0.13) |" in rows["ch_mod"] and "1.004 (1.004)" in rows["ch_mod"]
    assert "90.25 ± 0.35 (95.30, -5.05) † [n=2] |" in rows["uniform_scaling"]
    assert "94.00 (n=1, no std) (94.64, -0.64)" in rows["controlnet"]
    assert rows["gradnorm"].count("| – |") == 4
    for text in ("Protocol: 100 epochs, full data, seeds 0, 1, 2", "Adam, lr 0.001, batch 512", "cpu (test)",
                 "`abc123`", "sum of the shown runs' wall_time_s", "Generated by: `python -m experiments.table2"):
        assert text in markdown
    hours = markdown.split("Wall time (h) of the shown runs")[1].split("\n\n")[1]
    assert "cpu (test)" in markdown.split("Wall time (h) of the shown runs")[1].split("\n")[0]
    hours = {line.split(" | ")[0].strip("| "): line for line in hours.splitlines()[2:]}
    assert hours["ch_mod"] == "| ch_mod | 0.01 | – | – | – |"  # 3 seeds x 10 s, summed
    assert hours["controlnet"] == "| controlnet | – | 0.00 | – | – |" and hours["gradnorm"].count("–") == 4
    table = json.loads((out_dir / "table2.json").read_text())
    assert table["rows"]["ch_mod"]["2digits"]["acc_std"] == pytest.approx(1.0)
    assert table["rows"]["ch_mod"]["2digits"]["wall_time_h"] == pytest.approx(30 / 3600)


@pytest.mark.parametrize("setting", ["2digits", "9digits", "9digits_byref"])
def test_plot(runs, tmp_path, capsys, setting):
    pytest.importorskip("matplotlib")
    table2.write_tables(table2.aggregate(runs), tmp_path)
    out = tmp_path / "plot.png"
    args = ["--table", str(tmp_path / "table2.json"), "--setting", setting, "--out", str(out)]
    if setting == "9digits_byref":  # no run there: one line, nothing written
        assert plot_accuracy_vs_params.main(args) == 2 and not out.exists()
        assert "has no run in '9digits_byref'" in capsys.readouterr().err
        return
    assert plot_accuracy_vs_params.main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_spreads_markers_at_the_same_params_and_labels_the_axis_as_the_table(runs):
    plt = pytest.importorskip("matplotlib.pyplot")
    table = table2.aggregate(runs)
    assert table["rows"]["uniform_scaling"]["2digits"]["params_x"] == table["rows"]["ch_mod"]["2digits"]["params_x"]
    fig = plot_accuracy_vs_params.figure(plt, table, "2digits")
    ax = fig.axes[0]
    uniform, ch_mod = (container.lines[0].get_xdata()[0] for container in ax.containers)  # ours, in row order
    factors = plot_accuracy_vs_params.spread(table, "2digits")  # only the rows with runs are drawn and spread
    assert (uniform, ch_mod) == (1.0041 * factors["uniform_scaling"], 1.0041 * factors["ch_mod"])
    assert ch_mod / uniform >= 10 ** plot_accuracy_vs_params.SPREAD * (1 - 1e-9)  # at least one step apart
    assert ax.get_xlabel().startswith("#P: parameters as a multiple of one LeNet's, as in Table 2")
    assert ax.get_title() == "Multi-MNIST, 2 digits (100 epochs)"
    assert plot_accuracy_vs_params.spread(table, "9digits") == {"gumbel_matrix": 1.0}  # its only run, alone
    plt.close(fig)


def test_plot_writes_under_runs_by_default():
    assert plot_accuracy_vs_params.parse_args(["--setting", "4digits"]).out is None
    with pytest.raises(SystemExit):
        plot_accuracy_vs_params.parse_args(["--setting", "3digits"])


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


def test_dry_run_says_how_far_a_resumable_cell_got_and_the_time_left(tmp_path):
    run = tmp_path / "9digits_byref" / "controlnet" / "seed0"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    records = [{"epoch": epoch, "epoch_time_s": 40.0 if epoch <= 5 else 30.0} for epoch in range(1, 16)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    proc = sweep("--dry_run", "--methods", "controlnet", "--settings", "9digits_byref", "--seeds", "0,",
                 "--epochs", 900, "--runs_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    # the last 10 epochs took 30 s each; 885 epochs left: 885 * 30 s = 7.375 h
    assert "resume   9digits_byref/controlnet/seed0  (epoch 15 of 900; 30.0 s per epoch lately: about 7.4 h left)" \
        in proc.stdout
    (run / "metrics.jsonl").write_text('{"epoch": 1, "lr": 0.001}\n{"epoch": 2, "lr": 0.001}\n{"epo')  # no times
    proc = sweep("--dry_run", "--methods", "controlnet", "--settings", "9digits_byref", "--seeds", "0,",
                 "--epochs", 900, "--runs_dir", tmp_path)
    assert "resume   9digits_byref/controlnet/seed0  (epoch 2 of 900)\n" in proc.stdout  # a line being written: skipped


def test_bad_methods_exit_2_with_the_valid_choices(tmp_path):
    proc = sweep("--methods", "ch_mod,controlnett", "--runs_dir", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'controlnett'" in proc.stderr
    assert ",".join(table2.METHODS) in proc.stderr


def test_failing_cell_is_reported_and_the_exit_code_is_1(tmp_path):
    out = tmp_path / "2digits/ch_mod/seed0"
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = sweep("--methods", "ch_mod", "--settings", "2digits", "--seeds", 0, "--epochs", 1, "--subset", 100,
                 "--runs_dir", tmp_path, "--no_table", "--device", "cpu")
    assert proc.returncode == 1
    failure = next(line for line in proc.stderr.splitlines() if line.startswith("FAILED"))
    assert failure.startswith("FAILED 2digits/ch_mod/seed0 (exit 2): error:") and "checkpoint.pt" in failure
    assert "error:" in (out / "stderr.txt").read_text()
    log = json.loads((tmp_path / "sweep.json").read_text())
    assert log["invocations"][0]["cells_run"] == 1 and log["invocations"][0]["cells_failed"] == 1


def test_tiny_real_sweep_end_to_end(tmp_path):
    runs_dir, out_dir = tmp_path / "runs", tmp_path / "results"
    args = ["--methods", "uniform_scaling,ch_mod", "--settings", "2digits", "--seeds", 0, "--epochs", 1,
            "--subset", 300, "--runs_dir", runs_dir, "--out_dir", out_dir, "--device", "cpu", "--set", "lr=0.002"]
    proc = sweep(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("uniform_scaling", "ch_mod"):
        results = json.loads((runs_dir / f"2digits/{method}/seed0/results.json").read_text())
        assert (results["method"], results["epochs"], results["subset"], results["seed"]) == (method, 1, 300, 0)
        assert results["params"]["lr"] == 0.002 and results["overrides"] == ["lr=0.002"]
    table = json.loads((out_dir / "table2.json").read_text())
    assert (table["protocol"]["epochs"], table["protocol"]["subset"], table["num_runs"]) == (1, 300, 2)
    assert table["rows"]["ch_mod"]["2digits"]["note"] == "n=1, no std"
    assert "from sweep.json (1 invocation(s)" in (out_dir / "table2.md").read_text()

    again = sweep(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 done, 0 to resume, 0 to start" in again.stdout
    log = json.loads((runs_dir / "sweep.json").read_text())
    assert [item["cells_run"] for item in log["invocations"]] == [2, 0]
    assert log["total_wall_s"] == pytest.approx(sum(item["wall_s"] for item in log["invocations"]))


def test_full_protocol_table_shows_all_three_figures_and_the_reason_of_every_far_cell(tmp_path, capsys):
    run = fake_run(tmp_path / "runs", "controlnet", "9digits_byref", 0, 31.0)  # paper 72.25: far
    results = json.loads((run / "results.json").read_text())
    results.update(test_acc_mean_best_test=33.0, best_test_epoch=80)
    (run / "results.json").write_text(json.dumps(results))
    fake_run(tmp_path / "runs", "uniform_scaling", "9digits_byref", 0, 30.0)  # paper 29.90: near
    reasons = tmp_path / "reasons.json"
    reasons.write_text(json.dumps({"9digits_byref/controlnet": "the curve is flat since epoch 25"}))
    assert table2.main(["--runs_dir", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "out"),
                             "--name", "table2_full", "--reasons", str(reasons)]) == 0
    text = (tmp_path / "out" / "table2_full.md").read_text()
    last, best_test = text.split("at the last epoch, mean over seeds")[1].split("at the best test epoch")
    assert "| controlnet | – | – | – | 30.00 (-42.25) |" in last  # fake runs' last epoch = acc - 1
    assert "| controlnet | – | – | – | 33.00 (-39.25) |" in best_test
    assert "| uniform_scaling | – | – | – | – |" in best_test  # that run has no best-test figure
    assert "- 9 digits by ref, controlnet (-41.25): the curve is flat since epoch 25" in text
    assert "uniform_scaling (+0.10)" not in text  # within 2 points: no reason asked
    assert f"--name table2_full --reasons {reasons}" in text


def test_summary_opens_the_table_and_readme_gets_it_between_its_markers(runs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- table2 summary begin -->\nold numbers\n<!-- table2 summary end -->\n\nrest\n")
    out_dir = tmp_path / "results"
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(out_dir), "--readme", str(readme)]) == 0
    summary = (out_dir / "table2.md").read_text().split("## Summary")[1].split("## Every figure")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    assert list(rows) == ["Method", *table2.PAPER_METHODS, "gumbel_matrix (ours)"]  # beyond the paper: no runs, no row
    assert rows["ch_mod"] == "| ch_mod | **96.00** ± 1.00 (95.87, +0.13) | – (91.38) | – (76.56) | – (32.69) |"
    assert rows["controlnet"].split(" | ")[2] == "**94.00** (94.64, -0.64)"
    assert rows["gumbel_matrix (ours)"].split(" | ")[3] == "**80.00** (Δm% –)"  # no single-task run to compare
    text = readme.read_text()
    assert text.startswith("# Title\n\n<!-- table2 summary begin -->\n| Method | 2 digits |")
    assert text.endswith("<!-- table2 summary end -->\n\nrest\n") and "old numbers" not in text
    assert rows["ch_mod"] in text and "100 epochs on the full data, seed(s) 0, 1, 2" in text
    assert "[results/table2.md](results/table2.md)" in text  # linked relative to the README
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(out_dir), "--readme", str(readme)]) == 0
    assert readme.read_text() == text  # the same runs: the same file


@pytest.mark.parametrize("readme_text", ["no markers here\n",
                                         "<!-- table2 summary end -->\n<!-- table2 summary begin -->\n"])
def test_readme_without_its_markers_is_one_line_and_nothing_is_written(runs, tmp_path, capsys, readme_text):
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(tmp_path / "out"), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "<!-- table2 summary begin -->" in err and str(readme) in err
    assert readme.read_text() == readme_text and not (tmp_path / "out").exists()


def test_committed_full_protocol_table_and_readme_show_the_committed_runs():
    """results/table2_full.md and the README's headline summary are what the table maker makes of the committed
    runs: a run committed without regenerating them fails here."""
    table = table2.aggregate(REPO / "results" / "table2_full")
    committed = (REPO / "results" / "table2_full.md").read_text()
    assert "\n".join(table2.summary_lines(table)) in committed
    readme = (REPO / "README.md").read_text()
    begin, end = table2.markers("table2_full")
    assert table2.render_summary(table, "results/table2_full.md") == readme.split(begin + "\n")[1].split(end)[0]
