"""Gumbel-Matrix routing (arXiv 1910.04915): sampling, straight-through gradients, combination, budget, fixed
allocations, the rotated-MNIST tasks, the experiment script and a short learning run."""
import json
import math
import sys

import pytest
import torch
import torch.nn as nn

import train_multi_task_counter_stream as train_script
from training import round_robin
from experiments.plots import allocation as plot_allocation
from loaders.rotated_mnist import TASKS, load_rotated_mnist, make_tasks, rotate90
from tiny_rotated_mnist import use_tiny_rotated_mnist
from models.gumbel_matrix import (
    FixedRouter, GumbelMatrixLeNet, GumbelMatrixMNISTNet, GumbelMatrixRouter, RoutedLayer, allocation_matrix,
    budget_penalty, linear_components, make_router, router_parameters, temperature_schedule, weight_parameters)
from models.lenet import MultiBranchLeNet

torch.set_num_threads(1)


def set_probabilities(router, probabilities):
    """Sets the logits of a GumbelMatrixRouter to log[p, 1 - p]."""
    p = torch.as_tensor(probabilities, dtype=torch.float32)
    with torch.no_grad():
        router.logits.copy_(torch.stack([p.log(), (1 - p).log()], dim=-1))


def test_temperature_schedule():
    assert temperature_schedule(0) == 50.0
    assert temperature_schedule(3) == 25.0
    assert temperature_schedule(9_999) == pytest.approx(0.5)
    assert temperature_schedule(150_000) == 0.5
    assert temperature_schedule(0, initial=2.0, minimum=1.5) == 2.0


@pytest.mark.parametrize("temperature", [50.0, 0.5])
def test_sampled_connections_follow_the_probabilities(temperature):
    torch.manual_seed(0)
    probabilities = [0.1, 0.5, 0.9]
    router = GumbelMatrixRouter(num_tasks=3, num_components=4000, temperature=temperature)
    set_probabilities(router, torch.tensor(probabilities)[:, None].expand(3, 4000))
    router.train()
    draws = 5
    masks = torch.stack([router.masks().detach() for _ in range(draws)])  # [draws, T, K]
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    n = draws * 4000
    for t, p in enumerate(probabilities):
        tolerance = 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
        assert abs(masks[:, t].mean().item() - p) < tolerance, (p, masks[:, t].mean().item())


def test_straight_through_gradient_reaches_the_logits():
    torch.manual_seed(0)
    layer = RoutedLayer(linear_components(3, 5, 4), GumbelMatrixRouter(num_tasks=2, num_components=3, temperature=1.0))
    layer.train()
    out = layer(torch.randn(8, 5), torch.tensor([0, 1] * 4))
    (out * torch.randn(8, 4)).sum().backward()  # a loss with a non-zero gradient also where the output is 0
    grad = layer.router.logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.abs().sum(dim=(1, 2)) > 0).all()  # every task's logits get a gradient


def test_output_is_the_mean_of_the_selected_components():
    torch.manual_seed(0)
    components = linear_components(3, 5, 4)
    layer = RoutedLayer(components, FixedRouter(torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])))
    x = torch.randn(6, 5)
    each = components(x)  # [N, K, 4]
    out = layer(x, torch.tensor([0, 1, 0, 1, 0, 1]))
    torch.testing.assert_close(out[0::2], (each[0::2, 0] + each[0::2, 2]) / 2)
    torch.testing.assert_close(out[1::2], each[1::2].mean(dim=1))


@pytest.mark.parametrize("training", [True, False])
def test_no_selected_component_gives_zeros_without_nan(training):
    torch.manual_seed(0)
    router = GumbelMatrixRouter(num_tasks=2, num_components=3, temperature=0.5)
    with torch.no_grad():
        router.logits[..., 0] = -1e4  # P(connected) = 0: neither the noise nor the greedy rule selects anything
    layer = RoutedLayer(linear_components(3, 5, 4), router).train(training)
    out = layer(torch.randn(4, 5), torch.tensor([0, 1, 0, 1]))
    assert torch.equal(out, torch.zeros(4, 4))
    if training:
        (out.sum() + 1.0).backward()
        for p in layer.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()


def test_budget_penalty_on_a_hand_computed_case():
    first, second = GumbelMatrixRouter(2, 2), GumbelMatrixRouter(2, 3)
    set_probabilities(first, [[0.9, 0.8], [0.2, 0.1]])
    set_probabilities(second, [[0.7, 0.7, 0.7], [0.5, 0.5, 0.5]])
    model = nn.ModuleList([first, second])
    # task 0: (1.7 + 2.1) / 5 = 0.76 -> 2 * (0.76 - 0.5) = 0.52; task 1: (0.3 + 1.5) / 5 = 0.36 < 0.5 -> 0
    penalty = budget_penalty(model, budget=0.5, penalty=2.0)
    torch.testing.assert_close(penalty, torch.tensor([0.52, 0.0]))
    penalty.sum().backward()
    assert (first.logits.grad[0] != 0).all() and (first.logits.grad[1] == 0).all()


