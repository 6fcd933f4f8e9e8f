"""What made a result: the git commit of the code (``-dirty`` when tracked files differ from it) and the device."""
import platform
import subprocess

import torch

from runtime.files import REPO


def git_commit():
    """HEAD's commit, with ``-dirty`` if tracked files are modified; "unknown" outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe_device(device=torch.device("cpu")):
    """The device in words: the GPU's name, or the CPU and its torch thread count."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
