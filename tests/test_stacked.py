"""Stacked runs (issue 19): R runs trained as one stacked model equal the R separate runs of the training script
(float64, every Table 2 method, by location and by reference, both stacking modes), resume, the batched
min-norm solver against ``min_norm_solvers``, and the one-line errors."""
import pytest
import torch

import config
import train_multi_task_counter_stream as script
from models import build_model
from training import stacked as stacking
from weighting import build_weighting
from weighting.batched import MIN_NORM_TOLERANCE, batched_min_norm_element, stack_weightings
from weighting.min_norm_solvers import find_min_norm_element

SEEDS = (0, 1, 2)
TABLE2 = ("single_task", "uniform_scaling", "gradnorm", "kendall", "mgda", "task_routing", "ch_mod",
          "ch_mod_extended", "controlnet", "gumbel_matrix")
CASES = [(method, setting, mode) for method in TABLE2 for setting in ("9digits", "9digits_byref")
         for mode in stacking.MODES]


@pytest.fixture
def float64(monkeypatch):
    """Models in float64 and the script's normalised images too (its ``normalize`` returns float32)."""
    normalize = script.normalize
    monkeypatch.setattr(script, "normalize", lambda *args: normalize(*args).double())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


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
    model = model.to(memory_format=script.MEMORY_FORMATS[params["memory_format"]])
    weighting = build_weighting(params["weighting"], num_tasks, params["weighting_options"]) \
        if params["weighting"] else None
    return model, weighting, script.make_optimizer(params, script.parameter_groups(params, model, weighting))


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


def train_separately(runs, params, data, epochs):
    state = {"epoch": 0}
    return [[script.train_epoch(model, weighting, optimizer, data, params, seed, epoch, None, state)
             for epoch in epochs] for seed, (model, weighting, optimizer) in zip(SEEDS, runs)]


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
    training losses equal its separate run's; so do its evaluated accuracies."""
    memory_format = "channels_last" if mode == "loop" else "contiguous"
    params = config.load_params(f"params/mmnist_{setting}_{method}.json",
                                ["batch_size=8", f"memory_format=\"{memory_format}\""])
    data = toy_data(setting)
    runs = [separate_run(params, seed, 9) for seed in SEEDS]
    model, weighting, optimizer = stacking.stack_runs(runs, params, mode)
    separate_losses = train_separately(runs, params, data, range(2))
    stacked_losses = [stacking.train_epoch(model, weighting, optimizer, data, params, SEEDS, epoch)
                      for epoch in range(2)]
    for epoch, (loss, first_bad) in enumerate(stacked_losses):
        assert first_bad.tolist() == [-1] * len(SEEDS)
        torch.testing.assert_close(loss.double(), torch.tensor([losses[epoch] for losses in separate_losses]))
    assert_replicas_equal_runs(model, weighting, optimizer, runs)
    images, labels = data
    for r, (separate, _, _) in enumerate(runs):
        evaluated = [script.evaluate(m, images, labels, 9, 64, script.MEMORY_FORMATS[memory_format])
                     for m in (model.eval().replica_model(r), separate)]
        torch.testing.assert_close(*evaluated)


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
    stacking.train_epoch(model, weighting, optimizer, data, params, SEEDS, 3)
    assert_replicas_equal_runs(model, weighting, optimizer, runs)


def test_resumed_stacked_run_equals_uninterrupted(float64):
    """Epoch 2 from replica states written after epoch 1 (the files of separate runs) equals two epochs in a row."""
    params = config.load_params("params/mmnist_9digits_byref_kendall.json", ["batch_size=8"])
    data = toy_data(params["setting"])
    runs = [separate_run(params, seed, 9) for seed in SEEDS]
    model, weighting, optimizer = stacking.stack_runs(runs, params, "loop")
    stacking.train_epoch(model, weighting, optimizer, data, params, SEEDS, 0)
    saved = [(model.replica_state_dict(r), weighting.replica_state_dict(r),
              stacking.replica_optimizer_state(optimizer, r)) for r in range(len(SEEDS))]
    stacking.train_epoch(model, weighting, optimizer, data, params, SEEDS, 1)

    fresh = [separate_run(params, seed + 10, 9) for seed in SEEDS]  # other weights: all overwritten on resume
    for (run_model, run_weighting, run_optimizer), (model_state, weighting_state, optimizer_state) in zip(fresh, saved):
        run_model.load_state_dict(model_state)
        run_weighting.load_state_dict(weighting_state)
        run_optimizer.load_state_dict(optimizer_state)
    resumed = stacking.stack_runs(fresh, params, "loop")
    stacking.train_epoch(*resumed, data, params, SEEDS, 1)
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
        stack_weightings([build_weighting("pcgrad", 9)] * 2)
    with pytest.raises(ValueError, match="stacked MGDA solves up to 12 tasks"):
        stack_weightings([build_weighting("mgda", 13)] * 2)
    model = stacking.StackedModel([lenet, lenet])
    with pytest.raises(RuntimeError, match=r"keys \['bu.fc9.weight'\]"):
        model.load_replica_state_dict(0, {**lenet.state_dict(), "bu.fc9.weight": torch.zeros(1)})
    gumbel = stacking.StackedModel([build_model("gumbel_matrix", 9)] * 2)
    with pytest.raises(RuntimeError, match="needs seed_noise"):
        gumbel(torch.zeros(2, 1, 1, 28, 28))