def test_greedy_evaluation_is_deterministic():
    torch.manual_seed(0)
    model = GumbelMatrixMNISTNet()
    with torch.no_grad():
        for router in router_parameters(model):
            router.normal_()
    x, tasks = torch.rand(8, 1, 28, 28), torch.arange(8) % 4
    model.eval()
    torch.testing.assert_close(model(x, tasks), model(x, tasks), rtol=0, atol=0)
    probabilities = allocation_matrix(model, greedy=False)
    assert torch.equal(allocation_matrix(model), (probabilities >= 0.5).float())
    model.train()
    samples = {tuple(model.layers[0].router.masks().flatten().tolist()) for _ in range(20)}
    assert len(samples) > 1  # training samples, evaluation does not


def test_fixed_allocations():
    assert torch.equal(make_router("no_sharing", 4, 4).masks(), torch.eye(4))
    assert torch.equal(make_router("shared_bottom", 4, 3).masks(), torch.ones(4, 3))
    with pytest.raises(ValueError, match="num_components"):
        make_router("no_sharing", 4, 3)
    with pytest.raises(ValueError, match="allowed"):
        make_router("random", 4, 4)
    for allocation in ("no_sharing", "shared_bottom"):
        model = GumbelMatrixMNISTNet(allocation=allocation)
        assert router_parameters(model) == []
        assert sum(p.numel() for p in model.parameters()) == 1600 + 1480


def test_mnist_net_matches_the_paper_sizes():
    model = GumbelMatrixMNISTNet()
    assert sum(p.numel() for p in model.layers.parameters()) - 3 * 4 * 4 * 2 == 1600  # 12 routed components
    assert sum(p.numel() for p in model.heads.parameters()) == 1480
    assert model(torch.rand(3, 1, 28, 28), torch.tensor([0, 2, 3])).shape == (3, 10)


def test_no_sharing_lenet_tasks_are_independent():
    torch.manual_seed(0)
    model = GumbelMatrixLeNet(3, allocation="no_sharing", num_components=3).eval()
    x = torch.randn(4, 1, 28, 28)
    before = model(x)
    with torch.no_grad():  # perturb component 1 of every routed layer: only task 1 may change
        for layer in model.layers:
            weight = layer.components.layer.weight.unflatten(0, (3, -1))
            weight[1].add_(1.0)
    after = model(x)
    assert before.shape == (4, 3, 10)
    torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]], rtol=0, atol=0)
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_lenet_shared_bottom_with_one_component_has_the_multi_branch_size():
    model = GumbelMatrixLeNet(9, allocation="shared_bottom", num_components=1)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in MultiBranchLeNet(9).parameters())
    learned = GumbelMatrixLeNet(9)  # K = 4: 112,860 weights + 3 x [9, 4, 2] logits
    assert sum(p.numel() for p in weight_parameters(learned)) == 112_860
    assert sum(p.numel() for p in router_parameters(learned)) == 216


def test_rotated_tasks_on_a_hand_made_image():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 0, 27] = 200   # top-right
    image[0, 27, 27] = 100  # bottom-right
    rotated = rotate90(image)[0]
    assert rotated[0, 0] == 200 and rotated[0, 27] == 100 and int(rotated.sum()) == 300  # counter-clockwise
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.arange(5)
    tasks = make_tasks(images, labels)
    assert len(tasks) == len(TASKS) == 4
    assert tasks[0][0] is tasks[1][0] and tasks[2][0] is tasks[3][0]  # the copies are the same data
    assert all(torch.equal(task_labels, labels) for _, task_labels in tasks)
    i, j = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    assert torch.equal(tasks[2][0], images[:, j, 27 - i])  # new[i, j] = old[j, W - 1 - i]


@pytest.fixture(scope="module")
def small_mnist():
    return load_rotated_mnist(subset=2000, seed=0)


