"""Task-dependent spatial maps: where ControlNet's TD stream points for each task (paper §4.2 and §4.5).

    python -m experiments.td_maps --run runs/mmnist_9digits_controlnet_loc/seed0 --out results/td_maps/9digits_loc

Loads ``best_model.pt`` of a ControlNet run of the training script (its param file gives the setting), computes
the TD bottom map [28, 28] of every test image for every valid task, and reports how often the map's peak falls
in the right cell: the peak is nearer the selected digit's centre than any other digit's centre
(``loaders.multi_mnist.task_locations``; chance is about 1 / digits per image). Trained with
``spatial_loss_weight`` > 0 (the auxiliary localisation loss, target a Gaussian-blurred point at the selected
digit's centre), the peak should find the digit; trained without it, the map is free to be anything. Writes
``td_maps.json`` (rates overall and per task, chance, the run's command and commit) and ``td_maps.png`` (the map
over the image for a few test images and tasks) to --out.
"""
import json
import sys
from pathlib import Path

import torch

from loaders.multi_mnist import LAYOUTS, NUM_TASKS, make_multi_mnist
from models import build_model
from runtime import files
from training import checkpoint, cli, data, provenance

CHUNK = 2048


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="output dir of a ControlNet training run (holds best_model.pt)")
    parser.add_argument("--out", required=True, help="where td_maps.json and td_maps.png go")
    parser.add_argument("--images", type=cli.positive_int, default=4, help="test images in the PNG")
    parser.add_argument("--test_images", type=cli.positive_int, help="measure on the first N test images "
                        "(default: all 10,000)")
    parser.add_argument("--data_root", help="data directory (default $MTL_DATA_ROOT or ./data)")
    return parser.parse_args(argv)


def cell_centres(setting):
    """[K, 2] (x, y) centres of the digit positions of a setting, in pixels of the 28 x 28 image."""
    size, offsets = LAYOUTS["9digits" if setting == "9digits_byref" else setting]
    return torch.tensor([[(col + 14) * 28 / size, (row + 14) * 28 / size] for row, col in offsets])


def peak_in_right_cell(peaks, targets, centres):
    """[N] bool: the nearest digit centre to each peak (x, y) is the target's centre."""
    nearest = torch.cdist(peaks.float(), centres).argmin(dim=1)
    wanted = torch.cdist(targets.float(), centres).argmin(dim=1)
    return nearest == wanted


@torch.inference_mode()
def td_maps(model, images, tasks):
    """TD bottom maps [N, 28, 28] of (image, task) pairs."""
    maps = []
    for begin in range(0, len(images), CHUNK):
        x = data.normalize(images[begin:begin + CHUNK])
        maps.append(model.streams(x, tasks[begin:begin + CHUNK]).td_map[:, 0])
    return torch.cat(maps)


def load_run(run):
    path = Path(run) / "best_model.pt"
    if not path.is_file():
        raise ValueError(f"--run: {path} not found; give the --out dir of a finished training run")
    try:
        saved = checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        raise ValueError(f"--run: {err}") from None
    params = saved["params"]
    if params["model"] != "controlnet":
        raise ValueError(f"--run: {path} holds model '{params['model']}'; TD maps need model 'controlnet'")
    model = build_model(params["model"], NUM_TASKS[params["setting"]], **params["model_options"])
    model.load_state_dict(saved["model"])
    return model.eval(), params, saved["epoch"]


def main(argv=None):
    args = parse_args(argv)
    try:
        model, params, epoch = load_run(args.run)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    images, labels, locations = make_multi_mnist(params["setting"], "test", params["data_seed"], args.data_root,
                                                 params["resize"], locations=True)
    images, labels, locations = images[:args.test_images], labels[:args.test_images], locations[:args.test_images]
    valid = labels >= 0
    image_index, task_index = valid.nonzero(as_tuple=True)
    maps = td_maps(model, images[image_index], task_index)
    hits = peak_in_right_cell(map_argmax(maps), locations[image_index, task_index], cell_centres(params["setting"]))
    num_tasks = labels.shape[1]
    per_task = [100.0 * hits[task_index == t].float().mean().item() for t in range(num_tasks)]
    results_file = Path(args.run) / "results.json"
    trained = json.loads(results_file.read_text()) if results_file.exists() else {}
    report = {"command": cli.command_line(__spec__.name, argv),
              "git_commit": provenance.git_commit(), "run": str(args.run), "run_command": trained.get("command"),
              "run_git_commit": trained.get("git_commit"), "run_epochs": trained.get("epochs"),
              "run_seed": trained.get("seed"), "run_subset": trained.get("subset"), "best_epoch": epoch,
              "setting": params["setting"], "spatial_loss_weight": params.get("spatial_loss_weight", 0.0),
              "test_pairs": len(hits), "peak_in_right_cell_pct": 100.0 * hits.float().mean().item(),
              "peak_in_right_cell_pct_per_task": per_task, "chance_pct": 100.0 / len(cell_centres(params["setting"])),
              "test_acc_mean": trained.get("test_acc_mean")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(report, out / "td_maps.json")
    plot(images[:args.images], model, labels[:args.images], locations[:args.images], out / "td_maps.png")
    print(f"{params['setting']}: TD map peak in the right cell for {report['peak_in_right_cell_pct']:.1f}% of "
          f"{len(hits)} test image-task pairs (chance {report['chance_pct']:.1f}%); {out / 'td_maps.json'}")
    return 0


def plot(images, model, labels, locations, path):
    """A grid: one row per image, one column per task, the TD map (colour) over the image (grey)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: td_maps.png not drawn", file=sys.stderr)
        return
    rows, cols = labels.shape
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
    for i in range(rows):
        maps = td_maps(model, images[i:i + 1].expand(cols, -1, -1), torch.arange(cols))
        for t in range(cols):
            ax = axes[i, t]
            ax.imshow(images[i], cmap="gray")
            ax.imshow(maps[t], cmap="jet", alpha=0.45)
            if labels[i, t] >= 0:
                ax.plot(*locations[i, t].tolist(), "w+", markersize=8)
            ax.set_title(f"task {t}: {int(labels[i, t]) if labels[i, t] >= 0 else '-'}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def map_argmax(td_map):
    """[B, 2] (x, y) pixel of each map's maximum: the predicted location (for Figure 4c/d-style plots)."""
    width = td_map.shape[-1]
    flat = td_map.flatten(1).argmax(dim=1)
    return torch.stack([flat % width, torch.div(flat, width, rounding_mode="floor")], dim=1)


if __name__ == "__main__":
    cli.exit_with(main)
