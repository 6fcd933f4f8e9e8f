"""Stacked runs (issue 19): R runs trained as one stacked model equal the R separate runs of the training loop
(float64, every Table 2 method, by location and by reference, both stacking modes), resume, the batched
min-norm solver against ``min_norm_solvers``, the training script's ``--seeds`` end to end (the files of separate
runs, Ctrl-C and --resume), the one-line errors, the Table 2 sweep's --stacked and --shard, and the GPU allocation
command on a tiny CPU protocol."""
import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import train_multi_task_counter_stream as train_script
from experiments import table2_sweep
from models import build_model
from run_files import metrics_without_timing
from training import config, engine, evaluate as evaluation, loop, stacked as stacking, trainer
from training.checkpoint import load
from training.data import MEMORY_FORMATS
from training.optim import make_optimizer, parameter_groups
from weighting import build_weighting
from weighting.batched import STACKED_WEIGHTINGS, StackedWeighting
from weighting.min_norm_solvers import MIN_NORM_TOLERANCE, batched_min_norm_element, find_min_norm_element

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_allocation  # noqa: E402

SEEDS = (0, 1, 2)
TABLE2 = ("single_task", "uniform_scaling", "gradnorm", "kendall", "mgda", "task_routing", "ch_mod",
          "ch_mod_extended", "controlnet", "gumbel_matrix")
CASES = [(method, setting, mode) for method in TABLE2 for setting in ("9digits", "9digits_byref")
         for mode in stacking.MODES]


def toy_data(setting, n=20, num_tasks=9):
    """Random uint8 images and digit labels; by reference about half of the labels are -1 (undefined)."""
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n, num_tasks), generator=generator)
    if setting.endswith("byref"):
        labels[torch.rand(n, num_tasks, generator=generator) < 0.5] = -1
    return images, labels


def separate_run(params, seed, num_tasks):
    """Model, weighting and optimiser of one run, built as the training script builds them."""
    torch.manual_seed(seed)
    model = build_model(params["model"], num_tasks, **config.model_kwargs(params))
    model = model.to(memory_format=MEMORY_FORMATS[params["memory_format"]])
    weighting = build_weighting(params["weighting"], num_tasks, params["weighting_options"]) \
        if params["weighting"] else None
    return model, weighting, make_optimizer(params, parameter_groups(params, model, weighting))


def assert_close_states(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for key in expected:
        a, e = actual[key], expected[key]
        if isinstance(e, dict):
            assert_close_states(a, e, f"{what}.{key}")
        elif torch.is_tensor(e):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=f"{what}.{key}")
        else:
            assert a == e, f"{what}.{key}"


def stacked_epoch(model, weighting, optimizer, data, params, epoch):
    """``train_stacked_epoch`` of the stack of ``SEEDS`` (no run dirs: every loss here is finite)."""
    return [epoch.loss for epoch in engine.train_stacked_epoch(model, weighting, optimizer, data, params, SEEDS, epoch)]


def train_separately(runs, params, data, epochs):
    return [[loop.train_epoch(model, weighting, optimizer, data, params, seed, epoch).loss for epoch in epochs]
            for seed, (model, weighting, optimizer) in zip(SEEDS, runs)]


def assert_replicas_equal_runs(model, weighting, optimizer, runs):
    for r, (separate, separate_weighting, separate_optimizer) in enumerate(runs):
        assert_close_states(model.replica_state_dict(r), separate.state_dict(), f"replica {r} model")
        assert_close_states(stacking.replica_optimizer_state(optimizer, r), separate_optimizer.state_dict(),
                            f"replica {r} optimizer")
        if weighting is not None:
            assert_close_states(weighting.replica_state_dict(r), separate_weighting.state_dict(),
                                f"replica {r} weighting")


