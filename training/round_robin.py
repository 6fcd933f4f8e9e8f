"""The MNIST experiment of "Flexible Multi-task Networks by Learning Parameter Allocation" (Maziarz et al., arXiv
1910.04915, Sec. 5.1; ``learning_parameter_allocation/mnist/mnist_train.py`` of
google-research/google-research@0c1bbe5f), the reference run of the Gumbel-Matrix baseline.

    python train_multi_task_counter_stream.py --param_file params/gumbel_mnist/gumbel_matrix.json --out runs/gm

The training script reads the param file once and hands one with ``"dataset": "rotated_mnist"`` to this trainer's
``run``; the flags only this protocol takes (``--steps``, ``--threads``) are its ``arguments``, and the script refuses
the Table 1 trainer's flags for it.

Four tasks (MNIST, MNIST-2, MNIST-Rot, MNIST-Rot-2, ``loaders.rotated_mnist``) on the small routed conv net
(``models.gumbel_matrix.GumbelMatrixMNISTNet``). Training as the original: every step shuffles the task order and
makes one separate update per task on a batch of that task; two Adams (weights, allocation logits); the Gumbel
temperature follows max(min, init / sqrt(update + 1)) over task-updates; optional budget penalty. After the last step
the greedy allocation is evaluated on the train and test split of every task. Writes ``results.json`` and
``allocation.json`` (final allocation + probability snapshots) to ``--out``; ``--dry_run`` prints the parameter
counts. Param-file or CLI mistakes: one line, exit code 2.
"""
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loaders.rotated_mnist import TASKS, load_rotated_mnist
from models.gumbel_matrix import (
    ALLOCATIONS, GumbelMatrixMNISTNet, allocation_matrix, budget_penalty, router_parameters, set_temperature,
    temperature_schedule, weight_parameters)
from runtime import files
from runtime.files import REPO
from training import cli, config
from training.provenance import describe_device, git_commit

EVAL_CHUNK = 2000
LOG_POINTS = 10  # progress lines and allocation snapshots per run

# The keys of this protocol's param files, in training/config.py's form and checked by its checker:
# key: (type, default (REQUIRED = must be given), allowed values or (min, max) range, meaning)
SCHEMA = {
    "exp_id": (str, config.REQUIRED, None, "experiment name; default output dir is runs/gumbel_mnist/<exp_id>/seed<k>"),
    "dataset": (str, "rotated_mnist", ("rotated_mnist",), "the four MNIST tasks of Maziarz et al. Sec. 5.1"),
    "method": (str, config.REQUIRED, ALLOCATIONS, "allocation: learned (gumbel_matrix) or fixed"),
    "num_components": (int, 4, (1, 64), "components per routed layer (no_sharing: 4, one per task)"),
    "batch_size": (int, 16, (1, 1_000_000), "images per task update"),
    "epochs": (int, 10, (1, 100_000), "passes over each task's training set"),
    "lr": (float, 0.005, (1e-8, 10.0), "Adam lr of the weights"),
    "router_lr": (float, 0.005, (1e-8, 10.0), "Adam lr of the allocation logits"),
    "probs_init": (float, 0.5, (1e-6, 1 - 1e-6), "initial probability of every connection"),
    "temperature_init": (float, 50.0, (1e-3, 1e6), "Gumbel-softmax temperature max(min, init / sqrt(update + 1))"),
    "temperature_min": (float, 0.5, (1e-3, 1e6), "the temperature's floor"),
    "budget": (float, 1.0, (0.0, 1.0), "fraction of the routed components a task may use before the penalty"),
    "budget_penalty": (float, 0.0, (0.0, 1e3), "penalty * max(0, mean P - budget); 0 = off"),
    "dropout": (float, 0.5, (0.0, 0.99), "dropout rate of the original's net"),
}


def arguments(group):
    """The training script's flags that only this protocol takes (the shared ones: --param_file, --epochs, --seed,
    --out, --subset, --data_root, --dry_run)."""
    group.add_argument("--steps", type=cli.positive_int, help="training steps, each one update per task (instead of "
                       "--epochs)")
    group.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (default 1)")


