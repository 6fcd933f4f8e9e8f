"""Training/evaluation speed: the original per-sample pipeline vs our on-device path (issue "Speed").

    python benchmarks/bench_train.py --quick              # subsets, a few minutes on a 2-core CPU
    python benchmarks/bench_train.py --device cuda        # whole splits on a GPU

ControlNet on 9 digits by location, one epoch each, from the same initial weights:

(a) reference: the authors' pipeline. A ``Dataset`` builds a PIL image per sample and applies ToTensor +
    Normalize(0.1307, 0.3081) (written out here, no torchvision); a ``DataLoader`` (batch 512, shuffle,
    worker processes) collates it; each batch is copied to the device, a task is drawn per sample with
    ``torch.multinomial``, one-hot encoded, and its label picked with ``masked_select``; the model is in the
    contiguous memory format. Evaluation is the original's structure: one pass of a shuffled loader with
    batch 100, and for every batch a Python loop over the tasks (one forward per task), with the original
    metric's ``.cpu()`` host sync per task and batch.
(b) ours: ``training.loop.train_epoch`` and ``training.evaluate.evaluate`` (the training script's path) with the params of
    ``params/mmnist_counter_9tasks_params.json`` (whole split on the device, index slices, all tasks of an
    image evaluated at once, channels_last).

An epoch is train + evaluation of every task on val and test (what the training script does; the original
evaluated the test split only, the reference here does the same work as ours). Evaluation speed counts
image-task pairs. Then every Table 2 method is timed for one epoch of our path. Figures go to
``runs/benchmarks/<device-tag>[-quick].json`` (or ``--out``); see benchmarks/README.md.
"""
import copy
import ctypes
import gc
import os
import platform
import re
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("TQDM_DISABLE", "1")  # train_epoch's progress bar; must be set before tqdm is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from loaders import NUM_TASKS  # noqa: E402
from models import build_model  # noqa: E402
from runtime import files  # noqa: E402
from training import cli, config, evaluate, loop, optim, provenance  # noqa: E402
from training.data import MEMORY_FORMATS, load_data  # noqa: E402
from weighting import build_weighting  # noqa: E402

from reference_pipeline import (REF_EVAL_BATCH, reference_evaluate, reference_loader,  # noqa: E402
                                reference_train_epoch)

PARAM_FILE = REPO / "params" / "mmnist_counter_9tasks_params.json"
TABLE2 = ["single_task", "uniform_scaling", "gradnorm", "kendall", "mgda", "task_routing", "ch_mod",
          "ch_mod_extended", "controlnet"]
MB = 2 ** 20


# ---------------------------------------------------------------------------------------------------------
# (b) our path


def our_train(model, weighting, optimizer, data, params, seed, epoch):
    return loop.train_epoch(model, weighting, optimizer, data["train"], params, seed, epoch).loss


def our_evaluate(model, data, split, params, device):
    memory_format = MEMORY_FORMATS[params["memory_format"]]
    return evaluate.evaluate(model, *data[split], data["num_tasks"], evaluate.eval_rows(params, device), memory_format)


def build(params, num_tasks, device, seed):
    """Model (seeded init, the params' memory format), weighting, optimiser, as the training script."""
    torch.manual_seed(seed)
    model = build_model(params["model"], num_tasks, **params["model_options"])
    model = model.to(device, memory_format=MEMORY_FORMATS[params["memory_format"]])
    weighting = None
    if params["weighting"] is not None:
        weighting = build_weighting(params["weighting"], num_tasks, params["weighting_options"]).to(device)
    extra = list(weighting.parameters()) if weighting is not None else []
    return model, weighting, optim.make_optimizer(params, list(model.parameters()) + extra)


# ---------------------------------------------------------------------------------------------------------
# timing and memory


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_kb(field):
    """VmRSS / VmHWM of this process in kB from /proc (Linux), else None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_free_memory():
    """Returns the allocator's freed pages to the OS (glibc ``malloc_trim``), so that the RSS at the start of a
    phase is its live memory and the phase's peak delta counts what it uses, not only what it adds."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return rss_kb("VmHWM") is not None
    except OSError:
        return False


