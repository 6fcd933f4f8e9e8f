"""A run's results.json: what trained where (``run_info``), its three test figures (``reported_figures``), written
at the end (``write_results``); and the parameter counts of the paper's #P."""
from models import count_parameters, unit_counts
from metrics import select_record
from runtime import distributed, files, precision
from training import config
from training.provenance import describe_device, git_commit
from training.run_dir import log, write

# protocol -> the selection whose epoch best_model.pt keeps: the held-out validation split, or (the authors' released
# script, TD_MultiTask train_multi_task_counter_stream.py: `_model_best` by accuracy on the test split) the test split.
KEPT_MODEL = {"held_out": "best_val", "authors": "best_test"}


def parameter_counts(params, model):
    """Parameters and weights (parameters without biases), also as multiples of the plain backbone: the paper's #P
    (one LeNet in Table 2; "the corresponding BU architecture" in Table 3)."""
    num_params, num_weights = count_parameters(model)
    unit_params, unit_weights = unit_counts(**config.backbone_kwargs(params))
    return {"method": params["method"], "setting": params["setting"], "num_params": num_params,
            "num_weights": num_weights, "params_x": round(num_params / unit_params, 4),
            "weights_x": round(num_weights / unit_weights, 4)}


def run_info(args, params, epochs, device, fingerprint, model, stack_mode):
    """The entries of results.json that every run of the command shares."""
    info = {"command": args.command,
            "git_commit": git_commit(), "device": describe_device(device),
            "cuda_fp32_precision": precision.float32_precision(), "world_size": distributed.world_size(),
            "epochs": epochs, "method": params["method"], "setting": params["setting"],
            "subset": args.subset, "overrides": args.set, "data_fingerprint": fingerprint,
            "protocol": params["protocol"], **parameter_counts(params, model)}
    if len(args.seeds) > 1:
        info["stacked"] = {"seeds": args.seeds, "mode": stack_mode}
    return info


def reported_figures(history, kept):
    """results.json's three test figures from the epoch records: at the best-validation epoch (``best_epoch``,
    ``test_acc_mean``, ...; null without a validation split), at the best test epoch (``test_acc_mean_best_test``:
    the authors' selection, optimistic) and at the last epoch (``test_acc_mean_last``); and which one best_model.pt
    holds (``kept``)."""
    val, test, last = (select_record(history, selection) for selection in ("best_val", "best_test", "last"))
    at_val = {key: None if val is None else val[key]
              for key in ("epoch", "val_acc_mean", "test_acc_mean", "test_acc_per_task", "val_acc_per_task")}
    return {"best_epoch": at_val.pop("epoch"), **at_val,
            "best_test_epoch": test["epoch"], "test_acc_mean_best_test": test["test_acc_mean"],
            "test_acc_per_task_best_test": test["test_acc_per_task"],
            "last_epoch": last["epoch"], "test_acc_mean_last": last["test_acc_mean"],
            "test_acc_per_task_last": last["test_acc_per_task"],
            "best_model_selection": kept, "best_model_epoch": {"best_val": val, "best_test": test}[kept]["epoch"]}


def write_results(info, seed, state, params, out, name=""):
    """results.json of the finished run in ``out`` (rank 0) and its last log line (``name``: the run's, in a
    stacked group)."""
    kept = KEPT_MODEL[params["protocol"]]
    results = {**info, **history_of(state), "seed": seed, **reported_figures(state["history"], kept),
               **({"active_fraction_per_task": state["best"]["active_fraction_per_task"]}
                  if "active_fraction_per_task" in state["best"] else {}),
               "wall_time_s": round(state["wall_time_s"], 2), "params": params}
    distributed.on_main(write, files.write_json, results, out / "results.json")
    at_val = "none at a best-validation epoch (protocol authors: no validation split)"
    if results["best_epoch"] is not None:
        at_val = f"at the best-validation epoch {results['best_epoch']}: {results['test_acc_mean']:.2f}"
    log(f"{name}test accuracy {at_val}; at the best test epoch {results['best_test_epoch']} "
        f"(optimistic): {results['test_acc_mean_best_test']:.2f}; at the last epoch: "
        f"{results['test_acc_mean_last']:.2f}; best_model.pt: epoch {results['best_model_epoch']} "
        f"({results['best_model_selection']}); results in {out / 'results.json'}")


SCHEDULE = ("--epochs", "lr", "lr_schedule")  # a forced change of one of these changes the lr of the epochs after it


def history_of(state):
    """How the run came to be: the command that started it (``command``), the ``--resume`` commands with the epoch
    each continued from (``resumed``), what a ``--force``d resume changed (``forced_changes``) and the first epoch
    after which the lr schedule changed (``schedule_changed_at_epoch``, null if it never did)."""
    first, *resumes = state["commands"]
    changed = [change["epoch"] for change in state["forced_changes"]
               if any(item.split(" ")[0] in SCHEDULE for item in change["changed"])]
    return {"command": first["command"], "resumed": resumes, "forced_changes": state["forced_changes"],
            "schedule_changed_at_epoch": changed[0] if changed else None}


def interrupted_message(out, epoch, epochs, command):
    """Where an interrupted run stands: the epoch reached, the last checkpoint, the command that continues it."""
    if epoch == 0:
        kept = "no epoch finished, so no checkpoint was written; run the same command to start again"
    else:
        resume = command if " --resume" in f"{command} " else f"{command} --resume"
        kept = f"the last checkpoint is {out / 'checkpoint.pt'}; continue with: {resume}"
    return f"stopped in epoch {epoch + 1} of {epochs} ({epoch} finished); {kept}"
