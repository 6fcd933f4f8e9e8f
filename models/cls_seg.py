"""Classification and segmentation in one network (paper Table 5, "heterogeneous tasks") on the LeNet family.

Every model has two output branches at the top of its recognition stream (BU2 for ControlNet): the classification
branch (LeNet's fc1 -> fc2, 10 classes, as in Table 2) and a segmentation branch producing a 28x28 map of logits
of the selected digit's mask. The four rows of Table 5:

- ``ClsSegControlNet(instructed=True)`` (row 4): the instruction is the digit-selection one-hot (by location or
  by reference, T slots) followed by a two-slot operation one-hot (0 = recognise, 1 = segment); the T + 2 vector
  feeds TD's task embedding (``Linear(T + 2, c2*16)``, i.e. e(task) + e(op)). Both branches are computed, the
  instructed one is used (loss and evaluation on it only).
- ``ClsSegControlNet(instructed=False)`` (row 2, "ControlNet without the cls/seg instruction"): the plain
  T-slot ControlNet instruction; both branches are used on every pass (loss on both).
- ``ClsSegChannelModulated`` (row 3, ch-mod): one shared LeNet; the channel vectors at conv1, conv2 and pool2 are
  ``ReLU(v_task + v_op)`` (the T + 2 instruction times a learned [T + 2, C] matrix; task rows start at 1, operation
  rows at 0, so that training starts from Table 2's ch-mod).
- ``ClsSegMultiBranch`` (row 1): shared conv1 + conv2 + fc, and 2T branches: a classification head (fc1, fc2) and
  a segmentation branch per task; no instruction, every branch on every pass.

**Where the map comes from** (the paper says only "two separate output branches, one producing one of 10 class
labels, the other producing a 28*28 map"): the segmentation branch is a small top-down decoder on the recognition
stream, shaped as TD (``SegDecoder``): the 50-d representation where the class head reads (top of BU2) ->
``Linear(50, c2*16)`` -> [c2,4,4] -> x2 -> + 1x1 lateral of BU2's conv2 map -> ReLU -> conv k5 pad 4 (c2 -> c1,
12x12) -> x2 -> + 1x1 lateral of BU2's conv1 map -> ReLU -> conv k5 pad 4 (c1 -> 1) -> 28x28 logits. Reading the
top representation makes the branch location-aware in every model (ch-mod's channel vectors carry no spatial
information, so a purely convolutional decoder on its feature maps could not tell which digit was selected); the
laterals from BU2's conv maps (after the model's gating, before pooling) give the fine shape. 22,111 parameters per
branch (c1=10, c2=20, hidden=50).
"""
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .controlnet import ControlNet, multiplicative_gates
from .lenet import BatchedLinear, MultiBranchLeNet
from .modulation import ChannelModulatedLeNet

NUM_OPS = 2            # operation slots of the instruction
RECOGNISE, SEGMENT = 0, 1

ClsSegOutput = namedtuple("ClsSegOutput", ["class_logits", "seg_logits"])


class SegDecoder(nn.Module):
    """``branches`` independent TD-shaped decoders run as one grouped network (every weight belongs to one branch):
    ``(rep [B, hidden], conv1 [B, c1, 24, 24], conv2 [B, c2, 8, 8]) -> logits [B, branches, 28, 28]``.
    ``conv1`` / ``conv2`` are the recognition stream's pre-ReLU conv outputs (after its gates); ReLU is applied here."""

    def __init__(self, branches=1, c1=10, c2=20, hidden=50):
        super().__init__()
        self.branches, self.c2 = branches, c2
        self.top = BatchedLinear(branches, hidden, c2 * 16)
        self.lateral2 = nn.Conv2d(c2, branches * c2, 1)
        self.lateral1 = nn.Conv2d(c1, branches * c1, 1)
        self.deconv2 = nn.Conv2d(branches * c2, branches * c1, kernel_size=5, padding=4, groups=branches)
        self.deconv1 = nn.Conv2d(branches * c1, branches, kernel_size=5, padding=4, groups=branches)

    def forward(self, rep, conv1, conv2):
        top = self.top(rep).reshape(len(rep), self.branches * self.c2, 4, 4)
        x = F.relu(F.interpolate(top, scale_factor=2, mode="nearest") + self.lateral2(F.relu(conv2)))
        x = F.interpolate(self.deconv2(x), scale_factor=2, mode="nearest")
        x = F.relu(x + self.lateral1(F.relu(conv1)))
        return self.deconv1(x)


def instruction_code(tasks, ops, num_tasks, instructed, dtype):
    """The instruction vector: one-hot task [B, T], followed (``instructed``) by the one-hot operation [B, 2]."""
    code = F.one_hot(tasks, num_tasks).to(dtype)
    if not instructed:
        return code
    if ops is None:
        raise ValueError("an instructed model needs the operation of every sample (0 = recognise, 1 = segment)")
    return torch.cat([code, F.one_hot(ops, NUM_OPS).to(dtype)], dim=1)


