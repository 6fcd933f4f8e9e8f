"""experiments/plots/accuracy_vs_params.py: only the methods with runs, each its own colour, a legend that fits."""
import json
from pathlib import Path

import pytest

from experiments import table2
from experiments.plots import accuracy_vs_params

PARAMS = {"optimizer": "Adam", "lr": 0.001, "batch_size": 512, "lr_schedule": "halve_30_60_90"}
WITH_RUNS = table2.PAPER_METHODS + ("gumbel_matrix", "dwa", "rlw")  # 12 rows with a run; 6 rows without


@pytest.fixture
def table(tmp_path):
    for index, method in enumerate(WITH_RUNS):
        out = Path(tmp_path) / "9digits" / method / "seed0"
        out.mkdir(parents=True)
        results = {"git_commit": "abc", "device": "cpu", "seed": 0, "epochs": 100, "method": method,
                   "setting": "9digits", "subset": None, "params_x": 1.0 + index, "weights_x": 1.0,
                   "val_acc_mean": 70.0 + index, "test_acc_mean": 70.0 + index, "test_acc_mean_last": 70.0,
                   "wall_time_s": 1.0, "params": PARAMS}
        (out / "results.json").write_text(json.dumps(results))
    return table2.aggregate(tmp_path)


def test_legend_lists_only_the_methods_with_runs_in_distinct_colours_inside_the_image(table):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig = accuracy_vs_params.figure(plt, table, "9digits")
    legend = fig.legends[0]
    labels = [text.get_text() for text in legend.get_texts()]
    methods = labels[:-2]
    assert [label.split(" (")[0] for label in methods] == list(WITH_RUNS)
    assert "gumbel_matrix (not in the paper)" in methods and not any("no runs" in label for label in labels)
    assert labels[-2:] == ["ours (mean ± std over seeds)", "paper (its Table 2 #P)"]
    colors = [tuple(handle.get_color()) for handle in legend.legend_handles[:len(methods)]]
    assert len(set(colors)) == len(WITH_RUNS)
    fig.canvas.draw()
    inside, box = legend.get_window_extent(), fig.bbox
    assert box.x0 <= inside.x0 and inside.x1 <= box.x1 and box.y0 <= inside.y0 and inside.y1 <= box.y1
    plt.close(fig)


def test_the_default_table_is_the_readmes_table_2():
    assert accuracy_vs_params.parse_args([]).table == "results/table2_full.json"
