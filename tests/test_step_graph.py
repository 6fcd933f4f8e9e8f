"""The capturable training step (issue 19, item 3; training/step_graph.py): the step of device tensors only equals a
plain loop over batch slices, the replay bookkeeping of a captured step (static tensors staged per epoch, step index,
gradients handed back, the partial batch eagerly) equals the eager step, a failed capture falls back to it with one
line, the --cuda_graphs switch; and on a CUDA device the real graph equals the eager step."""
import copy
import math

import pytest
import torch

from losses import masked_cross_entropy
from models.gumbel_matrix import add_budget_gradient, set_temperature, temperature_schedule
from training import config, engine, loop, stacked as stacking, step_graph
from training.data import MEMORY_FORMATS, MNIST_STATS, normalize

from test_stacked import RUN, assert_close_states, gpu_allocation, run_script, separate_run, toy_data


def reference_epoch(model, weighting, optimizer, data, params, seed, epoch):
    """One epoch of one run as a plain loop over slices of its order, written out from the paper's protocol: the
    order and task draws of ``epoch_generator``, torch's generator seeded with ``epoch_seed`` for the model's noise,
    the Gumbel temperature per step; returns the mean training loss."""
    images, labels = data
    size, routing = params["batch_size"], params.get("router_options")
    steps = math.ceil(len(images) / size)
    generator = loop.epoch_generator(seed, epoch)
    torch.manual_seed(loop.epoch_seed(seed, epoch))
    order = torch.randperm(len(images), generator=generator)
    tasks = loop.draw_tasks(labels >= 0, generator) if weighting is None else None
    model.train()
    total = 0.0
    for step in range(steps):
        batch = order[step * size:(step + 1) * size]
        x = normalize(images[batch], MEMORY_FORMATS[params["memory_format"]], MNIST_STATS).double()
        optimizer.zero_grad()
        if routing:
            set_temperature(model, temperature_schedule((epoch * steps + step) * labels.shape[1],
                                                        routing["temperature_init"], routing["temperature_min"]))
        if weighting is None:
            t = tasks[batch]
            loss = masked_cross_entropy(model(x, t), labels[batch, t].long())
            loss.backward()
            task_losses = loss.detach()[None]
        else:
            y = labels[batch].long()
            task_losses = weighting.backward(model, x, y, (y >= 0).sum(0).clamp(min=1))
        if routing and routing["budget_penalty"] > 0:
            add_budget_gradient(model, routing["budget"], routing["budget_penalty"])
        optimizer.step()
        if weighting is not None:
            weighting.after_step()
        total += float(task_losses.mean())
    return total / steps


@pytest.mark.parametrize("param_file,overrides", [
    ("params/mmnist_9digits_byref_ch_mod.json", []),
    ("params/mmnist_9digits_gumbel_matrix_budget075.json", []),
    ("params/mmnist_9digits_mgda.json", ["dropout=\"sener_koltun\""]),
    ("params/mmnist_9digits_byref_gradnorm.json", [])])
def test_step_of_device_tensors_equals_a_loop_over_slices(float64, param_file, overrides):
    """Two epochs of 20 images in batches of 8 (the last one partial): the training loop's step, whose batch is
    picked by a step index tensor, leaves the weights, optimiser and weighting of a plain loop over slices."""
    params = config.load_params(param_file, ["batch_size=8"] + overrides)
    data = toy_data(params["setting"])
    run = separate_run(params, 4, 9)
    reference = copy.deepcopy(run)
    for epoch in range(2):
        loss = loop.train_epoch(*run, data, params, 4, epoch).loss
        assert loss == pytest.approx(reference_epoch(*reference, data, params, 4, epoch), rel=1e-12)
    for part, (actual, expected) in enumerate(zip(run, reference)):
        if actual is not None:
            assert_close_states(actual.state_dict(), expected.state_dict(), f"part {part}")


class FakeBackend:
    """``step_graph.CudaBackend`` on CPU: a warm-up runs the step; a capture records the gradient function without
    running it (a CUDA capture records kernels without their effects) or raises ``fail`` as a capture does; a replay
    runs it and writes its gradients into the tensors that the first replay returned (a graph's fixed outputs)."""

    def __init__(self, fail=None):
        self.fail, self.warmups, self.captures, self.replays, self.generators = fail, 0, 0, 0, None

    def warm_up(self, step):
        self.warmups += 1
        step()

    def capture(self, gradients, generators):
        if self.fail:  # raised inside the capture, then by capture_end on leaving it
            try:
                raise self.fail
            finally:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.captures += 1
        self.generators = generators
        outputs = []

        def replay():
            self.replays += 1
            grads = gradients()
            if not outputs:
                outputs.extend(grads)
            for output, grad in zip(outputs, grads):
                if output is not grad:
                    output.copy_(grad)
            return outputs
        return replay


