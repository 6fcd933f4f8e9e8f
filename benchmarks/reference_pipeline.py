"""The original authors' data and training pipeline (TD_MultiTask, ``data/datasets.py``,
``data/multi_mnist_loader_extratask9.py``, ``train_multi_task_counter_stream.py``), rebuilt without torchvision
as the reference of ``bench_train.py``: a per-sample PIL Dataset, a DataLoader, per-batch task draws with
``torch.multinomial`` + one-hot + ``masked_select``, and a per-task evaluation loop with a host sync per task.
"""
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
REF_EVAL_BATCH = 100  # the original's val_loader batch size


def pil_to_tensor(pic):
    """torchvision's ToTensor for a mode 'L' image: float32 [1, H, W] in [0, 1]."""
    x = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    return x.view(pic.size[1], pic.size[0], 1).permute(2, 0, 1).contiguous().float().div(255)


def normalize_tensor(x, mean=(MNIST_MEAN,), std=(MNIST_STD,)):
    """torchvision's Normalize (not in place): (x - mean) / std per channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return x.clone().sub_(mean).div_(std)


class ReferenceMultiMNIST(torch.utils.data.Dataset):
    """The original ``MNIST_ETASK9``: ``(image [1,28,28], label_1, ..., label_T)`` per sample, the image
    turned into a PIL image and transformed in ``__getitem__``. (The original stored the images as float64
    and cast each to uint8 first; here they are uint8 already, which only makes the reference faster.)"""

    def __init__(self, images, labels):
        self.images = images.numpy()
        self.labels = [labels[:, t].clone() for t in range(labels.shape[1])]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = normalize_tensor(pil_to_tensor(Image.fromarray(self.images[index])))
        return (image, *(label[index] for label in self.labels))


def reference_loader(images, labels, batch_size, workers, seed):
    return torch.utils.data.DataLoader(ReferenceMultiMNIST(images, labels), batch_size=batch_size, shuffle=True,
                                       num_workers=workers, generator=torch.Generator().manual_seed(seed))


def reference_batch(batch, device):
    """Images on the device and the task-major label matrix [B, T], as the original stacks it."""
    images = batch[0].to(device)
    return images, torch.stack([label.to(device) for label in batch[1:]]).transpose(0, 1)


def reference_train_epoch(model, optimizer, loader, num_tasks, device):
    """The original training loop: multinomial task draw, one-hot, masked_select of the label."""
    model.train()
    for batch in loader:
        images, labels = reference_batch(batch, device)
        with torch.no_grad():
            task = torch.multinomial(torch.ones(len(images), num_tasks) / num_tasks, 1).to(device)
            one_hot = torch.zeros(len(images), num_tasks, device=device).scatter_(1, task, 1)
            target = torch.masked_select(labels, one_hot.bool())  # the original's .byte() mask is an error now
        optimizer.zero_grad()
        loss = nn.CrossEntropyLoss()(model(images, task[:, 0]), target)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def reference_evaluate(model, loader, num_tasks, device):
    """The original evaluation: per batch, one forward per task; accuracy per task in percent."""
    model.eval()
    correct, count, total_loss = [0] * num_tasks, [0] * num_tasks, 0.0
    for batch in loader:
        images, labels = reference_batch(batch, device)
        for t in range(num_tasks):
            task = torch.full((len(images), 1), t, dtype=torch.int64, device=device)
            one_hot = torch.zeros(len(images), num_tasks, device=device).scatter_(1, task, 1)
            target = torch.masked_select(labels, one_hot.bool())
            logits = model(images, task[:, 0])
            total_loss += nn.CrossEntropyLoss()(logits, target)
            prediction = logits.max(1, keepdim=True)[1]
            correct[t] += prediction.eq(target.view_as(prediction)).cpu().sum()  # host sync, as RunningMetric
            count[t] += prediction.shape[0]
    return [100.0 * float(c) / n for c, n in zip(correct, count)]
