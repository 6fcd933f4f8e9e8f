"""Architectures: shapes, weight sharing, gradients, exact parameter counts (paper Table 2, #P)."""
import pytest
import torch
import torch.nn.functional as F

from models import LENET_PARAMS, MODELS, build_model, count_parameters, input_shape
from models.lenet import LeNet
from models.modulation import GATED

torch.set_num_threads(1)


def images(batch=6, seed=0, shape=(1, 28, 28)):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


# The larger backbones (paper §4.2) at width 1/8 and 64 px, small enough for a fast test; 5 classes.
BACKBONE_TEST_OPTIONS = {"backbone": "vgg11_clevr", "width": 1 / 8, "input_size": 64, "num_classes": 5}


def build(name, num_tasks):
    """A registered model: the LeNet family as registered (10 classes), the ``backbone_*`` models small."""
    return build_model(name, num_tasks, **(BACKBONE_TEST_OPTIONS if name.startswith("backbone_") else {}))


@pytest.mark.parametrize("num_tasks", [1, 2, 9, 10, 40])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shapes_for_any_number_of_tasks(name, num_tasks):
    model = build(name, num_tasks)
    classes = BACKBONE_TEST_OPTIONS["num_classes"] if name.startswith("backbone_") else 10
    x = images(shape=input_shape(model))
    if model.paradigm == "single_branch":
        out = model(x, torch.arange(6) % num_tasks)
        assert out.shape == (6, classes)
    else:
        assert model(x).shape == (6, num_tasks, classes)


@pytest.mark.parametrize("backbone,size", [("vgg11_clevr", 64), ("vgg7", 32), ("resnet18", 64)])
def test_backbone_models_declare_their_input_shape(backbone, size):
    for name in [n for n in MODELS if n.startswith("backbone_")]:
        model = build_model(name, 3, backbone=backbone, width=1 / 8, input_size=size)
        assert input_shape(model) == (3, size, size), name
    assert input_shape(build_model("controlnet", 3)) == (1, 28, 28)


def test_controlnet_streams_shapes():
    out = build_model("controlnet", 9).streams(images(), torch.arange(6))
    assert out.bu2_logits.shape == (6, 10) and out.bu1_logits.shape == (6, 10)
    assert out.td_map.shape == (6, 1, 28, 28)


def test_controlnet_bu1_and_bu2_share_all_weights():
    torch.manual_seed(0)
    model = build_model("controlnet", 9)
    x, tasks = images(), torch.arange(6)
    # BU1 is the plain LeNet of model.bu.
    assert torch.equal(model.streams(x, tasks).bu1_logits, model.bu(x))
    # With every TD->BU2 gate forced to 1, BU2 computes exactly what BU1 computes: same weights.
    for lateral in model.lateral_mul:
        torch.nn.init.zeros_(lateral.weight)
        torch.nn.init.ones_(lateral.bias)
    out = model.streams(x, tasks)
    torch.testing.assert_close(out.bu2_logits, out.bu1_logits, rtol=0, atol=1e-6)
    # There is only one copy of the LeNet weights.
    names = [n for n, _ in model.named_parameters() if n.startswith("bu.")]
    assert sorted(names) == sorted(f"bu.{n}" for n, _ in LeNet().named_parameters())


def test_controlnet_gradient_reaches_every_stream():
    torch.manual_seed(0)
    model = build_model("controlnet", 9)
    tasks = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])
    loss = F.cross_entropy(model(images(9), tasks), torch.arange(9) % 10)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Each task's embedding column gets a gradient only from its own samples.
    model.zero_grad()
    F.cross_entropy(model(images(3), torch.tensor([2, 2, 5])), torch.tensor([1, 2, 3])).backward()
    column_norms = model.emb.weight.grad.abs().sum(dim=0)
    assert (column_norms[[2, 5]] > 0).all() and column_norms[[0, 1, 3, 4, 6, 7, 8]].eq(0).all()


def test_controlnet_output_depends_on_task_and_image():
    torch.manual_seed(0)
    model = build_model("controlnet", 4)
    x = images(1).repeat(4, 1, 1, 1)
    out = model(x, torch.arange(4))
    assert not torch.allclose(out[0], out[1])
    # TD map is image-aware: same task, different images, different maps beyond the embedding.
    maps = model.streams(images(2, seed=1), torch.zeros(2, dtype=torch.long)).td_map
    assert not torch.allclose(maps[0], maps[1])


def test_ch_mod_initial_output_equals_plain_lenet():
    torch.manual_seed(0)
    for name in ("ch_mod", "ch_mod_extended"):
        model = build_model(name, 9)
        x = images()
        torch.testing.assert_close(model(x, torch.arange(6)), model.bu(x), rtol=0, atol=0)


