"""The three-task-clusters experiment of "Flexible Multi-task Networks by Learning Parameter Allocation" (Maziarz et
al., arXiv 1910.04915, Sec. 5.3; ``learning_parameter_allocation/clusters/clusters_train.py`` of
google-research/google-research@0c1bbe5f), reduced to its MNIST and Fashion-MNIST clusters.

    python -m experiments.gumbel_clusters --param_file params/gumbel_clusters/gumbel_matrix.json --out runs/gc

20 leave-one-class-out tasks (``loaders.task_clusters``: 10 MNIST, 10 Fashion-MNIST, 9-way each, 32x32, pad-and-
crop augmentation) on the routed network of ``models.gumbel_clusters`` (3 routed layers x 16 components). Training
as ``training/round_robin.py`` (whose loop this script reuses): every step shuffles the task order and makes one update
per task on a batch of that task; Adam for the weights and a second Adam for the allocation logits; Gumbel
temperature max(min, init / sqrt(update + 1)); budget penalty. The original runs 20,000 steps and no validation
split; here ``val_size`` training images per dataset are held out, and after the last step the greedy allocation is
evaluated on the validation and test split of every task. Writes ``results.json`` and ``allocation.json`` (the
format ``experiments/plots/allocation.py`` plots) to ``--out``. Param-file or CLI mistakes: one line, exit code 2; missing data:
one message, exit code 1.
"""
import sys
import time
from pathlib import Path

import torch

from experiments.plots.allocation import task_similarity
from loaders.fashion_mnist import FashionMNISTUnavailable
from loaders.mnist import MNISTUnavailable
from loaders.task_clusters import DATASETS, NUM_CLASSES, TASKS, load_task_clusters
from models.gumbel_clusters import GumbelClustersNet
from models.gumbel_matrix import allocation_matrix, router_parameters, weight_parameters
from runtime import files
from runtime.files import REPO
from training import cli, config
from training.provenance import describe_device, git_commit
from training.round_robin import check_allocation, evaluate, train

METHODS = ("gumbel_matrix", "shared_bottom")  # the two methods the original runs (clusters_train.py --method)

