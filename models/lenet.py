"""The LeNet backbone shared by every row of Table 2 (the authors' barakhi/TD_MultiTask@8c3d589
``models/lenet_counter_stream.py``, BU stream), and the multi-branch / single-task nets.

conv1 1->10 k5 (28->24), ReLU, maxpool (->12), conv2 10->20 k5 (->8), ReLU, maxpool (->4), fc 320->50, ReLU,
fc1 50->50, ReLU, fc2 50->10. No dropout by default (the authors' LeNet has none), so that the rows of Table 2
differ only in the method; the multi-branch and single-task LeNets can take Sener & Koltun's dropout
(``dropout="sener_koltun"``, ``SenerKoltunDropout``). Widths are arguments so that the wider variants (ch-mod
extended, Figure 3) reuse the same code.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import TrainingHooks

NUM_CLASSES = 10
DROPOUTS = ("none", "sener_koltun")


class SenerKoltunDropout(nn.Module):
    """The dropout of Sener & Koltun's MultiLeNetR / MultiLeNetO (isl-org/MultiObjectiveOptimization,
    ``multi_task/models/multi_lenet.py``), the source of the multi-branch baselines. In training only:

    - ``channel``: conv2's output (before pooling and ReLU) times one Bernoulli(0.5) mask per channel, of shape
      [1, C, 1, 1]: the same channels are dropped for every image of the batch;
    - ``element``: a head's fc1 output (after ReLU) times a Bernoulli(0.5) mask per element (per image, task and
      unit);
    - no 1/(1-p) rescale, and the identity in eval mode (so activations at test time are about twice those seen
      in training, as in the original).

    Masks come from torch's global generator, which the training script seeds per epoch (exact resume), or from
    ``generator`` when it is set (one per replica of a stacked run, training/stacked.py). Inside
    ``hold()`` the first masks drawn are reused by every later forward, as Sener & Koltun's MGDA-UB reuses the
    masks of its gradient passes in its final pass (``multi_task/train_multi_task.py``). Under DDP each rank draws
    the masks of its own part of the batch."""

    random_draws = "generator"  # models/hooks.py
    random_draws_label = "Sener-Koltun dropout masks"

    def __init__(self):
        super().__init__()
        self.held = None
        self.generator = None

    def channel(self, x):
        return self._mask(x, "channel", (1, x.shape[1], 1, 1))

    def element(self, x):
        return self._mask(x, "element", x.shape)

    def _mask(self, x, name, shape):
        if not self.training:
            return x
        mask = None if self.held is None else self.held.get(name)
        if mask is None:
            mask = torch.bernoulli(torch.full(shape, 0.5, dtype=x.dtype, device=x.device), generator=self.generator)
            if self.held is not None:
                self.held[name] = mask
        return x * mask

    @contextlib.contextmanager
    def hold(self):
        self.held = {}
        try:
            yield
        finally:
            self.held = None


def held_dropout_masks(model):
    """A context in which ``model``'s Sener-Koltun dropout masks stay fixed (a no-op for a model without them)."""
    dropout = getattr(model, "dropout", None)
    return dropout.hold() if isinstance(dropout, SenerKoltunDropout) else contextlib.nullcontext()


def make_dropout(dropout):
    if dropout not in DROPOUTS:
        raise ValueError(f"unknown dropout {dropout!r}; valid: {', '.join(DROPOUTS)}")
    return SenerKoltunDropout() if dropout == "sener_koltun" else None


def apply_gate(x, gate):
    """``x`` times a gate tensor, or a callable gate applied to ``x``."""
    return gate(x) if callable(gate) else x * gate


