"""Evaluation: ``evaluate`` of a model equals, in float64, a per-task loop written out here (accuracy and
cross-entropy), for single- and multi-branch models, by location and by reference (labels of -1), dense and by
pairs, with batch-norm buffers; a stacked group's evaluation (every replica in a separate run's model) equals each
replica's separate model, in both stacking modes; eval mode draws no noise (Gumbel routers greedy, no dropout
masks); the group's Gumbel-Matrix active fractions are every replica's."""
import copy
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from loaders import LOADERS
from models import build_model
from models.gumbel_matrix import allocation_matrix, router_parameters
from test_stacked import SEEDS, separate_run, toy_data
from training import config, engine, evaluate as evaluation, stacked as stacking, trainer
from training.data import MEMORY_FORMATS, MNIST_STATS, normalize

# single-branch: ControlNet (forward_all_tasks), ch_mod and task_routing (one pass per task);
# multi-branch: one LeNet per task, the shared LeNet, Gumbel-Matrix routing
METHODS = ("controlnet", "ch_mod", "task_routing", "single_task", "uniform_scaling", "gumbel_matrix")
CASES = [(method, setting, mode, pairs) for method in METHODS for setting in ("9digits", "9digits_byref")
         for mode in stacking.MODES for pairs in (False, True)]
ROWS = 40  # several passes, the last one short: 4 images (loop) or 1 image (vmap, 13 pairs per replica) per pass


def spread(model, generator):
    """Gumbel routers that differ by task and replica (their initial logits are all equal: every component on)."""
    with torch.no_grad():
        for logits in router_parameters(model):
            logits.copy_(torch.randn(logits.shape, generator=generator, dtype=logits.dtype))


def by_hand(model, images, labels, stats=MNIST_STATS):
    """Accuracy [T] (percent) and cross-entropy (mean over each task's valid images, then over tasks) of one model,
    one task after the other on every image where it is defined."""
    model.eval()
    x = normalize(images, stats=stats).double()
    accuracy, losses = [], []
    with torch.no_grad():
        for task in range(labels.shape[1]):
            valid = labels[:, task] >= 0
            xs, y = x[valid], labels[valid, task].long()
            if model.paradigm == "single_branch":
                logits = model(xs, torch.full((len(xs),), task, dtype=torch.int64))
            else:
                logits = model(xs)[:, task]
            accuracy.append(100.0 * float((logits.argmax(dim=1) == y).double().mean()) if len(y) else float("nan"))
            losses.append(float(torch.nn.functional.cross_entropy(logits, y)) if len(y) else float("nan"))
    return torch.tensor(accuracy, dtype=torch.float64), torch.tensor(losses).nanmean().item()


def assert_stack_equals_replicas(stack, models, images, labels, num_tasks, memory_format, stats=MNIST_STATS,
                                 pairs=False):
    group = SimpleNamespace(seeds=list(range(len(models))), stack=stack, model=copy.deepcopy(models[0]))
    figures = engine.StackedGroup.evaluate(group, partial(evaluation.evaluate, num_tasks=num_tasks, rows=ROWS,
                                                          memory_format=memory_format, stats=stats, pairs=pairs,
                                                          with_loss=True), images, labels)
    accuracy, loss = torch.stack([a for a, _ in figures]), [l for _, l in figures]
    assert accuracy.shape == (len(models), num_tasks)
    assert len(set(loss)) == len(models), "the replicas evaluate alike: not their own weights"
    for r, model in enumerate(models):
        separate, separate_loss = evaluation.evaluate(model, images, labels, num_tasks, ROWS, memory_format, stats,
                                                      pairs, with_loss=True)
        expected, expected_loss = by_hand(model, images, labels, stats)
        for got in (accuracy[r], separate):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-9, equal_nan=True)
        assert float(loss[r]) == pytest.approx(expected_loss, rel=1e-9)
        assert separate_loss == pytest.approx(expected_loss, rel=1e-9)
        assert torch.equal(evaluation.evaluate(model, images, labels, num_tasks, ROWS, memory_format, stats, pairs)
                           .nan_to_num(-1), separate.nan_to_num(-1))  # without the loss: the same accuracies


