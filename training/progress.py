"""What the training script shows while a run trains, beside its epoch lines: the time the run has left, which ends
every epoch line, and on a terminal a progress bar over the batches of the epoch.

The time left is the epochs still to train times the median of the run's epoch times so far (``epoch_time_s`` of
its epoch records: training and evaluation; a resumed run's earlier epochs are in its history, the records of its
metrics.jsonl). The median, not the mean: a slow first epoch (data on the device, a CUDA graph captured) or an
evaluated epoch among unevaluated ones does not skew it. After the last epoch it is ``0s``.

The bar is drawn on rank 0 only, and only when stdout is a terminal: in a log file, a pipe or a batch job's output
there are no bar frames, only the epoch lines (train.log never has any: it is written by its own logging handler).
"""
import statistics
import sys
from functools import partial

from tqdm import tqdm

from runtime import distributed


def duration(seconds):
    """'45s' below a minute, '12m05s' below an hour, '1h12m' from an hour (rounded to the unit shown last)."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def seconds_left(history, epochs):
    """The seconds the run has left after the last of its epoch records ``history`` (each with ``epoch`` and
    ``epoch_time_s``) when it trains ``epochs`` epochs: the epochs still to train times the median epoch time."""
    times = [record["epoch_time_s"] for record in history if isinstance(record.get("epoch_time_s"), (int, float))]
    return max(0, epochs - history[-1]["epoch"]) * statistics.median(times)


def batch_bar(epoch, epochs):
    """The wrapper of epoch ``epoch``'s (0-based) batch iteration: a bar that ``tqdm.write`` (the log lines) clears
    and redraws when stdout is a terminal on rank 0, else the iteration as it is."""
    if not (distributed.is_main() and sys.stdout.isatty()):
        return iter
    return partial(tqdm, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, file=sys.stdout,
                   dynamic_ncols=True)