def load_params(path, raw=None):
    """The param file at ``path`` (its JSON object ``raw`` when already read), checked against ``SCHEMA``
    (``config.check_keys``) and ``check_allocation``; ParamError (one line) otherwise."""
    if raw is None:
        return check_allocation(config.load_checked(path, SCHEMA), path)
    return check_allocation(config.check_keys(raw, str(Path(path)), SCHEMA), path)


def check_allocation(params, path):
    """The rules that tie a round-robin param file's keys together (also the task clusters' files); ``params``
    itself, or ParamError (one line)."""
    if params["method"] == "no_sharing" and params["num_components"] != len(TASKS):
        raise config.ParamError(f"{path}: key 'num_components' must be {len(TASKS)} (one per task) for method "
                                f"'no_sharing'")
    if params["method"] != "gumbel_matrix" and params["budget_penalty"] > 0:
        raise config.ParamError(f"{path}: key 'budget_penalty' only acts on learned allocations; allowed with method "
                                f"'{params['method']}': 0")
    if params["temperature_min"] > params["temperature_init"]:
        raise config.ParamError(f"{path}: key 'temperature_min' ({params['temperature_min']}) exceeds "
                                f"'temperature_init' ({params['temperature_init']})")
    return params


def build_model(params, num_tasks):
    return GumbelMatrixMNISTNet(num_tasks, params["method"], params["num_components"], params["probs_init"],
                                dropout=params["dropout"])


