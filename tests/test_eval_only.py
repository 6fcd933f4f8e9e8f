"""--eval_only: a trained run's best model evaluated again without training gives exactly the accuracies that
results.json recorded at the best epoch; eval.json is written beside it, results.json is left alone; missing,
corrupt or foreign model files are one line."""
import json
import shutil

import pytest
import torch

import train_multi_task_counter_stream as train_script
from training import checkpoint
from test_train import param_file, train

RUN = ["--epochs", 2, "--subset", 300, "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_only")
    out = tmp / "run"
    train("--param_file", param_file(tmp, method="kendall", batch_size=64), *RUN, "--out", out)
    return out


def run_main(capsys, *args):
    try:
        code = train_script.main([str(arg) for arg in args])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("target", ["run_dir", "model_file"])
def test_eval_only_gives_the_recorded_best_epoch_accuracies(trained, tmp_path, capsys, one_thread, target):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    results_before = (run / "results.json").read_bytes()
    out = run if target == "run_dir" else run / "best_model.pt"
    code, stdout, err = run_main(capsys, "--eval_only", "--out", out, "--device", "cpu")
    assert code == 0, err
    results = json.loads(results_before)
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["epoch"] == results["best_epoch"] and evaluated["subset"] == 300  # the run's subset
    for key in ("test_acc_per_task", "test_acc_mean", "val_acc_per_task", "val_acc_mean"):
        assert evaluated[key] == results[key], key
    assert evaluated["method"] == "kendall" and evaluated["model_file"] == str(run / "best_model.pt")
    assert f"test accuracy {results['test_acc_mean']:.2f}" in stdout
    assert (run / "results.json").read_bytes() == results_before
    assert not list(run.glob("*.tmp"))


def test_eval_only_of_another_subset_differs(trained, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, _, err = run_main(capsys, "--eval_only", "--out", run, "--device", "cpu", "--subset", 600)
    assert code == 0, err
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["subset"] == 600 and len(evaluated["test_acc_per_task"]) == 2


def damage(run, how):
    model = run / "best_model.pt"
    if how == "missing":
        model.unlink()
    elif how == "truncated":
        model.write_bytes(model.read_bytes()[:500])
    elif how == "results_json":
        (run / "results.json").write_text('{"subset": ')
    elif how == "not_a_model":
        checkpoint.save({"weights": torch.zeros(2)}, model)
    else:  # another model's weights under this model's params
        saved = checkpoint.load(model)
        checkpoint.save({**saved, "model": {"fc.weight": torch.zeros(2, 2)}}, model)


@pytest.mark.parametrize("how,code,expected", [
    ("missing", 2, "best_model.pt not found; allowed: a run dir of this script holding best_model.pt"),
    ("truncated", 2, "best_model.pt is corrupt or truncated"),
    ("results_json", 2, "cannot read the run's subset from"),
    ("not_a_model", 2, "is not a model of this script (it lacks 'model' and 'params')"),
    ("wrong_weights", 2, "does not fit model 'multi_branch'"),
])
def test_a_bad_model_file_is_one_line(trained, tmp_path, capsys, how, code, expected):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run, how)
    got, _, err = run_main(capsys, "--eval_only", "--out", run, "--device", "cpu")
    assert got == code and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("args,expected", [
    (["--eval_only"], "--eval_only takes the params saved with the model and needs --out"),
    (["--eval_only", "--out", "x", "--epochs", "3", "--resume"], "drop --epochs, --resume"),
    (["--eval_only", "--out", "x", "--param_file", "p.json"], "drop --param_file"),
])
def test_eval_only_argument_mistakes_are_one_line(capsys, args, expected):
    code, _, err = run_main(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