class LeNet(nn.Module):
    """One LeNet. `trunk` accepts multiplicative gates at four places, which is all that the
    modulation methods need:

    - ``image``: the input (ControlNet's TD->BU2 lateral at the image level),
    - ``conv1`` / ``conv2``: the conv outputs before ReLU (ControlNet's TD->BU2 laterals, ch-mod, routing),
    - ``pool2``: the 4x4 map after the second pooling (ch-mod, routing).
    A gate is any tensor broadcastable to the feature map, e.g. ``[B, C, 1, 1]`` for a channel vector, which
    multiplies it, or a callable that maps the feature map to the gated one (task routing's straight-through
    mask, ``models.modulation.StraightThroughMask``).
    """

    def __init__(self, in_channels=1, c1=10, c2=20, hidden=50, num_classes=NUM_CLASSES):
        super().__init__()
        self.c1, self.c2 = c1, c2
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.fc = nn.Linear(c2 * 4 * 4, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def trunk(self, x, gates=None):
        """Returns ``(rep [B, hidden], taps)``; taps holds the pre-ReLU conv outputs ``conv1`` [B,c1,24,24],
        ``conv2`` [B,c2,8,8] and the pooled map ``pool2`` [B,c2,4,4] (the BU1->TD lateral sources)."""
        gates = gates or {}
        if "image" in gates:
            x = apply_gate(x, gates["image"])
        conv1 = self.conv1(x)
        if "conv1" in gates:
            conv1 = apply_gate(conv1, gates["conv1"])
        conv2 = self.conv2(F.relu(F.max_pool2d(conv1, 2)))  # = pool(ReLU(x)) exactly, on a quarter of the elements
        if "conv2" in gates:
            conv2 = apply_gate(conv2, gates["conv2"])
        pool2 = F.relu(F.max_pool2d(conv2, 2))
        if "pool2" in gates:
            pool2 = apply_gate(pool2, gates["pool2"])
        rep = F.relu(self.fc(pool2.flatten(1)))
        return rep, {"conv1": conv1, "conv2": conv2, "pool2": pool2}

    def head(self, rep):
        return self.fc2(F.relu(self.fc1(rep)))

    def forward(self, x, gates=None):
        return self.head(self.trunk(x, gates)[0])


class BatchedLinear(nn.Module):
    """T independent ``nn.Linear(in, out)`` layers applied at once: ``[B, T, in] -> [B, T, out]``
    (a ``[B, in]`` input is shared by all T). Initialised as ``nn.Linear`` (uniform +-1/sqrt(in))."""

    def __init__(self, num_tasks, in_features, out_features):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(num_tasks, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks, out_features).uniform_(-bound, bound))

    def forward(self, x):
        if x.dim() == 2:
            return torch.einsum("bi,toi->bto", x, self.weight) + self.bias
        return torch.einsum("bti,toi->bto", x, self.weight) + self.bias


class MultiBranchLeNet(TrainingHooks, nn.Module):
    """Shared trunk (conv1, conv2, fc) and one head (fc1, fc2) per task: Sener & Koltun's MultiLeNetR and
    MultiLeNetO, the split that reproduces the paper's #P (Table 2). ``forward(x) -> [B, T, 10]``. ``dropout``:
    none, or sener_koltun (``SenerKoltunDropout``: a batch-shared channel mask on conv2, per-element masks on
    each head's fc1)."""

    paradigm = "multi_branch"

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50, dropout="none"):
        super().__init__()
        self.num_tasks = num_tasks
        self.dropout = make_dropout(dropout)
        self.conv1 = nn.Conv2d(1, c1, kernel_size=5)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.fc = nn.Linear(c2 * 4 * 4, hidden)
        self.fc1 = BatchedLinear(num_tasks, hidden, hidden)
        self.fc2 = BatchedLinear(num_tasks, hidden, NUM_CLASSES)

    @property
    def last_shared_layer(self):
        """GradNorm's W: the last layer of the shared trunk (Chen et al. 2018 take W as the last shared layer)."""
        return self.fc

    def trunk(self, x):
        x = self.conv2(F.relu(F.max_pool2d(self.conv1(x), 2)))
        if self.dropout is not None:
            x = self.dropout.channel(x)
        x = F.relu(F.max_pool2d(x, 2))
        return F.relu(self.fc(x.flatten(1)))

    def heads(self, rep):
        x = F.relu(self.fc1(rep))
        if self.dropout is not None:
            x = self.dropout.element(x)
        return self.fc2(x)

    def forward(self, x):
        return self.heads(self.trunk(x))


class SingleTaskLeNets(TrainingHooks, nn.Module):
    """T independent LeNets (Table 2 'Single task', #P = T x LeNet), run as one grouped network:
    conv1 has T*c1 output channels, conv2 is grouped by task, the fc layers are batched per task.
    Every weight belongs to exactly one task, so training all T with the summed loss is the same as
    training T separate networks. ``forward(x) -> [B, T, 10]``. ``dropout`` as ``MultiBranchLeNet``'s: with
    sener_koltun each task's LeNet gets its own batch-shared channel mask on conv2 (one mask over the T x c2
    channels) and per-element masks on fc1."""

    paradigm = "multi_branch"

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50, dropout="none"):
        super().__init__()
        self.num_tasks, self.c2 = num_tasks, c2
        self.dropout = make_dropout(dropout)
        self.conv1 = nn.Conv2d(1, num_tasks * c1, kernel_size=5)
        self.conv2 = nn.Conv2d(num_tasks * c1, num_tasks * c2, kernel_size=5, groups=num_tasks)
        self.fc = BatchedLinear(num_tasks, c2 * 4 * 4, hidden)
        self.fc1 = BatchedLinear(num_tasks, hidden, hidden)
        self.fc2 = BatchedLinear(num_tasks, hidden, NUM_CLASSES)

    def forward(self, x):
        x = self.conv2(F.relu(F.max_pool2d(self.conv1(x), 2)))
        if self.dropout is not None:
            x = self.dropout.channel(x)
        x = F.relu(F.max_pool2d(x, 2))
        x = x.reshape(x.shape[0], self.num_tasks, self.c2 * 16)
        x = F.relu(self.fc1(F.relu(self.fc(x))))
        if self.dropout is not None:
            x = self.dropout.element(x)
        return self.fc2(x)
