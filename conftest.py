"""Shared test fixtures, and the rule that the suite writes only into temporary folders.

Unless the caller set MTL_DATA_ROOT (to share a data cache such as MNIST's), it points at a temporary folder for
the whole session, removed at the end; it is set before collection, so that the test modules which copy
os.environ at import pass it on to their subprocesses. In a git checkout, the session fails if ``git status
--porcelain --ignored`` lists anything new at the end (a test wrote into the repository); __pycache__ and
.pytest_cache are not counted."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from runtime.files import REPO
from training import engine, evaluate as evaluation, loop

_state = {"data_root": None, "status": None}


def repository_status():
    """``git status --porcelain --ignored`` lines of the repository, without Python's caches; None outside git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {line for line in out.splitlines()
            if not {"__pycache__", ".pytest_cache"} & set(Path(line[3:].strip('"')).parts)}


def pytest_configure(config):
    if not os.environ.get("MTL_DATA_ROOT"):
        _state["data_root"] = tempfile.mkdtemp(prefix="mtl-test-data-")
        os.environ["MTL_DATA_ROOT"] = _state["data_root"]
    _state["status"] = repository_status()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    before, after = _state["status"], repository_status()
    if before is not None and after is not None and after - before:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.ensure_newline()
        reporter.write_line("FAILED: tests wrote into the repository: " + ", ".join(sorted(after - before)), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    if _state["data_root"] is not None:
        shutil.rmtree(_state["data_root"], ignore_errors=True)
        os.environ.pop("MTL_DATA_ROOT", None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (faster and steadier on a small shared CPU); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64(monkeypatch):
    """Models in float64 and the training loop's normalised images too (``normalize`` returns float32)."""
    for module in (loop, engine, evaluation):
        normalize = module.normalize
        monkeypatch.setattr(module, "normalize", lambda *args, normalize=normalize: normalize(*args).double())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)