def test_task_routing_masks():
    torch.manual_seed(0)
    model = build_model("task_routing", 9, sigma=0.5)
    for name, channels in zip(GATED, (10, 20, 20)):
        mask = getattr(model, f"mask_{name}")
        assert mask.shape == (9, channels)
        assert mask.sum(dim=1).eq(channels - int(channels * 0.5)).all()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert not any("mask" in n for n, _ in model.named_parameters())
    # No gradient reaches the conv1 filters that task 0 switches off.
    model.zero_grad()
    F.cross_entropy(model(images(), torch.zeros(6, dtype=torch.long)), torch.arange(6)).backward()
    off = model.mask_conv1[0] == 0
    assert model.bu.conv1.weight.grad[off].abs().sum() == 0
    assert model.bu.conv1.weight.grad[~off].abs().sum() > 0
    before = model.mask_conv1.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(images(), torch.zeros(6, dtype=torch.long)), torch.arange(6)).backward()
        optimizer.step()
    assert torch.equal(before, model.mask_conv1)
    # Masks are saved with the model, so a reloaded model routes the same way.
    torch.manual_seed(1)
    other = build_model("task_routing", 9)
    assert not torch.equal(other.mask_conv2, model.mask_conv2)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.mask_conv2, model.mask_conv2)


def test_single_task_lenets_equal_independent_lenets():
    torch.manual_seed(0)
    num_tasks = 3
    grouped = build_model("single_task", num_tasks)
    x = images()
    out = grouped(x)
    for t in range(num_tasks):
        net = LeNet()
        net.conv1.weight.data = grouped.conv1.weight[10 * t:10 * (t + 1)].clone()
        net.conv1.bias.data = grouped.conv1.bias[10 * t:10 * (t + 1)].clone()
        net.conv2.weight.data = grouped.conv2.weight[20 * t:20 * (t + 1)].clone()
        net.conv2.bias.data = grouped.conv2.bias[20 * t:20 * (t + 1)].clone()
        for layer in ("fc", "fc1", "fc2"):
            getattr(net, layer).weight.data = getattr(grouped, layer).weight[t].clone()
            getattr(net, layer).bias.data = getattr(grouped, layer).bias[t].clone()
        torch.testing.assert_close(out[:, t], net(x), rtol=1e-5, atol=1e-5)


def test_multi_branch_heads_are_independent():
    torch.manual_seed(0)
    model = build_model("multi_branch", 4)
    F.cross_entropy(model(images())[:, 2], torch.arange(6)).backward()
    assert model.fc1.weight.grad[2].abs().sum() > 0
    assert model.fc1.weight.grad[[0, 1, 3]].abs().sum() == 0
    assert model.conv1.weight.grad.abs().sum() > 0


# (num_params, num_weights) for T = 2, 4, 9, 10, from the per-layer counts (weights + biases).
EXPECTED = {
    "single_task": [(24390 * t, 24250 * t) for t in (2, 4, 9, 10)],
    "multi_branch": [(21330 + 3060 * t, 21250 + 3000 * t) for t in (2, 4, 9, 10)],
    "ch_mod": [(24390 + 50 * t, 24250 + 50 * t) for t in (2, 4, 9, 10)],
    "task_routing": [(24390 + 50 * t, 24250 + 50 * t) for t in (2, 4, 9, 10)],
    "ch_mod_extended": [(32900 + 65 * t, 32750 + 65 * t) for t in (2, 4, 9, 10)],
    "controlnet": [(31453 + 320 * t, 30901 + 320 * t) for t in (2, 4, 9, 10)],
    "td_only": [(30503 + 320 * t, 30001 + 320 * t) for t in (2, 4, 9, 10)],  # controlnet less lateral_add (950)
    "bu_only": [(24390 + 250 * t, 24250 + 250 * t) for t in (2, 4, 9, 10)],  # conv1 gets T task planes
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_parameter_counts(name):
    for t, expected in zip((2, 4, 9, 10), EXPECTED[name]):
        assert count_parameters(build_model(name, t)) == expected


def test_paper_multiples_reproduced_for_baselines():
    """The #P conventions that reproduce paper Table 2: multi-branch rows = weights / 24,250; modulation rows =
    params / 24,390."""
    paper = {"uniform": [1.12, 1.37, 1.99, 2.11], "mod": [1.004, 1.008, 1.018, 1.021], "ext": [1.35, 1.36, 1.37, 1.38]}
    for i, t in enumerate((2, 4, 9, 10)):
        assert round(count_parameters(build_model("multi_branch", t))[1] / 24250, 2) == paper["uniform"][i]
        assert round(count_parameters(build_model("ch_mod", t))[0] / LENET_PARAMS, 3) == paper["mod"][i]
        assert round(count_parameters(build_model("ch_mod_extended", t))[0] / LENET_PARAMS, 2) == paper["ext"][i]
