"""Classification and segmentation on Multi-MNIST (paper Table 5, "heterogeneous tasks"): train one variant.

    python -m experiments.table5_cls_seg --param_file params/cls_seg/9digits_controlnet.json --epochs 100
    python -m experiments.table5_cls_seg --param_file params/cls_seg/9digits_ch_mod.json --epochs 8 --subset 10000 --out runs/x
    python -m experiments.table5_cls_seg --table results/cls_seg          # results/cls_seg/table5.md from the runs' results.json

Every task (digit by location, or by reference) has two operations: recognise (10-way class of the task's digit,
measured by accuracy) and segment (the 28x28 binary mask of that digit, ``loaders.multi_mnist_seg``, measured by
IoU). The four variants of Table 5 (``models.cls_seg``): ``controlnet`` (instruction = task one-hot + operation
one-hot, the instructed branch used), ``ch_mod`` (the same instruction on channel modulation),
``controlnet_no_instruction`` (task one-hot only, both branches on every pass) and ``multi_branch`` (2T branches).

Training follows ``train_multi_task_counter_stream.py``: Adam, batch 512, the authors' lr halving at 30/60/90%,
images normalised on the device, every epoch's order and draws a function of (seed, epoch). Single-branch models get
one task per image (uniform among its valid tasks, ``draw_tasks``) and, if instructed, one operation (uniform);
the loss is the recognise samples' mean cross-entropy + ``seg_loss_weight`` x the segment samples' mean per-pixel
binary cross-entropy (without an operation instruction every sample is both). ``multi_branch``: the mean over tasks
of (CE + weight x BCE), every task of every image in one pass. Evaluation: every task on every validation and test
image where it is defined, accuracy with the recognise instruction and IoU with the segment instruction (for
instructed models also the *unselected* branch: the class branch under the segment instruction and vice versa).
IoU of one image = |pred & mask| / |pred | mask| with pred = logit > 0, 1 when both are empty; per task the mean
over images. The kept epoch is the best on validation by the mean of (accuracy, IoU).

Outputs in --out: results.json, metrics.jsonl (one line per epoch) and best_model.pt, written atomically.
Param-file or command-line mistakes: one line naming the file, the key and what is allowed, exit code 2.
"""
import inspect
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loaders.mnist import MNISTUnavailable
from loaders.multi_mnist import NUM_TASKS, RESIZES
from loaders.multi_mnist_seg import make_multi_mnist_seg
import losses
from metrics import TaskAccuracy
from models import LENET_PARAMS, LENET_WEIGHTS, count_parameters
from models.cls_seg import RECOGNISE, SEGMENT, TABLE5_ROWS, VARIANTS, build_cls_seg_model
from runtime import files
from runtime.files import REPO
from training import checkpoint, cli, config, loop, optim, provenance, run_dir
from training.data import MEMORY_FORMATS, normalize

PAPER_TABLES = REPO / "paper" / "paper_tables.json"
SETTINGS = ("9digits", "9digits_byref", "4digits", "2digits")
SETTING_COLUMNS = {"9digits": "by_loc", "9digits_byref": "by_ref"}  # the paper's Table 5 columns