# key: (type, default (REQUIRED = must be given), allowed values or (min, max) range, meaning), in
# training/config.py's form; the defaults are the original's flags and constants (clusters_train.py)
SCHEMA = {
    "exp_id": (str, config.REQUIRED, None, "experiment name; default output dir is runs/gumbel_clusters/<exp_id>/seed<k>"),
    "method": (str, config.REQUIRED, METHODS, "allocation: learned (gumbel_matrix) or one shared trunk"),
    "steps": (int, 20_000, (1, 10**9), "training steps, each = one update per task"),
    "batch_size": (int, 32, (1, 1_000_000), "images per task update"),
    "lr": (float, 3e-4, (1e-8, 10.0), "Adam lr of the weights"),
    "router_lr": (float, 6e-3, (1e-8, 10.0), "Adam lr of the allocation logits"),
    "probs_init": (float, 0.5, (1e-6, 1 - 1e-6), "initial probability of every connection"),
    "temperature_init": (float, 50.0, (1e-3, 1e6), "Gumbel-softmax temperature max(min, init / sqrt(update + 1))"),
    "temperature_min": (float, 0.5, (1e-3, 1e6), "the temperature's floor"),
    "budget": (float, 0.5, (0.0, 1.0), "fraction of the routed components a task may use before the penalty"),
    "budget_penalty": (float, 1.0, (0.0, 1e3), "penalty * max(0, mean P - budget); 0 = off"),
    "dropout": (float, 0.5, (0.0, 0.99), "dropout rate of the original's net"),
    "val_size": (int, 10_000, (1, 59_999), "held-out training images per dataset"),
    "data_seed": (int, 0, (0, 2**31 - 1), "seed of the train / val split"),
}


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param_file", required=True, help="JSON param file, e.g. params/gumbel_clusters/*.json")
    parser.add_argument("--steps", type=cli.positive_int, help="training steps, each = one update per task "
                                                           "(default: param file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, dropout, Gumbel noise, data order and "
                                                            "augmentation")
    parser.add_argument("--out", help="output dir (default runs/gumbel_clusters/<exp_id>/seed<k>)")
    parser.add_argument("--subset", type=cli.positive_int, help="use only N training images per dataset (seeded)")
    parser.add_argument("--eval_subset", type=cli.positive_int,
                        help="evaluate each task on N random images (seeded by data_seed) of its val and test split "
                             "(default: all)")
    parser.add_argument("--data_root", help="data directory (default $MTL_DATA_ROOT or ./data)")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (default 1)")
    return parser.parse_args(argv)


def load_params(path):
    """The param file at ``path``, checked against ``SCHEMA`` (``config.load_checked``) and the round-robin
    protocol's rules (``round_robin.check_allocation``)."""
    return check_allocation(config.load_checked(path, SCHEMA), path)


def build_model(params):
    return GumbelClustersNet(len(TASKS), NUM_CLASSES, params["method"], params["probs_init"],
                             dropout=params["dropout"])


def cluster_similarity(greedy):
    """Mean cosine similarity of the tasks' binary allocation rows (``plot_allocation.task_similarity``) over the
    pairs of distinct tasks within each dataset cluster and across the two: the block structure of the paper's
    similarity figure in three numbers."""
    similarity = torch.as_tensor(task_similarity(greedy))
    cluster = torch.arange(len(TASKS)) // 10  # 0 = MNIST, 1 = Fashion
    same = cluster[:, None] == cluster[None, :]
    distinct = ~torch.eye(len(TASKS), dtype=torch.bool)
    summary = {f"within_{name}": similarity[same & distinct & (cluster[:, None] == c)].mean().item()
               for c, name in enumerate(DATASETS)}
    summary["across"] = similarity[~same].mean().item()
    return summary


def cluster_means(accuracies):
    return {name: sum(accuracies[c * 10:(c + 1) * 10]) / 10 for c, name in enumerate(DATASETS)}


def run(args, command):
    params = load_params(args.param_file)
    torch.set_num_threads(args.threads)
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        data = load_task_clusters(args.data_root, params["val_size"], params["data_seed"], args.subset, args.seed,
                                  args.eval_subset)
    except ValueError as err:
        raise config.ParamError(f"--subset / val_size: {err}") from None
    sizes = [len(labels) for _, labels in data["train"]]
    if params["batch_size"] > min(sizes):
        raise config.ParamError(f"{args.param_file}: key 'batch_size' ({params['batch_size']}) exceeds the {min(sizes)} "
                                f"training images of the smallest task")
    steps = args.steps or params["steps"]
    out = Path(args.out or REPO / "runs" / "gumbel_clusters" / params["exp_id"] / f"seed{args.seed}")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = build_model(params)
    print(f"{params['exp_id']}: method {params['method']}, {steps} steps x {len(TASKS)} tasks, "
          f"{min(sizes)}-{max(sizes)} training images per task, out {out}", flush=True)
    train_start = time.perf_counter()
    snapshots = train(model, data["train"], params, steps, args.seed, log=lambda line: print(line, flush=True))
    train_time = time.perf_counter() - train_start
    val, test = evaluate(model, data["val"]), evaluate(model, data["test"])
    greedy = allocation_matrix(model)
    results = {
        "command": command, "git_commit": git_commit(), "seed": args.seed,
        "device": describe_device(),
        "torch": torch.__version__, "method": params["method"], "subset": args.subset,
        "eval_subset": args.eval_subset, "steps": steps, "updates": steps * len(TASKS),
        "epochs": round(steps * params["batch_size"] * sum(1 / n for n in sizes) / len(sizes), 4),
        "tasks": list(TASKS), "num_eval_images": {split: [len(labels) for _, labels in data[split]]
                                                  for split in ("val", "test")},
        "val_acc_per_task": val, "val_acc_mean": sum(val) / len(val),
        "test_acc_per_task": test, "test_acc_mean": sum(test) / len(test),
        "test_acc_mean_per_cluster": cluster_means(test), "val_acc_mean_per_cluster": cluster_means(val),
        "allocation": greedy.tolist(), "active_fraction_per_task": greedy.mean(dim=1).tolist(),
        "allocation_similarity": cluster_similarity(greedy.tolist()),
        "num_weights": sum(p.numel() for p in weight_parameters(model)),
        "num_logits": sum(p.numel() for p in router_parameters(model)),
        "train_time_s": round(train_time, 2), "wall_time_s": round(time.perf_counter() - start, 2),
        "cpu_time_s": round(time.process_time() - start_cpu, 2), "params": params,
    }
    allocation = {"tasks": list(TASKS), "layers": ["Layer 1", "Layer 2", "Layer 3"],
                  "num_components": greedy.shape[1] // len(model.layers), "greedy": greedy.tolist(),
                  "probabilities": allocation_matrix(model, greedy=False).tolist(), "snapshots": snapshots}
    files.write_json(allocation, out / "allocation.json")
    files.write_json(results, out / "results.json")
    print(f"test accuracy per task {[round(a, 2) for a in test]}, mean {results['test_acc_mean']:.2f} "
          f"{ {k: round(v, 2) for k, v in results['test_acc_mean_per_cluster'].items()} }; allocation similarity "
          f"{ {k: round(v, 3) for k, v in results['allocation_similarity'].items()} }; results in "
          f"{out / 'results.json'}", flush=True)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        return run(args, cli.command_line(__spec__.name, argv))
    except config.ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (MNISTUnavailable, FashionMNISTUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    cli.exit_with(main)
