"""experiments/table6a.py: cells beside the paper's, the no-image reference row, and the protocol read off the runs
(the run's epochs, which --epochs may set apart from the param file's)."""
from experiments import table6a


def run(method, n, acc, epochs=100):
    params = {"exp_id": f"{n}_{method}", "method": method, "setting": f"clevr_{n}", "clevr_like_train": 4000,
              "clevr_like_test": 500, "val_fraction": 0.05, "data_seed": 0, "input_size": 64,
              "relation_rule": "pixel_cone", "model_options": {"width": 0.125}, "optimizer": "Adam", "lr": 0.001,
              "batch_size": 128, "epochs": 6, "lr_schedule": "none", "eval_every": 6,
              "spatial_loss_weight": 1.0 if method == "controlnet" else 0.0}
    return {"test_acc_mean": acc, "params_x": 1.5, "epochs": epochs, "seed": 0, "wall_time_s": 60.0,
            "git_commit": "abc", "device": "cpu", "params": params}


def test_table_cells_reference_row_and_protocol():
    runs = {("ch_mod", 40): run("ch_mod", 40, 47.27), ("controlnet", 40): run("controlnet", 40, 39.0)}
    text = table6a.markdown(runs, {40: 40.24}, "results/x")
    assert "| ch-mod | 47.27 (89.97) | – (87.39) |" in text
    assert "| most frequent training answer (no image) | 40.24 | – | – | – | |" in text
    assert "Cells above the no-image answer: 1 of 2." in text
    # 3800 training images, batch 128: 30 steps per epoch, for the run's 100 epochs (the param file says 6)
    assert "100 epochs (3000 optimiser steps)" in text and "The same protocol in every cell." in text
    assert "`python -m experiments.table6a --runs_dir results/x`" in text


def test_cells_with_different_epochs_are_flagged():
    runs = {("ch_mod", 40): run("ch_mod", 40, 47.0), ("controlnet", 40): run("controlnet", 40, 39.0, epochs=6)}
    assert "NOTE: the cells differ in protocol." in table6a.markdown(runs, {40: 40.24}, "r")
