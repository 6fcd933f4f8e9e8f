"""Table 3's 'loc' variants of the baselines (paper §4.2: "an additional regression loss, calculated by a FC layer
at the top of the network") and its single-task row on the larger backbones: the regression loss against hand
computations, one training step of the script against the loss written out by hand, and the param checks."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import masked_cross_entropy
from models import build_model, count_parameters
from models.backbones import build_backbone
from runtime import files
from training import config, loop
from training.data import normalize
from weighting import build_weighting

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
OPTIONS = {"backbone": "resnet18", "width": 1 / 8, "input_size": SIZE, "num_classes": 5}


def test_regression_loss_by_hand():
    predicted = torch.tensor([[3.0, 4.0], [10.0, 0.0], [7.0, 7.0]], requires_grad=True)
    xy = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [7.0, 9.0]])  # the second sample has no target
    loss = losses.location_regression_loss(predicted, xy, 4.0)
    # ((2/4)^2 + (2/4)^2) / 2 = 0.25 and (0 + (2/4)^2) / 2 = 0.125, over the 2 samples with a target
    assert loss.item() == pytest.approx((0.25 + 0.125) / 2)
    loss.backward()
    assert predicted.grad[1].tolist() == [0.0, 0.0]
    # d/dp of ((p - t) / 4)^2 / 2 / 2 = (p - t) / 32 for sample 0
    assert predicted.grad[0].tolist() == pytest.approx([2 / 32, 2 / 32])
    assert losses.location_regression_loss(predicted, xy, 4.0, num_valid=3).item() == pytest.approx(0.125)


def test_regression_loss_per_task():
    predicted = torch.zeros(2, 3, 2)
    xy = torch.tensor([[[2.0, 0.0], [-1.0, -1.0], [-1.0, -1.0]], [[0.0, 0.0], [0.0, 4.0], [-1.0, -1.0]]])
    got = losses.location_regression_loss(predicted, xy, 2.0)
    # task 0: (1 + 0) / 2 and 0 over 2 samples; task 1: (0 + 4) / 2 over 1; task 2: no target
    torch.testing.assert_close(got, torch.tensor([0.25, 2.0, 0.0]))


def test_location_loss_divides_by_the_global_batch_over_the_ranks():
    """A rank's share: its samples' summed loss over (targets in the whole global batch / ranks), so the ranks'
    shares average to the global batch's loss; the TD map [B, 1, S, S] and the regressed (x, y) take the same rule."""
    xy = torch.tensor([[1.0, 2.0], [-1.0, -1.0]])  # this rank's 2 samples, 1 with a target
    batch_xy = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [3.0, 3.0], [0.0, 1.0]])  # the global batch: 3 with a target
    predicted = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert losses.location_loss(predicted, xy, batch_xy, 4.0, ranks=2).item() == pytest.approx(0.25 / (3 / 2))
    td_map = torch.randn(2, 1, 8, 8)
    alone = losses.spatial_classification_loss(td_map, xy)  # divided by this rank's 1 target
    assert losses.location_loss(td_map, xy, batch_xy, 8, ranks=2).item() == pytest.approx(alone.item() / 1.5)
    targets = losses.LocationTargets(xy, batch_xy, 4, weight=2.5, ranks=2)
    assert targets.loss(predicted).item() == pytest.approx(2.5 * 0.25 / 1.5)


def one_step(model, params, images, labels, locations, weighting=None, seed=3):
    """One epoch of one full batch through the script's ``train_epoch`` with SGD at lr 1: returns the step -grad."""
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(list(model.parameters()) + (list(weighting.parameters()) if weighting else []), lr=1.0)
    stats = ((0.5,) * 3, (0.25,) * 3)
    loop.train_epoch(model, weighting, optimizer, (images, labels), params, seed, 0, stats,
                             locations)
    return {name: value - before[name] for name, value in model.state_dict().items()}, stats