@pytest.mark.parametrize("method,setting,mode", CASES)
def test_stacked_runs_equal_separate_runs(float64, method, setting, mode):
    """Two epochs of 3 steps (the last one partial): every replica's model, optimiser and weighting state and its
    training losses equal its separate run's; so do its accuracies, evaluated as the group evaluates them."""
    memory_format = "channels_last" if mode == "loop" else "contiguous"
    params = config.load_params(f"params/mmnist_{setting}_{method}.json",
                                ["batch_size=8", f"memory_format=\"{memory_format}\""])
    data = toy_data(setting)
    runs = [separate_run(params, seed, 9) for seed in SEEDS]
    model, weighting, optimizer = stacking.stack_runs(runs, params, mode)
    separate_losses = train_separately(runs, params, data, range(2))
    stacked_losses = [stacked_epoch(model, weighting, optimizer, data, params, epoch) for epoch in range(2)]
    for epoch, losses in enumerate(stacked_losses):
        assert losses == pytest.approx([run_losses[epoch] for run_losses in separate_losses], rel=1e-9)
    assert_replicas_equal_runs(model, weighting, optimizer, runs)
    images, labels = data
    group = engine.StackedGroup([separate_run(params, seed, 9) for seed in SEEDS], params, SEEDS, mode)
    group.stack = model
    evaluated = group.evaluate(partial(evaluation.evaluate, num_tasks=9, rows=64,
                                       memory_format=MEMORY_FORMATS[memory_format]), images, labels)
    for r, (separate, _, _) in enumerate(runs):
        torch.testing.assert_close(evaluated[r], evaluation.evaluate(separate, images, labels, 9, 64,
                                                                     MEMORY_FORMATS[memory_format]), equal_nan=True)


@pytest.mark.parametrize("param_file,overrides", [
    ("params/mmnist_9digits_mgda.json", ["dropout=\"sener_koltun\""]),
    ("params/mmnist_9digits_byref_gradnorm.json", ["dropout=\"sener_koltun\""]),
    ("params/mmnist_9digits_gumbel_matrix_budget075.json", [])])
def test_stacked_runs_with_dropout_and_budget(float64, param_file, overrides):
    """Sener & Koltun's dropout (per-replica masks, held through MGDA's passes) and the Gumbel budget penalty."""
    params = config.load_params(param_file, ["batch_size=8"] + overrides)
    data = toy_data(params["setting"])
    runs = [separate_run(params, seed, 9) for seed in SEEDS]
    model, weighting, optimizer = stacking.stack_runs(runs, params, "loop")
    train_separately(runs, params, data, [3])
    stacked_epoch(model, weighting, optimizer, data, params, 3)
    assert_replicas_equal_runs(model, weighting, optimizer, runs)


def test_resumed_stacked_run_equals_uninterrupted(float64):
    """Epoch 2 from replica states written after epoch 1 (the files of separate runs) equals two epochs in a row."""
    params = config.load_params("params/mmnist_9digits_byref_kendall.json", ["batch_size=8"])
    data = toy_data(params["setting"])
    runs = [separate_run(params, seed, 9) for seed in SEEDS]
    model, weighting, optimizer = stacking.stack_runs(runs, params, "loop")
    stacked_epoch(model, weighting, optimizer, data, params, 0)
    saved = [(model.replica_state_dict(r), weighting.replica_state_dict(r),
              stacking.replica_optimizer_state(optimizer, r)) for r in range(len(SEEDS))]
    stacked_epoch(model, weighting, optimizer, data, params, 1)

    fresh = [separate_run(params, seed + 10, 9) for seed in SEEDS]  # other weights: all overwritten on resume
    for (run_model, run_weighting, run_optimizer), (model_state, weighting_state, optimizer_state) in zip(fresh, saved):
        run_model.load_state_dict(model_state)
        run_weighting.load_state_dict(weighting_state)
        run_optimizer.load_state_dict(optimizer_state)
    resumed = stacking.stack_runs(fresh, params, "loop")
    stacked_epoch(*resumed, data, params, 1)
    for r in range(len(SEEDS)):
        assert_close_states(resumed[0].replica_state_dict(r), model.replica_state_dict(r), f"replica {r}")
        assert_close_states(stacking.replica_optimizer_state(resumed[2], r),
                            stacking.replica_optimizer_state(optimizer, r), f"replica {r} optimizer")


