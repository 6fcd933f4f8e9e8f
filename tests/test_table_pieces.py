"""Pieces of the table makers on hand-made inputs: which protocol Table 2 shows (experiments/table2.py,
``pick_protocol``) and one variant's cells in one setting of Table 5 (experiments/table5_cls_seg.py,
``setting_cells``)."""
import json

import pytest

from experiments import table2, table5_cls_seg


def protocol(epochs, subset=None, lr=0.001):
    return json.dumps({"epochs": epochs, "subset": subset, "lr": lr}, sort_keys=True)


# runs per protocol; no two tie on (runs, epochs, full data, subset)
COUNTS = {protocol(100): 3, protocol(10, 5000): 5, protocol(900): 3, protocol(100, lr=0.01): 1,
          protocol(10, 2000): 5, protocol(10): 5}


def test_protocols_are_ordered_by_runs_then_epochs_then_full_data_then_subset():
    ordered, chosen = table2.pick_protocol(COUNTS, None, None, "runs")
    assert ordered == [protocol(10), protocol(10, 5000), protocol(10, 2000), protocol(900), protocol(100),
                       protocol(100, lr=0.01)]
    assert chosen == protocol(10)


def test_the_asked_epochs_and_subset_come_first_and_choice_picks_among_them():
    ordered, chosen = table2.pick_protocol(COUNTS, (100, None), None, "runs")
    assert ordered[:2] == [protocol(100), protocol(100, lr=0.01)] and chosen == protocol(100)
    assert table2.pick_protocol(COUNTS, (100, None), 2, "runs")[1] == protocol(100, lr=0.01)
    assert table2.pick_protocol(COUNTS, (50, None), None, "runs")[1] is None  # no run of 50 epochs
    with pytest.raises(ValueError, match=r"--protocol 3: runs holds 2 protocol\(s\) .* allowed: 1 to 2"):
        table2.pick_protocol(COUNTS, (100, None), 3, "runs")


PAPER_ROW = {"by_loc_branches": 18, "by_loc_cls_acc": 90.5, "by_loc_seg_iou": 60.25}


def test_a_cell_of_two_seeds_is_mean_and_sample_std_beside_the_paper():
    runs = [{"test_acc_mean": 80.0, "test_iou_mean": 50.0, "params_x": 1.234},
            {"test_acc_mean": 82.0, "test_iou_mean": 54.0, "params_x": 1.234}]
    # std (ddof=1) of 80, 82 is sqrt(2); of 50, 54 it is 2 sqrt(2)
    assert table5_cls_seg.setting_cells("multi_branch", "9digits", PAPER_ROW, runs) == [
        "18 (18)", "1.23", "81.00 ± 1.41 (90.50) [n=2]", "52.00 ± 2.83 (60.25) [n=2]"]
    assert table5_cls_seg.setting_cells("controlnet", "9digits", PAPER_ROW, runs[:1]) == [
        "2 (18)", "1.23", "80.00 (90.50)", "50.00 (60.25)"]
    assert table5_cls_seg.setting_cells("multi_branch", "9digits", PAPER_ROW, []) == [
        "18 (18)", "–", "– (90.50)", "– (60.25)"]
