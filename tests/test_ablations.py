"""The Table 6b ablations of ControlNet: TD-only (no BU1) and BU-only (no TD, task planes on the image)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import MODELS, build_model, count_parameters
from models.lenet import LeNet

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_multi_task_counter_stream.py"
ABLATIONS = ("td_only", "bu_only")


def images(batch=6, seed=0):
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def train(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("name", ABLATIONS)
def test_registered_single_branch_with_the_controlnet_interface(name):
    from training import config
    assert config.METHODS[name] == (name, None)
    model = build_model(name, 9)
    assert MODELS[name].paradigm == "single_branch"
    assert model(images(), torch.arange(6)).shape == (6, 10)
    assert model.forward_all_tasks(images()).shape == (9, 6, 10)


# Hand count (T tasks, default widths c1=10, c2=20, hidden=50; LeNet = 24,390 params, 24,250 weights):
#   ControlNet = 31,453 + 320 T: LeNet 24,390 + emb (T*320 + 320) + td_conv2 (20*10*25 + 10 = 5,010)
#                + td_conv1 (10*25 + 1 = 251) + lateral_add (10*10+10 + 20*20+20 + 20*20+20 = 950)
#                + lateral_mul (1+1 + 10*10+10 + 20*20+20 = 532).
#   td_only    = ControlNet - lateral_add = 30,503 + 320 T params; biases 140 + 320 + 10 + 1 + 31 = 502,
#                so 30,001 + 320 T weights.       T=9: 33,383 / 32,881;  T=10: 33,703 / 33,201.
#   bu_only    = LeNet with 1+T input channels: conv1 gains 10*25 = 250 weights per task plane:
#                24,390 + 250 T params, 24,250 + 250 T weights.   T=9: 26,640 / 26,500;  T=10: 26,890 / 26,750.
EXPECTED = {"td_only": {9: (33383, 32881), 10: (33703, 33201)}, "bu_only": {9: (26640, 26500), 10: (26890, 26750)}}


@pytest.mark.parametrize("name", ABLATIONS)
def test_exact_parameter_counts(name):
    for t, counts in EXPECTED[name].items():
        assert count_parameters(build_model(name, t)) == counts
    controlnet = count_parameters(build_model("controlnet", 9))
    assert controlnet == (34333, 33781)
    assert count_parameters(build_model(name, 9))[0] < controlnet[0]


@pytest.mark.parametrize("name", ABLATIONS)
@pytest.mark.parametrize("num_tasks", [2, 9, 10])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_forward_all_tasks_equals_the_per_task_loop(name, num_tasks, memory_format):
    torch.manual_seed(0)
    model = build_model(name, num_tasks).to(memory_format=memory_format)
    x = images(5).contiguous(memory_format=memory_format)
    with torch.no_grad():
        fast = model.forward_all_tasks(x)
        loop = torch.stack([model(x, torch.full((5,), t, dtype=torch.long)) for t in range(num_tasks)])
    assert fast.shape == (num_tasks, 5, 10)
    torch.testing.assert_close(fast, loop, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ABLATIONS)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, 9)
    F.cross_entropy(model(images(9), torch.arange(9)), torch.arange(9) % 10).backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, param_name


def test_td_only_is_controlnet_without_bu1():
    """Same layers and names as ControlNet less the BU1->TD laterals; with those laterals zeroed, ControlNet
    computes exactly what td_only computes with the same weights."""
    torch.manual_seed(0)
    controlnet, td_only = build_model("controlnet", 9), build_model("td_only", 9)
    names = {n for n, _ in controlnet.named_parameters()}
    assert names - {n for n, _ in td_only.named_parameters()} == {n for n in names if n.startswith("lateral_add.")}
    assert td_only.load_state_dict(controlnet.state_dict(), strict=False).unexpected_keys == \
        [n for n in controlnet.state_dict() if n.startswith("lateral_add.")]
    for lateral in controlnet.lateral_add:
        torch.nn.init.zeros_(lateral.weight)
        torch.nn.init.zeros_(lateral.bias)
    x, tasks = images(), torch.tensor([0, 3, 3, 8, 1, 5])
    torch.testing.assert_close(td_only(x, tasks), controlnet(x, tasks), rtol=0, atol=1e-6)
    torch.testing.assert_close(td_only.streams(x, tasks).td_map, controlnet.streams(x, tasks).td_map, rtol=0, atol=0)


def test_td_only_control_is_image_independent_but_task_and_space_dependent():
    torch.manual_seed(0)
    model = build_model("td_only", 4)
    tasks = torch.tensor([2, 2])
    two_images = torch.cat([images(1, seed=1), images(1, seed=2)])
    out = model(two_images, tasks)
    used = list(model.gates(*model.td(tasks)).values())  # TD never receives the images
    assert [g.shape[1:] for g in used] == [(1, 28, 28), (10, 24, 24), (20, 8, 8)]
    for gate in used:  # the gates that multiply BU2: identical for the two images, varying over space
        assert torch.equal(gate[0], gate[1])
        assert gate[0].flatten(1).std(dim=1).gt(0).all()
    assert not torch.allclose(out[0], out[1])  # BU2 still sees the image
    maps = model.streams(images(4), torch.arange(4)).td_map
    assert not torch.allclose(maps[0], maps[1])  # a different task, a different control
    # The control of a task does not depend on the batch it is in.
    alone = model.streams(images(1, seed=3), torch.tensor([2])).td_map
    torch.testing.assert_close(alone[0], maps[2], rtol=0, atol=0)


def test_bu_only_input_is_image_plus_one_hot_task_planes():
    torch.manual_seed(0)
    num_tasks = 4
    model = build_model("bu_only", num_tasks)
    assert model.bu.conv1.in_channels == 1 + num_tasks
    seen = []
    hook = model.bu.conv1.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    x = images(1).repeat(num_tasks, 1, 1, 1)
    out = model(x, torch.arange(num_tasks))
    hook.remove()
    (inputs,) = seen
    assert inputs.shape == (num_tasks, 1 + num_tasks, 28, 28)
    assert torch.equal(inputs[:, :1], x)
    assert torch.equal(inputs[:, 1:], torch.eye(num_tasks)[:, :, None, None].expand(-1, -1, 28, 28))
    for a in range(num_tasks):  # same image, every task gives a different output
        for b in range(a):
            assert not torch.allclose(out[a], out[b])
    # No task in the batch, no gradient on its plane's filters.
    model.zero_grad()
    F.cross_entropy(model(images(3), torch.tensor([1, 1, 3])), torch.tensor([1, 2, 3])).backward()
    per_plane = model.bu.conv1.weight.grad.abs().sum(dim=(0, 2, 3))
    assert per_plane[[0, 2, 4]].gt(0).all() and per_plane[[1, 3]].eq(0).all()
    # With the plane filters zeroed, it is the plain LeNet on the image.
    plain = LeNet()
    plain.load_state_dict({k: (v[:, :1] if k == "conv1.weight" else v) for k, v in model.bu.state_dict().items()})
    with torch.no_grad():
        model.bu.conv1.weight[:, 1:] = 0
    torch.testing.assert_close(model(images(), torch.arange(6) % num_tasks), plain(images()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["mmnist_9digits_td_only", "mmnist_9digits_bu_only",
                                  "mmnist_9digits_byref_td_only", "mmnist_9digits_byref_bu_only"])
def test_param_files_follow_the_controlnet_protocol_and_dry_run(name, tmp_path):
    params = json.loads((REPO / "params" / f"{name}.json").read_text())
    byref = "byref" in name
    reference = json.loads((REPO / "params" / f"mmnist_9digits{'_byref' if byref else ''}_controlnet.json").read_text())
    method = "td_only" if name.endswith("td_only") else "bu_only"
    assert params == {**reference, "exp_id": name, "method": method}
    proc = train("--param_file", REPO / "params" / f"{name}.json", "--dry_run", "--data_root", tmp_path / "nodata")
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (counts["method"], counts["setting"]) == (method, params["setting"])
    assert (counts["num_params"], counts["num_weights"]) == EXPECTED[method][10 if byref else 9]


# 2 epochs on 2,000 2digits images (batch 16, 250 steps): far above the 10% chance level (seed 0, CPU: td_only
# ~53%, bu_only ~65% test accuracy, < 10 s each). 600 images stay on the initial loss plateau (~10-20%).
@pytest.mark.parametrize("name", ABLATIONS)
def test_short_run_learns_above_chance(name, tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"exp_id": "test", "method": name, "setting": "2digits", "lr": 0.002,
                                  "batch_size": 16, "lr_schedule": "none"}))
    out = tmp_path / "run"
    train("--param_file", params, "--epochs", 2, "--subset", 2000, "--out", out, "--device", "cpu")
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == name and results["epochs"] == 2 and len(results["test_acc_per_task"]) == 2
    assert results["test_acc_mean"] > 30.0, results
