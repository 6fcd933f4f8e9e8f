"""The switches that reproduce the authors' choices (docs/fidelity.md): the protocol (held_out / authors), the three
reported test figures, Sener & Koltun's dropout, the released resize with its uint8 wrap-around, and make_table2's
--select / --protocol."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import config
from experiments import table2
from loaders import LOADERS, multi_mnist
from loaders.multi_mnist import make_multi_mnist, resize_to_28, wrap_uint8
from metrics import select_record
from models.lenet import MultiBranchLeNet, SingleTaskLeNets, held_dropout_masks
from training.results import reported_figures
from weighting.mgda import MGDA

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_multi_task_counter_stream.py"


def params(**overrides):
    return {"exp_id": "t", "method": "uniform_scaling", "setting": "2digits", **overrides}


# --- the param file ------------------------------------------------------------------------------------------

def test_defaults_keep_todays_behaviour():
    checked = config.validate(params(), "p.json")
    assert checked["protocol"] == "held_out" and checked["dropout"] == "none"
    assert config.model_kwargs(checked) == {}
    for name in ("mmnist_9digits_controlnet", "mmnist_9digits_uniform_scaling", "mmnist_2digits_single_task"):
        assert config.load_params(REPO / "params" / f"{name}.json")["protocol"] == "held_out"


@pytest.mark.parametrize("raw,message", [
    (params(protocol="authers"), "p.json: key 'protocol' has unknown value \"authers\" (did you mean 'authors'?); "
                                 "allowed: held_out, authors"),
    (params(protocol="authors", dataset="clevr_like", setting="clevr_40", method="controlnet"),
     "p.json: key 'protocol': 'authors' is the authors' Multi-MNIST protocol, not defined for data set 'clevr_like'; "
     "allowed: held_out"),
    (params(dropout="sener"), "p.json: key 'dropout' has unknown value \"sener\"; allowed: none, sener_koltun"),
    (params(method="controlnet", dropout="sener_koltun"),
     "p.json: key 'dropout': model 'controlnet' has no Sener-Koltun dropout (models with it: multi_branch, "
     "single_task); allowed: none"),
    (params(model_options={"dropout": "sener_koltun"}), "p.json: unknown key 'model_options.dropout'"),
    (params(resize="bicubic"), "p.json: key 'resize' has unknown value \"bicubic\""),
])
def test_bad_switch_values_are_one_line_errors(raw, message):
    with pytest.raises(config.ParamError) as err:
        config.validate(raw, "p.json")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_protocol_on_the_command_line_exits_2_with_one_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(params(protocol="best_on_test")))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--param_file", str(path), "--dry_run"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "key 'protocol' has unknown value \"best_on_test\"; allowed: held_out, authors" in proc.stderr


# --- Sener & Koltun's dropout ---------------------------------------------------------------------------------

def inputs_of(module, model, x):
    """What ``module`` receives during ``model(x)``."""
    seen = []
    handle = module.register_forward_hook(lambda _, args, __: seen.append(args[0].detach()))
    model(x)
    handle.remove()
    return seen[0]


def positive_model(cls, **kwargs):
    """A model whose conv2 and fc1 outputs are positive everywhere: a zero after them can only be a dropout mask."""
    torch.manual_seed(0)
    model = cls(3, dropout="sener_koltun", **kwargs)
    with torch.no_grad():
        model.conv2.bias.fill_(5.0)
        model.fc1.bias.fill_(5.0)
    return model


@pytest.mark.parametrize("cls", [MultiBranchLeNet, SingleTaskLeNets])
def test_one_channel_mask_for_the_whole_batch_without_rescale(cls):
    model, x = positive_model(cls), torch.randn(16, 1, 28, 28)
    model.eval()
    clean = inputs_of(model.fc, model, x)
    model.train()
    torch.manual_seed(1)
    dropped = inputs_of(model.fc, model, x)
    per_channel = dropped.reshape(16, -1, 16)  # [B, channels (T x c2 for single task), 4 x 4]
    zero = (per_channel == 0).all(dim=2)  # channel c of image b dropped
    assert (zero == zero[0]).all()  # the same channels for every image of the batch
    assert 0 < zero[0].sum() < zero.shape[1]
    kept = ~zero[0]
    assert torch.equal(per_channel[:, kept], clean.reshape(16, -1, 16)[:, kept])  # kept units unscaled (no 1/(1-p))


@pytest.mark.parametrize("cls", [MultiBranchLeNet, SingleTaskLeNets])
def test_per_element_head_mask_without_rescale(cls):
    model, x = positive_model(cls), torch.randn(16, 1, 28, 28)
    model.train()
    seen = {}
    model.fc1.register_forward_hook(lambda _, __, out: seen.update(fc1=out.detach()))
    model.fc2.register_forward_hook(lambda _, args, __: seen.update(fc2_in=args[0].detach()))
    torch.manual_seed(1)
    model(x)
    head_in, unmasked = seen["fc2_in"], torch.relu(seen["fc1"])
    assert head_in.shape == (16, 3, 50) and (unmasked > 0).all()
    zero = head_in == 0
    assert 0.4 < zero.float().mean() < 0.6  # Bernoulli(0.5) per element
    assert not (zero == zero[0]).all() and not (zero == zero[:, :1]).all()  # differs across images and tasks
    assert torch.equal(head_in[~zero], unmasked[~zero])  # kept units unscaled (no 1/(1-p))


@pytest.mark.parametrize("cls", [MultiBranchLeNet, SingleTaskLeNets])
def test_identity_at_eval_and_state_dict_unchanged(cls):
    torch.manual_seed(0)
    plain = cls(3)
    with_dropout = cls(3, dropout="sener_koltun")
    with_dropout.load_state_dict(plain.state_dict())  # no new parameters or buffers
    x = torch.randn(8, 1, 28, 28)
    plain.eval()
    with_dropout.eval()
    assert torch.equal(with_dropout(x), plain(x))
    with_dropout.train()
    assert not torch.equal(with_dropout(x), plain(x))


def test_held_masks_are_reused_and_mgda_trains_with_them():
    model, x = positive_model(MultiBranchLeNet), torch.randn(8, 1, 28, 28)
    model.train()
    with held_dropout_masks(model):
        assert torch.equal(model(x), model(x))
    assert not torch.equal(model(x), model(x))
    labels = torch.randint(0, 10, (8, 3))
    losses = MGDA(3).backward(model, x, labels)
    assert losses.shape == (3,) and model.conv1.weight.grad is not None and model.dropout.held is None


# --- the released resize --------------------------------------------------------------------------------------

def keys_cubic(x, a=-0.5):
    x = abs(x)
    return ((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def bicubic_row(source, out_size):
    """Pillow's BICUBIC downscaling of a 1-D signal, by hand: Keys' kernel (a = -0.5) stretched by the scale, centred
    at (x + 0.5) * scale, the taps renormalised to sum 1."""
    scale = len(source) / out_size
    values = []
    for x in range(out_size):
        centre = (x + 0.5) * scale
        lo, hi = max(int(centre - 2 * scale + 0.5), 0), min(int(centre + 2 * scale + 0.5), len(source))
        w = np.array([keys_cubic((j - centre + 0.5) / scale) for j in range(lo, hi)])
        values.append(float(w @ source[lo:hi] / w.sum()))
    return np.array(values)


def test_uint8_wrap_by_hand():
    values = np.array([-2.8, -0.5, 0.0, 16.45, 254.9, 255.0, 257.8, 271.9, -8.1])
    assert wrap_uint8(values).tolist() == [254, 0, 0, 16, 254, 255, 1, 15, 248]


def test_constant_canvas_is_unchanged_by_the_exact_resizes():
    canvas = np.full((2, 52, 52), 200, dtype=np.uint8)
    for resize in ("nearest", "bicubic_wrap"):
        assert (resize_to_28(canvas, resize) == 200).all(), resize
    clipped = resize_to_28(canvas, "bicubic_clipped")  # a float32 matrix product, truncated: 199.99... -> 199
    assert clipped.min() == 199 and clipped.max() == 200


def test_step_edge_overshoot_wraps_around():
    canvas = np.zeros((1, 52, 52), dtype=np.uint8)
    canvas[:, :, 26:] = 255  # a vertical edge: every row the same
    expected = bicubic_row(np.where(np.arange(52) >= 26, 255.0, 0.0), 28)
    assert expected[12] == pytest.approx(-2.8153, abs=1e-4) and expected[15] == pytest.approx(257.8153, abs=1e-4)
    wrap, clipped = resize_to_28(canvas, "bicubic_wrap")[0], resize_to_28(canvas, "bicubic_clipped")[0]
    # the plateau is 255 exactly in Pillow, 254.99999... by hand in double: compare at 1e-3 grey levels
    assert (wrap == wrap[0]).all() and wrap[0].tolist() == wrap_uint8(np.round(expected, 3)).tolist()
    assert wrap[0, 11:17].tolist() == [0, 254, 16, 238, 1, 255]  # -2.8 -> 254, 257.8 -> 1
    assert clipped[0, 11:17].tolist() == [0, 0, 16, 238, 255, 255]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the released cast is x86's")
def test_bicubic_wrap_equals_the_released_generator_line():
    """TD_MultiTask data/multi_mnist_loader_extratask9.py: np.array(Image.fromarray(new_im).resize((28, 28))) on the
    float64 canvas (Pillow >= 7: BICUBIC), stored as float64, then .astype(np.uint8)."""
    blocks = np.random.default_rng(1).integers(0, 2, size=(3, 13, 13), dtype=np.uint8) * 255
    canvas = blocks.repeat(4, axis=1).repeat(4, axis=2)
    ours = resize_to_28(canvas, "bicubic_wrap")
    for n in range(3):
        released = np.array(Image.fromarray(canvas[n].astype(np.float64)).resize((28, 28))).astype(np.float64)
        assert (released < 0).any() and np.array_equal(ours[n], released.astype(np.uint8))


def test_each_resize_and_the_60k_pool_get_their_own_cache(tmp_path, monkeypatch):
    from loaders import mnist
    raw = mnist.load_mnist()
    monkeypatch.setattr(multi_mnist, "load_mnist", lambda root=None: raw)
    images = {resize: make_multi_mnist("2digits", "test", root=tmp_path, resize=resize)[0]
              for resize in multi_mnist.RESIZES}
    assert not torch.equal(images["bicubic_wrap"], images["bicubic_clipped"])
    names = sorted(p.name for p in (tmp_path / "multi_mnist").glob("*.npz"))
    assert names == [f"2digits_test_seed0_{resize}_v1.npz" for resize in sorted(multi_mnist.RESIZES)]
    again = make_multi_mnist("2digits", "test", root=tmp_path, resize="bicubic_wrap")[0]
    assert torch.equal(again, images["bicubic_wrap"])
    full, labels = make_multi_mnist("2digits", "train_all", root=tmp_path)
    assert len(full) == 60_000 and np.array_equal(labels[:, 0].numpy(), raw["train_labels"])
    held_out = make_multi_mnist("2digits", "train", root=tmp_path)[0]
    assert not torch.equal(full[:50_000], held_out)  # partners drawn from all 60k, by their own seed
    authors = LOADERS["multi_mnist"].load("2digits", {**params(protocol="authors"), "data_seed": 0,
                                                      "resize": "nearest"}, tmp_path)
    assert sorted(authors) == ["test", "train"] and torch.equal(authors["train"][0], full)


# --- the three test figures -----------------------------------------------------------------------------------

HISTORY = [{"epoch": 1, "val_acc_mean": 50.0, "test_acc_mean": 52.0, "val_acc_per_task": [50.0],
            "test_acc_per_task": [52.0]},
           {"epoch": 2, "val_acc_mean": 60.0, "test_acc_mean": 58.0, "val_acc_per_task": [60.0],
            "test_acc_per_task": [58.0]},
           {"epoch": 3, "val_acc_mean": 59.0, "test_acc_mean": 61.0, "val_acc_per_task": [59.0],
            "test_acc_per_task": [61.0]},
           {"epoch": 4, "val_acc_mean": 60.0, "test_acc_mean": 57.0, "val_acc_per_task": [60.0],
            "test_acc_per_task": [57.0]},
           {"epoch": 5, "train_loss": 0.1}]  # not evaluated (eval_every)


def test_three_figures_from_the_epoch_records():
    figures = reported_figures(HISTORY, "best_val")
    assert (figures["best_epoch"], figures["test_acc_mean"], figures["val_acc_mean"]) == (2, 58.0, 60.0)  # first max
    assert (figures["best_test_epoch"], figures["test_acc_mean_best_test"]) == (3, 61.0)
    assert (figures["last_epoch"], figures["test_acc_mean_last"]) == (4, 57.0)
    assert figures["best_model_epoch"] == 2 and figures["best_model_selection"] == "best_val"
    no_val = [{key: value for key, value in r.items() if not key.startswith("val")} for r in HISTORY]
    authors = reported_figures(no_val, "best_test")
    assert authors["best_epoch"] is None and authors["test_acc_mean"] is None and authors["val_acc_mean"] is None
    assert authors["best_model_epoch"] == 3 and authors["test_acc_mean_best_test"] == 61.0
    assert select_record(no_val, "best_val") is None


def train(tmp_path, name, **overrides):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"exp_id": name, "method": "uniform_scaling", "setting": "2digits", "lr": 0.003,
                                "batch_size": 128, "lr_schedule": "none", **overrides}))
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(SCRIPT), "--param_file", str(path), "--epochs", "3", "--subset", "3000",
                           "--out", str(out), "--device", "cpu"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "results.json").read_text()), history, proc.stdout, out


def test_authors_protocol_run_keeps_the_best_on_test_model(tmp_path):
    results, history, stdout, out = train(tmp_path, "authors", protocol="authors")
    assert results["protocol"] == "authors" and results["params"]["protocol"] == "authors"
    assert all("val_acc_mean" not in record for record in history)
    best = max(history, key=lambda record: record["test_acc_mean"])
    assert results["best_test_epoch"] == best["epoch"] and results["test_acc_mean_best_test"] == best["test_acc_mean"]
    assert results["best_epoch"] is None and results["test_acc_mean"] is None
    assert results["best_model_selection"] == "best_test" and results["best_model_epoch"] == best["epoch"]
    assert torch.load(out / "best_model.pt", weights_only=False)["epoch"] == best["epoch"]
    assert results["test_acc_mean_last"] == history[-1]["test_acc_mean"] and best["test_acc_mean"] > 40.0
    assert "test accuracy none at a best-validation epoch (protocol authors: no validation split)" in stdout
    assert "(best test " in stdout


def test_held_out_run_with_sener_koltun_dropout_learns_and_reports_three_figures(tmp_path):
    results, history, stdout, _ = train(tmp_path, "dropout", dropout="sener_koltun")
    assert results["protocol"] == "held_out" and results["params"]["dropout"] == "sener_koltun"
    assert results["best_epoch"] == max(history, key=lambda record: record["val_acc_mean"])["epoch"]
    assert results["test_acc_mean_best_test"] == max(record["test_acc_mean"] for record in history)
    assert results["test_acc_mean_best_test"] >= results["test_acc_mean"] > 40.0  # chance: 10%
    assert "at the best test epoch" in stdout and "(optimistic)" in stdout


# --- make_table2: --select and --protocol -----------------------------------------------------------------------

def fake_run(runs_dir, name, seed, history, protocol="held_out", with_best_test=True, method="controlnet"):
    """A results.json as the training script writes it (the keys the table reads) and its metrics.jsonl."""
    out = Path(runs_dir) / name / f"seed{seed}"
    out.mkdir(parents=True)
    figures = reported_figures(history, "best_val" if protocol == "held_out" else "best_test")
    if not with_best_test:  # a run made before the best-test figure existed
        figures = {k: v for k, v in figures.items() if "best_test" not in k and "best_model" not in k}
    results = {"command": "python train_multi_task_counter_stream.py", "git_commit": "abc123", "device": "cpu (test)",
               "seed": seed, "epochs": 4, "method": method, "setting": "9digits", "subset": None,
               "num_params": 34333, "num_weights": 33783, "params_x": 1.4077, "weights_x": 1.393, **figures,
               "wall_time_s": 10.0, "params": {"optimizer": "Adam", "lr": 0.001, "batch_size": 512,
                                               "lr_schedule": "halve_30_60_90", "protocol": protocol}}
    if protocol != "held_out":
        results["protocol"] = protocol
    (out / "results.json").write_text(json.dumps(results))
    (out / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))


def shifted(history, delta):
    return [{k: v + delta if k.endswith("acc_mean") else v for k, v in record.items()} for record in history]


@pytest.fixture
def runs(tmp_path):
    fake_run(tmp_path, "held_out", 0, HISTORY)
    fake_run(tmp_path, "held_out", 1, shifted(HISTORY, 2.0), with_best_test=False)  # figure from metrics.jsonl
    no_val = [{k: v for k, v in record.items() if not k.startswith("val")} for record in HISTORY]
    fake_run(tmp_path, "authors", 0, shifted(no_val, 10.0), protocol="authors")
    return tmp_path


@pytest.mark.parametrize("select,expected", [("best_val", 59.0), ("best_test", 62.0), ("last", 58.0)])
def test_table_shows_the_selected_figure_of_one_protocol(runs, select, expected):
    table = table2.aggregate(runs, select=select)
    cell = table["rows"]["controlnet"]["9digits"]
    assert table["protocol"]["protocol"] == "held_out" and table["selection"] == select
    assert cell["n"] == 2 and cell["acc_mean"] == pytest.approx(expected)  # (58 + 60)/2, (61 + 63)/2, (57 + 59)/2
    # never pooled with the held-out runs; listed apart when they have the figure (no best_val without validation)
    assert [o["n"] for o in cell["other_protocols"]] == ([] if select == "best_val" else [1])
    assert [(found["protocol"], found["runs"]) for found in table["protocols_found"]] == [("held_out", 2),
                                                                                         ("authors", 1)]
    markdown = table2.render_markdown(table, "cmd")
    assert f"Acc: test accuracy (%) {table2.SELECTED[select]}" in markdown
    assert "- Training protocol (param `protocol`): held_out (trained on MNIST train[:50k]" in markdown


def test_authors_runs_shown_on_their_own(runs):
    table = table2.aggregate(runs, choice=2, select="best_test")
    cell = table["rows"]["controlnet"]["9digits"]
    assert table["protocol"]["protocol"] == "authors"
    assert cell["n"] == 1 and cell["acc_mean"] == pytest.approx(71.0)
    assert cell["other_protocols"] == [{"protocol": 1, "n": 2, "acc_mean": pytest.approx(62.0)}]
    markdown = table2.render_markdown(table, "cmd")
    assert "optimistic" in markdown and "Training protocol (param `protocol`): authors (trained on all 60k" in markdown


def test_best_test_of_an_old_run_comes_from_its_metrics(runs):
    table = table2.aggregate(runs, select="best_test")
    assert any("read off their metrics.jsonl" in note for note in table["notes"])
    old = json.loads((runs / "held_out" / "seed1" / "results.json").read_text())
    assert "test_acc_mean_best_test" not in old  # computed by the table maker, not written back


def test_cli_names_protocol_and_selection_and_refuses_best_val_without_validation(runs, tmp_path, capsys):
    out_dir = tmp_path / "tables"
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(out_dir), "--protocol", "2",
                             "--select", "last"]) == 0
    written = json.loads((out_dir / "table2.json").read_text())
    assert written["command"].endswith("--epochs 4 --protocol 2 --select last")
    assert written["rows"]["controlnet"]["9digits"]["acc_mean"] == pytest.approx(67.0)
    capsys.readouterr()
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(tmp_path / "none"), "--protocol", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with a test figure at the best-validation epoch" in err
    assert "use --select best_test or last" in err and not (tmp_path / "none").exists()


def test_fidelity_switches_table_copies_results_and_shows_three_figures(tmp_path):
    from experiments import fidelity_switches
    runs_dir = tmp_path / "runs"
    fake_run(runs_dir, "uniform_scaling_bicubic_wrap_held_out", 0, HISTORY, method="uniform_scaling")
    no_val = [{k: v for k, v in record.items() if not k.startswith("val")} for record in HISTORY]
    fake_run(runs_dir, "controlnet_nearest_authors", 0, no_val, protocol="authors")
    (runs_dir / "controlnet_nearest_authors" / "seed0" / "checkpoint.pt").write_bytes(b"x")
    table = tmp_path / "table.md"
    assert fidelity_switches.main(["table", "--runs_dir", str(runs_dir), "--results_dir", str(tmp_path / "results"),
                                   "--table", str(table), "--epochs", "4"]) == 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| controlnet") or
            line.startswith("| uniform_scaling")]
    assert len(rows) == 12 and sum("not run" in row for row in rows) == 10
    assert "| uniform_scaling | bicubic_wrap | held_out | 50,000 | 58.00 (2) | 61.00 (3) | 57.00 (4) |" \
        in table.read_text()
    assert "| controlnet | nearest | authors | 60,000 | – (no validation split) | 61.00 (3) | 57.00 (4) |" \
        in table.read_text()
    copied = sorted(p.name for p in (tmp_path / "results" / "controlnet_nearest_authors" / "seed0").iterdir())
    assert copied == ["metrics.jsonl", "results.json"]  # no checkpoints
