"""Tests for loaders.cache: atomic writes, verification and rebuild of corrupt entries."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from loaders import cache
from loaders.cache import cached_arrays, load_arrays, save_arrays, sha256_file


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "images": rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8),
        "labels": rng.integers(0, 10, size=50).astype(np.int64),
        "weights": rng.standard_normal((3, 4)).astype(np.float32),
    }


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        np.testing.assert_array_equal(a[k], b[k])


def _sidecar(path):
    return Path(str(path) + ".json")


def test_round_trip_and_sidecar(tmp_path):
    path = tmp_path / "sub" / "entry.npz"
    data = _arrays()
    save_arrays(path, meta={"source": "test", "n": (1, 2)}, **data)

    record = json.loads(_sidecar(path).read_text())
    assert record["size"] == path.stat().st_size
    assert record["sha256"] == sha256_file(path)
    assert record["arrays"]["images"] == {"shape": [50, 28, 28], "dtype": "|u1"}
    assert record["meta"] == {"source": "test", "n": [1, 2]}
    assert not list(path.parent.glob("*.tmp"))

    _assert_same(load_arrays(path), data)
    assert load_arrays(tmp_path / "missing.npz") is None


def test_sha256_file_streams(tmp_path):
    import hashlib
    p = tmp_path / "blob"
    blob = os.urandom(3000)
    p.write_bytes(blob)
    assert sha256_file(p, chunk_size=7) == hashlib.sha256(blob).hexdigest()


def test_truncated_file_is_reported_and_rebuilt(tmp_path, capsys):
    path = tmp_path / "entry.npz"
    data = _arrays()
    save_arrays(path, **data)
    size = path.stat().st_size
    with open(path, "r+b") as fh:  # a real truncation, as left by a full disk or a kill
        fh.truncate(size // 2)

    calls = []

    def build():
        calls.append(1)
        return data

    out = cached_arrays(path, build)
    err = capsys.readouterr().err
    assert f"cache: {path} is corrupt (size {size // 2} bytes, expected {size}); rebuilding" in err
    assert len(err.strip().splitlines()) == 1
    assert calls == [1]
    _assert_same(out, data)
    # rebuilt entry is valid again and is now used without building
    _assert_same(cached_arrays(path, lambda: pytest.fail("should not rebuild")), data)


def test_flipped_byte_is_detected(tmp_path, capsys):
    path = tmp_path / "entry.npz"
    save_arrays(path, **_arrays())
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size, inside the array data: only the hash can tell
    path.write_bytes(bytes(raw))

    assert load_arrays(path) is None
    err = capsys.readouterr().err
    assert "is corrupt (sha256" in err and "rebuilding" in err
    assert not path.exists() and not _sidecar(path).exists()


def test_sidecar_missing_rebuilds(tmp_path, capsys):
    path = tmp_path / "entry.npz"
    data = _arrays()
    save_arrays(path, **data)
    _sidecar(path).unlink()

    out = cached_arrays(path, lambda: data)
    assert "is corrupt (sidecar missing); rebuilding" in capsys.readouterr().err
    _assert_same(out, data)
    assert _sidecar(path).exists()


def test_unreadable_sidecar_and_shape_mismatch(tmp_path, capsys):
    path = tmp_path / "entry.npz"
    save_arrays(path, **_arrays())
    _sidecar(path).write_text("{not json")
    assert load_arrays(path) is None
    assert "sidecar unreadable" in capsys.readouterr().err

    # sidecar consistent in size/hash but recording another shape: refused too
    save_arrays(path, **_arrays())
    record = json.loads(_sidecar(path).read_text())
    record["arrays"]["labels"]["shape"] = [49]
    _sidecar(path).write_text(json.dumps(record))
    assert load_arrays(path) is None
    assert "array 'labels'" in capsys.readouterr().err
    assert not path.exists()


def test_leftover_tmp_is_ignored(tmp_path, capsys):
    path = tmp_path / "entry.npz"
    data = _arrays()
    # What a writer killed mid-way leaves behind: a partial temp file next to the target.
    leftover = tmp_path / "entry.npz.killed.tmp"
    leftover.write_bytes(b"PK\x03\x04 partial")
    assert load_arrays(path) is None  # the .tmp is not mistaken for the entry

    save_arrays(path, **data)
    _assert_same(load_arrays(path), data)
    assert capsys.readouterr().err == ""

    # An old leftover is cleaned up by the next save; a fresh one (maybe a live writer) is kept.
    fresh = tmp_path / "entry.npz.live.tmp"
    fresh.write_bytes(b"x")
    os.utime(leftover, (0, 0))
    save_arrays(path, **data)
    assert not leftover.exists() and fresh.exists()


def test_interrupted_save_keeps_previous_entry(tmp_path, monkeypatch):
    path = tmp_path / "entry.npz"
    old = _arrays()
    save_arrays(path, **old)

    def boom(*args, **kwargs):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(cache.os, "replace", boom)
    with pytest.raises(OSError):
        save_arrays(path, x=np.zeros(3))
    monkeypatch.undo()

    assert not list(tmp_path.glob("*.tmp"))
    # the npz is still the complete old one; its sidecar was dropped first, so it is rebuilt
    # instead of being trusted
    assert load_arrays(path) is None


def test_meta_change_makes_entry_stale(tmp_path, capsys):
    path = tmp_path / "entry.npz"
    cached_arrays(path, lambda: {"a": np.arange(3)}, meta={"v": 1})
    out = cached_arrays(path, lambda: {"a": np.arange(4)}, meta={"v": 2})
    assert out["a"].shape == (4,)
    assert "stale" in capsys.readouterr().err
    assert cache.read_meta(path) == {"v": 2}


def test_object_arrays_refused(tmp_path):
    with pytest.raises(TypeError):
        save_arrays(tmp_path / "x.npz", a=np.array([{}, None], dtype=object))
