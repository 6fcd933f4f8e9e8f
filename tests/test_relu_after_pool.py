"""ReLU after max-pooling, and ControlNet's TD sums with the BU1 lateral first, compute the same function as the
textbook order (ReLU, then pool; the TD term first) bit for bit: outputs and every gradient, in float64 and float32,
channels_last as in training, on every LeNet model of Table 2 and the ablations.

max_pool2d(relu(x)) == relu(max_pool2d(x)) holds exactly (both are monotone), and so do the gradients: where the
window's maximum is positive both orders send the gradient to the same element; where it is not, ReLU's derivative
(0 at 0, as torch's) stops it in both. A sum's operands commute exactly. The reference here is the code before the
change, patched back in; the images have a constant background (as normalised MNIST), so the pooling windows hold
ties, and tasks are drawn at random. The Gumbel-matrix LeNet keeps its order: its ReLU is inside each component,
before the allocation's mean over components, which does not commute with it."""
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.ablations import BUOnlyLeNet
from models.cls_seg import ClsSegMultiBranch, ClsSegOutput
from models.controlnet import ControlNet
from models.lenet import LeNet, MultiBranchLeNet, SingleTaskLeNets

NUM_TASKS, BATCH = 4, 24


# --- the textbook order: the code before the change --------------------------------------------------------------

def lenet_trunk(self, x, gates=None):
    gates = gates or {}
    if "image" in gates:
        x = x * gates["image"]
    conv1 = self.conv1(x)
    if "conv1" in gates:
        conv1 = conv1 * gates["conv1"]
    conv2 = self.conv2(F.max_pool2d(F.relu(conv1), 2))
    if "conv2" in gates:
        conv2 = conv2 * gates["conv2"]
    pool2 = F.max_pool2d(F.relu(conv2), 2)
    if "pool2" in gates:
        pool2 = pool2 * gates["pool2"]
    rep = F.relu(self.fc(pool2.flatten(1)))
    return rep, {"conv1": conv1, "conv2": conv2, "pool2": pool2}


def multi_branch_trunk(self, x):
    x = self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))
    if self.dropout is not None:
        x = self.dropout.channel(x)
    x = F.max_pool2d(F.relu(x), 2)
    return F.relu(self.fc(x.flatten(1)))


def single_task_forward(self, x):
    x = self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))
    if self.dropout is not None:
        x = self.dropout.channel(x)
    x = F.max_pool2d(F.relu(x), 2)
    x = x.reshape(x.shape[0], self.num_tasks, self.c2 * 16)
    x = F.relu(self.fc1(F.relu(self.fc(x))))
    if self.dropout is not None:
        x = self.dropout.element(x)
    return self.fc2(x)


def controlnet_td(self, embedding, bu1_taps):
    td4 = embedding + self.lateral_add[2](bu1_taps["pool2"])
    td8 = F.interpolate(td4, scale_factor=2, mode="nearest") + self.lateral_add[1](bu1_taps["conv2"])
    td24 = F.interpolate(self.td_conv2(td8), scale_factor=2, mode="nearest") + self.lateral_add[0](bu1_taps["conv1"])
    return self.td_conv1(td24), td24, td8


def bu_only_forward_all_tasks(self, images):
    batch, tasks, conv1 = len(images), self.num_tasks, self.bu.conv1
    image_term = F.conv2d(images, conv1.weight[:, :1], conv1.bias)
    task_term = conv1.weight[:, 1:].sum(dim=(2, 3)).t()
    x = (image_term.unsqueeze(0) + task_term[:, None, :, None, None]).flatten(0, 1)
    x = F.max_pool2d(F.relu(self.bu.conv2(F.max_pool2d(F.relu(x), 2))), 2)
    logits = self.bu.head(F.relu(self.bu.fc(x.flatten(1))))
    return logits.view(tasks, batch, -1)


