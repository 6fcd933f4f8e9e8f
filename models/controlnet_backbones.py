"""The Top-Down Control Network on the larger backbones (paper §3, Figure 2; for CLEVR the authors'
``BUTD_comp_CLEVR_vgg``): VGG-11 (CLEVR), VGG-7 (CELEB-A), ResNet-18 (CUB-200); see ``models.backbones``.

With stages 0..n-1 of the backbone (C_k channels at stage k):

    BU1:  image -> stage 0 -> ... -> stage n-1 -> head                                  (bu1 logits)
    TD:   td = conv1x1(emb(task)) + lateral_add[n-1](bu1 stage n-1)                    (task embedding, top)
          for k = n-1 .. 1:
              td = top_down_stage(k)(nearest-resize(td, size of stage k-1))            (C_k -> C_{k-1})
              gate[k-1] = lateral_mul[k-1](td)                                         (TD -> BU2, Fig. 2c)
              if k-1 >= 1: td = td + lateral_add[k-1](bu1 stage k-1)                    (BU1 -> TD, Fig. 2b)
          td_map = conv1x1(conv3x3(nearest-resize(td, image size)))                    (1 x S x S, TD bottom)
    BU2:  the same backbone, stage k's output multiplied by gate[k] for k < n-1          (bu2 logits)

As in the authors' CLEVR model: the task embedding is ``Linear(T, e*h*w)`` on the one-hot task (e = 32,
h = w = the top size), then a 1x1 conv to C_{n-1}; there is no BU1 lateral at stage 0 and no gate on the
top stage or the image; the TD bottom is conv3x3 C_0 -> C_0/2 then conv1x1 -> 1, trained by the
localisation loss (``losses``); neither bottom conv has a bias: the map feeds only that loss, a softmax
over all pixels, so a constant added to the map (all that either bias adds) would never be trained. Laterals are
1x1 convs C_k -> C_k. For the CLEVR VGG-11 this gives the paper's #P of x1.56 over the backbone (Table 3a).
"""
import torch.nn as nn
import torch.nn.functional as F

from .backbones import build_backbone, init_convs, scaled
from .controlnet import ControlNetOutput
from .hooks import TrainingHooks


class BackboneControlNet(TrainingHooks, nn.Module):
    """``forward(images [B,3,S,S], tasks [B] int64) -> bu2 logits``; ``streams`` returns all three outputs;
    ``input_shape`` is (3, S, S)."""

    paradigm = "single_branch"
    location_output = "with_td_map"

    def __init__(self, num_tasks, backbone="vgg11_clevr", num_classes=None, width=1.0, input_size=None):
        super().__init__()
        self.num_tasks = num_tasks
        self.bu = build_backbone(backbone, num_classes, width, input_size)
        self.input_shape = (3, self.bu.input_size, self.bu.input_size)
        channels, n = self.bu.channels, len(self.bu.channels)
        top = self.bu.input_size // self.bu.stride
        self.emb_shape = (scaled(32, width), top, top)
        self.emb = nn.Linear(num_tasks, self.emb_shape[0] * top * top)
        self.emb_conv = nn.Conv2d(self.emb_shape[0], channels[-1], 1)
        self.td = nn.ModuleDict({str(k): self.bu.top_down_stage(k) for k in range(1, n)})
        self.lateral_add = nn.ModuleDict({str(k): nn.Conv2d(channels[k], channels[k], 1) for k in range(1, n)})
        self.lateral_mul = nn.ModuleDict({str(k): nn.Conv2d(channels[k], channels[k], 1) for k in range(n - 1)})
        half = scaled(channels[0], 0.5)
        self.bottom = nn.Sequential(nn.Conv2d(channels[0], half, 3, padding=1, bias=False),
                                    nn.Conv2d(half, 1, 1, bias=False))
        for module in (self.emb_conv, self.lateral_add, self.lateral_mul, self.bottom):
            init_convs(module)

    def task_embedding(self, tasks):
        one_hot = F.one_hot(tasks, self.num_tasks).to(self.emb.weight.dtype)
        return self.emb_conv(self.emb(one_hot).view(-1, *self.emb_shape))

    def td_stream(self, tasks, bu1_taps, image_size):
        """Returns ``(td_map [B,1,S,S], gates {stage: tensor})`` from the task and BU1's stage outputs."""
        n = len(bu1_taps)
        td = self.task_embedding(tasks) + self.lateral_add[str(n - 1)](bu1_taps[-1])
        gates = {}
        for k in range(n - 1, 0, -1):
            td = self.td[str(k)](F.interpolate(td, size=bu1_taps[k - 1].shape[-2:], mode="nearest"))
            gates[k - 1] = self.lateral_mul[str(k - 1)](td)
            if k - 1 >= 1:
                td = td + self.lateral_add[str(k - 1)](bu1_taps[k - 1])
        return self.bottom(F.interpolate(td, size=image_size, mode="nearest")), gates

    def streams(self, images, tasks):
        taps = self.bu.taps(images)
        td_map, gates = self.td_stream(tasks, taps, images.shape[-2:])
        return ControlNetOutput(self.bu(images, gates), self.bu.head(taps[-1]), td_map)

    def forward(self, images, tasks, with_td_map=False):
        """BU2 logits [B, C]; with ``with_td_map`` the pair (logits, TD bottom map [B, 1, S, S]), for the
        localisation loss through a DistributedDataParallel wrapper (which only calls ``forward``)."""
        out = self.streams(images, tasks)
        return (out.bu2_logits, out.td_map) if with_td_map else out.bu2_logits
