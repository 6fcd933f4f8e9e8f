"""experiments/table3.py: the runs of Table 3's experiments grouped by (method, loc), mean ± sample std over seeds, beside
the paper's numbers; rows not run, rows the paper does not have, and rows mixing protocols."""
import json

import pytest

from experiments import table3


def write_run(directory, name, method, dataset, setting, acc, seed=0, loc=0.0, epochs=100, params_x=1.0):
    path = directory / name / f"seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "method": method, "seed": seed, "epochs": epochs, "subset": None, "test_acc_mean": acc, "params_x": params_x,
        "device": "cpu", "git_commit": "abc123",
        "params": {"dataset": dataset, "setting": setting, "spatial_loss_weight": loc, "input_size": 224}}))


def test_rows_are_grouped_by_method_and_loc(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a", "ch_mod", "clevr", "clevr_40", 80.0, seed=0, loc=1.0, params_x=1.0027)
    write_run(runs, "a", "ch_mod", "clevr", "clevr_40", 90.0, seed=1, loc=1.0, params_x=1.0027)
    write_run(runs, "b", "ch_mod", "clevr", "clevr_40", 70.0)
    write_run(runs, "c", "single_task", "cub", "cub", 60.0, params_x=13.0)
    write_run(runs, "d", "kendall", "cub", "cub", 65.0, seed=0, epochs=10)
    write_run(runs, "d", "kendall", "cub", "cub", 66.0, seed=1, epochs=20)
    write_run(runs, "e", "controlnet", "multi_mnist", "9digits", 99.0)  # Table 2: ignored
    out = tmp_path / "table3.md"
    assert table3.main(["--runs_dir", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    # mean 85, sample std of (80, 90) = 7.07
    assert "| ch-mod | √ | 85.00 ± 7.07 | 2 | 100 | x1.003 | x1.003 | 89.87 ± 0.40 |" in text
    assert "| ch-mod | × | 70.00 | 1 | 100 | x1.000 | x1.002 | 87.05 ± 0.59 |" in text
    assert "| Uni-sc | √ | not run | | | | x21.04 | 73.56 ± 0.31 |" in text
    assert "| Single task | × | 60.00 | 1 | 100 | x13.000 | – | 74.34 ± 0.07 |" in text
    assert "| kendall (ours, not in the paper) | × | 65.50 ± 0.71 ‡ | 2 | 10/20 | x1.000 | – | – |" in text
    assert "99.00" not in text and "CLEVR-like" not in text


def test_missing_runs_dir_is_an_error(tmp_path, capsys):
    assert table3.main(["--runs_dir", str(tmp_path / "none"), "--out", str(tmp_path / "t.md")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("table", ["CLEVR_40_tasks", "CELEB-A_40_tasks", "CUB-200"])
def test_every_paper_row_is_listed(table, tmp_path):
    (tmp_path / "runs").mkdir()
    table3.main(["--runs_dir", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")])
    text = (tmp_path / "t.md").read_text()
    for method, loc, _, acc, std in table3.paper_rows(table):
        assert f"| {'√' if loc else '×'} | not run | | | |" in text and f"{acc:.2f} ± {std:.2f} |" in text


def test_an_existing_table_is_never_replaced_by_an_empty_one(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "t.md").write_text("a good table")
    assert table3.main(["--runs_dir", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")]) == 1
    assert "is not replaced by an empty table" in capsys.readouterr().err
    assert (tmp_path / "t.md").read_text() == "a good table"
    assert table3.parse_args([]).out.startswith("runs/")