def to_input(images):
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28] in [0, 1] (the original divides by 255, no mean/std)."""
    return images.unsqueeze(1).float().div_(255.0)


def batches(n, batch_size, generator):
    """Endless mini-batches of indices into one task's training set: a new shuffle every pass, the partial
    last batch of a pass dropped."""
    while True:
        order = torch.randperm(n, generator=generator)
        for begin in range(0, n - batch_size + 1, batch_size):
            yield order[begin:begin + batch_size]


def train(model, tasks_data, params, steps, seed, log=print):
    """Round-robin training (mnist_train.py, ``pathnet/pathnet_lib.py`` PathNet): per step a shuffled task order, one
    forward / backward / update of both Adams per task. Returns the allocation-probability snapshots taken at
    ``LOG_POINTS`` steps."""
    num_tasks = len(tasks_data)
    order_rng = torch.Generator().manual_seed(seed)
    streams = [batches(len(labels), params["batch_size"], torch.Generator().manual_seed(seed * 1000 + 1 + t))
               for t, (_, labels) in enumerate(tasks_data)]
    optimizers = [torch.optim.Adam(weight_parameters(model), lr=params["lr"])]
    if router_parameters(model):
        optimizers.append(torch.optim.Adam(router_parameters(model), lr=params["router_lr"]))
    log_every = max(steps // LOG_POINTS, 1)
    snapshots, loss_sum, update = [], 0.0, 0
    model.train()
    for step in range(steps):
        for t in torch.randperm(num_tasks, generator=order_rng).tolist():
            temperature = temperature_schedule(update, params["temperature_init"], params["temperature_min"])
            set_temperature(model, temperature)
            images, labels = tasks_data[t]
            index = next(streams[t])
            task = torch.full((len(index),), t, dtype=torch.int64)
            loss = F.cross_entropy(model(to_input(images[index]), task), labels[index])
            if params["budget_penalty"] > 0:
                loss = loss + budget_penalty(model, params["budget"], params["budget_penalty"])[t]
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            loss_sum += loss.item()
            update += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            probabilities = allocation_matrix(model, greedy=False)
            snapshots.append({"step": step + 1, "update": update, "temperature": temperature,
                              "probabilities": probabilities.tolist()})
            log(f"step {step + 1}/{steps}  updates {update}  tau {temperature:.3f}  loss {loss_sum / update:.4f}  "
                f"mean P per task {[round(v, 2) for v in probabilities.mean(dim=1).tolist()]}")
    return snapshots


@torch.no_grad()
def evaluate(model, tasks_data):
    """Accuracy in percent per task with the greedy allocation and dropout off (``utils.py`` run_pathnet_evaluation)."""
    model.eval()
    accuracies = []
    for t, (images, labels) in enumerate(tasks_data):
        correct = 0
        for begin in range(0, len(labels), EVAL_CHUNK):
            x = to_input(images[begin:begin + EVAL_CHUNK])
            task = torch.full((len(x),), t, dtype=torch.int64)
            correct += int((model(x, task).argmax(dim=1) == labels[begin:begin + EVAL_CHUNK]).sum())
        accuracies.append(100.0 * correct / len(labels))
    model.train()
    return accuracies


def run(args, raw):
    """The training script's run of a round-robin param file (read by the script into ``raw``) with ``args``."""
    params = load_params(args.param_file, raw)
    if args.dry_run:
        torch.manual_seed(args.seed)
        model = build_model(params, len(TASKS))
        print(json.dumps({"num_weights": sum(p.numel() for p in weight_parameters(model)),
                          "num_logits": sum(p.numel() for p in router_parameters(model))}))
        return 0
    torch.set_num_threads(args.threads)
    try:
        data = load_rotated_mnist(args.data_root, args.subset, args.seed)
    except ValueError as err:
        raise config.ParamError(f"--subset: {err}") from None
    num_train = len(data["train"][0][1])
    if params["batch_size"] > num_train:
        raise config.ParamError(f"{args.param_file}: key 'batch_size' ({params['batch_size']}) exceeds the {num_train} "
                                f"training images")
    steps = args.steps or (args.epochs or params["epochs"]) * num_train // params["batch_size"]
    out = Path(args.out or REPO / "runs" / "gumbel_mnist" / params["exp_id"] / f"seed{args.seed}")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = build_model(params, len(TASKS))
    print(f"{params['exp_id']}: method {params['method']}, {steps} steps x {len(TASKS)} tasks, "
          f"{num_train} training images per task, out {out}", flush=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    snapshots = train(model, data["train"], params, steps, args.seed, log=lambda line: print(line, flush=True))
    train_time = time.perf_counter() - start
    test, train_acc = evaluate(model, data["test"]), evaluate(model, data["train"])
    greedy = allocation_matrix(model)
    results = {
        "command": args.command, "git_commit": git_commit(), "seed": args.seed,
        "device": describe_device(),
        "torch": torch.__version__, "method": params["method"], "subset": args.subset, "steps": steps,
        "updates": steps * len(TASKS), "epochs": round(steps * params["batch_size"] / num_train, 4),
        "tasks": list(TASKS), "test_acc_per_task": test, "test_acc_mean": sum(test) / len(test),
        "train_acc_per_task": train_acc, "train_acc_mean": sum(train_acc) / len(train_acc),
        "allocation": greedy.tolist(), "active_fraction_per_task": greedy.mean(dim=1).tolist(),
        "num_weights": sum(p.numel() for p in weight_parameters(model)),
        "num_logits": sum(p.numel() for p in router_parameters(model)),
        "train_time_s": round(train_time, 2), "wall_time_s": round(time.perf_counter() - start, 2),
        "cpu_time_s": round(time.process_time() - start_cpu, 2), "params": params,
    }
    allocation = {"tasks": list(TASKS), "layers": ["L1", "L2", "L3"], "num_components": params["num_components"],
                  "greedy": greedy.tolist(), "probabilities": allocation_matrix(model, greedy=False).tolist(),
                  "snapshots": snapshots}
    files.write_json(allocation, out / "allocation.json")
    files.write_json(results, out / "results.json")
    print(f"test accuracy per task {[round(a, 2) for a in test]}, mean {results['test_acc_mean']:.2f}; "
          f"greedy allocation {greedy.int().tolist()}; results in {out / 'results.json'}", flush=True)
    return 0
