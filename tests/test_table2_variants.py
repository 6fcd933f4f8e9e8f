"""A Table 2 cell never mixes variants of its method (experiments/table2.py, ``one_variant``): it shows the shipped
param file's variant where it has runs of it, else the variant with the most runs, and names the others."""
import json

import pytest

from experiments import table2, table2_gaps
from test_sweep import fake_run
from training import config

SHIPPED_SIGMA = config.load_params(table2.PARAMS_DIR / "mmnist_9digits_task_routing.json")["model_options"]["sigma"]
OTHER_SIGMA = 0.5 if SHIPPED_SIGMA != 0.5 else 0.25


def routing_run(runs_dir, seed, acc, sigma, name=None, **results):
    """A task-routing run of 9 digits with this sigma; ``results`` are further keys of its results.json."""
    out = fake_run(runs_dir, "task_routing", "9digits", seed, acc, name=name, model="task_routing",
                   model_options={"sigma": sigma})
    path = out / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **results}))
    return out


def test_the_shipped_variant_is_shown_and_the_other_is_named_not_averaged(tmp_path):
    routing_run(tmp_path, 0, 70.0, OTHER_SIGMA, name="old/seed0")
    routing_run(tmp_path, 1, 71.0, OTHER_SIGMA, name="old/seed1")
    routing_run(tmp_path, 0, 78.0, SHIPPED_SIGMA, name="new/seed0")
    table = table2.aggregate(tmp_path)
    cell = table["rows"]["task_routing"]["9digits"]
    assert cell["n"] == 1 and cell["acc_mean"] == 78.0  # not the mean of 70, 71, 78
    assert table["num_runs"] == 1
    left_out = [note for note in table["notes"] if "another variant left out" in note]
    assert left_out == [f"9digits/task_routing: 2 run(s) of another variant left out (model_options.sigma "
                        f"{OTHER_SIGMA} where the runs shown have {SHIPPED_SIGMA}): 70.00, 71.00; "
                        f"{tmp_path / 'old/seed0'}, {tmp_path / 'old/seed1'}"]
    assert not any("the shipped" in note for note in table["notes"])


def test_without_the_shipped_variant_the_largest_is_shown_and_the_difference_named(tmp_path):
    routing_run(tmp_path, 0, 70.0, OTHER_SIGMA, name="old/seed0")
    routing_run(tmp_path, 1, 72.0, OTHER_SIGMA, name="old/seed1")
    routing_run(tmp_path, 0, 60.0, 0.75, name="sparse/seed0")
    table = table2.aggregate(tmp_path)
    cell = table["rows"]["task_routing"]["9digits"]
    assert cell["n"] == 2 and cell["acc_mean"] == pytest.approx(71.0)
    assert "9digits/task_routing: the shipped params/mmnist_9digits_task_routing.json has model_options.sigma " \
           f"{SHIPPED_SIGMA} where the runs shown have {OTHER_SIGMA}" in table["notes"]
    assert any("1 run(s) of another variant left out (model_options.sigma 0.75 " in note for note in table["notes"])


def test_a_run_made_with_set_says_so_below_the_table(tmp_path):
    run = routing_run(tmp_path, 0, 78.0, SHIPPED_SIGMA, overrides=[f"model_options.sigma={SHIPPED_SIGMA}"])
    table = table2.aggregate(tmp_path)
    note = f"9digits/task_routing seed 0 ({run}) was made with --set model_options.sigma={SHIPPED_SIGMA}"
    assert note in table["notes"] and f"- {note}" in table2.render_markdown(table, "cmd")


def test_the_open_cells_table_names_each_rows_method_options(tmp_path):
    routing_run(tmp_path / "gaps" / "q", 0, 70.0, 0.5, name="half/9digits/task_routing/seed0",
                test_acc_mean_best_test=70.5)
    row = table2_gaps.collect(tmp_path / "gaps", tmp_path / "none")["q"][0]
    assert row["options"] == ["model_options.sigma=0.5"] and row["overrides"] == []
    assert "| `model_options.sigma=0.5` | none |" in table2_gaps.render_row(row)


def test_the_shipped_task_routing_files_set_a_quarter_of_the_units_off():
    """The decision of docs/fidelity.md §6: sigma 0.25 in every M-MNIST task-routing param file."""
    for setting in table2.SETTINGS:
        params = config.load_params(table2.shipped_param_file("task_routing", setting))
        assert params["model_options"] == {"sigma": 0.25}
