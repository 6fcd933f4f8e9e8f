"""Table 5 (classification and segmentation): masks, IoU, the four models, the training script."""
import json

import numpy as np
import pytest
import torch

from experiments import table5_cls_seg
from loaders import multi_mnist, multi_mnist_seg
from loaders.mnist import data_root, load_mnist
from loaders.multi_mnist_seg import make_multi_mnist_seg
from models.cls_seg import (
    ClsSegChannelModulated, ClsSegControlNet, NUM_OPS, RECOGNISE, SEGMENT, VARIANTS, build_cls_seg_model)



@pytest.fixture(scope="module")
def val_9digits():
    images, labels, masks = make_multi_mnist_seg("9digits", "val")
    return images.numpy(), labels.numpy(), masks.numpy()


@pytest.fixture
def tmp_root(tmp_path):
    """A data root holding only the shared MNIST cache (generated Multi-MNIST and masks go to tmp_path)."""
    load_mnist()  # the verified MNIST cache, under the default data root
    (tmp_path / "mnist").symlink_to(data_root() / "mnist", target_is_directory=True)
    return tmp_path


# ------------------------------------------------------------------------------------------------------ masks
def test_masks_are_inside_the_image_and_their_union_is_the_thresholded_image(val_9digits):
    images, labels, masks = val_9digits
    assert masks.shape == (len(images), 9, 28, 28) and masks.dtype == bool
    support = images > multi_mnist_seg.DEFAULT_THRESHOLD
    assert not (masks & ~support[:, None]).any()                 # every mask inside the image's support
    np.testing.assert_array_equal(masks.any(axis=1), support)     # nearest resize: exactly the thresholded image
    assert (masks.reshape(len(images), 9, -1).sum(-1) > 0).all()  # no digit vanishes


def test_each_task_mask_is_its_own_digit_placed_and_resized_as_the_image(val_9digits):
    images, labels, masks = val_9digits
    pool_images, pool_labels = multi_mnist_seg.pool(load_mnist(), "val")
    index = multi_mnist_seg.placements("9digits", "val", 0, len(pool_images))
    np.testing.assert_array_equal(pool_labels[index], labels)     # the regenerated placements are the generator's
    size, offsets = multi_mnist.LAYOUTS["9digits"]
    some = np.arange(0, len(images), 997)
    for k, offset in enumerate(offsets):  # one digit on an empty canvas, through the image pipeline
        alone = multi_mnist.resize_to_28(multi_mnist.compose(pool_images, index[some, k:k + 1], size, [offset]),
                                         "nearest")
        np.testing.assert_array_equal(masks[some, k], alone > multi_mnist_seg.DEFAULT_THRESHOLD)
    # digits of different positions give different masks (the tasks are not all one map)
    assert (masks[:, 0] != masks[:, 4]).any(axis=(1, 2)).mean() > 0.99


def test_by_reference_masks_follow_the_referred_answer(val_9digits):
    _, grid_labels, loc_masks = val_9digits
    _, ref_labels, ref_masks = (a.numpy() for a in make_multi_mnist_seg("9digits_byref", "val"))
    assert ref_masks.shape == (len(grid_labels), 10, 28, 28)
    answer = multi_mnist_seg.by_ref_positions(grid_labels)
    valid = ref_labels >= 0
    np.testing.assert_array_equal(answer >= 0, valid)
    n, d = np.nonzero(valid)
    assert len(n) > 20_000
    position = answer[n, d]
    np.testing.assert_array_equal(grid_labels[n, position], ref_labels[n, d])  # the answer digit's label...
    np.testing.assert_array_equal(ref_masks[n, d], loc_masks[n, position])    # ...and its mask
    # the answer is right of the referred digit d: same row, next column
    referred = (grid_labels[n] == d[:, None]).argmax(axis=1)
    np.testing.assert_array_equal(position, referred + 3)
    assert not ref_masks[~valid].any()                                         # invalid tasks: empty masks


def test_bicubic_masks_close_to_the_image_and_cache_reload(tmp_root):
    images, _, masks = make_multi_mnist_seg("2digits", "val", root=tmp_root, resize="bicubic_clipped")
    support = images.numpy() > multi_mnist_seg.DEFAULT_THRESHOLD
    union = masks.numpy().any(axis=1)
    # thresholding before the BICUBIC resize (masks) or after it (the image) moves the edges a little
    assert (union == support).mean() > 0.97 and (union & support).sum() / (union | support).sum() > 0.85
    assert (masks.numpy().reshape(len(images), 2, -1).sum(-1) > 0).all()
    cached = list(tmp_root.glob("multi_mnist/seg_2digits_val_*bicubic_clipped*.npz"))
    assert len(cached) == 1
    again = make_multi_mnist_seg("2digits", "val", root=tmp_root, resize="bicubic_clipped")[2]
    assert torch.equal(again, masks)


