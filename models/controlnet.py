"""The Top-Down Control Network on LeNet (paper §3, Figure 2; the authors' `BUTD_aligned_Lenet9`).

Three streams: BU1 and BU2 are one LeNet (shared weights); TD mirrors it top-down.

    BU1:  image -> conv1 -> relu/pool -> conv2 -> relu/pool -> fc -> fc1 -> fc2      (bu1 logits)
    TD:   emb(task) [c2,4,4] + lateral_add[2](bu1 pool2)
          -> upsample x2 [c2,8,8]   + lateral_add[1](bu1 conv2) = td8
          -> td_conv2 (c2->c1, k5, pad 4) -> upsample x2 [c1,24,24] + lateral_add[0](bu1 conv1) = td24
          -> td_conv1 (c1->1, k5, pad 4) -> td_map [1,28,28]                           (TD bottom map)
    BU2:  the same LeNet, gated by lateral_mul[0](td_map) at the image, lateral_mul[1](td24) at conv1
          and lateral_mul[2](td8) at conv2 (both before ReLU)                           (bu2 logits)

BU1->TD laterals are additive 1x1 convs (Fig. 2b), TD->BU2 laterals multiplicative 1x1 convs (Fig. 2c).
TD has no nonlinearity and uses nearest-neighbour upsampling, as the released code. TD is therefore affine in
(task embedding, BU1 taps), which ``forward_all_tasks`` uses to evaluate every task without T passes of TD.
"""
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import TrainingHooks
from .lenet import LeNet

ControlNetOutput = namedtuple("ControlNetOutput", ["bu2_logits", "bu1_logits", "td_map"])


class ControlNet(TrainingHooks, nn.Module):
    """``forward(images [B,1,28,28], tasks [B] int64) -> bu2 logits [B,10]``; ``streams`` returns all outputs.

    The task embedding is ``Linear(T, c2*16)`` on the one-hot task (weights and bias, as released).
    """

    paradigm = "single_branch"
    location_output = "with_td_map"  # the localisation loss trains the TD map (paper §4.2)

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50, td_channels=None):
        super().__init__()
        t1, t2 = td_channels or (c1, c2)
        self.num_tasks, self.t2 = num_tasks, t2
        self.bu = LeNet(1, c1, c2, hidden)
        self.emb = nn.Linear(num_tasks, t2 * 16)
        self.td_conv2 = nn.Conv2d(t2, t1, kernel_size=5, padding=4)
        self.td_conv1 = nn.Conv2d(t1, 1, kernel_size=5, padding=4)
        self.lateral_add = nn.ModuleList([nn.Conv2d(c1, t1, 1), nn.Conv2d(c2, t2, 1), nn.Conv2d(c2, t2, 1)])
        self.lateral_mul = nn.ModuleList([nn.Conv2d(1, 1, 1), nn.Conv2d(t1, c1, 1), nn.Conv2d(t2, c2, 1)])

    def bu1(self, images):
        rep, taps = self.bu.trunk(images)
        return self.bu.head(rep), taps

    def task_embedding(self, tasks):
        one_hot = F.one_hot(tasks, self.num_tasks).to(self.emb.weight.dtype)
        return self.emb(one_hot).view(-1, self.t2, 4, 4)

    def td(self, embedding, bu1_taps):
        """Returns the TD tensors that feed BU2: the bottom map [B,1,28,28], td24 and td8. Each sum starts with
        the BU1 lateral, whose channels_last format the sum takes (the same numbers, no layout copies in TD)."""
        td4 = self.lateral_add[2](bu1_taps["pool2"]) + embedding
        td8 = self.lateral_add[1](bu1_taps["conv2"]) + F.interpolate(td4, scale_factor=2, mode="nearest")
        td24 = self.lateral_add[0](bu1_taps["conv1"]) + F.interpolate(self.td_conv2(td8), scale_factor=2, mode="nearest")
        return self.td_conv1(td24), td24, td8

    def bu2(self, images, td_map, td24, td8):
        return self.bu(images, multiplicative_gates(self.lateral_mul, td_map, td24, td8))

    def streams(self, images, tasks):
        bu1_logits, taps = self.bu1(images)
        td_map, td24, td8 = self.td(self.task_embedding(tasks), taps)
        return ControlNetOutput(self.bu2(images, td_map, td24, td8), bu1_logits, td_map)

    def forward(self, images, tasks, with_td_map=False):
        """BU2 logits, and with ``with_td_map`` also the TD bottom map (the localisation loss's input, §4.2)."""
        out = self.streams(images, tasks)
        return (out.bu2_logits, out.td_map) if with_td_map else out.bu2_logits

    def forward_all_tasks(self, images):
        """BU2 logits of every task on every image, [T, B, 10]; the same function as ``forward`` per task.

        TD is affine, TD(e, s) = L(e) + M(s) + c, so TD(e_t, s(x)) = [TD(e_t, 0) - TD(0, 0)] + TD(0, s(x)):
        the task term is computed once per task, the image term once per image, and only BU2 runs T times.
        """
        batch, tasks = len(images), self.num_tasks
        _, taps = self.bu.trunk(images)
        image_term = self.td(torch.zeros_like(taps["pool2"][:, :self.t2]), taps)
        no_taps = {name: torch.zeros_like(tap[:1]) for name, tap in taps.items()}
        embeddings = self.task_embedding(torch.arange(tasks, device=images.device))
        task_term = [with_task - constant for with_task, constant in
                     zip(self.td(embeddings, no_taps), self.td(torch.zeros_like(embeddings[:1]), no_taps))]
        td_map, td24, td8 = ((i.unsqueeze(0) + t.unsqueeze(1)).flatten(0, 1) for i, t in zip(image_term, task_term))
        logits = self.bu2(images.repeat(tasks, 1, 1, 1), td_map, td24, td8)
        return logits.view(tasks, batch, -1)


def multiplicative_gates(lateral_mul, td_map, td24, td8):
    """The TD->BU2 gates (Fig. 2c): 1x1 convs of the TD tensors. The image-level one has a single input and
    output channel, i.e. it is w * td_map + b, computed so (oneDNN is very slow on a 1-channel conv)."""
    image = lateral_mul[0]
    return {"image": torch.addcmul(image.bias.view(1, 1, 1, 1), td_map, image.weight.view(1, 1, 1, 1)),
            "conv1": lateral_mul[1](td24), "conv2": lateral_mul[2](td8)}