def train_group(runs, params, seeds, mode, epochs, graphs=None):
    """Trains ``runs`` (as a group of ``seeds``) for ``epochs``, each (epoch, data, lr factor), halving the lr as the
    schedule does; the group and its losses."""
    group = engine.StackedGroup(runs, params, seeds, mode or "loop", graphs)
    losses = []
    for epoch, epoch_data, factor in epochs:
        for param_group in group.optimizer.param_groups:
            param_group["lr"] = params["lr"] * factor
        losses.append([trained.loss for trained in group.train_epoch(epoch_data, params, epoch, MNIST_STATS)])
    return group, losses


def assert_groups_equal(actual, expected, seeds):
    for r in range(len(seeds)):
        for part, (a, e) in enumerate(zip(actual.states(r), expected.states(r))):
            assert_close_states(a, e, f"replica {r} part {part}")


GRAPH_CASES = [("params/mmnist_9digits_mgda.json", ["dropout=\"sener_koltun\""], (0, 1, 2), "loop"),
               ("params/mmnist_9digits_byref_gradnorm.json", [], (0, 1, 2), "loop"),
               ("params/mmnist_9digits_gumbel_matrix_budget075.json", [], (0, 1, 2), "loop"),
               ("params/mmnist_9digits_byref_ch_mod.json", [], (0, 1, 2), "loop"),
               ("params/mmnist_9digits_kendall.json", [], (0, 1, 2), "vmap"),
               ("params/mmnist_9digits_gumbel_matrix.json", [], (5,), None),
               ("params/mmnist_9digits_mgda.json", [], (5,), None)]


@pytest.mark.parametrize("param_file,overrides,seeds,mode", GRAPH_CASES)
def test_replayed_step_equals_the_eager_step(float64, param_file, overrides, seeds, mode):
    """Three epochs of 22 images in batches of 4 (5 full batches, then 2 images), the lr halved after the first,
    the third on other data tensors: one warm-up step, one capture per data, replays of every other full batch, the
    partial batch eagerly; every replica's weights, optimiser and weighting state and losses are the eager step's."""
    params = config.load_params(param_file, ["batch_size=4"] + overrides)
    data = toy_data(params["setting"], n=22)
    other = tuple(tensor.clone() for tensor in data)
    epochs = [(0, data, 1.0), (1, data, 0.5), (2, other, 0.5)]
    runs = [separate_run(params, seed, 9) for seed in seeds]
    backend = FakeBackend()
    graphed, graphed_losses = train_group(copy.deepcopy(runs), params, list(seeds), mode, epochs,
                                          step_graph.StepGraph(backend, warmup=1))
    eager, eager_losses = train_group(runs, params, list(seeds), mode, epochs)
    assert graphed_losses == eager_losses
    assert_groups_equal(graphed, eager, seeds)
    assert (backend.warmups, backend.captures, backend.replays) == (2, 2, 5 * 3 - 2)
    noisy = params["dropout"] != "none" or bool(params.get("router_options"))  # a single run too: a stack of one
    assert backend.generators == graphed.stack.noise_generators() and len(backend.generators) == noisy * len(seeds)