REQUIRED = config.REQUIRED
# Table 5's own keys, in training/config.py's form (type, default (REQUIRED = must be given), allowed: tuple of strings
# or (min, max), meaning), and the training keys it shares with the training script, taken from that schema.
SCHEMA = {
    "exp_id": (str, REQUIRED, None, "experiment name; default output dir is runs/cls_seg/<exp_id>/seed<k>"),
    "variant": (str, REQUIRED, tuple(VARIANTS), "Table 5 row (models/cls_seg.py)"),
    "setting": (str, REQUIRED, SETTINGS, "Multi-MNIST task set (9digits = by location, 9digits_byref = by reference)"),
    **{key: config.SCHEMA[key] for key in ("epochs", "optimizer", "lr", "momentum", "lr_schedule", "batch_size")},
    "eval_batch_size": (int, 0, (0, 10_000_000), "images per evaluation pass; 0 = auto (512 on CPU, 8192 on GPU)"),
    "eval_every": config.SCHEMA["eval_every"],
    "seg_loss_weight": (float, 1.0, (0.0, 1000.0), "weight of the per-pixel BCE of the segment operation"),
    "mask_threshold": (int, 127, (0, 254), "mask = MNIST pixel > threshold (of 0..255)"),
    "resize": (str, "nearest", RESIZES, "Multi-MNIST resize filter to 28x28 (the masks are resized alike)"),
    "data_seed": (int, 0, (0, 2**31 - 1), "seed of the Multi-MNIST generation"),
    "data_root": (str, None, None, "data directory (--data_root overrides it); null = $MTL_DATA_ROOT or ./data"),
    "memory_format": config.SCHEMA["memory_format"],
    "model_options": (dict, {}, None, "keyword arguments of the model (c1, c2, hidden; td_channels for ControlNet)"),
}


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param_file", help="JSON param file (params/cls_seg/*.json)")
    parser.add_argument("--epochs", type=cli.positive_int, help="training epochs (default: the param file's)")
    parser.add_argument("--seed", type=cli.non_negative_int, default=0, help="run seed: initialisation, order, draws")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--out", help="output dir (default runs/cls_seg/<exp_id>/seed<k>)")
    parser.add_argument("--subset", type=cli.positive_int, help="use only N training and N/5 val/test images")
    parser.add_argument("--eval_subset", type=cli.positive_int,
                        help="use only M val and M test images (default: all, or N/5 with --subset)")
    parser.add_argument("--data_root", help="data directory (default: the param data_root, else $MTL_DATA_ROOT or ./data)")
    parser.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    parser.add_argument("--no_model_file", action="store_true", help="do not write best_model.pt")
    parser.add_argument("--dry_run", action="store_true", help="build the model, print its parameter counts, exit")
    parser.add_argument("--table", metavar="RUNS_DIR", help="write RUNS_DIR/table5.md from RUNS_DIR/<setting>/<variant>/"
                        "results.json next to the paper's Table 5, then exit")
    args = parser.parse_args(argv)
    if (args.param_file is None) == (args.table is None):
        parser.error("give exactly one of --param_file (train) and --table (make the table)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = cli.command_line(__spec__.name, argv)
    return cli.exit_code(table if args.table else run, args)


def table(args):
    print(write_table(Path(args.table)))
    return 0


# ----------------------------------------------------------------------------------------------------- params
def load_params(path):
    """Reads, validates and completes a param file; raises config.ParamError on any problem."""
    return validate(config.read_param_file(path, config.required_keys(SCHEMA)), str(Path(path)))


def validate(raw, source):
    params = config.check_keys(raw, source, SCHEMA)
    _check_model_options(params, source)
    return params


def _check_model_options(params, source):
    cls, fixed = VARIANTS[params["variant"]]
    signature = inspect.signature(cls.__init__).parameters
    allowed = [name for name in signature if name not in ("self", "num_tasks") and name not in fixed]
    for key, value in params["model_options"].items():
        if key not in allowed:
            raise config.ParamError(f"{source}: key 'model_options' has unknown option '{key}' for variant "
                             f"'{params['variant']}'; allowed: {', '.join(allowed)}")
        default = signature[key].default
        if default is None:  # td_channels: [t1, t2]
            ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value)
            if not ok:
                raise config.ParamError(f"{source}: key 'model_options.{key}' must be a list of two integers >= 1, "
                                 f"got {json.dumps(value)}; allowed: [t1, t2]")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise config.ParamError(f"{source}: key 'model_options.{key}' must be an integer >= 1, got {json.dumps(value)}; "
                             f"allowed: an integer >= 1 (default {default})")


# ------------------------------------------------------------------------------------------------------ run
def build(params):
    return build_cls_seg_model(params["variant"], NUM_TASKS[params["setting"]], **params["model_options"])


def parameter_counts(model):
    num_params, num_weights = count_parameters(model)
    return {"num_params": num_params, "num_weights": num_weights, "params_x": round(num_params / LENET_PARAMS, 4),
            "weights_x": round(num_weights / LENET_WEIGHTS, 4)}


def run(args):
    """Trains the param file's variant (with --dry_run only prints its parameter counts), keeps its best epoch on
    validation and writes results.json, metrics.jsonl and best_model.pt into --out."""
    params = load_params(args.param_file)
    epochs = args.epochs or params["epochs"]
    if args.dry_run:
        print(json.dumps({"variant": params["variant"], "setting": params["setting"], **parameter_counts(build(params))}))
        return 0
    device = cli.resolve_device(args.device)
    out = Path(args.out or REPO / "runs" / "cls_seg" / params["exp_id"] / f"seed{args.seed}")
    prepare_output_dir(out, args.force)
    memory_format = MEMORY_FORMATS[params["memory_format"]]

    torch.manual_seed(args.seed)
    model = build(params).to(device, memory_format=memory_format)
    optimizer = optim.make_optimizer(params, [{"params": list(model.parameters()), "lr": params["lr"]}])
    splits = load_data(params, args.subset, args.data_root or params["data_root"], args.eval_subset)
    data = {split: tuple(array.to(device) for array in arrays) for split, arrays in splits.items()}
    info = run_info(args, params, epochs, model, splits, device)
    print(f"{params['exp_id']}: {params['variant']} on {params['setting']}, {info['num_params']} params "
          f"(x{info['params_x']:.3f}), {info['sizes']['train']} train images, {info['device']}, out {out}", flush=True)

    history, best, wall = fit(model, optimizer, data, params, args, epochs, device, out)
    results = {**info, "best_epoch": best["epoch"],
               **{key: best[key] for key in best if key.startswith(("val_", "test_"))},
               "test_acc_mean_last": history[-1]["test_acc_mean"], "test_iou_mean_last": history[-1]["test_iou_mean"],
               "test_acc_per_task_last": history[-1]["test_acc_per_task"],
               "test_iou_per_task_last": history[-1]["test_iou_per_task"],
               "wall_time_s": round(wall, 2), "params": params}
    run_dir.write(files.write_json, results, out / "results.json")
    print(f"test at the best-validation epoch {best['epoch']}: accuracy {results['test_acc_mean']:.2f}, IoU "
          f"{results['test_iou_mean']:.2f}; results in {out / 'results.json'}", flush=True)
    return 0


def run_info(args, params, epochs, model, splits, device):
    """What results.json records of the run besides its scores: command, commit, device, seed, protocol, variant,
    split sizes and parameter counts."""
    return {"command": args.command, "git_commit": provenance.git_commit(), "device": provenance.describe_device(device),
            "torch": torch.__version__, "seed": args.seed, "epochs": epochs, "subset": args.subset,
            "eval_subset": args.eval_subset,
            "variant": params["variant"], "table5_row": TABLE5_ROWS[params["variant"]], "setting": params["setting"],
            "instructed": bool(getattr(model, "instructed", False)), "num_tasks": NUM_TASKS[params["setting"]],
            "sizes": {split: len(arrays[0]) for split, arrays in splits.items()}, **parameter_counts(model)}


def fit(model, optimizer, data, params, args, epochs, device, out):
    """The run's epochs (epoch_record): each one's record printed and metrics.jsonl rewritten after it, the best
    evaluated epoch by val_score saved as best_model.pt (unless --no_model_file). Returns (the records, the best
    one, the wall time of training and evaluation in seconds)."""
    per_pass = params["eval_batch_size"] or (512 if device.type == "cpu" else 8192)
    history, best, wall = [], None, 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        record = epoch_record(model, optimizer, data, params, args.seed, epoch, epochs, per_pass)
        record["epoch_time_s"] = round(time.perf_counter() - start, 2)
        wall += time.perf_counter() - start
        history.append(record)
        evaluated = "val_score" in record
        is_best = evaluated and (best is None or record["val_score"] > best["val_score"])
        if is_best:
            best = record
            if not args.no_model_file:
                run_dir.write(checkpoint.save, {"epoch": epoch + 1, "model": model.state_dict(), "params": params},
                              out / "best_model.pt")
        run_dir.write(files.write_text, "".join(json.dumps(r) + "\n" for r in history), out / "metrics.jsonl")
        scores = (f"val acc {record['val_acc_mean']:.2f} iou {record['val_iou_mean']:.2f}  test acc "
                  f"{record['test_acc_mean']:.2f} iou {record['test_iou_mean']:.2f}") if evaluated else ""
        print(f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f} (cls {record['train_cls_loss']:.4f}, seg "
              f"{record['train_seg_loss']:.4f})  {scores}  {record['epoch_time_s']:.1f}s", flush=True)
    return history, best, wall


def epoch_record(model, optimizer, data, params, seed, epoch, epochs, per_pass):
    """One epoch at the lr of the schedule, then, on an evaluation epoch (every eval_every-th and the last),
    accuracy and IoU on val and test and val_score = (val accuracy + val IoU) / 2; returns the epoch's record."""
    lr = params["lr"] * optim.lr_factor(params, epoch, epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr
    train_losses = train_epoch(model, optimizer, data["train"], params, seed, epoch)
    record = {"epoch": epoch + 1, "lr": lr, **train_losses}
    if (epoch + 1) % params["eval_every"] == 0 or epoch + 1 == epochs:
        for split in ("val", "test"):
            scores = evaluate(model, *data[split], NUM_TASKS[params["setting"]], per_pass,
                              MEMORY_FORMATS[params["memory_format"]])
            record.update({f"{split}_{name}": value for name, value in scores.items()})
        record["val_score"] = (record["val_acc_mean"] + record["val_iou_mean"]) / 2
    return record


def prepare_output_dir(out, force):
    run_dir.check_writable(out)
    if (out / "results.json").exists() and not force:
        raise config.ParamError(f"--out: {out} already holds results (results.json); pass --force to overwrite them, or "
                         f"choose another --out")


def load_data(params, subset, root, eval_subset=None):
    """{split: (images uint8 [N,28,28], labels int64 [N,T], masks bool [N,T,28,28])}: ``subset`` training images
    (default all) and ``eval_subset`` val / test images (default ``subset // 5`` with a subset, else all)."""
    data = {}
    for split in ("train", "val", "test"):
        try:
            images, labels, masks = make_multi_mnist_seg(params["setting"], split, params["data_seed"], root,
                                                         params["resize"], params["mask_threshold"])
        except (MNISTUnavailable, ValueError) as err:
            raise cli.RunError(" ".join(str(err).split())) from None
        except OSError as err:
            raise cli.RunError(f"cannot read or write the data cache: {err}; choose another data root with --data_root") \
                from None
        size = subset if split == "train" else eval_subset or (max(subset // 5, 1) if subset else None)
        if size:
            images, labels, masks = images[:size], labels[:size], masks[:size].clone()
        data[split] = (images, labels, masks)
    return data


# ------------------------------------------------------------------------------------------------- training
def seg_loss_per_sample(seg_logits, masks):
    """Mean per-pixel binary cross-entropy of each map: [..., 28, 28] -> [...]."""
    return F.binary_cross_entropy_with_logits(seg_logits, masks.to(seg_logits.dtype), reduction="none").mean((-2, -1))


def step_losses(model, x, labels, masks, tasks=None, ops=None):
    """(classification loss, segmentation loss) of one batch, each a mean over the samples it applies to.

    Multi-branch: labels [B, T], masks [B, T, 28, 28]; each is the mean over tasks of the task's mean over its valid
    images. Single-branch: labels [B], masks [B, 28, 28] of the drawn ``tasks``; an instructed model's ``ops`` pick
    which loss each sample counts in, an uninstructed model's samples count in both."""
    if model.paradigm == "multi_branch":
        out = model(x)
        valid = labels >= 0
        cls_loss = losses.per_task_cross_entropy(out.class_logits, labels).mean()
        seg = (seg_loss_per_sample(out.seg_logits, masks) * valid).sum(0) / valid.sum(0).clamp(min=1)
        return cls_loss, seg.mean()
    out = model(x, tasks, ops)
    valid = labels >= 0
    cls_used, seg_used = (valid & (ops == RECOGNISE), valid & (ops == SEGMENT)) if model.instructed else (valid, valid)
    cls_loss = losses.masked_cross_entropy(out.class_logits, labels.where(cls_used, losses.IGNORE_INDEX))
    seg_loss = (seg_loss_per_sample(out.seg_logits, masks) * seg_used).sum() / seg_used.sum().clamp(min=1)
    return cls_loss, seg_loss


def train_epoch(model, optimizer, train, params, seed, epoch):
    """One epoch; the order, the task draws and the operation draws depend only on (seed, epoch)."""
    images, labels, masks = train
    device, n, batch_size = images.device, len(images), params["batch_size"]
    memory_format = MEMORY_FORMATS[params["memory_format"]]
    generator = loop.epoch_generator(seed, epoch)
    torch.manual_seed(loop.epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=generator)
    single = model.paradigm == "single_branch"
    tasks = loop.draw_tasks((labels >= 0).cpu(), generator).to(device) if single else None
    ops = torch.randint(0, 2, (n,), generator=generator).to(device) if single and model.instructed else None
    order = order.to(device)
    model.train()
    sums = torch.zeros(3, device=device)
    steps = 0
    for begin in range(0, n, batch_size):
        index = order[begin:begin + batch_size]
        x = normalize(images[index], memory_format)
        if single:
            t = tasks[index]
            cls_loss, seg_loss = step_losses(model, x, labels[index, t], masks[index, t], t,
                                             None if ops is None else ops[index])
        else:
            cls_loss, seg_loss = step_losses(model, x, labels[index], masks[index])
        loss = cls_loss + params["seg_loss_weight"] * seg_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([loss.detach(), cls_loss.detach(), seg_loss.detach()])
        steps += 1
    mean = (sums / steps).tolist()
    if not all(math.isfinite(v) for v in mean):
        raise cli.RunError(f"non-finite training loss at epoch {epoch + 1} (variant '{params['variant']}', losses "
                       f"{[float(f'{v:.4g}') for v in mean]}); lower lr or seg_loss_weight")
    return {"train_loss": mean[0], "train_cls_loss": mean[1], "train_seg_loss": mean[2]}


# ----------------------------------------------------------------------------------------------- evaluation
def binary_iou(pred, target):
    """Per-map IoU of boolean maps [..., H, W] -> float [...]: |pred & target| / |pred | target|; 1 when both are
    empty (nothing to find, nothing found), 0 when exactly one is."""
    inter = (pred & target).sum((-2, -1)).double()
    union = (pred | target).sum((-2, -1)).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class TaskIoU:
    """Mean per-image IoU of each task over its valid images (label >= 0), in percent."""

    def __init__(self, num_tasks, device):
        self.total = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_tasks, dtype=torch.int64, device=device)

    def update(self, pred, target, valid):
        """pred, target: bool [T, B, H, W]; valid: bool [T, B]."""
        self.total += (binary_iou(pred, target) * valid).sum(dim=1)
        self.count += valid.sum(dim=1)

    def per_task(self):
        count = self.count.double()
        return (100.0 * self.total / count).where(count > 0, torch.nan).cpu()


@torch.inference_mode()
def evaluate(model, images, labels, masks, num_tasks, per_pass, memory_format=torch.contiguous_format):
    """Every task on every image where it is defined: accuracy [T] with the recognise instruction and IoU [T] with the
    segment instruction (both from one pass without an operation instruction); for instructed models also the
    unselected branch's scores. Returns {name: value} with per-task lists and their means (NaN tasks skipped)."""
    model.eval()
    device = images.device
    acc, iou = TaskAccuracy(num_tasks, device), TaskIoU(num_tasks, device)
    instructed = bool(getattr(model, "instructed", False))
    acc_other, iou_other = TaskAccuracy(num_tasks, device), TaskIoU(num_tasks, device)
    for begin in range(0, len(images), per_pass):
        x = normalize(images[begin:begin + per_pass], memory_format)
        y, m = labels[begin:begin + per_pass].t(), masks[begin:begin + per_pass].transpose(0, 1)  # [T,B], [T,B,H,W]
        valid = y >= 0
        if model.paradigm == "multi_branch":
            out = model(x)
            acc.update(out.class_logits.argmax(dim=2).t(), y)
            iou.update(out.seg_logits.transpose(0, 1) > 0, m, valid)
            continue
        taps = model.bu1_taps(x) if hasattr(model, "from_taps") else None
        forward = (lambda t, o: model.from_taps(x, taps, t, o)) if taps is not None else (lambda t, o: model(x, t, o))
        for task in range(num_tasks):
            t = torch.full((len(x),), task, dtype=torch.int64, device=device)
            if instructed:
                recognised = forward(t, torch.full_like(t, RECOGNISE))
                segmented = forward(t, torch.full_like(t, SEGMENT))
                _update_task(acc_other, iou_other, task, valid[task], y[task], m[task], segmented.class_logits,
                             recognised.seg_logits)
            else:
                recognised = segmented = forward(t, None)
            _update_task(acc, iou, task, valid[task], y[task], m[task], recognised.class_logits, segmented.seg_logits)
    scores = _summary("acc", acc.per_task()) | _summary("iou", iou.per_task())
    if instructed:
        scores |= _summary("acc_unselected", acc_other.per_task()) | _summary("iou_unselected", iou_other.per_task())
    return scores


def _update_task(acc, iou, task, valid, labels, masks, class_logits, seg_logits):
    """One task's predictions on a chunk of images: labels [B], masks [B, H, W], valid [B]."""
    acc.correct[task] += ((class_logits.argmax(dim=1) == labels) & valid).sum()
    acc.count[task] += valid.sum()
    iou.total[task] += (binary_iou(seg_logits > 0, masks) * valid).sum()
    iou.count[task] += valid.sum()


def _summary(name, per_task):
    values = [None if math.isnan(v) else round(v, 4) for v in per_task.tolist()]
    return {f"{name}_per_task": values, f"{name}_mean": float(per_task.nanmean())}


# ----------------------------------------------------------------------------------------------------- table
def _mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def write_table(runs_dir):
    """``runs_dir/table5.md``: our Table 5 (``runs_dir/<setting>/<variant>/results.json``, seed runs under
    ``seed<k>/`` averaged) next to the paper's; returns the Markdown."""
    found = read_runs(runs_dir)
    settings = [s for s in SETTING_COLUMNS if any(key[0] == s for key in found)]
    lines = ["# Table 5 (classification and segmentation), Multi-MNIST", "",
             "Ours: test accuracy (%) and IoU (%) at the best-validation epoch, mean over tasks (mean over seeds when "
             "there are several, ± sample std); in brackets the paper's value. #br: output branches. "
             "#P: parameters (x one LeNet, 24,390).", ""]
    lines += comparison_lines(found, settings)
    lines += unselected_lines(found)
    lines += protocol_lines([r for runs in found.values() for r in runs])
    text = "\n".join(lines) + "\n"
    files.write_text(text, runs_dir / "table5.md")
    return text


def read_runs(runs_dir):
    """{(setting, variant): [results.json of each seed]} from ``runs_dir/<setting>/<variant>/results.json`` and
    ``runs_dir/<setting>/<variant>/seed<k>/results.json``; RunError when there is none."""
    found = {}
    for path in sorted(runs_dir.glob("*/*/results.json")) + sorted(runs_dir.glob("*/*/seed*/results.json")):
        result = json.loads(path.read_text())
        found.setdefault((result["setting"], result["variant"]), []).append(result)
    if not found:
        raise cli.RunError(f"no results.json under {runs_dir}/<setting>/<variant>/; run experiments/table5_cls_seg.py with --out there first")
    return found


def comparison_lines(found, settings):
    """The table beside the paper's: one row per variant in the paper's order, and per setting of ``settings``
    its number of branches, parameter multiple, accuracy and IoU (mean ± std over seeds), each with the paper's."""
    paper = json.loads(PAPER_TABLES.read_text())["table5_heterogeneous_cls_seg"]
    columns, rows = paper["columns"], paper["rows"]
    paper_key = {"multi_branch": "multi_branched", "controlnet_no_instruction": "controlnet_no_cls_seg_inst",
                 "ch_mod": "ch_mod", "controlnet": "controlnet"}
    header = "| Row | loc inst. | cls/seg inst. |"
    rule = "|---|---|---|"
    for setting in settings:
        name = "by loc" if setting == "9digits" else "by ref"
        header += f" {name} #br | {name} #P | {name} CLS acc | {name} SEG IoU |"
        rule += "---|---|---|---|"
    lines = [header, rule]
    for variant in ("multi_branch", "controlnet_no_instruction", "ch_mod", "controlnet"):
        paper_row = dict(zip(columns, rows[paper_key[variant]]))
        cells = [TABLE5_ROWS[variant], "✓" if paper_row["loc_instruction"] else "✗",
                 "✓" if paper_row["cls_seg_instruction"] else "✗"]
        for setting in settings:
            cells += setting_cells(variant, setting, paper_row, found.get((setting, variant), []))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def setting_cells(variant, setting, paper_row, runs):
    """The four cells of one variant in one setting: branches, parameter multiple, accuracy and IoU over ``runs``
    (with [n=k] for several seeds), each beside the paper's value; dashes for ours when there is no run."""
    prefix = SETTING_COLUMNS[setting]
    branches = 2 * NUM_TASKS[setting] if variant == "multi_branch" else 2
    if not runs:
        return [f"{branches} ({paper_row[prefix + '_branches']})", "–",
                f"– ({paper_row[prefix + '_cls_acc']:.2f})", f"– ({paper_row[prefix + '_seg_iou']:.2f})"]
    acc, iou = (_mean_std([r[key] for r in runs]) for key in ("test_acc_mean", "test_iou_mean"))
    seeds = f" [n={len(runs)}]" if len(runs) > 1 else ""
    return [f"{branches} ({paper_row[prefix + '_branches']})", f"{runs[0]['params_x']:.2f}",
            f"{acc} ({paper_row[prefix + '_cls_acc']:.2f}){seeds}",
            f"{iou} ({paper_row[prefix + '_seg_iou']:.2f}){seeds}"]


def unselected_lines(found):
    """The table of the instructed rows' unselected branches (the class branch under the segment instruction and
    vice versa) beside their selected ones, test, mean over seeds."""
    lines = ["", "Instructed rows, the unselected branch (class branch under the *segment* instruction, segmentation "
             "branch under the *recognise* instruction), test:", "",
             "| Row | setting | CLS acc, selected | CLS acc, unselected | SEG IoU, selected | SEG IoU, unselected |",
             "|---|---|---|---|---|---|"]
    for (setting, variant), runs in sorted(found.items()):
        if "test_acc_unselected_mean" in runs[0]:
            mean = lambda key: float(np.mean([r[key] for r in runs]))  # noqa: E731
            lines.append(f"| {TABLE5_ROWS[variant]} | {setting} | {mean('test_acc_mean'):.2f} | "
                         f"{mean('test_acc_unselected_mean'):.2f} | {mean('test_iou_mean'):.2f} | "
                         f"{mean('test_iou_unselected_mean'):.2f} |")
    return lines


def protocol_lines(all_runs):
    """How the runs shown were made: epochs and data sizes, optimisation and best epochs, training samples seen
    against the paper's budget, whether every run was still improving, devices, seeds, wall time, commits and
    commands."""
    protocol = sorted({(r["epochs"], r["subset"], r["sizes"]["train"], r["sizes"]["val"], r["sizes"]["test"])
                       for r in all_runs})
    lines = ["", "Protocol of the runs shown:", ""]
    for epochs, subset, train, val, test in protocol:
        lines.append(f"- {epochs} epochs on {train} training images ({val} val / {test} test)"
                     f"{' (--subset ' + str(subset) + ')' if subset else ''}")
    optimisation = sorted({(r["params"]["optimizer"], r["params"]["lr"], r["params"]["batch_size"],
                            r["params"]["lr_schedule"], r["params"]["seg_loss_weight"], r["params"]["mask_threshold"])
                           for r in all_runs})
    for optimizer, lr, batch, schedule, weight, threshold in optimisation:
        lines.append(f"- {optimizer}, lr {lr}, batch {batch}, lr schedule {schedule}, seg_loss_weight {weight}, "
                     f"mask threshold {threshold}; best epochs: "
                     f"{', '.join(str(r['best_epoch']) for r in all_runs)}")
    samples = sorted({r["epochs"] * r["sizes"]["train"] for r in all_runs})
    lines.append(f"- training samples seen: {', '.join(f'{n:,}' for n in samples)} "
                 f"({', '.join(f'{100 * n / 5_000_000:.1f}%' for n in samples)} of the paper's 100 epochs x 50,000)")
    if all(r["best_epoch"] == r["epochs"] for r in all_runs):
        lines.append("- every run's best-validation epoch is its last: the models were still improving when stopped, "
                     "so these numbers compare how fast the rows learn on this budget, not their final accuracy")
    lines.append(f"- devices: {', '.join(sorted({r['device'] for r in all_runs}))}; seeds: "
                 f"{', '.join(str(s) for s in sorted({r['seed'] for r in all_runs}))}; total wall time "
                 f"{sum(r['wall_time_s'] for r in all_runs) / 60:.1f} min (training + evaluation)")
    lines.append(f"- commits: {', '.join(sorted({r['git_commit'] for r in all_runs}))}")
    lines.append("- commands: " + "; ".join(f"`{r['command']}`" for r in all_runs))
    return lines


if __name__ == "__main__":
    cli.exit_with(main)
