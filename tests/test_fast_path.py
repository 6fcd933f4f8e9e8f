"""Our fast path computes what the original pipeline computes: the same input tensors and labels as the
per-sample PIL pipeline, the same per-task accuracies when all tasks are evaluated at once, and task draws
uniform among the valid tasks."""
import functools
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from loaders.multi_mnist import make_multi_mnist  # noqa: E402
from models import build_model  # noqa: E402
from training import data, evaluate, loop  # noqa: E402
from reference_pipeline import ReferenceMultiMNIST, reference_batch  # noqa: E402
from weighting import build_weighting  # noqa: E402

NUM_TEST = 200
SINGLE_BRANCH = ("controlnet", "ch_mod", "task_routing")
MULTI_BRANCH = ("multi_branch", "single_task")


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def load(kind, split):
    return make_multi_mnist(kind, split)


@pytest.fixture(scope="module")
def test_split():
    images, labels = load("9digits", "test")
    return images[:NUM_TEST], labels[:NUM_TEST]


@pytest.fixture(scope="module")
def train_split():
    images, labels = load("9digits", "train")
    return images[:512], labels[:512]


def test_reference_pipeline_batch_equals_normalize(test_split):
    images, labels = test_split
    index = [0, 7, 42, 199, 5]
    batch = torch.utils.data.default_collate([ReferenceMultiMNIST(images, labels)[i] for i in index])
    ref_images, ref_labels = reference_batch(batch, torch.device("cpu"))
    ours = data.normalize(images[index])
    assert ref_images.shape == ours.shape == (5, 1, 28, 28) and ref_images.dtype == ours.dtype
    torch.testing.assert_close(ref_images, ours, rtol=0, atol=1e-6)
    assert torch.equal(ref_labels, labels[index])
    # The original's one-hot + masked_select picks the same label as our labels[index, task].
    tasks = torch.tensor([3, 0, 8, 4, 4])
    one_hot = torch.zeros(5, 9).scatter_(1, tasks[:, None], 1)
    assert torch.equal(torch.masked_select(ref_labels, one_hot.bool()), labels[index][torch.arange(5), tasks])


def make_model(name, num_tasks=9, seed=0):
    torch.manual_seed(seed)
    return build_model(name, num_tasks).to(memory_format=torch.channels_last)


def briefly_train(model, train_split, labels=None):
    """8 Adam steps of our train_epoch: weights that depend on the data, not only on the init."""
    labels = train_split[1] if labels is None else labels
    params = {"batch_size": 64, "memory_format": "channels_last", "method": "test"}
    weighting = build_weighting("uniform", labels.shape[1]) if model.paradigm == "multi_branch" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loop.train_epoch(model, weighting, optimizer, (train_split[0], labels), params, 0, 0)
    return model