def min_norm_problems():
    generator = torch.Generator().manual_seed(3)
    problems = [torch.randn(4, tasks, dim, generator=generator, dtype=torch.float64)
                for tasks, dim in [(1, 5), (2, 7), (3, 50), (4, 3), (9, 40), (9, 6)]]
    degenerate = torch.randn(4, 5, 20, generator=generator, dtype=torch.float64)
    degenerate[0, 1] = degenerate[0, 0]  # two equal gradients
    degenerate[1, 2] = 0.0  # a task without a valid label: zero gradient, minimum 0 at its vertex
    degenerate[2] = 0.0  # all zero: uniform alpha
    degenerate[3, 4] = 0.5 * (degenerate[3, 0] + degenerate[3, 1])  # one gradient inside the hull of two
    return problems + [degenerate]


@pytest.mark.parametrize("grads", min_norm_problems(), ids=lambda g: f"T{g.shape[1]}D{g.shape[2]}")
def test_batched_min_norm_solver_equals_reference(grads):
    """The same minimum as ``find_min_norm_element`` (relative to max ||g_t||^2), the same alpha where it is unique
    (within MIN_NORM_TOLERANCE), alpha on the simplex."""
    alpha = batched_min_norm_element(grads)
    assert alpha.shape == grads.shape[:2] and alpha.dtype == grads.dtype
    assert (alpha >= 0).all() and torch.allclose(alpha.sum(dim=1), torch.ones(len(grads), dtype=grads.dtype))
    for r, g in enumerate(grads):
        reference, cost = find_min_norm_element(g)
        scale = max(float((g * g).sum(dim=1).max()), 1e-300)
        ours = float((alpha[r] @ g).pow(2).sum())
        assert abs(ours - cost) <= 1e-10 * scale
        unique = torch.linalg.matrix_rank(g[1:] - g[0]) == len(g) - 1 if len(g) > 1 else True
        if unique:
            torch.testing.assert_close(alpha[r], reference, rtol=0, atol=MIN_NORM_TOLERANCE)


