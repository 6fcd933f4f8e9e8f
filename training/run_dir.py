"""The output folder of a run: where it is (``run_dirs``), checked and locked at the start (``run_lock``), its
train.log, its atomic writes and end-of-epoch files, and the checkpoint a ``--resume`` continues from, checked
against the run's settings and data."""
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from runtime import distributed, files
from runtime.files import REPO
from training import checkpoint, config, run_lock
from training.cli import RunError

LOGGER = logging.getLogger("training.run")  # train.log of the runs in progress (rank 0): one FileHandler each
LOGGER.setLevel(logging.INFO)
LOGGER.propagate = False


class _UtcFormatter(logging.Formatter):
    def format(self, record):
        return f"{datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec='seconds')} " \
               f"{record.getMessage()}"


def log(message):
    """One line on stdout and in the run's train.log, from rank 0 only."""
    if distributed.is_main():
        tqdm.write(message)
        LOGGER.info(message)


def note(message):
    """One line in the run's train.log only (rank 0), for what the caller prints to stderr itself."""
    if distributed.is_main():
        LOGGER.info(message)


def open_log(*outs):
    """From now on ``log`` also appends to the train.log of every run dir ``outs`` (a resumed run appends to the same
    file)."""
    close_log()
    for out in outs:
        handler = logging.FileHandler(out / "train.log", encoding="utf-8")
        handler.setFormatter(_UtcFormatter())
        LOGGER.addHandler(handler)


def close_log():
    """``log`` writes to stdout only again (the run has ended)."""
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
        handler.close()


def run_dirs(out, exp_id, seeds):
    """The output dir of every seed: ``out`` (default runs/<exp_id>/seed<k>) for one seed, <out>/seed<k> (default
    runs/<exp_id>/seed<k>) for each seed of a stacked group (``--seeds``)."""
    if len(seeds) == 1:
        return [Path(out or REPO / "runs" / exp_id / f"seed{seeds[0]}")]
    return [Path(out or REPO / "runs" / exp_id) / f"seed{seed}" for seed in seeds]


