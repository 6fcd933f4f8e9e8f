"""The output folder of a run: checked and locked at the start (``run_lock``), its train.log, its atomic writes, and
the checkpoint a ``--resume`` continues from, checked against the run's settings."""
from datetime import datetime, timezone

from tqdm import tqdm

from runtime import distributed, files
from training import checkpoint, config, run_lock
from training.cli import RunError


LOG_FILES = []  # train.log of the run in progress (rank 0)


def log(message):
    """One line on stdout and in the run's train.log, from rank 0 only."""
    if distributed.is_main():
        tqdm.write(message)
        for path in LOG_FILES:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {message}\n")


def open_log(*outs):
    """From now on ``log`` also appends to the train.log of every run dir ``outs`` (a resumed run appends to the same
    file)."""
    LOG_FILES[:] = [out / "train.log" for out in outs]


def close_log():
    """``log`` writes to stdout only again (the run has ended)."""
    LOG_FILES.clear()


def check_writable(out):
    """Creates ``out`` and writes a probe file into it; RunError (one line) if it cannot."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        files.write_text("ok", out / ".write_probe")
        (out / ".write_probe").unlink()
    except OSError as err:
        raise RunError(f"output dir {out} is not writable: {err.strerror or err}; choose another with --out") from None


def prepare_output_dir(out, resume, command):
    """Fails at start, not after hours of training, when the output dir is unusable or already in use; locks it
    for this process (``run_lock``: a second run into it exits 2 naming the holder)."""
    check_writable(out)
    stale = run_lock.acquire(out, command)
    if stale:
        log(f"note: {out} was left locked by a run that no longer exists ({run_lock.describe(stale)}); taken over")
    if (out / "checkpoint.pt").exists() and not resume:
        raise config.ParamError(f"--out: {out} already holds a run (checkpoint.pt); pass --resume to continue it, "
                                f"or choose another --out")
    if resume:
        for leftover in out.glob("*.tmp"):  # left by a write that a kill interrupted
            leftover.unlink()


CHECKPOINT_KEYS = {"model", "optimizer", "weighting", "params", "seed", "epochs", "epoch", "history", "best",
                   "wall_time_s"}


def read_checkpoint(path, params, args, epochs):
    """The checkpoint to resume from (None if there is none yet), checked against this run's settings."""
    if not path.exists():
        return None
    try:
        saved = checkpoint.load(path)
    except (checkpoint.CheckpointError, OSError) as err:
        raise RunError(f"cannot resume: {err}; move it away to start the run again") from None
    missing = CHECKPOINT_KEYS - set(saved) if isinstance(saved, dict) else CHECKPOINT_KEYS
    if missing:
        raise RunError(f"cannot resume: {path} is not a checkpoint of this script (it lacks "
                       f"{', '.join(sorted(missing))}); move it away to start the run again")
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
    return saved


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
