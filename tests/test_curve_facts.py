"""experiments/curve_facts.py: the facts of a learning curve, checked on hand-made metrics.jsonl files."""
import json

import pytest

from experiments import curve_facts


def write_run(directory, tests, vals=None, losses=None, every=1):
    """A run directory whose metrics.jsonl has test accuracies ``tests`` (one per evaluated epoch, every ``every``
    epochs) and validation accuracies ``vals`` (default: the test ones)."""
    directory.mkdir(parents=True)
    vals = vals or tests
    losses = losses or [2.0 - 0.01 * i for i in range(len(tests))]
    lines = [json.dumps({"epoch": (i + 1) * every, "train_loss": loss, "val_acc_mean": val, "test_acc_mean": test})
             for i, (test, val, loss) in enumerate(zip(tests, vals, losses))]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_rising_curve_and_the_epochs_it_reads(tmp_path):
    tests = [float(i) for i in range(1, 21)]  # 20 epochs, +1 point each
    f = curve_facts.facts(json.loads(line) for line in
                          (write_run(tmp_path / "r", tests) / "metrics.jsonl").read_text().splitlines())
    assert f["shape"] == "rising" and f["epochs"] == 20
    assert f["test_gain_last_tenth"] == pytest.approx(2.0)  # last 2 epochs (10%): max 20 vs max 18 before
    assert (f["epoch_best_val"], f["test_best_val"], f["test_last"], f["epoch_best_test"]) == (20, 20.0, 20.0, 20)
    assert list(f["at"]) == [2, 6, 12, 18, 20] and f["at"][6]["test"] == 6.0
    assert f["at"][20]["train_loss"] == pytest.approx(1.81)


def test_overfitting_curve_selects_the_validation_peak(tmp_path):
    vals = [50, 60, 70, 68, 67, 66, 65, 65, 64, 64]
    tests = [49, 59, 71, 69, 66, 65, 64, 64, 63, 63]
    f = curve_facts.facts([json.loads(line) for line in
                           (write_run(tmp_path / "r", tests, vals) / "metrics.jsonl").read_text().splitlines()])
    assert f["shape"] == "overfits" and f["val_peak_epoch"] == 3 and f["val_drop_from_peak"] == 6
    assert (f["test_best_val"], f["test_last"], f["test_best_test"]) == (71, 63, 71)


def test_flat_curve_with_evaluation_every_ten_epochs(tmp_path):
    tests = [30.0, 30.4, 30.2, 30.5, 30.1, 30.3, 30.2, 30.4, 30.6, 30.5]
    f = curve_facts.facts([json.loads(line) for line in
                           (write_run(tmp_path / "r", tests, every=10) / "metrics.jsonl").read_text().splitlines()])
    assert f["shape"] == "flat" and f["epochs"] == 100 and f["test_gain_last_tenth"] == pytest.approx(-0.1)  # 30.5 vs 30.6
    assert list(f["at"]) == [10, 30, 60, 90, 100] and f["epoch_best_test"] == 90


def test_script_text_and_json(tmp_path, capsys):
    write_run(tmp_path / "a" / "seed0", [10.0, 20.0, 30.0])
    write_run(tmp_path / "b" / "seed0", [10.0, 10.0, 10.0])
    assert curve_facts.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.count("(3 epochs)") == 2 and "rising (3 epochs)" in text and "flat (3 epochs)" in text
    assert curve_facts.main([str(tmp_path / "b"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["shape"] == "flat" and record["test_last"] == 10.0


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert curve_facts.main([str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 2.0}) + "\n")
    assert curve_facts.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl: no evaluated epoch" in err