def test_load_rotated_mnist_is_seeded(small_mnist):
    again, other = load_rotated_mnist(subset=2000, seed=0), load_rotated_mnist(subset=2000, seed=1)
    images, labels = small_mnist["train"][0]
    assert images.shape == (2000, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(images, again["train"][0][0]) and not torch.equal(images, other["train"][0][0])
    assert torch.equal(small_mnist["train"][2][0], rotate90(images))
    assert [len(y) for _, y in small_mnist["test"]] == [10_000] * 4


def test_short_learning_run_beats_chance(small_mnist):
    params = round_robin.load_params("params/gumbel_mnist/gumbel_matrix.json")
    torch.manual_seed(0)
    model = round_robin.build_model(params, len(TASKS))
    snapshots = round_robin.train(model, small_mnist["train"], params, steps=150, seed=0, log=lambda _: None)
    test = [(images[:1000], labels[:1000]) for images, labels in small_mnist["test"]]
    accuracies = round_robin.evaluate(model, test)
    assert min(accuracies) > 40.0, accuracies  # chance is 10%
    assert snapshots[-1]["update"] == 600 and len(snapshots[-1]["probabilities"]) == 4


def write_params(tmp_path, **changes):
    params = json.loads(open("params/gumbel_mnist/gumbel_matrix.json").read())
    params.update(changes)
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"lr_router": 0.1}, "unknown key 'lr_router'"),
    ({"method": "routing"}, "key 'method'"),
    ({"probs_init": 1.0}, "key 'probs_init'"),
    ({"batch_size": 16.0}, "key 'batch_size'"),
    ({"method": "no_sharing", "num_components": 3}, "num_components"),
    ({"method": "shared_bottom", "budget_penalty": 1.0}, "budget_penalty"),
    ({"temperature_min": 60.0}, "temperature_min"),
])
def test_param_file_errors_are_one_line_and_exit_2(tmp_path, capsys, changes, message):
    assert train_script.main(["--param_file", str(write_params(tmp_path, **changes))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_malformed_and_missing_param_files_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    assert train_script.main(["--param_file", str(bad)]) == 2
    assert train_script.main(["--param_file", str(tmp_path / "absent.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "malformed JSON" in err[0] and "not found" in err[1]


@pytest.mark.parametrize("variant", ["no_sharing", "shared_bottom", "gumbel_matrix", "gumbel_matrix_budget075"])
def test_shipped_param_files_are_valid(variant):
    params = round_robin.load_params(f"params/gumbel_mnist/{variant}.json")
    assert params["exp_id"] == f"gumbel_mnist_{variant}"


def test_cli_writes_results_and_allocation(tmp_path, monkeypatch):
    use_tiny_rotated_mnist(monkeypatch, train=64, test=32)
    out = tmp_path / "run"
    params = "params/gumbel_mnist/gumbel_matrix_budget075.json"
    assert train_script.main(["--param_file", params, "--steps", "3", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("command", "git_commit", "device", "seed", "steps", "epochs", "test_acc_per_task", "test_acc_mean",
                "wall_time_s", "allocation"):
        assert key in results
    assert results["steps"] == 3 and results["updates"] == 12 and len(results["test_acc_per_task"]) == 4
    allocation = json.loads((out / "allocation.json").read_text())
    assert torch.tensor(allocation["greedy"]).shape == (4, 12) == torch.tensor(allocation["probabilities"]).shape


def test_task_similarity():
    similarity = plot_allocation.task_similarity([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    torch.testing.assert_close(torch.as_tensor(similarity), torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64))


def test_plot_allocation_without_matplotlib_exits_2(tmp_path, capsys, monkeypatch):
    record = {"tasks": list(TASKS), "layers": ["L1"], "num_components": 2, "greedy": [[1, 0]] * 4,
              "probabilities": [[0.9, 0.2]] * 4}
    (tmp_path / "allocation.json").write_text(json.dumps(record))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_allocation.main([str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_plot_allocation_writes_both_figures(tmp_path):
    pytest.importorskip("matplotlib")
    record = {"tasks": list(TASKS), "layers": ["L1", "L2"], "num_components": 2,
              "greedy": [[1, 0, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0], [0, 1, 0, 1]], "probabilities": [[0.6] * 4] * 4}
    (tmp_path / "allocation.json").write_text(json.dumps(record))
    assert plot_allocation.main([str(tmp_path), "--probabilities", "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "allocation.png").stat().st_size > 0
    assert (tmp_path / "figs" / "similarity.png").stat().st_size > 0 and not (tmp_path / "allocation.png").exists()


@pytest.mark.parametrize("probabilities", [False, True])
def test_allocation_plot_has_a_colour_key_labels_and_the_run_in_its_title(tmp_path, probabilities):
    plt = pytest.importorskip("matplotlib.pyplot")
    record = {"tasks": list(TASKS), "layers": ["L1", "L2"], "num_components": 2,
              "greedy": [[1, 0, 1, 1]] * 4, "probabilities": [[0.6, 0.1, 0.9, 0.7]] * 4}
    (tmp_path / "allocation.json").write_text(json.dumps(record))
    (tmp_path / "results.json").write_text(json.dumps({"method": "gumbel_matrix", "seed": 1, "steps": 300}))
    title = plot_allocation.run_title(tmp_path / "allocation.json")
    assert title == f"{tmp_path}\ngumbel_matrix, seed 1, 300 steps"
    fig = plot_allocation.plot_allocation(plt, record, probabilities, title)
    ax, key = fig.axes[0], fig.axes[-1]
    assert ax.get_title().startswith(title)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(TASKS) and ax.get_ylabel() == "task"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "0", "1"]
    assert ax.get_xlabel().startswith("component")
    if probabilities:
        assert key.get_ylabel() == "P(task uses the component)"
    else:
        assert [t.get_text() for t in key.get_yticklabels()] == ["not used", "used"]
    plt.close(fig)
    fig = plot_allocation.plot_similarity(plt, record, title)
    assert fig.axes[0].get_title().startswith(title) and fig.axes[-1].get_ylabel().startswith("cosine similarity")
    plt.close(fig)
    assert plot_allocation.run_title(tmp_path / "x" / "allocation.json") == str(tmp_path / "x")  # no results.json
