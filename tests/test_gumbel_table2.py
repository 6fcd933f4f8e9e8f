"""Gumbel-matrix routing as a Table 2 row: the routed LeNet's all-task forward, the
param-file checks of ``router_options``, the optimiser groups, the temperature, the budget gradient, a short run
that must learn and a resume that must equal the uninterrupted run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.gumbel_matrix import (
    GumbelMatrixLeNet, add_budget_gradient, budget_penalty, router_parameters, routers, temperature_schedule)
from training import config, loop, optim
from weighting import build_weighting
from run_files import TIMING

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def write_params(tmp_path, **overrides):
    params = {"exp_id": "gm", "method": "gumbel_matrix", "setting": "2digits", "batch_size": 64, "lr": 0.003,
              "lr_schedule": "none", "router_options": {"lr": 0.01}}
    params.update(overrides)
    path = tmp_path / "gm.json"
    path.write_text(json.dumps(params))
    return path


def train(*args):
    proc = subprocess.run([sys.executable, str(REPO / "train_multi_task_counter_stream.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc


def test_all_task_forward_equals_each_task_run_alone():
    """The first routed layer runs once for all tasks (its input is the image): same logits as running every task
    on its own copy of the images through the same greedy allocation."""
    torch.manual_seed(0)
    model = GumbelMatrixLeNet(3, num_components=4).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.router.logits.normal_()
    images = torch.randn(5, 1, 28, 28)
    logits = model(images)
    for t in range(3):
        tasks = torch.full((5,), t)
        x = torch.nn.functional.max_pool2d(model.layers[0](images, tasks), 2)
        x = torch.nn.functional.max_pool2d(model.layers[1](x, tasks), 2)
        rep = model.layers[2](x.flatten(1), tasks)
        alone = model.fc2.weight[t] @ torch.relu(model.fc1.weight[t] @ rep.T + model.fc1.bias[t, :, None]) \
            + model.fc2.bias[t, :, None]
        torch.testing.assert_close(logits[:, t], alone.T, rtol=1e-5, atol=1e-5)


def test_budget_gradient_is_the_task_mean_penalty_gradient():
    model = GumbelMatrixLeNet(2, num_components=2)
    with torch.no_grad():  # task 0 uses all 6 components with P = 0.9, task 1 P = 0.2: only task 0 is over budget
        for layer in model.layers:
            layer.router.logits[0] = torch.tensor([0.9, 0.1]).log()
            layer.router.logits[1] = torch.tensor([0.2, 0.8]).log()
    penalty = budget_penalty(model, budget=0.5, penalty=2.0)
    torch.testing.assert_close(penalty, torch.tensor([2.0 * (0.9 - 0.5), 0.0]))
    value = add_budget_gradient(model, budget=0.5, penalty=2.0)
    assert value.item() == pytest.approx(0.4)
    for logits in router_parameters(model):  # d/dlogit0 of mean_t penalty: (2 / 6 / 2) * P (1 - P) for task 0
        expected = 2.0 / 6 / 2 * 0.9 * 0.1
        torch.testing.assert_close(logits.grad[0], torch.tensor([[expected, -expected]] * 2))
        torch.testing.assert_close(logits.grad[1], torch.zeros(2, 2))


def test_the_hooks_give_the_temperature_in_place_and_the_budget_gradient():
    """``before_step`` writes each step's temperature into the one tensor that every router reads (a CUDA graph of
    the step replays with it); ``after_backward`` adds the gradient of ``penalty``, as ``add_budget_gradient``."""
    options = {"lr": 0.01, "temperature_init": 50.0, "temperature_min": 0.5, "budget": 0.5, "budget_penalty": 2.0}
    model = GumbelMatrixLeNet(2, num_components=2)
    model.before_step(0, options)
    first = model.temperature
    assert all(router.temperature is first for router in routers(model)) and float(first) == 50.0
    model.before_step(12, options)  # 12 steps of 2 tasks: 24 task-updates
    assert model.temperature is first and float(first) == pytest.approx(50.0 / 5.0)
    assert model.penalty({**options, "budget_penalty": 0.0}) is None
    model.after_backward(options)
    expected = GumbelMatrixLeNet(2, num_components=2)
    expected.load_state_dict(model.state_dict())
    add_budget_gradient(expected, budget=0.5, penalty=2.0)
    for got, want in zip(router_parameters(model), router_parameters(expected)):
        assert torch.equal(got.grad, want.grad)


def test_router_options_are_checked_and_completed(tmp_path):
    params = config.load_params(write_params(tmp_path))
    assert params["model"] == "gumbel_matrix" and params["weighting"] == "uniform"
    assert params["router_options"] == {"lr": 0.01, "temperature_init": 50.0, "temperature_min": 0.5, "budget": 1.0,
                                        "budget_penalty": 0.0}
    cases = [({"router_options": {"lr": 0.01, "tau": 3}}, "unknown key 'router_options.tau'; allowed: lr, "),
             ({"router_options": {"budget": 1.5}}, "'router_options.budget' = 1.5; allowed: a number from 0.0 to 1.0"),
             ({"router_options": {"temperature_init": 1.0, "temperature_min": 2.0}}, "exceeds 'temperature_init'"),
             ({"method": "controlnet"}, "model 'controlnet' has no learned allocation; allowed: {}"),
             ({"model_options": {"allocation": "shared_bottom"}}, "model 'gumbel_matrix' has no learned allocation")]
    for overrides, expected in cases:
        with pytest.raises(config.ParamError, match=expected.replace("(", r"\(").replace(")", r"\)")
                           .replace("{", r"\{").replace("}", r"\}")):
            config.load_params(write_params(tmp_path, **overrides))


def test_allocation_logits_get_their_own_learning_rate_and_schedule(tmp_path):
    params = config.load_params(write_params(tmp_path, lr_schedule="halve_30_60_90"))
    model = GumbelMatrixLeNet(2)
    groups = optim.parameter_groups(params, model, None)
    assert [g["lr"] for g in groups] == [0.003, 0.01]
    assert groups[1]["params"] == router_parameters(model)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    assert optim.lr_factor(params, 29, 100) == 0.5  # both groups are halved together
    plain = config.load_params(write_params(tmp_path, method="uniform_scaling", router_options={}))
    assert [g["lr"] for g in optim.parameter_groups(plain, GumbelMatrixLeNet(2, "shared_bottom"), None)] \
        == [0.003]


def test_short_run_learns_and_resumes_exactly(tmp_path):
    """2digits, 3000 images, 64 per batch (47 steps an epoch; the Gumbel net needs ~60 steps to leave chance): the
    accuracy rises far above chance, the budget penalty (budget 0.5) keeps the mean allocation probability at about
    its initial 0.5 (without it the useful components' rise to 0.6-0.9 in as many steps), and a run stopped after
    epoch 2 and resumed gives the uninterrupted run's weights and metrics bit for bit (the Gumbel draws are seeded per epoch)."""
    param_file = write_params(tmp_path, router_options={"lr": 0.05, "budget": 0.5, "budget_penalty": 1.0})
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--param_file", param_file, "--subset", 3000, "--device", "cpu"]
    for args in ([*common, "--epochs", 4, "--out", full], [*common, "--epochs", 2, "--out", part],
                 [*common, "--epochs", 4, "--out", part, "--resume", "--force"]):
        proc = train(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((full / "results.json").read_text())
    losses = [json.loads(line)["train_loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.4, losses
    assert results["test_acc_mean"] > 25.0, results["test_acc_mean"]  # chance: 10
    assert len(results["active_fraction_per_task"]) == 2

    saved = torch.load(full / "checkpoint.pt", weights_only=False)
    model = GumbelMatrixLeNet(2)
    model.load_state_dict(saved["model"])
    probabilities = torch.cat([layer.router.probabilities() for layer in model.layers], dim=1)
    assert probabilities.mean() < 0.53

    resumed = torch.load(part / "checkpoint.pt", weights_only=False)
    for name, tensor in saved["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    drop = ("wall_time_s", *TIMING)
    assert [{k: v for k, v in r.items() if k not in drop} for r in saved["history"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in resumed["history"]]


def test_training_sets_the_temperature_from_the_task_update_count():
    """After epoch e of S steps with T tasks the last step ran at update ((e + 1) * S - 1) * T."""
    torch.manual_seed(0)
    params = {**config.validate({"exp_id": "t", "method": "gumbel_matrix", "setting": "4digits", "batch_size": 8},
                                "test"), "memory_format": "contiguous"}
    model = GumbelMatrixLeNet(4)
    weighting = build_weighting("uniform", 4, {})
    optimizer = optim.make_optimizer(params, optim.parameter_groups(params, model, weighting))
    images, labels = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (40, 4))
    loop.train_epoch(model, weighting, optimizer, (images, labels), params, 0, 1)
    expected = temperature_schedule((2 * 5 - 1) * 4, 50.0, 0.5)
    assert [layer.router.temperature for layer in model.layers] == [expected] * 3