def test_placements_that_do_not_reproduce_the_images_are_refused(tmp_root, monkeypatch):
    true_placements = multi_mnist_seg.placements
    monkeypatch.setattr(multi_mnist_seg, "placements", lambda *a: np.roll(true_placements(*a), 1, axis=0))
    with pytest.raises(multi_mnist_seg.PlacementMismatch):
        make_multi_mnist_seg("2digits", "val", root=tmp_root)


# ------------------------------------------------------------------------------------------------------- IoU
def test_iou_hand_cases():
    def maps(*rows):
        return torch.tensor(rows, dtype=torch.bool).view(-1, 1, 4)

    pred = maps([1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1])
    target = maps([1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1])
    iou = table5_cls_seg.binary_iou(pred, target)
    # same, 1 of 3, empty prediction, both empty, empty target, 2 of 4
    torch.testing.assert_close(iou, torch.tensor([1.0, 1 / 3, 0.0, 1.0, 0.0, 0.5], dtype=torch.float64))
    metric = table5_cls_seg.TaskIoU(2, "cpu")
    metric.update(pred.view(2, 3, 1, 4), target.view(2, 3, 1, 4), torch.tensor([[1, 1, 0], [1, 0, 1]]).bool())
    torch.testing.assert_close(metric.per_task(), torch.tensor([100 * (1 + 1 / 3) / 2, 100 * 0.75],
                                                               dtype=torch.float64))
    assert torch.isnan(table5_cls_seg.TaskIoU(1, "cpu").per_task()).all()  # no valid image: NaN, not 0


# ------------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("num_tasks", [9, 10])
def test_output_shapes(variant, num_tasks):
    torch.manual_seed(0)
    model = build_cls_seg_model(variant, num_tasks)
    x = torch.randn(5, 1, 28, 28)
    tasks, ops = torch.randint(0, num_tasks, (5,)), torch.randint(0, NUM_OPS, (5,))
    if model.paradigm == "multi_branch":
        out = model(x)
        assert out.class_logits.shape == (5, num_tasks, 10) and out.seg_logits.shape == (5, num_tasks, 28, 28)
    else:
        out = model(x, tasks, ops if model.instructed else None)
        assert out.class_logits.shape == (5, 10) and out.seg_logits.shape == (5, 28, 28)


def test_the_operation_slot_switches_the_output():
    torch.manual_seed(0)
    x, tasks = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 5, 8])
    recognise, segment = torch.full((4,), RECOGNISE), torch.full((4,), SEGMENT)
    controlnet = ClsSegControlNet(9)
    ch_mod = ClsSegChannelModulated(9)
    torch.testing.assert_close(ch_mod(x, tasks, recognise), ch_mod(x, tasks, segment))  # op rows start at 0
    with torch.no_grad():
        for vectors in ch_mod.modulation.values():
            vectors[9:].uniform_(-0.5, 0.5)
    for model in (controlnet, ch_mod):
        a, b = model(x, tasks, recognise), model(x, tasks, segment)
        assert not torch.allclose(a.class_logits, b.class_logits)
        assert not torch.allclose(a.seg_logits, b.seg_logits)
        with pytest.raises(ValueError):
            model(x, tasks)  # an instructed model needs the operation
    torch.testing.assert_close(controlnet.from_taps(x, controlnet.bu1_taps(x), tasks, segment),
                               controlnet(x, tasks, segment))
    assert controlnet.emb.in_features == 9 + NUM_OPS
    plain = ClsSegControlNet(9, instructed=False)
    assert plain.emb.in_features == 9
    torch.testing.assert_close(plain(x, tasks, recognise), plain(x, tasks))  # no operation slot: ops ignored


def test_the_operation_picks_which_branch_is_trained():
    torch.manual_seed(0)
    model = ClsSegControlNet(9)
    x, tasks = torch.randn(6, 1, 28, 28), torch.randint(0, 9, (6,))
    labels, masks = torch.randint(0, 10, (6,)), torch.rand(6, 28, 28) > 0.8
    for op, trained, untouched in ((RECOGNISE, "bu.fc2", "seg."), (SEGMENT, "seg.", "bu.fc2")):
        model.zero_grad(set_to_none=True)
        cls_loss, seg_loss = table5_cls_seg.step_losses(model, x, labels, masks, tasks, torch.full((6,), op))
        assert (cls_loss > 0) == (op == RECOGNISE) and (seg_loss > 0) == (op == SEGMENT)
        (cls_loss + seg_loss).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(trained))
        assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith(untouched))
    labels[:3] = -1  # invalid (by-reference) samples count in neither loss
    plain = ClsSegControlNet(9, instructed=False)
    cls_loss, seg_loss = table5_cls_seg.step_losses(plain, x, labels, masks, tasks)
    ce = torch.nn.functional.cross_entropy(plain(x, tasks).class_logits[3:], labels[3:])
    torch.testing.assert_close(cls_loss, ce)