def test_batched_min_norm_hand_computed():
    """g1 = (1, 0), g2 = (0, 1): alpha = (1/2, 1/2); g1 = (1, 0), g2 = (2, 0): alpha = (1, 0); all zero: uniform."""
    grads = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert batched_min_norm_element(grads).tolist() == [[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]


def test_bad_stacks_fail_with_one_line():
    torch.manual_seed(0)
    lenet, wide = build_model("ch_mod", 9), build_model("ch_mod_extended", 9)
    with pytest.raises(ValueError, match="one class with the same parameter shapes"):
        stacking.StackedModel([lenet, wide])
    with pytest.raises(ValueError, match="unknown stacking mode 'grouped'; valid: loop, vmap"):
        stacking.StackedModel([lenet, lenet], "grouped")
    with pytest.raises(ValueError, match="'vmap' cannot draw Sener-Koltun dropout"):
        stacking.StackedModel([build_model("multi_branch", 9, dropout="sener_koltun")] * 2, "vmap")
    with pytest.raises(ValueError, match="no stacked form of weighting PCGrad"):
        StackedWeighting([build_weighting("pcgrad", 9)] * 2)
    with pytest.raises(ValueError, match="stacked MGDA solves up to 12 tasks"):
        StackedWeighting([build_weighting("mgda", 13)] * 2)
    model = stacking.StackedModel([lenet, lenet])
    with pytest.raises(RuntimeError, match=r"keys \['bu.fc9.weight'\]"):
        model.load_replica_state_dict(0, {**lenet.state_dict(), "bu.fc9.weight": torch.zeros(1)})
    gumbel = stacking.StackedModel([build_model("gumbel_matrix", 9)] * 2)
    with pytest.raises(RuntimeError, match="needs seed_noise"):
        gumbel(torch.zeros(2, 1, 1, 28, 28))


def test_the_stacked_weightings_are_those_of_table2():
    assert STACKED_WEIGHTINGS == ("uniform", "sum", "gradnorm", "kendall", "mgda")


@pytest.mark.parametrize("name", STACKED_WEIGHTINGS)
def test_stacked_weighting_holds_every_runs_state(name):
    """Replica r's state dict and task weights are its run's (keys, shapes, values); the parameters are the rule's,
    stacked."""
    runs = [build_weighting(name, 4) for _ in range(3)]
    with torch.no_grad():
        for r, weighting in enumerate(runs):  # a different state in every run
            for value in weighting.state_dict().values():
                value.add_(0.25 * r)
    stacked = StackedWeighting(runs)
    for r, weighting in enumerate(runs):
        assert_close_states(stacked.replica_state_dict(r), weighting.state_dict(), f"replica {r}")
        torch.testing.assert_close(stacked.weights()[r], weighting.weights())
    assert [p.shape for p in stacked.parameters()] == [(3, *p.shape) for p in runs[0].parameters()]


RUN = ["--epochs", "2", "--subset", "256", "--device", "cpu", "--set", "batch_size=64"]


def run_script(capsys, *args):
    """The training script's ``main`` in this process: (exit code, captured output)."""
    try:
        code = train_script.main([str(arg) for arg in args])
    except SystemExit as exit:  # a command-line mistake
        code = exit.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("method", ["mmnist_9digits_byref_kendall", "mmnist_4digits_controlnet"])
def test_seeds_write_the_files_of_separate_runs(method, tmp_path, capsys):
    """``--seeds 0,1`` (real Multi-MNIST, a subset) writes into <out>/seed<k> what ``--seed k`` writes: the same
    epoch records (to float32 rounding), the same test figures, checkpoints a separate run resumes from."""
    params = f"params/{method}.json"
    assert run_script(capsys, "--param_file", params, *RUN, "--seeds", "0,1", "--out", tmp_path / "group")[0] == 0
    for seed in (0, 1):
        separate = tmp_path / f"seed{seed}"
        assert run_script(capsys, "--param_file", params, *RUN, "--seed", seed, "--out", separate)[0] == 0
        stacked = tmp_path / "group" / f"seed{seed}"
        assert sorted(p.name for p in stacked.iterdir()) == sorted(p.name for p in separate.iterdir())
        for ours, theirs in zip(metrics_without_timing(stacked), metrics_without_timing(separate)):
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():
                assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        results = [json.loads((run / "results.json").read_text()) for run in (stacked, separate)]
        for key in ("seed", "best_epoch", "num_params", "params", "epochs", "subset"):
            assert results[0][key] == results[1][key], key
        for key in ("test_acc_mean", "test_acc_mean_last", "val_acc_mean"):
            assert results[0][key] == pytest.approx(results[1][key], rel=1e-4), key
        assert results[0]["stacked"] == {"seeds": [0, 1], "mode": "loop"}
        ours, theirs = load(stacked / "checkpoint.pt"), load(separate / "checkpoint.pt")
        assert ours.keys() == theirs.keys() and ours["seed"] == seed
        for key, value in theirs["model"].items():
            torch.testing.assert_close(ours["model"][key], value, rtol=1e-4, atol=1e-5)
        assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]


def test_interrupted_stacked_group_resumes_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    """Ctrl-C after epoch 1: one line, exit 130, every seed's checkpoint at epoch 1; --resume ends where the
    uninterrupted group does."""
    params = "params/mmnist_9digits_byref_gradnorm.json"
    assert run_script(capsys, "--param_file", params, *RUN, "--seeds", "0,1", "--out", tmp_path / "straight")[0] == 0
    train_one = trainer.train_one

    def interrupted(epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_one(epoch, *args)
    monkeypatch.setattr(trainer, "train_one", interrupted)
    code, captured = run_script(capsys, "--param_file", params, *RUN, "--seeds", "0,1", "--out", tmp_path / "cut")
    assert code == 130 and "stopped in epoch 2 of 2 (1 finished)" in captured.err
    assert f"{tmp_path / 'cut' / 'seed*' / 'checkpoint.pt'}" in captured.err
    assert [load(tmp_path / "cut" / f"seed{seed}" / "checkpoint.pt")["epoch"] for seed in (0, 1)] == [1, 1]
    monkeypatch.setattr(trainer, "train_one", train_one)
    assert run_script(capsys, "--param_file", params, *RUN, "--seeds", "0,1", "--out", tmp_path / "cut",
                      "--resume")[0] == 0
    for seed in (0, 1):
        assert metrics_without_timing(tmp_path / "cut" / f"seed{seed}") == \
            metrics_without_timing(tmp_path / "straight" / f"seed{seed}")


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0,1", "--seed", "3"], "--seeds replaces --seed and trains; drop --seed"),
    (["--seeds", "0,-1"], "expected a seed >= 0 (3) or a comma list of seeds (0,2,7)"),
    (["--seeds", "3,"], "--seeds trains a group of 2 or more seeds, got [3]; for one, use --seed"),
    (["--seeds", "0,1", "--set", "method=\"pcgrad\""], "--seeds: weighting 'pcgrad' has no stacked form; allowed: "
                                                       "uniform, sum, gradnorm, kendall, mgda, or one --seed per run"),
    (["--seeds", "0,1", "--set", "dropout=\"sener_koltun\"", "--set", "method=\"mgda\"", "--stack_mode", "vmap"],
     "--stack_mode: 'vmap' cannot draw dropout masks per replica; allowed: auto, loop")])