def data(num_tasks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(-1, 5, (6, num_tasks), generator=generator).to(torch.int8)
    labels[:, 0] = 1  # every image has a valid task
    locations = torch.rand(6, num_tasks, 2, generator=generator) * SIZE
    locations[1, :] = -1.0  # one image without any location
    return images, labels, locations


@pytest.mark.parametrize("name", ["backbone_ch_mod", "backbone_task_routing"])
def test_single_branch_step_is_cross_entropy_plus_weighted_regression(name):
    torch.manual_seed(0)
    model = build_model(name, 3, location_head=True, **OPTIONS)
    reference = copy.deepcopy(model)
    images, labels, locations = data(3)
    params = {"batch_size": 6, "memory_format": "contiguous", "spatial_loss_weight": 2.5, "model": name}
    delta, stats = one_step(model, params, images, labels, locations)

    generator = loop.epoch_generator(3, 0)
    order = torch.randperm(6, generator=generator)
    tasks = loop.draw_tasks(labels >= 0, generator)[order]
    x = normalize(images[order], torch.contiguous_format, stats)
    reference.train()
    logits, where = reference(x, tasks, with_location=True)
    rows = torch.arange(6)
    y, xy = labels[order][rows, tasks].long(), locations[order][rows, tasks]
    valid = (xy >= 0).all(dim=1)
    regression = (((where - xy) / SIZE) ** 2).mean(dim=1)[valid].mean()
    (masked_cross_entropy(logits, y) + 2.5 * regression).backward()
    assert reference.locator.weight.grad.abs().sum() > 0
    for parameter_name, parameter in reference.named_parameters():
        torch.testing.assert_close(delta[parameter_name], -parameter.grad, rtol=1e-4, atol=1e-6)


def test_multi_branch_step_adds_each_tasks_regression_to_its_loss():
    torch.manual_seed(0)
    model = build_model("backbone_multi_branch", 3, location_head=True, **OPTIONS)
    reference = copy.deepcopy(model)
    images, labels, locations = data(3, seed=1)
    params = {"batch_size": 6, "memory_format": "contiguous", "spatial_loss_weight": 0.5,
              "model": "backbone_multi_branch"}
    delta, stats = one_step(model, params, images, labels, locations, build_weighting("uniform", 3))

    order = torch.randperm(6, generator=loop.epoch_generator(3, 0))
    reference.train()
    logits, where = reference(normalize(images[order], torch.contiguous_format, stats), with_location=True)
    total = 0.0
    for t in range(3):
        y, xy = labels[order, t].long(), locations[order, t]
        valid = (xy >= 0).all(dim=1)
        regression = (((where[:, t] - xy) / SIZE) ** 2).mean(dim=1)[valid].mean()
        total = total + F.cross_entropy(logits[:, t], y, ignore_index=-1) + 0.5 * regression
    (total / 3).backward()
    assert all(locator.weight.grad.abs().sum() > 0 for locator in reference.locators)
    for parameter_name, parameter in reference.named_parameters():
        torch.testing.assert_close(delta[parameter_name], -parameter.grad, rtol=1e-4, atol=1e-6)


def check(tmp_path, **params):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"exp_id": "t", "dataset": "clevr", "setting": "clevr_40", "input_size": 64,
                                "model_options": {"width": 0.125}, **params}))
    return config.load_params(path)


@pytest.mark.parametrize("method,model", [("ch_mod", "backbone_ch_mod"), ("task_routing", "backbone_task_routing"),
                                          ("uniform_scaling", "backbone_multi_branch"),
                                          ("kendall", "backbone_multi_branch")])
def test_loc_variant_gets_a_location_head(tmp_path, method, model):
    plain, located = (check(tmp_path, method=method, spatial_loss_weight=w) for w in (0.0, 1.0))
    assert plain["model"] == located["model"] == model
    sizes = [count_parameters(build_model(model, 40, **config.model_kwargs(p)))[0] for p in (plain, located)]
    heads = 40 if model == "backbone_multi_branch" else 1
    features = build_backbone("vgg11_clevr", width=0.125, input_size=64).head.num_features
    assert sizes[1] - sizes[0] == heads * (features * 2 + 2)  # Linear(F, 2) per head


@pytest.mark.parametrize("params,message", [
    ({"method": "gradnorm"}, "weighting 'gradnorm' combines the classification losses only; with a localisation "
                             "loss use one of: uniform, sum, kendall"),
    ({"method": "mgda"}, "weighting 'mgda' combines"),
    ({"method": "ch_mod", "dataset": "multi_mnist", "setting": "9digits", "input_size": 0, "model_options": {}},
     "model 'ch_mod' has neither a TD map nor a location head"),
    ({"method": "ch_mod", "dataset": "celeba", "setting": "celeba"}, "data set 'celeba' has no object or part"),
])
def test_loc_variant_bad_pairings_are_one_line_errors(tmp_path, params, message):
    with pytest.raises(config.ParamError, match="key 'spatial_loss_weight'") as err:
        check(tmp_path, spatial_loss_weight=1.0, **params)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_location_head_is_not_a_model_option(tmp_path):
    with pytest.raises(config.ParamError, match="unknown key 'model_options.location_head'"):
        check(tmp_path, method="ch_mod", model_options={"width": 0.125, "location_head": True})


def test_single_task_backbones_are_independent_networks():
    torch.manual_seed(0)
    model = build_model("backbone_single_task", 3, **OPTIONS)
    one = count_parameters(build_backbone("resnet18", 5, 1 / 8, SIZE))
    assert count_parameters(model) == tuple(3 * n for n in one)
    x = torch.randn(4, 3, SIZE, SIZE)
    logits = model(x)
    assert logits.shape == (4, 3, 5)
    logits[:, 1].sum().backward()  # task 1's loss reaches its own network only
    for t, network in enumerate(model.networks):
        touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
        assert touched == (t == 1)
    model.eval()
    torch.testing.assert_close(model(x)[:, 2], model.networks[2].eval()(x))


def test_cub_single_task_param_file_is_one_resnet_per_task():
    params = config.load_params(files.REPO / "params" / "cub_single_task.json")
    assert params["model"] == "backbone_single_task" and params["weighting"] == "sum"