def test_failed_capture_runs_eagerly_with_one_line(float64, capsys):
    """A capture that raises (e.g. a host synchronisation inside the step) leaves the run on the eager step: one log
    line, the eager step's results."""
    params = config.load_params("params/mmnist_9digits_gradnorm.json", ["batch_size=4"])
    data = toy_data(params["setting"], n=22)
    runs = [separate_run(params, seed, 9) for seed in (0, 1)]
    backend = FakeBackend(fail=RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore"))
    epochs = [(0, data, 1.0), (1, data, 1.0)]
    graphed, graphed_losses = train_group(copy.deepcopy(runs), params, [0, 1], "loop", epochs,
                                          step_graph.StepGraph(backend, warmup=2))
    eager, eager_losses = train_group(runs, params, [0, 1], "loop", epochs)
    assert graphed_losses == eager_losses
    assert_groups_equal(graphed, eager, (0, 1))
    lines = [line for line in capsys.readouterr().out.splitlines() if "CUDA graph" in line]
    assert lines == ["CUDA graph capture failed (RuntimeError: CUDA error: operation not permitted when stream is "
                     "capturing); the training step runs eagerly"]
    assert (backend.warmups, backend.captures, backend.replays) == (2, 0, 0)


class BrokenWarmUp(FakeBackend):
    def warm_up(self, step):
        raise ValueError("boom\nmore")


def test_gpu_allocation_uses_a_graphed_path_only_if_it_equals_its_eager_mode(float64):
    """benchmarks/gpu_allocation.py's check of a graphed path against its eager mode after the same epochs: equal,
    differing weights (an epoch more), a failed warm-up (the command goes on without the path)."""
    params = config.load_params("params/mmnist_9digits_kendall.json", ["batch_size=4"])
    data, seeds = toy_data(params["setting"], n=12), [0, 1]
    runs = [separate_run(params, seed, 9) for seed in seeds]
    paths = ("loop", "loop+graphs", "vmap+graphs")
    stacks = {path: stacking.stack_runs(runs, params, "loop") for path in paths}
    graphs = {"loop": None, "loop+graphs": step_graph.StepGraph(FakeBackend(), warmup=1),
              "vmap+graphs": step_graph.StepGraph(BrokenWarmUp(), warmup=1)}
    for path in paths:
        gpu_allocation.probe_epoch(stacks[path], data, params, seeds, 0, graphs[path])
    repeat = stacking.stack_runs(runs, params, "loop")
    gpu_allocation.probe_epoch(repeat, data, params, seeds, 0, None)
    run_to_run = gpu_allocation.worst_differences(repeat, stacks["loop"], len(seeds))
    assert gpu_allocation.summary(run_to_run) == "bit for bit" and "weighting.log_vars" in run_to_run
    checks, differences = gpu_allocation.check_graphs(stacks, graphs, {"loop": run_to_run, "vmap": run_to_run}, 2)
    assert checks == {"loop+graphs": "equal: bit for bit", "vmap+graphs": "not captured: ValueError: boom"}
    assert differences == {"loop+graphs": "bit for bit"}
    gpu_allocation.probe_epoch(stacks["loop+graphs"], data, params, seeds, 1, graphs["loop+graphs"])
    checks, differences = gpu_allocation.check_graphs(stacks, graphs, {"loop": run_to_run}, 2)
    assert checks["loop+graphs"].startswith("differs: worst |graphed - eager| ") and \
        checks["loop+graphs"].endswith("(eager run to run there: 0)")
    assert set(differences["loop+graphs"]) == set(run_to_run) and min(differences["loop+graphs"].values()) > 0
    # within the eager run-to-run differences: allowed where two eager runs differ as much (a GPU's atomics)
    noisy = {key: 1.0 for key in run_to_run}
    assert gpu_allocation.check_graphs(stacks, graphs, {"loop": noisy}, 2)[0]["loop+graphs"].startswith(
        "equal within the eager run-to-run differences: worst |graphed - eager| ")


def test_cuda_graphs_switch(tmp_path, capsys):
    """auto captures stacked groups on CUDA only; 'on' where no graph can be captured fails with one line."""
    params = config.load_params("params/mmnist_9digits_controlnet.json")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert step_graph.build("auto", cpu, 5, params) is None and step_graph.build("auto", cuda, 1, params) is None
    assert step_graph.build("off", cuda, 5, params) is None
    assert isinstance(step_graph.build("auto", cuda, 5, params), step_graph.StepGraph)
    assert isinstance(step_graph.build("on", cuda, 1, params), step_graph.StepGraph)
    with pytest.raises(config.ParamError, match="the localisation loss"):
        step_graph.build("on", cuda, 1, {**params, "spatial_loss_weight": 1.0})
    code, captured = run_script(capsys, "--param_file", "params/mmnist_2digits_uniform_scaling.json", *RUN,
                                "--seeds", "0,1", "--cuda_graphs", "on", "--out", tmp_path / "group")
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == ["error: --cuda_graphs on: it needs a CUDA device; allowed here: auto, off"], captured.err
    assert code == 2
    assert not (tmp_path / "group").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("param_file,overrides,mode", [
    ("params/mmnist_9digits_gumbel_matrix_budget075.json", [], "vmap"),
    ("params/mmnist_9digits_mgda.json", ["dropout=\"sener_koltun\""], "loop"),
    ("params/mmnist_9digits_byref_gradnorm.json", [], "vmap")])
def test_cuda_graph_equals_the_eager_step_on_the_device(param_file, overrides, mode):
    """On a GPU: two epochs of a stacked group, its full batches replayed from one real CUDA graph, equal the eager
    step (float32, the same kernels; 1e-5 for the order of atomic additions)."""
    device = torch.device("cuda")
    params = config.load_params(param_file, ["batch_size=32"] + overrides)
    data = tuple(tensor.to(device) for tensor in toy_data(params["setting"], n=200))
    runs = [tuple(part.to(device) if part is not None and not isinstance(part, torch.optim.Optimizer) else part
                  for part in separate_run(params, seed, 9)) for seed in (0, 1, 2)]
    results = []
    for graphs in (step_graph.StepGraph(step_graph.CudaBackend(device)), None):
        model, weighting, optimizer = stacking.stack_runs(runs, params, mode)
        losses = [[trained.loss for trained in engine.train_stacked_epoch(model, weighting, optimizer, data, params,
                                                                          [0, 1, 2], epoch, graphs=graphs)]
                  for epoch in range(2)]
        results.append((losses, [model.replica_state_dict(r) for r in range(3)]))
        assert graphs is None or (graphs.failed is None and graphs.replay is not None)
    (graphed_losses, graphed), (eager_losses, eager) = results
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
    for a, e in zip(graphed, eager):
        for key in e:
            torch.testing.assert_close(a[key], e[key], rtol=1e-5, atol=1e-6, msg=key)