def test_bad_seed_groups_fail_with_one_line(args, message, tmp_path, capsys):
    code, captured = run_script(capsys, "--param_file", "params/mmnist_2digits_uniform_scaling.json", *RUN, *args,
                                "--out", tmp_path / "group")
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], captured.err
    assert not (tmp_path / "group").exists()


def test_gpu_allocation_command_on_a_tiny_protocol(tmp_path, capsys):
    """benchmarks/gpu_allocation.py on CPU: two groups measured in both modes, each mode trained twice alike to
    the same weights bit for bit (the eager run-to-run differences that a graphed path is held to; no graphs on
    CPU), projected, trained to the end (their seeds' results.json), then found finished by a second call without
    training again."""
    args = ["--device", "cpu", "--methods", "uniform_scaling,controlnet", "--settings", "2digits", "--replicas", "2",
            "--batch_size", "64", "--probe_steps", "1", "--eval_images", "64", "--epochs", "1", "--subset", "128",
            "--runs_dir", str(tmp_path / "runs"), "--budget_s", "300", "--out", str(tmp_path / "figures.json")]
    assert gpu_allocation.main(args) == 0
    output = capsys.readouterr().out
    assert "2 of 2 cells finished" in output and "projected:" in output
    assert output.count("eager run to run: {'loop': 'bit for bit', 'vmap': 'bit for bit'}; graphs: {}") == 2, output
    for method in ("uniform_scaling", "controlnet"):
        for seed in (0, 1):
            results = json.loads((tmp_path / "runs" / "2digits" / method / f"seed{seed}" / "results.json").read_text())
            assert results["seed"] == seed and results["stacked"]["seeds"] == [0, 1]
    assert gpu_allocation.main(args) == 0
    assert "2digits/controlnet: " not in capsys.readouterr().out  # finished cells are not trained again


def test_sweep_stacks_the_seeds_of_a_cell_and_shards_the_grid(tmp_path, capsys):
    """``python -m experiments.table2_sweep --stacked``: the seeds of uniform scaling train as one group, PCGrad (no
    stacked form) one seed per process; ``--shard 2/2`` takes the second cell of the grid (PCGrad), ``--shard 1/2``
    the first."""
    args = ["--methods", "uniform_scaling,pcgrad", "--settings", "2digits", "--n_seeds", "2", "--epochs", "1",
            "--subset", "128", "--runs_dir", str(tmp_path), "--no_table", "--device", "cpu", "--stacked"]
    assert table2_sweep.main(args + ["--shard", "2/2"]) == 0
    assert "2 cell(s) (1 epochs, subset 128): 0 done, 0 to resume, 2 to start; running 2 in 2 process(es) " \
        "(shard 2/2)" in capsys.readouterr().out
    assert sorted(p.parent.name for p in tmp_path.glob("2digits/*/seed*/results.json")) == ["seed0", "seed1"]
    assert table2_sweep.main(args + ["--shard", "1/2"]) == 0
    assert "running 2 in 1 process(es) (shard 1/2)" in capsys.readouterr().out
    for method, seed in [("uniform_scaling", 0), ("uniform_scaling", 1), ("pcgrad", 0), ("pcgrad", 1)]:
        results = json.loads((tmp_path / "2digits" / method / f"seed{seed}" / "results.json").read_text())
        assert results["seed"] == seed and results.get("stacked", {}).get("seeds") == \
            ([0, 1] if method == "uniform_scaling" else None)
