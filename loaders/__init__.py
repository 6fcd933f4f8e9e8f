"""Loader registry: ``LOADERS[name](setting, params, root) -> {split: (images uint8 [N,H,W], labels int64 [N,T])}``
for the splits ``train``, ``val`` and ``test``; labels of -1 mark a task that does not apply to an image."""
from . import multi_mnist


def load_multi_mnist(setting, params, root=None):
    return {split: multi_mnist.make_multi_mnist(setting, split, params["data_seed"], root, params["resize"])
            for split in multi_mnist.SPLITS}


LOADERS = {"multi_mnist": load_multi_mnist}
SETTINGS = multi_mnist.KINDS
NUM_TASKS = multi_mnist.NUM_TASKS