@pytest.mark.parametrize("method,setting,mode,pairs", CASES)
def test_stacked_evaluation_equals_each_replicas_model(float64, method, setting, mode, pairs):
    memory_format = "channels_last" if mode == "loop" else "contiguous"
    params = config.load_params(f"params/mmnist_{setting}_{method}.json", [f"memory_format=\"{memory_format}\""])
    images, labels = toy_data(setting)
    generator = torch.Generator().manual_seed(5)
    models = [separate_run(params, seed, 9)[0] for seed in SEEDS]
    for model in models:
        spread(model, generator)
    for model in models:
        model.train()  # evaluation sets eval mode
    stack = stacking.StackedModel(models, mode, MEMORY_FORMATS[memory_format])
    assert_stack_equals_replicas(stack, models, images, labels, 9, MEMORY_FORMATS[memory_format], pairs=pairs)


@pytest.mark.parametrize("mode", stacking.MODES)
@pytest.mark.parametrize("name", ["backbone_ch_mod", "backbone_multi_branch"])
def test_stacked_evaluation_of_batch_norm_backbones_by_pairs(float64, name, mode):
    """ResNet-18 backbones (CUB's) with batch-norm running statistics that differ per replica; RGB statistics;
    pairs as CLEVR, CELEB-A and CUB evaluate; about half of the labels undefined."""
    models = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = build_model(name, 5, backbone="resnet18", width=0.125, input_size=32, num_classes=4)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
        models.append(model)
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(-1, 4, (12, 5), generator=generator).to(torch.int8)
    stats = (LOADERS["cub"].mean, LOADERS["cub"].std)
    stack = stacking.StackedModel(models, mode)
    assert_stack_equals_replicas(stack, models, images, labels, 5, torch.contiguous_format, stats, pairs=True)


def test_stacked_evaluation_draws_no_dropout_masks(float64):
    """Sener & Koltun's dropout: in eval mode no masks, so a stack that never got ``seed_noise`` evaluates, and
    twice alike."""
    params = config.load_params("params/mmnist_9digits_byref_mgda.json", ["dropout=\"sener_koltun\""])
    images, labels = toy_data("9digits_byref")
    models = [separate_run(params, seed, 9)[0] for seed in SEEDS]
    stack = stacking.StackedModel(models, "loop", MEMORY_FORMATS[params["memory_format"]])
    assert_stack_equals_replicas(stack, models, images, labels, 9, MEMORY_FORMATS[params["memory_format"]])
    with pytest.raises(RuntimeError, match="needs seed_noise"):  # in training mode it would draw masks
        stack.train()(normalize(images[:4]).double().expand(len(SEEDS), -1, -1, -1, -1))


@pytest.mark.parametrize("mode", stacking.MODES)
def test_group_active_fractions_are_each_replicas(float64, mode):
    """The epoch record's ``active_fraction_per_task`` of a Gumbel-Matrix group: every replica's greedy allocation,
    as its separate model's ``allocation_matrix``; for one run (``models.gumbel_matrix`` hook), the run's."""
    params = config.load_params("params/mmnist_9digits_gumbel_matrix.json", [])
    runs = [separate_run(params, seed, 9) for seed in SEEDS]
    generator = torch.Generator().manual_seed(11)
    for model, _, _ in runs:
        spread(model, generator)
    expected = [allocation_matrix(model).mean(dim=1).tolist() for model, _, _ in runs]
    assert len({tuple(e) for e in expected}) == len(SEEDS)
    fractions = [record["active_fraction_per_task"] for record in
                 engine.StackedGroup(runs, params, list(SEEDS), mode).records()]
    assert fractions == expected
    assert trainer.Run(*runs[0], 0).records()[0]["active_fraction_per_task"] == expected[0]
    plain = config.load_params("params/mmnist_9digits_uniform_scaling.json", [])
    plain_run = trainer.Run(*separate_run(plain, 0, 9), 0)
    assert "active_fraction_per_task" not in plain_run.records()[0]