def memory_method(device):
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the phase (absolute: includes model, optimiser, on-device data)"
    if reset_peak_rss():
        return ("peak RSS of the process during the phase minus RSS at its start (VmHWM reset per phase, freed "
                "memory returned to the OS with malloc_trim before it)")
    return "resource.getrusage max RSS delta (grows only when the phase sets a new process high-water mark)"


class Phase:
    """Wall time (device synchronised) and peak memory (MiB) of a ``with`` block."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_memory()
            self.hwm = reset_peak_rss()
            self.start_kb = rss_kb("VmRSS") if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            end_kb = rss_kb("VmHWM") if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mb = max(0, end_kb - self.start_kb) / 1024
        return False


def warm_size(n, chunk):
    """A warm-up subset size that meets both the full chunk shape and the last, partial one."""
    return min(n, chunk + n % chunk)


# ---------------------------------------------------------------------------------------------------------
# the runs


class snapshot:
    """Restores the weights and optimiser (and weighting) state on exit: warm-ups leave no trace."""

    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.saved = [copy.deepcopy(m.state_dict()) for m in self.modules]

    def __exit__(self, *exc):
        for module, state in zip(self.modules, self.saved):
            module.load_state_dict(state)
        return False


def warm_up_reference(model, optimizer, params, data, args, device):
    """A full and a short batch of training and of evaluation (no workers), undone afterwards."""
    batch, (images, labels) = params["batch_size"], cpu_split(data, "train")
    train_loader = reference_loader(images[:batch + 8], labels[:batch + 8], batch, 0, args.seed)
    n_eval = REF_EVAL_BATCH + 8
    eval_loader = reference_loader(images[:n_eval], labels[:n_eval], REF_EVAL_BATCH, 0, args.seed)
    with snapshot(model, optimizer), Phase(device) as phase:
        reference_train_epoch(model, optimizer, train_loader, data["num_tasks"], device)
        reference_evaluate(model, eval_loader, data["num_tasks"], device)
    return phase.seconds


def reference_epoch(model, optimizer, params, data, args, device, epoch):
    """Reference train + eval of val and test: {phase: Phase} and the test accuracies."""
    torch.manual_seed(args.seed + epoch)
    phases = {}
    loader = reference_loader(*cpu_split(data, "train"), params["batch_size"], args.workers, args.seed + epoch)
    with Phase(device) as phases["train"]:
        reference_train_epoch(model, optimizer, loader, data["num_tasks"], device)
    for split in ("val", "test"):
        loader = reference_loader(*cpu_split(data, split), REF_EVAL_BATCH, args.workers, args.seed + epoch)
        with Phase(device) as phases[split]:
            accuracy = reference_evaluate(model, loader, data["num_tasks"], device)
    return phases, float(np.mean(accuracy))


def warm_up_ours(model, weighting, optimizer, params, data, args, device, context):
    """Our train and eval on a few chunks (full and last-partial shapes), undone afterwards."""
    n, rows = len(data["train"][0]), evaluate.eval_rows(params, device)
    per_pass = max(1, rows // data["num_tasks"])
    warm = {"num_tasks": data["num_tasks"]}
    warm["train"] = tuple(t[:warm_size(n, params["batch_size"])] for t in data["train"])
    for split in ("val", "test"):
        warm[split] = tuple(t[:warm_size(len(data[split][0]), per_pass)] for t in data[split])
    with snapshot(model, optimizer, weighting), Phase(device) as phase, context():
        our_train(model, weighting, optimizer, warm, params, args.seed, 0)
        for split in ("val", "test"):
            our_evaluate(model, warm, split, params, device)
    return phase.seconds


def our_epoch(model, weighting, optimizer, params, data, args, device, epoch, context=nullcontext):
    """Our train + eval of val and test: {phase: Phase} and the test accuracies."""
    phases = {}
    with Phase(device) as phases["train"], context():
        our_train(model, weighting, optimizer, data, params, args.seed, epoch)
    for split in ("val", "test"):
        with Phase(device) as phases[split], context():
            accuracy = our_evaluate(model, data, split, params, device)
    return phases, float(accuracy.nanmean())


def time_ours(model, weighting, optimizer, params, data, args, device, repeats, autocast=False):
    """Warm-up, then ``repeats`` epochs of our path; the rates of the fastest of each phase."""
    context = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else nullcontext
    warmup_s = warm_up_ours(model, weighting, optimizer, params, data, args, device, context)
    best = {}
    for epoch in range(repeats):
        phases, accuracy = our_epoch(model, weighting, optimizer, params, data, args, device, epoch, context)
        keep_best(best, phases)
    return {**rates(best, accuracy, data), "warmup_s": warmup_s}


def cpu_split(data, split):
    return data[split][0].cpu(), data[split][1].cpu()


def keep_best(best, phases):
    for name, phase in phases.items():
        if name not in best or phase.seconds < best[name].seconds:
            best[name] = phase


def rates(phases, test_accuracy, data):
    """Train images/s, eval image-task pairs/s, the epoch time (train + eval val + test), peak memory."""
    n_train, num_tasks = len(data["train"][0]), data["num_tasks"]
    pairs = num_tasks * (len(data["val"][0]) + len(data["test"][0]))
    eval_s = phases["val"].seconds + phases["test"].seconds
    return {"train_s": phases["train"].seconds, "eval_s": eval_s, "epoch_s": phases["train"].seconds + eval_s,
            "train_imgs_per_s": n_train / phases["train"].seconds, "eval_pairs_per_s": pairs / eval_s,
            "train_peak_mb": phases["train"].peak_mb,
            "eval_peak_mb": max(phases["val"].peak_mb, phases["test"].peak_mb),
            "test_acc_mean": test_accuracy}


def load_split_data(params, sizes, device):
    """{split: (uint8 images, int64 labels)} on ``device``, cut to ``sizes``."""
    data = load_data(params, None, None)
    out = {"num_tasks": NUM_TASKS[params["setting"]]}
    for split, (images, labels, _) in data.items():
        out[split] = (images[:sizes[split]].to(device), labels[:sizes[split]].to(device))
    return out


def time_methods(methods, sizes, args, device):
    """One epoch of our path (train + eval val + test) per method on 9 digits, from its param file."""
    rows = {}
    for method in methods:
        params = config.load_params(REPO / "params" / f"mmnist_9digits_{method}.json")
        data = load_split_data(params, sizes, device)
        model, weighting, optimizer = build(params, data["num_tasks"], device, args.seed)
        row = time_ours(model, weighting, optimizer, params, data, args, device, repeats=1)
        rows[method] = {key: round(value, 4) for key, value in row.items()}
        print(f"  {method:16s} epoch {rows[method]['epoch_s']:8.2f} s  (train {rows[method]['train_s']:.2f} s, "
              f"eval {rows[method]['eval_s']:.2f} s)", flush=True)
    return rows


def variant_rows(args, base_params, model, data, device, default):
    """Opt-in accelerations of our path, each timed as its own row (same init as the default row)."""
    wanted = [("contiguous", args.contiguous), ("compile", args.compile), ("bf16", args.bf16)]
    rows = {}
    for name, on in wanted:
        if not on:
            continue
        params = dict(base_params, memory_format="contiguous") if name == "contiguous" else base_params
        variant = copy.deepcopy(model).to(memory_format=MEMORY_FORMATS[params["memory_format"]])
        optimizer = optim.make_optimizer(params, variant.parameters())
        if name == "compile":
            variant.forward_all_tasks = torch.compile(variant.forward_all_tasks)
            variant = torch.compile(variant)
        row = time_ours(variant, None, optimizer, params, data, args, device, args.repeats, autocast=name == "bf16")
        row["epoch_speedup_vs_default"] = default["epoch_s"] / row["epoch_s"]
        rows[name] = {key: round(value, 4) for key, value in row.items()}
    return rows


def device_tag(device):
    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name(device)).strip("-")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{cores}cores"


def read_commit():
    """HEAD's commit read from .git without running git (no dirty flag); 'unknown' if unreadable."""
    try:
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (REPO / ".git" / ref).exists():
            return (REPO / ".git" / ref).read_text().strip()
        for line in (REPO / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="5k train / 1k val / 1k test images; methods on 2k / 500 / 500")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, help="reference DataLoader workers (default 2 on CPU, 4 on CUDA)")
    parser.add_argument("--train_images", type=int, help="override the number of training images")
    parser.add_argument("--eval_images", type=int, help="override the number of val and of test images")
    parser.add_argument("--repeats", type=int, default=1, help="time each phase N times, keep the fastest")
    parser.add_argument("--methods", default="all",
                        help="comma-separated methods (any of config.METHODS) to time, 'all' (Table 2's 9) or 'none'")
    parser.add_argument("--compile", action="store_true", help="extra row: our path with torch.compile")
    parser.add_argument("--bf16", action="store_true", help="extra row: our path under bf16 autocast")
    parser.add_argument("--contiguous", action="store_true", help="extra row: our path without channels_last")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the main process (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="result JSON (default runs/benchmarks/<device-tag>[-quick].json)")
    args = parser.parse_args(argv)
    args.methods = TABLE2 if args.methods == "all" else [] if args.methods == "none" else args.methods.split(",")
    unknown = sorted(set(args.methods) - set(config.METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {', '.join(config.METHODS)}, all, none")
    return args


def main(argv=None):
    """Times our training path against the reference pipeline on the same model, then the opt-in variants of
    ours and one epoch per Table 2 method; prints each table and writes every figure to the result JSON."""
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = 2 if device.type == "cpu" else 4
    sizes, method_sizes = image_counts(args)
    params = config.load_params(PARAM_FILE)
    data = load_split_data(params, sizes, device)
    n = {split: len(data[split][0]) for split in ("train", "val", "test")}
    print(f"ControlNet, 9 digits, {provenance.describe_device(device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; images: {n}; reference workers: {args.workers}", flush=True)
    mem_method = memory_method(device)

    initial, ref, ours = time_reference_and_ours(params, data, args, device)
    ref_workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print_comparison(ref, ours)
    print(f"memory: {mem_method}; reference worker processes: peak RSS {ref_workers_mb:.0f} MiB", flush=True)

    variants = variant_rows(args, params, initial, data, device, ours)
    for name, row in variants.items():
        print(f"variant {name:10s} train {row['train_imgs_per_s']:.0f} img/s, eval {row['eval_pairs_per_s']:.0f} "
              f"pairs/s, epoch {row['epoch_s']:.2f} s ({row['epoch_speedup_vs_default']:.2f}x the default), "
              f"warm-up {row['warmup_s']:.1f} s", flush=True)

    if args.methods:
        print(f"\nTable 2 methods, one epoch of our path on {method_sizes if args.quick else n} images:", flush=True)
    methods = time_methods(args.methods, method_sizes, args, device)

    result = {
        "device": provenance.describe_device(device), "device_tag": device_tag(device), "git_commit": read_commit(),
        "command": " ".join(["python", "benchmarks/bench_train.py"] + list(sys.argv[1:] if argv is None else argv)),
        "torch_version": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "quick": args.quick, "repeats": args.repeats, "seed": args.seed, "reference_workers": args.workers,
        "reference_eval_batch": REF_EVAL_BATCH, "train_batch": params["batch_size"],
        "eval_rows": evaluate.eval_rows(params, device), "n_images": n,
        "n_images_methods": {split: method_sizes[split] or n[split] for split in n},
        **comparison_figures(ref, ours, {"ref_worker_processes_rss": ref_workers_mb, "method": mem_method}),
        "variants": variants, "methods_epoch": methods,
    }
    out = Path(args.out) if args.out else \
        REPO / "runs" / "benchmarks" / f"{device_tag(device)}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(result, out)
    print(f"\nwrote {out}")
    return 0


def image_counts(args):
    """The images per split of the comparison and of the methods' rows ({split: N}, None = all): all of them, or
    with --quick 5k / 1k / 1k and 2k / 500 / 500; --train_images and --eval_images override both."""
    sizes = {"train": 5000, "val": 1000, "test": 1000} if args.quick else {"train": None, "val": None, "test": None}
    method_sizes = {"train": 2000, "val": 500, "test": 500} if args.quick else dict(sizes)
    if args.train_images:
        sizes["train"] = method_sizes["train"] = args.train_images
    if args.eval_images:
        sizes["val"] = sizes["test"] = method_sizes["val"] = method_sizes["test"] = args.eval_images
    return sizes, method_sizes


def time_reference_and_ours(params, data, args, device):
    """The untrained model, and the reference pipeline's and our path's figures (``rates``, with the warm-up
    time ``warmup_s``): two copies of that model, warmed up, then trained and evaluated an epoch each in turn,
    --repeats times, so that both see the same load on a shared machine; each phase's fastest time kept."""
    model, _, optimizer = build(params, data["num_tasks"], device, args.seed)
    initial = copy.deepcopy(model)
    ref_model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    ref_optimizer = optim.make_optimizer(params, ref_model.parameters())
    ref_warmup_s = warm_up_reference(ref_model, ref_optimizer, params, data, args, device)
    warmup_s = warm_up_ours(model, None, optimizer, params, data, args, device, nullcontext)
    best_ref, best = {}, {}
    for epoch in range(args.repeats):
        phases, ref_accuracy = reference_epoch(ref_model, ref_optimizer, params, data, args, device, epoch)
        keep_best(best_ref, phases)
        phases, accuracy = our_epoch(model, None, optimizer, params, data, args, device, epoch)
        keep_best(best, phases)
    return (initial, {**rates(best_ref, ref_accuracy, data), "warmup_s": ref_warmup_s},
            {**rates(best, accuracy, data), "warmup_s": warmup_s})


def print_comparison(ref, ours):
    """The table of the reference's and our figures side by side, with our speed-up where it is a speed."""
    print(f"\n{'':28s}{'reference':>12s}{'ours':>12s}{'speedup':>9s}")
    for key, label in [("train_imgs_per_s", "train images/s"), ("eval_pairs_per_s", "eval image-task pairs/s"),
                       ("epoch_s", "epoch s (train + val + test)"), ("train_peak_mb", "train peak memory MiB"),
                       ("eval_peak_mb", "eval peak memory MiB"), ("test_acc_mean", "test accuracy after (%)")]:
        ratio = ""
        if key in ("train_imgs_per_s", "eval_pairs_per_s", "epoch_s"):
            ratio = f"{(ref[key] / ours[key] if key == 'epoch_s' else ours[key] / ref[key]):8.2f}x"
        print(f"{label:28s}{ref[key]:12.2f}{ours[key]:12.2f} {ratio}")


def comparison_figures(ref, ours, memory):
    """The result JSON's figures of the comparison: each of ours beside the reference's (``_ref``), the speed-ups,
    warm-up times, peak memory (with ``memory``: the reference workers' peak RSS and how memory was measured) and
    test accuracies."""
    return {
        "train_imgs_per_s_ref": ref["train_imgs_per_s"], "train_imgs_per_s": ours["train_imgs_per_s"],
        "train_speedup": ours["train_imgs_per_s"] / ref["train_imgs_per_s"],
        "eval_pairs_per_s_ref": ref["eval_pairs_per_s"], "eval_pairs_per_s": ours["eval_pairs_per_s"],
        "eval_speedup": ours["eval_pairs_per_s"] / ref["eval_pairs_per_s"],
        "epoch_s_ref": ref["epoch_s"], "epoch_s": ours["epoch_s"], "epoch_speedup": ref["epoch_s"] / ours["epoch_s"],
        "train_s_ref": ref["train_s"], "train_s": ours["train_s"],
        "eval_s_ref": ref["eval_s"], "eval_s": ours["eval_s"],
        "warmup_s": ours["warmup_s"], "warmup_s_ref": ref["warmup_s"],
        "peak_memory_mb": {"train_ref": ref["train_peak_mb"], "train": ours["train_peak_mb"],
                           "eval_ref": ref["eval_peak_mb"], "eval": ours["eval_peak_mb"], **memory},
        "test_acc_mean_ref": ref["test_acc_mean"], "test_acc_mean": ours["test_acc_mean"],
    }


if __name__ == "__main__":
    cli.exit_with(main)