def scramble(model, seed=1):
    """Random He-scaled weights and N(0, 0.1) biases: predictions that vary with the image and the task, which
    neither a fresh model's nor (for ch-mod on 9 digits) a briefly trained one's do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            std = (2.0 / parameter[0].numel()) ** 0.5 if parameter.dim() > 1 else 0.1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


@torch.inference_mode()
def loop_logits(model, x, num_tasks=9):
    """[T, B, 10]: one forward per task (single-branch) or the heads indexed one by one (multi-branch)."""
    model.eval()
    if model.paradigm == "multi_branch":
        out = model(x)
        return torch.stack([out[:, t] for t in range(num_tasks)])
    return torch.stack([model(x, torch.full((len(x),), t, dtype=torch.int64)) for t in range(num_tasks)])


def loop_accuracy(logits, labels):
    """Per-task accuracy in percent from [T, B, 10] logits, and the number of near-tied predictions."""
    top2 = logits.topk(2, dim=2).values
    near_ties = int(((top2[..., 0] - top2[..., 1]) < 1e-4 * scale(logits)).sum())
    correct = (logits.argmax(dim=2) == labels.t()).sum(dim=1)
    return 100.0 * correct.double() / labels.shape[0], near_ties


def scale(logits):
    """Tolerances are relative to the largest logit (scrambled ControlNets reach 1e7), at least 1."""
    return max(1.0, float(logits.abs().max()))


@pytest.mark.parametrize("state", ["fresh", "trained", "scrambled"])
@pytest.mark.parametrize("name", SINGLE_BRANCH + MULTI_BRANCH)
def test_evaluate_all_tasks_at_once_equals_per_task_loop(name, state, test_split, train_split):
    images, labels = test_split
    model = make_model(name)
    x = data.normalize(images, torch.channels_last)
    if state == "trained":
        fresh = loop_logits(model, x)
        briefly_train(model, train_split)
    if state == "scrambled":
        scramble(model)
    expected = loop_logits(model, x)
    if state == "trained":
        assert (expected - fresh).abs().max() > 1e-2, "training did not change the model"
    expected_accuracy, near_ties = loop_accuracy(expected, labels)
    with torch.inference_mode():
        model.eval()
        all_at_once = evaluate.all_task_logits(model, x, 9)
    torch.testing.assert_close(all_at_once, expected, rtol=0, atol=1e-5 * scale(expected))
    if state == "scrambled":
        assert len(expected.argmax(dim=2).unique()) >= 3, "predictions are (nearly) constant"
    for rows in (512, 4096):  # 56 images per pass with a short last one; all 200 in one pass
        accuracy = evaluate.evaluate(model, images, labels, 9, rows, torch.channels_last)
        # Identical, except that an image whose top-2 logits tie within rounding may flip (none in practice).
        assert (accuracy.double() - expected_accuracy).abs().max() <= 100.0 * near_ties / len(images) + 1e-9


def test_evaluate_skips_invalid_labels_like_the_loop(test_split, train_split):
    """9 digits by reference: labels of -1 count neither as right nor as wrong; a task with none is NaN."""
    images, by_ref = test_split[0], load("9digits_byref", "test")[1][:NUM_TEST]
    model = briefly_train(make_model("controlnet", num_tasks=10), train_split,
                          labels=load("9digits_byref", "train")[1][:len(train_split[1])])
    predictions = loop_logits(model, data.normalize(images, torch.channels_last), num_tasks=10).argmax(dim=2)
    valid = by_ref.t() >= 0
    expected = 100.0 * ((predictions == by_ref.t()) & valid).sum(1).double() / valid.sum(1).double()
    accuracy = evaluate.evaluate(model, images, by_ref, 10, 512, torch.channels_last)
    torch.testing.assert_close(accuracy.double(), expected, rtol=0, atol=1e-9, equal_nan=True)


def test_forward_all_tasks_matches_forward_per_task(test_split, train_split):
    model = briefly_train(make_model("controlnet"), train_split)
    model.eval()
    x = data.normalize(test_split[0][:64], torch.channels_last)
    with torch.inference_mode():
        all_tasks = model.forward_all_tasks(x)
    assert all_tasks.shape == (9, 64, 10)
    torch.testing.assert_close(all_tasks, loop_logits(model, x), rtol=0, atol=1e-5)


CHI2_CRITICAL_1E4 = {1: 15.14, 2: 18.42, 3: 21.11, 9: 33.72}  # chi-square quantiles at p = 1e-4, by degrees of freedom


@pytest.mark.parametrize("valid_tasks", [list(range(10)), [1, 4, 7], [2, 9], [0, 3, 5, 8]])
def test_draw_tasks_is_uniform_among_valid_tasks(valid_tasks):
    n, num_tasks = 40_000, 10
    valid = torch.zeros(n, num_tasks, dtype=torch.bool)
    valid[:, valid_tasks] = True
    tasks = loop.draw_tasks(valid, torch.Generator().manual_seed(1))
    assert valid[torch.arange(n), tasks].all()
    counts = torch.bincount(tasks, minlength=num_tasks)[valid_tasks].double()
    expected = n / len(valid_tasks)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRITICAL_1E4[len(valid_tasks) - 1], (counts.tolist(), chi2)


def test_draw_tasks_never_picks_an_invalid_task():
    labels = load("9digits_byref", "train")[1][:20_000]
    valid = labels >= 0
    tasks = loop.draw_tasks(valid, torch.Generator().manual_seed(2))
    has_valid = valid.any(dim=1)
    assert has_valid.any() and (~has_valid).any()  # both kinds of image occur in the by-reference data
    assert valid[torch.arange(len(labels)), tasks][has_valid].all()
    assert (tasks[~has_valid] == 0).all()  # no valid task: task 0, whose label -1 the loss ignores
    # Per image, uniform among its own valid tasks: each task's share matches the expected share.
    share = (valid.double() / valid.sum(1, keepdim=True).clamp(min=1)).sum(0)
    counts = torch.bincount(tasks[has_valid], minlength=10).double()
    assert ((counts - share) ** 2 / share).sum() < CHI2_CRITICAL_1E4[9]