# -------------------------------------------------------------------------------------------------- the script
def write_params(tmp_path, **overrides):
    params = {"exp_id": "t", "variant": "controlnet", "setting": "9digits", "batch_size": 64, "lr": 0.003,
              "lr_schedule": "none"}
    params.update(overrides)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(params))
    return path


@pytest.mark.parametrize("overrides, words", [
    ({"variant": "controlnett"}, ["'variant'", "controlnet_no_instruction", "multi_branch", "did you mean"]),
    ({"setting": "3digits"}, ["'setting'", "9digits_byref"]),
    ({"seg_loss_wieght": 1.0}, ["unknown key 'seg_loss_wieght'", "seg_loss_weight"]),
    ({"lr": -1}, ["'lr'", "out of range", "1e-08 to 10.0"]),
    ({"model_options": {"sigma": 0.5}}, ["'model_options'", "sigma", "c1, c2, hidden, td_channels"]),
    ({"variant": None}, ["'variant'", "must be str"]),
])
def test_bad_params_are_one_line_with_exit_code_2(tmp_path, capsys, overrides, words):
    path = write_params(tmp_path, **overrides)
    assert table5_cls_seg.main(["--param_file", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err, err
    assert all(word in err for word in words), err


def test_short_run_learns_and_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    path = write_params(tmp_path, variant="ch_mod", batch_size=32, eval_batch_size=256)
    torch.set_num_threads(1)
    assert table5_cls_seg.main(["--param_file", str(path), "--epochs", "3", "--subset", "600", "--out", str(out),
                         "--device", "cpu", "--no_model_file"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("command", "git_commit", "device", "seed", "epochs", "subset", "variant", "setting", "num_params",
                "params_x", "best_epoch", "test_acc_per_task", "test_iou_per_task", "test_acc_mean", "test_iou_mean",
                "val_acc_mean", "val_iou_mean", "test_acc_unselected_mean", "test_iou_unselected_mean", "wall_time_s"):
        assert key in results, key
    assert len(results["test_acc_per_task"]) == len(results["test_iou_per_task"]) == 9
    assert results["sizes"] == {"train": 600, "val": 120, "test": 120} and results["epochs"] == 3
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_seg_loss"] < 0.6 * history[0]["train_seg_loss"]
    assert results["val_score"] == max(r["val_score"] for r in history)
    assert not (out / "best_model.pt").exists()
    # an existing run is not overwritten without --force
    assert table5_cls_seg.main(["--param_file", str(path), "--epochs", "1", "--subset", "60", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    # the table reads <setting>/<variant>/results.json
    runs = tmp_path / "table"
    (runs / "9digits" / "ch_mod").mkdir(parents=True)
    (runs / "9digits" / "ch_mod" / "results.json").write_text(json.dumps(results))
    text = table5_cls_seg.write_table(runs)
    assert "| ch-mod |" in text and "(76.67)" in text and (runs / "table5.md").exists()


def test_evaluation_reads_each_operation_from_its_instructed_branch():
    """A fake instructed model that answers right only when instructed to: recognise -> correct class, segment ->
    correct mask; the other branch is wrong. Selected scores 100, unselected 0; invalid labels are not counted."""
    from models.cls_seg import ClsSegOutput
    labels = torch.tensor([[3, -1], [7, 2], [0, 9]])
    masks = torch.rand(3, 2, 28, 28) > 0.7

    class Fake(torch.nn.Module):
        paradigm, instructed = "single_branch", True

        def forward(self, x, tasks, ops):
            rows = torch.arange(len(x))
            right = labels[rows, tasks].clamp(min=0)
            logits = torch.nn.functional.one_hot(torch.where(ops == RECOGNISE, right, (right + 1) % 10), 10).float()
            seg = torch.where((ops == SEGMENT)[:, None, None], masks[rows, tasks], ~masks[rows, tasks])
            return ClsSegOutput(logits, seg.float() * 2 - 1)

    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    scores = table5_cls_seg.evaluate(Fake(), images, labels, masks, 2, per_pass=8)  # one chunk
    assert scores["acc_per_task"] == [100.0, 100.0] and scores["iou_per_task"] == [100.0, 100.0]
    assert scores["acc_unselected_mean"] == 0.0 and scores["iou_unselected_mean"] == 0.0
