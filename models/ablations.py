"""The two ablations of ControlNet in the paper's Table 6b (§4.5 "Ablations and the use of image content").

- ``TDOnlyControlNet`` ('TD', no image contribution): ControlNet without BU1. The TD stream computes from the
  task embedding alone (no BU1->TD additive laterals) and controls BU2 through the same multiplicative laterals:

      TD:   emb(task) [c2,4,4] -> upsample x2 = td8 [c2,8,8]
            -> td_conv2 (c2->c1, k5, pad 4) -> upsample x2 = td24 [c1,24,24]
            -> td_conv1 (c1->1, k5, pad 4) -> td_map [1,28,28]
      BU2:  LeNet gated by lateral_mul[0](td_map) at the image, lateral_mul[1](td24) at conv1 and
            lateral_mul[2](td8) at conv2 (both before ReLU), exactly as in ControlNet.

  The control is channel- and spatial-wise but image-independent: one fixed set of gates per task.

- ``BUOnlyLeNet`` ('BU', no TD stream): one LeNet whose input is the image concatenated with T one-hot task
  planes of 28x28 (1+T channels into conv1), single branch.

Both keep ControlNet's / LeNet's widths, so the comparison isolates the removed stream.
"""
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .controlnet import ControlNet, multiplicative_gates
from .hooks import TrainingHooks
from .lenet import LeNet

TDOnlyOutput = namedtuple("TDOnlyOutput", ["bu2_logits", "td_map"])


class TDOnlyControlNet(ControlNet):
    """``forward(images [B,1,28,28], tasks [B] int64) -> bu2 logits [B,10]``; ``streams`` also returns the TD map.

    The layers that remain carry ControlNet's names (``bu``, ``emb``, ``td_conv2``, ``td_conv1``, ``lateral_mul``).
    """

    location_output = None  # its TD map comes from the task alone: nothing of the image to localise

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50, td_channels=None):
        super().__init__(num_tasks, c1, c2, hidden, td_channels)
        del self.lateral_add  # no BU1, so no BU1->TD laterals

    def td(self, tasks):
        """The TD tensors that feed BU2 for the given tasks, from the task alone: td_map [N,1,28,28], td24, td8."""
        td8 = F.interpolate(self.task_embedding(tasks), scale_factor=2, mode="nearest")
        td24 = F.interpolate(self.td_conv2(td8), scale_factor=2, mode="nearest")
        return self.td_conv1(td24), td24, td8

    def gates(self, td_map, td24, td8):
        return multiplicative_gates(self.lateral_mul, td_map, td24, td8)

    def streams(self, images, tasks):
        td_map, td24, td8 = self.td(tasks)
        return TDOnlyOutput(self.bu2(images, td_map, td24, td8), td_map)

    def forward_all_tasks(self, images):
        """BU2 logits of every task on every image, [T, B, 10]. The gates depend only on the task, so TD and the
        laterals run once per task (T rows, not T*B); only BU2 runs on the T*B image-task pairs."""
        batch, tasks = len(images), self.num_tasks
        gates = self.gates(*self.td(torch.arange(tasks, device=images.device)))
        gates = {name: g.unsqueeze(1).expand(-1, batch, -1, -1, -1).flatten(0, 1) for name, g in gates.items()}
        logits = self.bu(images.repeat(tasks, 1, 1, 1), gates)
        return logits.view(tasks, batch, -1)


class BUOnlyLeNet(TrainingHooks, nn.Module):
    """``forward(images [B,1,28,28], tasks [B] int64) -> logits [B,10]``: one LeNet on image + T task planes.

    Plane t is all ones for the selected task t, all zeros otherwise (``inputs`` builds the [B,1+T,28,28] tensor).
    """

    paradigm = "single_branch"

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50):
        super().__init__()
        self.num_tasks = num_tasks
        self.bu = LeNet(1 + num_tasks, c1, c2, hidden)

    def inputs(self, images, tasks):
        planes = F.one_hot(tasks, self.num_tasks).to(images.dtype)[:, :, None, None]
        return torch.cat([images, planes.expand(-1, -1, *images.shape[2:])], dim=1)

    def forward(self, images, tasks):
        return self.bu(self.inputs(images, tasks))

    def forward_all_tasks(self, images):
        """Logits of every task on every image, [T, B, 10]; the same function as ``forward`` per task.

        conv1 is linear and unpadded, so conv1(image ⊕ onehot_t) = conv1 of the image channel alone plus, at every
        output position, the sum of the 5x5 kernel of plane t: a per-task constant [c1]. conv1 runs once per image.
        """
        batch, tasks, conv1 = len(images), self.num_tasks, self.bu.conv1
        image_term = F.conv2d(images, conv1.weight[:, :1], conv1.bias)
        task_term = conv1.weight[:, 1:].sum(dim=(2, 3)).t()  # [T, c1]
        x = (image_term.unsqueeze(0) + task_term[:, None, :, None, None]).flatten(0, 1)
        x = F.relu(F.max_pool2d(self.bu.conv2(F.relu(F.max_pool2d(x, 2))), 2))
        logits = self.bu.head(F.relu(self.bu.fc(x.flatten(1))))
        return logits.view(tasks, batch, -1)
