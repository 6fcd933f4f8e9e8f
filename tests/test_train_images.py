"""The training script on CLEVR, CELEB-A and CUB-200 (paper §4, Tables 3 and 6a): one epoch through ``main`` on
fixtures written in each data set's real format, the missing-data error, the dry run of every shipped param
file, the evaluation of valid pairs only, and the CLEVR-like generator + CLEVR loader + training script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loaders import LOADERS, cub
from loaders.image_sets import normalize_rgb
from models import build_model
from in_process import run_main, write_params
from training import data, evaluate
from test_clevr_celeba_cub import PARTS, scene_a, write_celeba, write_clevr, write_image

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_options": {"width": 0.125}, "batch_size": 4, "epochs": 1, "lr": 0.001}


pytestmark = pytest.mark.usefixtures("one_thread")


def param_file(directory, **params):
    return write_params(directory, {"exp_id": "test", **TINY, **params})


def results(out):
    return json.loads((out / "results.json").read_text())


def write_cub_all_tasks(root):
    """CUB-200-2011 with every colour group of ``cub.COLOR_PARTS`` (the 13 tasks), two colours each, 6 images
    (4 official train, 2 test), every part visible."""
    files = [f"00{k % 2 + 1}.Bird/b_{k}.jpg" for k in range(6)]
    (root / "images.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "images.txt").write_text("".join(f"{i} {f}\n" for i, f in enumerate(files, 1)))
    (root / "train_test_split.txt").write_text("".join(f"{i} {int(i <= 4)}\n" for i in range(1, 7)))
    for i, f in enumerate(files):
        write_image(root / "images" / f, 40, 30, seed=i, fmt="JPEG")
    attributes = [f"{group}::{colour}" for group in cub.COLOR_PARTS for colour in ("blue", "red")]
    (root / "attributes.txt").write_text("".join(f"{k} {a}\n" for k, a in enumerate(attributes, 1)))
    (root / "attributes").mkdir(exist_ok=True)
    (root / "attributes" / "image_attribute_labels.txt").write_text("".join(
        f"{image} {a} {int((a + image) % 2 == 0)} 3 1.0\n" for image in range(1, 7) for a in range(1, 27)))
    (root / "parts").mkdir(exist_ok=True)
    (root / "parts" / "parts.txt").write_text("".join(f"{k} {p}\n" for k, p in enumerate(PARTS, 1)))
    (root / "parts" / "part_locs.txt").write_text("".join(
        f"{image} {k} {2.0 * k} {1.5 * k} 1\n" for image in range(1, 7) for k in range(1, len(PARTS) + 1)))


@pytest.fixture
def clevr_root(tmp_path):
    root = tmp_path / "CLEVR_v1.0"
    write_clevr(root, {"train": [scene_a() for _ in range(6)], "val": [scene_a() for _ in range(3)]})
    return root


def test_clevr_controlnet_with_the_localisation_loss_trains_an_epoch(clevr_root, tmp_path, capsys):
    params = param_file(tmp_path, method="controlnet", dataset="clevr", setting="clevr_40", input_size=64,
                        val_fraction=0.34, spatial_loss_weight=1.0)
    code, _, err = run_main(capsys, "--param_file", params, "--data_root", clevr_root, "--out", tmp_path / "out",
                            "--device", "cpu")
    assert code == 0, err
    got = results(tmp_path / "out")
    assert got["setting"] == "clevr_40" and len(got["test_acc_per_task"]) == 40
    assert 0 <= got["test_acc_mean"] <= 100 and got["params"]["backbone"] == "vgg11_clevr"
    assert round(got["params_x"], 1) == 1.9  # x1.56 at full width and 224 px (Table 3a); here width 1/8, 64 px
    assert torch.isfinite(torch.tensor(json.loads((tmp_path / "out" / "metrics.jsonl").read_text())["train_loss"]))


def test_celeba_uniform_scaling_trains_an_epoch(tmp_path, capsys):
    write_celeba(tmp_path / "celeba")
    params = param_file(tmp_path, method="uniform_scaling", dataset="celeba", setting="celeba", input_size=32)
    code, _, err = run_main(capsys, "--param_file", params, "--data_root", tmp_path / "celeba",
                            "--out", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    got = results(tmp_path / "out")
    assert got["params"]["model"] == "backbone_multi_branch" and len(got["test_acc_per_task"]) == 40
    assert all(value in (0.0, 100.0) for value in got["test_acc_per_task"])  # one test image, binary tasks


def test_cub_task_routing_trains_an_epoch(tmp_path, capsys):
    write_cub_all_tasks(tmp_path / "CUB_200_2011")
    params = param_file(tmp_path, method="task_routing", dataset="cub", setting="cub", input_size=64,
                        val_fraction=0.25)
    code, _, err = run_main(capsys, "--param_file", params, "--data_root", tmp_path / "CUB_200_2011", "--out",
                            tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    got = results(tmp_path / "out")
    assert got["params"]["backbone"] == "resnet18" and len(got["test_acc_per_task"]) == len(cub.COLOR_PARTS) == 13


def test_cub_locations_are_in_input_pixels(tmp_path):
    write_cub_all_tasks(tmp_path / "CUB_200_2011")
    data = LOADERS["cub"].load("cub", {"input_size": 64, "val_fraction": 0.25, "data_seed": 0},
                               tmp_path / "CUB_200_2011")
    images, labels, locations = data["test"]
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8 and labels.shape == (2, 13)
    # task 0 (bill colour) is the beak, part 2 at (4, 3) in a 40 x 30 image
    assert locations[0, 0].tolist() == pytest.approx([4 * 64 / 40, 3 * 64 / 30])


def test_missing_data_set_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MTL_CLEVR_ROOT", raising=False)
    params = param_file(tmp_path, method="ch_mod", dataset="clevr", setting="clevr_40", input_size=64)
    code, out, err = run_main(capsys, "--param_file", params, "--data_root", tmp_path / "nowhere", "--out",
                              tmp_path / "out", "--device", "cpu")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: CLEVR scenes not found under {tmp_path / 'nowhere'}") and "MTL_CLEVR_ROOT" in err
    env = {key: value for key, value in os.environ.items() if key != "MTL_CLEVR_ROOT"}
    proc = subprocess.run([sys.executable, str(REPO / "train_multi_task_counter_stream.py"), "--param_file",
                           str(params), "--out", str(tmp_path / "out2"), "--device", "cpu"], capture_output=True,
                          text=True, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "no CLEVR directory given" in proc.stderr and "set MTL_CLEVR_ROOT=DIR" in proc.stderr


def test_clevr_like_generated_loaded_and_trained_end_to_end(tmp_path, capsys):
    params = param_file(tmp_path, method="controlnet", dataset="clevr_like", setting="clevr_1645", input_size=64,
                        clevr_like_train=12, clevr_like_test=4, val_fraction=0.25, spatial_loss_weight=0.5,
                        epochs=2, eval_every=2)
    code, _, err = run_main(capsys, "--param_file", params, "--data_root", tmp_path / "data", "--out", tmp_path / "out",
                            "--device", "cpu")
    assert code == 0, err
    generated = tmp_path / "data" / "clevr_like" / "seed0_64px_12train_4test"
    scenes = json.loads((generated / "scenes" / "CLEVR_train_scenes.json").read_text())["scenes"]
    assert len(scenes) == 12 and (generated / "images" / "val" / "CLEVR_val_000003.png").exists()
    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert "val_acc_mean" not in history[0] and "val_acc_mean" in history[1]  # eval_every 2
    got = results(tmp_path / "out")
    assert got["best_epoch"] == 2 and len(got["test_acc_per_task"]) == 1645 and 0 <= got["test_acc_mean"] <= 100


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "params").glob("*.json")
                                        if p.name.startswith(("clevr", "celeba", "cub"))))
def test_dry_run_of_every_image_param_file(name, tmp_path, capsys):
    code, out, err = run_main(capsys, "--param_file", REPO / "params" / name, "--dry_run",
                              "--data_root", tmp_path / "no")
    assert code == 0, err
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["num_params"] > counts["num_weights"] > 0 and not (tmp_path / "no").exists()
    paper = {"clevr_40tasks_controlnet.json": 1.56, "clevr_40tasks_ch_mod.json": 1.0}  # Table 3a (x1.56, x1.002)
    if name in paper:
        assert round(counts["params_x"], 2) == paper[name]


def test_rgb_normalisation_on_the_device_is_the_data_sets():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    stats = (LOADERS["clevr"].mean, LOADERS["clevr"].std)
    torch.testing.assert_close(data.normalize(images, stats=stats), normalize_rgb(images))


def test_evaluating_valid_pairs_gives_the_dense_accuracies():
    torch.manual_seed(0)
    model = build_model("backbone_ch_mod", 7, backbone="vgg11_clevr", width=0.125, input_size=64, num_classes=8)
    with torch.no_grad():
        for v in model.modulation.values():
            v.uniform_(0.0, 2.0)  # tasks that answer differently
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    labels = torch.randint(-1, 8, (5, 7), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    stats = (LOADERS["clevr"].mean, LOADERS["clevr"].std)
    dense = evaluate.evaluate(model, images, labels, 7, 512, torch.contiguous_format, stats)
    pairs = evaluate.evaluate(model, images, labels, 7, 4, torch.contiguous_format, stats, pairs=True)
    torch.testing.assert_close(pairs, dense, equal_nan=True)


def test_cub_single_task_and_ch_mod_loc_train_an_epoch(tmp_path, capsys):
    write_cub_all_tasks(tmp_path / "CUB_200_2011")
    got = {}
    for name, extra in {"single_task": {"method": "single_task"},
                        "ch_mod_loc": {"method": "ch_mod", "spatial_loss_weight": 1.0}}.items():
        params = param_file(tmp_path, dataset="cub", setting="cub", input_size=64, val_fraction=0.25, **extra)
        code, _, err = run_main(capsys, "--param_file", params, "--data_root", tmp_path / "CUB_200_2011", "--out",
                                tmp_path / name, "--device", "cpu")
        assert code == 0, err
        got[name] = results(tmp_path / name)
    assert got["single_task"]["params"]["model"] == "backbone_single_task"
    assert round(got["single_task"]["params_x"], 6) == 13.0  # one ResNet-18 per colour task
    saved = torch.load(tmp_path / "ch_mod_loc" / "best_model.pt", weights_only=True)["model"]
    assert saved["locator.weight"].shape == (2, 64)  # ResNet-18 at width 1/8: 64 features -> (x, y)
