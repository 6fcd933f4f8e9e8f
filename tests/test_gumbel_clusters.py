"""The three-task-clusters experiment (arXiv 1910.04915, Sec. 5.3) reduced to MNIST + Fashion-MNIST: Fashion-MNIST
IDX loading (tiny fixtures, corrupt files, the Debian route with apt-get / dpkg-deb faked), the leave-one-out tasks,
the 28 -> 32 resize and the pad-and-crop augmentation, the routed network, a short learning run, the param-file
errors and the script's outputs. Offline."""
import gzip
import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments import gumbel_clusters
from loaders import fashion_mnist, task_clusters
from loaders.fashion_mnist import FashionMNISTUnavailable, load_fashion_mnist
from loaders.mnist import IDX_NAMES
from loaders.task_clusters import TASKS, TaskImages, leave_one_out, random_crop, resize, resize_matrix
from models.gumbel_clusters import GumbelClustersNet, routed_conv_layer, same_padding
from models.gumbel_matrix import router_parameters, weight_parameters
from training import round_robin

torch.set_num_threads(1)

TINY_TRAIN, TINY_TEST = (3,) * 10, (2,) * 10  # images per class of the tiny fixture


# --- fixtures ----------------------------------------------------------------------------------------------------

def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def tiny_fashion(seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for split, counts in (("train", TINY_TRAIN), ("test", TINY_TEST)):
        labels = rng.permutation(np.repeat(np.arange(10), counts))
        data[f"{split}_images"] = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        data[f"{split}_labels"] = labels.astype(np.int64)
    return data


def write_fashion(directory, data, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_NAMES.items():
        blob = idx_bytes(data[key])
        (directory / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(blob) if gz else blob)


@pytest.fixture
def tiny_counts(monkeypatch):
    monkeypatch.setattr(fashion_mnist, "TRAIN_COUNTS", TINY_TRAIN)
    monkeypatch.setattr(fashion_mnist, "TEST_COUNTS", TINY_TEST)


# --- Fashion-MNIST -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx_files_are_read(tmp_path, tiny_counts, gz):
    data = tiny_fashion()
    write_fashion(tmp_path / "fashion_mnist", data, gz)
    loaded = load_fashion_mnist(tmp_path, fetch=False)
    for key, value in data.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key


@pytest.mark.parametrize("damage,message", [
    (lambda blob: b"\x08\x03" + blob[2:], "bad IDX magic number"),
    (lambda blob: blob[:-5], "truncated"),
    (lambda blob: blob + b"\x00", "trailing bytes"),
    (lambda blob: blob[:2] + b"\x08\x01" + struct.pack(">I", 3 * 10 * 28 * 28) + blob[16:], "expected a 3-d uint8"),
])
def test_corrupt_fashion_files_give_one_line_errors(tmp_path, tiny_counts, damage, message):
    write_fashion(tmp_path / "fashion_mnist", tiny_fashion(), gz=False)
    path = tmp_path / "fashion_mnist" / IDX_NAMES["train_images"]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(FashionMNISTUnavailable, match=message) as err:
        load_fashion_mnist(tmp_path, fetch=False)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_corrupt_gzip_and_wrong_class_counts(tmp_path, tiny_counts):
    directory = tmp_path / "fashion_mnist"
    write_fashion(directory, tiny_fashion())
    labels = directory / (IDX_NAMES["test_labels"] + ".gz")
    labels.write_bytes(labels.read_bytes()[:20])
    with pytest.raises(FashionMNISTUnavailable, match="corrupt gzip"):
        load_fashion_mnist(tmp_path, fetch=False)
    data = tiny_fashion()
    data["test_labels"][:] = 0
    write_fashion(directory, data)
    with pytest.raises(FashionMNISTUnavailable, match="not Fashion-MNIST .*label counts"):
        load_fashion_mnist(tmp_path, fetch=False)


def test_missing_fashion_without_fetching_says_where_to_put_it(tmp_path):
    with pytest.raises(FashionMNISTUnavailable) as err:
        load_fashion_mnist(tmp_path, fetch=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "fashion_mnist") in message
    assert "train-images-idx3-ubyte.gz" in message and "MTL_DATA_ROOT" in message


def fake_debian(data, calls, apt_fails=False):
    """``subprocess.run`` stand-in: ``apt-get download`` writes a placeholder .deb, ``dpkg-deb -x DEB DIR`` writes
    the tiny files where the real package has them."""
    def run(command, cwd=None, **kwargs):
        calls.append(command)
        if command[0] == "apt-get":
            if apt_fails:
                raise subprocess.CalledProcessError(100, command, stderr="E: Unable to locate package x\n")
            (cwd / "dataset-fashion-mnist_1.0_all.deb").write_bytes(b"!<arch>\n")
        else:
            write_fashion(Path(command[3]) / fashion_mnist.DEBIAN_DIR, data)
        return subprocess.CompletedProcess(command, 0)
    return run


def test_fetch_from_debian(tmp_path, tiny_counts, monkeypatch):
    data, calls = tiny_fashion(), []
    monkeypatch.setattr(fashion_mnist.subprocess, "run", fake_debian(data, calls))
    loaded = load_fashion_mnist(tmp_path)
    assert [c[:2] for c in calls] == [["apt-get", "download"], ["dpkg-deb", "-x"]]
    assert np.array_equal(loaded["train_images"], data["train_images"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion_mnist"]  # the temporary folder is gone
    calls.clear()
    load_fashion_mnist(tmp_path)  # now from the IDX files
    assert calls == []


@pytest.mark.parametrize("failure,message", [("apt", "exit 100: E: Unable to locate package"),
                                             ("missing", "`apt-get` not found")])
def test_failed_fetch_is_one_line(tmp_path, monkeypatch, failure, message):
    if failure == "apt":
        monkeypatch.setattr(fashion_mnist.subprocess, "run", fake_debian(None, [], apt_fails=True))
    else:
        def run(command, **kwargs):
            raise FileNotFoundError(command[0])
        monkeypatch.setattr(fashion_mnist.subprocess, "run", run)
    with pytest.raises(FashionMNISTUnavailable) as err:
        load_fashion_mnist(tmp_path)
    text = str(err.value)
    assert "\n" not in text and message in text and "could not be fetched from Debian" in text
    assert "put the four IDX files" in text


# --- tasks, resize, augmentation -----------------------------------------------------------------------------------

def test_leave_one_out_remaps_labels():
    labels = torch.tensor([0, 3, 5, 3, 9, 4, 8, 1])
    index, remapped = leave_one_out(labels, 3)
    assert index.tolist() == [0, 2, 4, 5, 6, 7]
    assert remapped.tolist() == [0, 4, 8, 3, 7, 1]
    for left_out in range(10):
        index, remapped = leave_one_out(torch.arange(10).repeat(3), left_out)
        assert left_out not in torch.arange(10).repeat(3)[index].tolist()
        assert sorted(set(remapped.tolist())) == list(range(9))


def test_resize_is_tf1_bilinear():
    matrix = resize_matrix()
    assert matrix.shape == (32, 28) and torch.allclose(matrix.sum(dim=1), torch.ones(32))
    # output pixel i samples the input at 0.875 i: i = 3 -> 2.625 = 0.375 * p2 + 0.625 * p3; i = 31 -> p27 (clamped)
    assert torch.allclose(matrix[3, 2:4], torch.tensor([0.375, 0.625])) and matrix[31, 27] == 1
    image = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    out = resize(image)
    assert out.shape == (2, 32, 32) and out.dtype == torch.float32
    expected = 0.375 * (0.375 * image[1, 2, 2] + 0.625 * image[1, 2, 3]) + 0.625 * (
        0.375 * image[1, 3, 2] + 0.625 * image[1, 3, 3])
    assert torch.isclose(out[1, 3, 3], expected.float())
    assert torch.allclose(resize(torch.full((1, 28, 28), 7)), torch.full((1, 32, 32), 7.0))


def test_random_crop_is_a_window_of_the_zero_padded_image_and_seeded():
    images = torch.rand(64, 32, 32) + 1  # > 0 everywhere, so zero pixels can only come from the padding
    crops = random_crop(images, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 32, 32)
    padded = F.pad(images, (4, 4, 4, 4))
    for n in range(0, 64, 7):
        windows = [(r, c) for r in range(9) for c in range(9)
                   if torch.equal(padded[n, r:r + 32, c:c + 32], crops[n])]
        assert len(windows) == 1
    assert torch.equal(crops, random_crop(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(crops, random_crop(images, torch.Generator().manual_seed(1)))
    assert (crops == 0).any() and not torch.equal(crops, images)


def test_task_images_view():
    source = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    index = torch.tensor([1, 4, 7])
    clean = TaskImages(source, index)
    assert len(clean) == 3 and torch.equal(clean[1:], resize(source[[4, 7]]))
    augmented = TaskImages(source, index, torch.Generator().manual_seed(0))
    first = augmented[torch.tensor([0, 2])]
    assert first.shape == (2, 32, 32) and not torch.equal(first, clean[torch.tensor([0, 2])])
    net_input = round_robin.to_input(clean[:])
    assert net_input.shape == (3, 1, 32, 32) and 0 <= net_input.min() and net_input.max() <= 1


def synthetic_dataset(seed, n_train=400, n_test=100):
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data[f"{split}_labels"] = np.arange(n, dtype=np.int64) % 10
        data[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return data


@pytest.fixture
def fake_sources(monkeypatch):
    monkeypatch.setattr(task_clusters, "load_mnist", lambda root: synthetic_dataset(0))
    monkeypatch.setattr(task_clusters, "load_fashion_mnist", lambda root: synthetic_dataset(1))


def test_load_task_clusters_builds_twenty_leave_one_out_tasks(fake_sources):
    data = task_clusters.load_task_clusters(val_size=100, data_seed=0, seed=0)
    assert data["tasks"] == TASKS and len(TASKS) == 20 and TASKS[0] == "MNIST-0" and TASKS[19] == "Fashion-9"
    for t in range(20):
        left_out = t % 10
        train_images, train_labels = data["train"][t]
        val_images, _ = data["val"][t]
        assert len(train_images) + len(val_images) == 360 and len(data["test"][t][1]) == 90  # 400 / 100, 10 classes
        assert train_images.generator is not None and val_images.generator is None
        source = synthetic_dataset(t // 10)
        train, val = task_clusters.split_train_val(torch.from_numpy(source["train_images"]),
                                                   torch.from_numpy(source["train_labels"]), 100, 0)
        for (images, labels), (source_images, source_labels) in ((data["train"][t], train), (data["val"][t], val)):
            assert torch.equal(images.source, source_images)
            original = source_labels[images.index]
            assert left_out not in original.tolist() and len(images) == int((source_labels != left_out).sum())
            assert torch.equal(labels, original - (original > left_out).long())
        assert sorted(set(train_labels.tolist())) == list(range(9))
        assert train_images[torch.arange(5)].shape == (5, 32, 32)
    assert len(data["train"][0][0].source) + len(data["val"][0][0].source) == 400


def test_load_task_clusters_is_seeded(fake_sources):
    first, again, reseeded, resplit = (task_clusters.load_task_clusters(val_size=100, data_seed=data_seed, seed=seed)
                                       for data_seed, seed in ((0, 0), (0, 0), (0, 1), (1, 0)))
    assert torch.equal(first["val"][0][0].source, again["val"][0][0].source)
    assert torch.equal(first["val"][0][0].source, reseeded["val"][0][0].source)
    assert not torch.equal(first["val"][0][0].source, resplit["val"][0][0].source)  # the split follows data_seed
    assert torch.equal(first["test"][3][0][:], resplit["test"][3][0][:])  # test: no split, no augmentation
    batch = torch.arange(8)
    crops = [data["train"][3][0][batch] for data in (first, again, reseeded)]  # each view's first draw
    assert torch.equal(crops[0], crops[1]) and not torch.equal(crops[0], crops[2])  # the crops follow the run seed
    assert not torch.equal(first["train"][3][0][batch], crops[0])  # a new draw every batch


def test_subsets(fake_sources):
    data = task_clusters.load_task_clusters(val_size=100, subset=50, eval_subset=20)
    assert all(len(data["train"][t][0].source) == 50 for t in range(20))
    assert [len(labels) for _, labels in data["test"]] == [20] * 20
    assert all((index.diff() > 0).all() for index in (images.index for images, _ in data["val"]))
    with pytest.raises(ValueError, match="subset"):
        task_clusters.load_task_clusters(val_size=100, subset=301)


# --- the network -------------------------------------------------------------------------------------------------

def test_same_padding_is_tf_same():
    assert [same_padding(32, k, 2) for k in (1, 3, 5)] == [(0, 0), (0, 1), (1, 2)]
    assert same_padding(7, 3, 2) == (1, 1) and same_padding(32, 1, 1) == (0, 0)


def test_network_shapes_and_size():
    torch.manual_seed(0)
    model = GumbelClustersNet(num_tasks=20)
    logits = model(torch.rand(5, 1, 32, 32), torch.tensor([0, 5, 10, 15, 19]))
    assert logits.shape == (5, 9)
    # stem 1x1 conv + GN: 32; per routed layer 8 * (8*8*9 + 8) + 8 * (8*8*25 + 8) + 4 * 64 (component GNs)
    # + 16 (shared GN) = 17,808; heads 20 * (128 * 9 + 9) = 23,220
    assert sum(p.numel() for p in weight_parameters(model)) == 32 + 3 * 17_808 + 23_220
    assert [p.shape for p in router_parameters(model)] == [(20, 16, 2)] * 3
    assert router_parameters(GumbelClustersNet(20, allocation="shared_bottom")) == []
    with pytest.raises(ValueError, match="num_components"):
        GumbelClustersNet(20, allocation="no_sharing")


def test_each_component_is_conv_groupnorm_relu_of_its_own():
    torch.manual_seed(0)
    layer = routed_conv_layer(8, 8, ((3, 8), (5, 8)), stride=2, norm_groups=4)
    x = torch.randn(2, 8, 16, 16)
    out = layer(x)
    assert out.shape == (2, 16, 8, 8, 8)
    for k, (bank, j) in {2: (0, 2), 12: (1, 4)}.items():  # component 2 (3x3) and component 12 (5x5)
        conv = layer[bank].layer
        size = conv.kernel_size[0]
        weight, bias = conv.weight[j * 8:(j + 1) * 8], conv.bias[j * 8:(j + 1) * 8]
        before, after = same_padding(16, size, 2)
        single = F.conv2d(F.pad(x, (before, after, before, after)), weight, bias, stride=2)
        norm = conv.norm
        expected = F.relu(F.group_norm(single, 4, norm.weight[j * 8:(j + 1) * 8], norm.bias[j * 8:(j + 1) * 8],
                                       norm.eps))
        torch.testing.assert_close(out[:, k], expected)


def synthetic_task(num, generator, shift):
    """A learnable 9-way task: class c lights up a 6x6 square at row 2 + 3c (mirrored for ``shift``)."""
    labels = torch.randint(0, 9, (num,), generator=generator)
    images = torch.randint(0, 60, (num, 28, 28), dtype=torch.uint8, generator=generator)
    for c in range(9):
        rows = slice(2 + 2 * c, 8 + 2 * c)
        cols = slice(16, 22) if shift else slice(4, 10)
        images[labels == c, rows, cols] = 255
    return images, labels


def test_short_learning_run_reduces_the_loss():
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(2):
        images, labels = synthetic_task(256, generator, shift=t == 1)
        tasks.append((TaskImages(images, torch.arange(256), torch.Generator().manual_seed(t)), labels))
    params = gumbel_clusters.load_params("params/gumbel_clusters/gumbel_matrix.json")
    params.update(batch_size=16, lr=0.003)
    torch.manual_seed(0)
    model = GumbelClustersNet(num_tasks=2)

    def loss():
        model.eval()
        with torch.no_grad():
            losses = [F.cross_entropy(model(round_robin.to_input(TaskImages(x.source, x.index)[:]),
                                            torch.full((len(y),), t)), y) for t, (x, y) in enumerate(tasks)]
        return sum(losses).item() / 2

    before = loss()
    snapshots = round_robin.train(model, tasks, params, steps=40, seed=0, log=lambda _: None)
    after = loss()
    assert after < 0.7 * before, (before, after)
    assert snapshots[-1]["update"] == 80 and len(snapshots[-1]["probabilities"][0]) == 48


# --- the script ----------------------------------------------------------------------------------------------------

def write_params(tmp_path, **changes):
    params = json.loads(open("params/gumbel_clusters/gumbel_matrix.json").read())
    params.update(changes)
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"num_components": 16}, "unknown key 'num_components'"),
    ({"method": "no_sharing"}, "key 'method'"),
    ({"budget": 1.5}, "key 'budget'"),
    ({"steps": 10.0}, "key 'steps'"),
    ({"val_size": 60_000}, "key 'val_size'"),
    ({"method": "shared_bottom"}, "budget_penalty"),
    ({"temperature_min": 60.0}, "temperature_min"),
])
def test_param_file_errors_are_one_line_and_exit_2(tmp_path, capsys, changes, message):
    assert gumbel_clusters.main(["--param_file", str(write_params(tmp_path, **changes))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_malformed_and_missing_param_files_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert gumbel_clusters.main(["--param_file", str(bad)]) == 2
    assert gumbel_clusters.main(["--param_file", str(tmp_path / "absent.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "expected a JSON object" in err[0] and "not found" in err[1]


@pytest.mark.parametrize("variant", ["gumbel_matrix", "shared_bottom"])
def test_shipped_param_files_are_valid(variant):
    params = gumbel_clusters.load_params(f"params/gumbel_clusters/{variant}.json")
    assert params["exp_id"] == f"gumbel_clusters_{variant}" and params["steps"] == 20_000


def test_missing_fashion_is_reported_with_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(task_clusters, "load_mnist", lambda root: synthetic_dataset(0))
    monkeypatch.setattr(task_clusters, "load_fashion_mnist", lambda root: load_fashion_mnist(root, fetch=False))
    params = "params/gumbel_clusters/gumbel_matrix.json"
    assert gumbel_clusters.main(["--param_file", params, "--data_root", str(tmp_path)]) == 1
    assert "Fashion-MNIST is not in" in capsys.readouterr().err


def test_cluster_similarity():
    greedy = [[1, 1, 0, 0]] * 10 + [[0, 0, 1, 1]] * 10
    assert gumbel_clusters.cluster_similarity(greedy) == pytest.approx(
        {"within_MNIST": 1.0, "within_Fashion": 1.0, "across": 0.0})


def test_cli_writes_results_and_allocation(tmp_path, fake_sources):
    out = tmp_path / "run"
    params = write_params(tmp_path, val_size=100, batch_size=8)
    assert gumbel_clusters.main(["--param_file", str(params), "--steps", "2", "--eval_subset", "10",
                                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("command", "git_commit", "device", "seed", "steps", "epochs", "test_acc_per_task", "val_acc_per_task",
                "test_acc_mean_per_cluster", "allocation_similarity", "wall_time_s", "allocation"):
        assert key in results
    assert results["steps"] == 2 and results["updates"] == 40 and len(results["test_acc_per_task"]) == 20
    assert results["num_eval_images"]["test"] == [10] * 20
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["num_components"] == 16 and allocation["tasks"] == list(TASKS)
    assert torch.tensor(allocation["greedy"]).shape == (20, 48) == torch.tensor(allocation["probabilities"]).shape