def cls_seg_multi_branch_forward(self, images):
    conv1 = self.conv1(images)
    conv2 = self.conv2(F.max_pool2d(F.relu(conv1), 2))
    rep = F.relu(self.fc(F.max_pool2d(F.relu(conv2), 2).flatten(1)))
    return ClsSegOutput(self.heads(rep), self.seg(rep, conv1, conv2))


TEXTBOOK = [(LeNet, "trunk", lenet_trunk), (MultiBranchLeNet, "trunk", multi_branch_trunk),
            (SingleTaskLeNets, "forward", single_task_forward), (ControlNet, "td", controlnet_td),
            (BUOnlyLeNet, "forward_all_tasks", bu_only_forward_all_tasks),
            (ClsSegMultiBranch, "forward", cls_seg_multi_branch_forward)]


@pytest.fixture
def textbook(monkeypatch):
    """A function that patches the textbook order in (until the test ends)."""
    def patch():
        for cls, name, function in TEXTBOOK:
            monkeypatch.setattr(cls, name, function)
    return patch


# --- what is compared --------------------------------------------------------------------------------------------

def inputs(dtype):
    """MNIST-like images (a constant background, normalised as in training) and random tasks."""
    generator = torch.Generator().manual_seed(0)
    strokes = torch.rand(BATCH, 1, 28, 28, generator=generator)
    images = torch.where(torch.rand(BATCH, 1, 28, 28, generator=generator) < 0.2, strokes, 0.0)
    images = ((images - 0.1307) / 0.3081).to(dtype).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(NUM_TASKS, (BATCH,), generator=generator)


def outputs(model, images, tasks):
    """Every output of a training-mode forward (all streams of ControlNet) and of the evaluation path."""
    model.train()
    if isinstance(model, ClsSegMultiBranch):
        return list(model(images))
    if model.paradigm == "multi_branch":
        return [model(images)]
    out = list(model.streams(images, tasks)) if hasattr(model, "streams") else [model(images, tasks)]
    if hasattr(model, "forward_all_tasks"):
        model.eval()
        out.append(model.forward_all_tasks(images))
    return out


def outputs_and_gradients(name, dtype, images, tasks):
    torch.manual_seed(1)
    if name == "cls_seg_multi_branch":
        model = ClsSegMultiBranch(NUM_TASKS)
    else:  # "<model>+dropout": with Sener & Koltun's dropout (its masks drawn from the seeded global generator)
        model = build_model(name.split("+")[0], NUM_TASKS, **({"dropout": "sener_koltun"} if "+" in name else {}))
    model = model.to(dtype).to(memory_format=torch.channels_last)
    out = outputs(model, images, tasks)
    generator = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=dtype)).sum() for o in out)
    loss.backward()
    return [o.detach() for o in out] + [p.grad for p in model.parameters() if p.grad is not None]


MODELS = ["single_task", "single_task+dropout", "multi_branch", "multi_branch+dropout", "task_routing", "ch_mod", "ch_mod_extended", "controlnet", "td_only",
          "bu_only", "cls_seg_multi_branch"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", MODELS)
def test_outputs_and_gradients_equal_the_textbook_order_bit_for_bit(name, dtype, textbook):
    images, tasks = inputs(dtype)
    ours = outputs_and_gradients(name, dtype, images, tasks)
    textbook()
    reference = outputs_and_gradients(name, dtype, images, tasks)
    assert len(ours) == len(reference) > 2
    for a, b in zip(ours, reference):
        assert a.dtype == dtype and torch.equal(a, b), (a - b).abs().max()


def test_controlnets_td_stays_channels_last():
    """The BU1 lateral first: TD's sums take the lateral's channels_last format, so its convolutions need no copy."""
    model = ControlNet(NUM_TASKS).to(memory_format=torch.channels_last)
    images, tasks = inputs(torch.float32)
    _, taps = model.bu1(images)
    td_map, td24, td8 = model.td(model.task_embedding(tasks), taps)
    assert td8.is_contiguous(memory_format=torch.channels_last)
    assert td24.is_contiguous(memory_format=torch.channels_last)