def check_writable(out):
    """Creates ``out`` and writes a probe file into it; RunError (one line) if it cannot."""
    if out.exists() and not out.is_dir():
        raise config.ParamError(f"--out: {out} is a file, not a folder; choose a folder with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        files.write_text("ok", out / ".write_probe")
        (out / ".write_probe").unlink()
    except OSError as err:
        raise RunError(f"output dir {out} is not writable: {err.strerror or err}; choose another with --out") from None


RUN_FILES = ("results.json", "metrics.jsonl", "best_model.pt", "checkpoint.pt")  # a folder with one holds a run
MOVED_ASIDE = RUN_FILES + ("train.log", "eval.json", "tensorboard")  # what --overwrite moves into replaced_<time>/


def prepare_output_dir(out, resume, command, overwrite=None, own_files=()):
    """Fails at start, not after hours of training, when the output dir is unusable, in use or holds a run that this
    command would overwrite; locks it for this process (``run_lock``: a second run into it exits 2 naming the
    holder), and releases it again when it refuses. ``overwrite`` True: the old run's files (and a script's
    ``own_files``) move into a dated subfolder; None: not checked (a script without ``--overwrite``)."""
    check_writable(out)
    stale = run_lock.acquire(out, command)
    if stale:
        log(f"note: {out} was left locked by a run that no longer exists ({run_lock.describe(stale)}); taken over")
    try:
        if overwrite is not None:
            check_run_files(out, resume, overwrite)
        if overwrite:
            move_aside(out, own_files)
    except BaseException:
        run_lock.release(out)
        raise
    if resume:
        for leftover in out.glob("*.tmp"):  # left by a write that a kill interrupted
            leftover.unlink()


def check_run_files(out, resume, overwrite):
    """ParamError (one line naming the files and the choices) when a run's files in ``out`` would be overwritten:
    a new run without ``overwrite``, or ``resume`` without a checkpoint to continue from."""
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present or overwrite or (resume and "checkpoint.pt" in present):
        return
    aside = f"pass --overwrite to start again with its files moved into {out / 'replaced_<UTC time>'}"
    if resume:
        raise config.ParamError(f"--resume: {out} holds a run's files ({', '.join(present)}) but no checkpoint.pt "
                                f"to continue from; choose another --out, or drop --resume and {aside}")
    again = "pass --resume to continue it, " if "checkpoint.pt" in present else ""
    raise config.ParamError(f"--out: {out} already holds a run ({', '.join(present)}); {again}choose another --out, "
                            f"or {aside}")


def move_aside(out, own_files=()):
    """Moves the files of the run in ``out`` (``MOVED_ASIDE`` and ``own_files``) into ``out/replaced_<UTC time>/``;
    nothing deleted."""
    present = [name for name in MOVED_ASIDE + tuple(own_files) if (out / name).exists()]
    if not present:
        return
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = out / f"replaced_{stamp}"
    for k in range(2, 1000):
        if not aside.exists():
            break
        aside = out / f"replaced_{stamp}_{k}"
    aside.mkdir()
    for name in present:
        (out / name).replace(aside / name)
    log(f"--overwrite: moved {', '.join(present)} of the run in {out} into {aside}")


CHECKPOINT_KEYS = {"model", "optimizer", "weighting", "params", "seed", "epochs", "epoch", "history", "best",
                   "wall_time_s"}


START_AGAIN = "to start the run again, keeping its files in a dated subfolder, drop --resume and pass --overwrite"


def read_checkpoint(path, params, args, epochs):
    """The checkpoint to resume from (None if there is none yet), checked against this run's settings."""
    if not path.exists():
        return None
    try:
        saved = checkpoint.load(path)
    except (checkpoint.CheckpointError, OSError) as err:
        raise RunError(f"cannot resume: {err}; {START_AGAIN}") from None
    missing = CHECKPOINT_KEYS - set(saved) if isinstance(saved, dict) else CHECKPOINT_KEYS
    if missing:
        raise RunError(f"cannot resume: {path} is not a checkpoint of this script (it lacks "
                       f"{', '.join(sorted(missing))}); {START_AGAIN}")
    before = {key: entry[1] for key, entry in config.SCHEMA.items() if entry[1] is not config.REQUIRED}
    before.update(saved["params"])  # a key added to the schema since the checkpoint was written has its default
    changed = sorted(key for key in set(params) | set(before) if params.get(key) != before.get(key))
    if saved["seed"] != args.seed:
        changed.append(f"--seed ({saved['seed']} -> {args.seed})")
    if saved["epochs"] != epochs:
        changed.append(f"--epochs ({saved['epochs']} -> {epochs}, which changes the lr schedule)")
    if saved.get("subset", args.subset) != args.subset:  # checkpoints before the subset was recorded: not checked
        changed.append(f"--subset ({saved['subset']} -> {args.subset}, which changes the data)")
    if changed and not args.force:
        raise config.ParamError(f"--resume: {path} was made with other settings ({', '.join(changed)}); "
                                f"pass --force to resume anyway, or choose another --out")
    return {**saved, "forced": changed}


def read_checkpoints(outs, params, args, epochs):
    """The checkpoint of every run dir to resume from (None for a run that starts), or None when every run has
    finished (logged: nothing to do); ParamError when only some of a group have."""
    saved = [distributed.on_main(read_checkpoint, out / "checkpoint.pt", params, _with_seed(args, seed), epochs)
             if args.resume else None for seed, out in zip(args.seeds, outs)]
    finished = [s is not None and s["epoch"] >= epochs and (out / "results.json").exists()
                for s, out in zip(saved, outs)]
    if all(finished):
        for s, out in zip(saved, outs):
            log(f"{out} holds a finished run ({s['epoch']} of {epochs} epochs); nothing to do, nothing changed")
        return None
    if any(finished):
        done = [seed for seed, f in zip(args.seeds, finished) if f]
        raise config.ParamError(f"--seeds: seed(s) {done} have finished runs in {outs[0].parent}; give --seeds the "
                                f"others only")
    return saved


def _with_seed(args, seed):
    return type(args)(**{**vars(args), "seed": seed})


def start_state(saved, out, params, objects, command):
    """A run's state (epoch, history, best, wall time, the commands that trained it and the changes a ``--force``d
    resume made): a fresh one, or ``saved``'s, loaded into its (model, weighting, optimiser) ``objects``, with
    metrics.jsonl written anew from the checkpoint's history."""
    if saved is None:
        return {"epoch": 0, "history": [], "best": None, "wall_time_s": 0.0,
                "commands": [{"command": command, "epoch": 0}], "forced_changes": []}
    state = resume(saved, out / "checkpoint.pt", params, *objects)
    distributed.on_main(write_metrics, out, state["history"])  # a kill after checkpoint.pt left it an epoch short
    at = {"epoch": saved["epoch"]}
    state["commands"] = saved.get("commands", [{"command": None, "epoch": 0}]) + [{"command": command, **at}]
    state["forced_changes"] = saved.get("forced_changes", []) + ([{**at, "changed": saved["forced"]}]
                                                                 if saved["forced"] else [])
    return state


def check_same_epoch(seeds, states):
    """A stacked group trains in step: ParamError (one line) when its runs stand at different epochs."""
    if len({state["epoch"] for state in states}) > 1:
        where = ", ".join(f"seed {seed}: {state['epoch']}" for seed, state in zip(seeds, states))
        raise config.ParamError(f"--seeds: the runs stand at different epochs ({where}); a stacked group trains in "
                                f"step, resume them with one --seed each")


def check_fingerprints(saved, outs, states, fingerprint, force):
    """A resumed run continues on its own data: ParamError (one line) unless ``force``, and then the change is one
    of the run's ``forced_changes``."""
    for s, out, state in zip(saved, outs, states):
        if s is None or s.get("data_fingerprint", fingerprint) == fingerprint:
            continue
        if not force:
            raise config.ParamError(f"--resume: {out / 'checkpoint.pt'} was trained on other data (fingerprint "
                                    f"{s['data_fingerprint']}, now {fingerprint}: another --data_root or data "
                                    f"files); pass --force to resume anyway, or choose another --out")
        change = f"data ({s['data_fingerprint']} -> {fingerprint})"
        if state["forced_changes"] and state["forced_changes"][-1]["epoch"] == s["epoch"]:
            state["forced_changes"][-1]["changed"].append(change)
        else:
            state["forced_changes"].append({"epoch": s["epoch"], "changed": [change]})


def save_epoch(out, objects, params, args, seed, epochs, state, best):
    """The end-of-epoch files (rank 0) of the run in ``out`` from its (model, weighting, optimiser) state dicts
    ``objects``: best_model.pt on a new best, checkpoint.pt, metrics.jsonl."""
    model, weighting, optimizer = objects
    if best:
        write(checkpoint.save, {"epoch": state["epoch"], "model": model, "params": params}, out / "best_model.pt")
    write(checkpoint.save, {"model": model, "optimizer": optimizer, "weighting": weighting, "params": params,
                            "seed": seed, "epochs": epochs, "subset": args.subset, **state}, out / "checkpoint.pt")
    write_metrics(out, state["history"])


def write_metrics(out, history):
    """metrics.jsonl: one line per epoch of ``history`` (the checkpoint's, of which it is a copy)."""
    write(files.write_text, "".join(json.dumps(r) + "\n" for r in history), out / "metrics.jsonl")


def resume(saved, path, params, model, weighting, optimizer):
    """Loads a checkpoint (``read_checkpoint``'s) into the model, the weighting and the optimiser."""
    try:
        model.load_state_dict(saved["model"])
        if params["optimizer"] == saved["params"].get("optimizer"):
            optimizer.load_state_dict(saved["optimizer"])
        else:  # another optimiser's state does not fit (Adam needs its step counts): start it afresh
            log(f"optimizer changed to {params['optimizer']}: its state starts afresh")
        if weighting is not None:
            weighting.load_state_dict(saved["weighting"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise RunError(f"cannot resume: {path} does not fit model '{params['model']}' / weighting "
                       f"'{params['weighting']}' ({' '.join(str(err).split())[:200]}); choose another --out") from None
    log(f"resumed from {path} at epoch {saved['epoch']}")
    return {key: saved[key] for key in ("epoch", "history", "best", "wall_time_s")}


def write(writer, obj, path):
    try:
        writer(obj, path)
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}; the previous version of that file is intact") \
            from None
