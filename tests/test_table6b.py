"""Table 6b's runner: finished cells are reused (nothing retrains), the table puts our mean ± std beside the
paper's value, missing cells are trained through the training script."""
import json

from experiments import table6b
from test_sweep import fake_run


def test_finished_cells_are_reused_and_tabulated(tmp_path):
    for method in table6b.METHODS:
        for setting in table6b.SETTINGS:
            for seed, acc in enumerate([80.0, 82.0]):
                fake_run(tmp_path / "runs", method, setting, seed, acc, epochs=3)
    out = tmp_path / "out"
    assert table6b.main(["--epochs", "3", "--n_seeds", "2", "--runs_dir", str(tmp_path / "runs"),
                         "--out_dir", str(out)]) == 0
    table = json.loads((out / "table6b.json").read_text())
    cell = table["rows"]["td_only"]["9digits_byref"]
    assert cell["n"] == 2 and cell["acc_mean"] == 81.0 and cell["paper_acc"] == 66.86
    markdown = (out / "table6b.md").read_text()
    assert "| td_only | no | 1.004 | 81.00 ± 1.41 (82.22) | 1.004 | 81.00 ± 1.41 (66.86) |" in markdown


def test_a_missing_cell_is_trained(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for method in table6b.METHODS:
        for setting in table6b.SETTINGS:
            if (method, setting) != ("bu_only", "9digits"):
                fake_run(tmp_path / "runs", method, setting, 0, 50.0, epochs=1, subset=300)
    out = tmp_path / "out"
    assert table6b.main(["--epochs", "1", "--subset", "300", "--seeds", "0", "--device", "cpu",
                         "--runs_dir", str(tmp_path / "runs"), "--out_dir", str(out)]) == 0
    trained = json.loads((tmp_path / "runs" / "9digits" / "bu_only" / "seed0" / "results.json").read_text())
    assert trained["method"] == "bu_only" and trained["epochs"] == 1 and trained["subset"] == 300
    assert json.loads((out / "table6b.json").read_text())["rows"]["bu_only"]["9digits"]["n"] == 1