class ClsSegControlNet(ControlNet):
    """``forward(images [B,1,28,28], tasks [B], ops [B] or None) -> ClsSegOutput([B,10], [B,28,28])``.

    BU1, TD, BU2 and the laterals are ControlNet's; the embedding takes the T + 2 (``instructed``) or T slot
    instruction. ``bu1_taps`` + ``from_taps`` evaluate several instructions on one image batch with one BU1 pass.
    """

    paradigm = "single_branch"

    def __init__(self, num_tasks, instructed=True, c1=10, c2=20, hidden=50, td_channels=None):
        super().__init__(num_tasks + (NUM_OPS if instructed else 0), c1, c2, hidden, td_channels)
        self.num_tasks, self.instructed = num_tasks, instructed
        self.seg = SegDecoder(1, c1, c2, hidden)

    def task_embedding(self, tasks, ops=None):
        code = instruction_code(tasks, ops, self.num_tasks, self.instructed, self.emb.weight.dtype)
        return self.emb(code).view(-1, self.t2, 4, 4)

    def bu1_taps(self, images):
        return self.bu.trunk(images)[1]

    def from_taps(self, images, taps, tasks, ops=None):
        td_map, td24, td8 = self.td(self.task_embedding(tasks, ops), taps)
        rep, bu2 = self.bu.trunk(images, multiplicative_gates(self.lateral_mul, td_map, td24, td8))
        return ClsSegOutput(self.bu.head(rep), self.seg(rep, bu2["conv1"], bu2["conv2"])[:, 0])

    def forward(self, images, tasks, ops=None):
        return self.from_taps(images, self.bu1_taps(images), tasks, ops)

    def forward_all_tasks(self, images):
        raise NotImplementedError("ClsSegControlNet has two outputs per instruction; use forward / from_taps")


class ClsSegChannelModulated(ChannelModulatedLeNet):
    """ch-mod with the two-part instruction: gates ``ReLU(code @ v)`` = ReLU(v_task + v_op) at conv1, conv2 and
    pool2. ``forward(images, tasks, ops) -> ClsSegOutput([B,10], [B,28,28])``."""

    paradigm = "single_branch"

    def __init__(self, num_tasks, instructed=True, c1=10, c2=20, hidden=50):
        super().__init__(num_tasks + (NUM_OPS if instructed else 0), c1, c2, hidden)
        self.num_tasks, self.instructed = num_tasks, instructed
        with torch.no_grad():
            for vectors in self.modulation.values():
                vectors[num_tasks:] = 0.0  # operation rows: start as Table 2's ch-mod (gate = ReLU(1 + 0))
        self.seg = SegDecoder(1, c1, c2, hidden)

    def forward(self, images, tasks, ops=None):
        code = instruction_code(tasks, ops, self.num_tasks, self.instructed, images.dtype)
        gates = {name: F.relu(code @ v)[:, :, None, None] for name, v in self.modulation.items()}
        rep, taps = self.bu.trunk(images, gates)
        return ClsSegOutput(self.bu.head(rep), self.seg(rep, taps["conv1"], taps["conv2"])[:, 0])


class ClsSegMultiBranch(MultiBranchLeNet):
    """Shared conv1, conv2, fc; per task a classification head (fc1, fc2) and a segmentation branch: 2T branches.
    ``forward(images) -> ClsSegOutput([B,T,10], [B,T,28,28])``."""

    paradigm = "multi_branch"
    instructed = False

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50):
        super().__init__(num_tasks, c1, c2, hidden)
        self.seg = SegDecoder(num_tasks, c1, c2, hidden)

    def forward(self, images):
        conv1 = self.conv1(images)
        conv2 = self.conv2(F.relu(F.max_pool2d(conv1, 2)))
        rep = F.relu(self.fc(F.relu(F.max_pool2d(conv2, 2)).flatten(1)))
        return ClsSegOutput(self.heads(rep), self.seg(rep, conv1, conv2))


# variant (param file) -> (class, keyword arguments); the Table 5 row each one reproduces.
VARIANTS = {
    "multi_branch": (ClsSegMultiBranch, {}),                          # row 1: no instruction, 2T branches
    "controlnet_no_instruction": (ClsSegControlNet, {"instructed": False}),  # row 2: loc instruction, both branches
    "ch_mod": (ClsSegChannelModulated, {"instructed": True}),         # row 3
    "controlnet": (ClsSegControlNet, {"instructed": True}),           # row 4
}
TABLE5_ROWS = {"multi_branch": "Multi-branched", "controlnet_no_instruction": "ControlNet (no cls/seg inst.)",
               "ch_mod": "ch-mod", "controlnet": "ControlNet"}


def build_cls_seg_model(variant, num_tasks, **options):
    cls, fixed = VARIANTS[variant]
    return cls(num_tasks, **fixed, **options)
