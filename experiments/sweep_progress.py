"""What a running Table 2 sweep shows: the epoch x/N of every running cell, the sweep's time left, and one line per
event (a cell started, finished, failed or was skipped).

On a terminal the sweep draws progress bars (one for the sweep, in epochs, one per running cell); wherever the
output is not a terminal (a log, ``nohup``, a batch job) it prints plain status lines instead, every
``status_every`` seconds, and the same lines, each with its UTC time (and the shard of a sharded sweep), go to the
sweep's log file (``<runs_dir>/sweep.log``): no bar frames in a file.

Everything is read from the files the runs already write: a cell's last epoch and its epoch times from its
metrics.jsonl. The time left of a cell is its epochs still to train times its median epoch time (of its last ten
epochs); a cell without an epoch time yet takes the median of the cells of the same method and setting (finished
or running), else it is counted as not yet timed. The sweep's time left is the larger of the longest running job's
and the sum over every job still to finish divided by the workers.
"""
import json
import statistics
import sys
import threading
import time
from datetime import datetime, timezone

from tqdm import tqdm

RECENT = 10  # epochs whose median time is a cell's pace


def epoch_records(out):
    """The epoch records of ``out``/metrics.jsonl ([] when there is none); a line being written, or unreadable, is
    skipped."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def cell_progress(out):
    """(last epoch recorded, median seconds per epoch of the last ten, or None without epoch times)."""
    records = epoch_records(out)
    times = [record["epoch_time_s"] for record in records[-RECENT:]
             if isinstance(record.get("epoch_time_s"), (int, float))]
    return (records[-1]["epoch"] if records else 0), (statistics.median(times) if times else None)


def duration(seconds):
    """'45 s', '12 min', '2.3 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Progress:
    """The display and the log of one sweep invocation. ``jobs``: the training processes to run (lists of cells,
    each a dict with ``name``, ``setting``, ``method``, ``out``); ``done``: the cells finished before it started
    (their paces time the cells not yet started). ``started`` may be called from the worker threads; everything
    else runs in the main thread."""

    def __init__(self, jobs, done, epochs, workers, log_path, status_every, tag="", bars=None, plain=None):
        self.jobs, self.epochs, self.workers, self.tag = jobs, epochs, workers, tag
        self.log_path, self.status_every = log_path, status_every
        self.bars = sys.stderr.isatty() if bars is None else bars
        self.plain = (not self.bars or not sys.stdout.isatty()) if plain is None else plain
        self.lock = threading.Lock()
        self.running, self.ended, self.cell_bars = {}, set(), {}  # running: name -> cell; ended: names
        self.paces = {}  # (setting, method) -> [seconds per epoch of its timed cells]
        for cell in done:
            self.learn(cell)
        self.queued = {cell["name"]: cell_progress(cell["out"]) for job in jobs for cell in job}
        self.num_cells = len(done) + sum(len(job) for job in jobs)
        self.num_done, self.num_failed = len(done), 0
        self.start = self.last_status = time.monotonic()
        self.announced = set()
        self.bar = tqdm(total=self.num_cells * epochs, unit="epoch", desc="table 2 sweep", disable=not self.bars,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs [{elapsed}{postfix}]")

    def learn(self, cell):
        _, pace = cell_progress(cell["out"])
        if pace is not None:
            self.paces.setdefault((cell["setting"], cell["method"]), []).append(pace)

    def started(self, job):
        with self.lock:
            self.running.update((cell["name"], cell) for cell in job)

    def finished(self, job, failed):
        """A job ended: its cells count as done (or failed) and time the cells of their method and setting."""
        with self.lock:
            for cell in job:
                self.running.pop(cell["name"], None)
        for cell in job:
            self.ended.add(cell["name"])
            self.learn(cell)
            bar = self.cell_bars.pop(cell["name"], None)
            if bar is not None:
                bar.close()
        self.num_failed += failed
        self.num_done += len(job) - failed

    def left_out(self, cell, done):
        """A cell that another run took (or finished, ``done``) before this sweep started it."""
        self.ended.add(cell["name"])
        if done:
            self.num_done += 1
        else:
            self.num_cells -= 1
            self.bar.total -= self.epochs

    def say(self, text, error=False):
        """One event line: on the terminal (above the bars) and, with its time, in the log."""
        stream = sys.stderr if error else sys.stdout
        if self.bars:
            tqdm.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)
        self.write_log(text)

    def write_log(self, text):
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(f"{now()} {self.tag}{text}\n")

    def announce(self, only=None):
        """A line for every cell (of the cells ``only``) that started since the last call; returns the running
        cells."""
        with self.lock:
            running = list(self.running.values())
        for cell in running:
            if cell["name"] not in self.announced and (only is None or cell in only):
                self.announced.add(cell["name"])
                epoch = self.queued[cell["name"]][0]
                self.say(f"started {cell['name']}" + (f" (resumed after epoch {epoch})" if epoch else ""))
        return running

    def tick(self):
        """Refreshes the bars; every ``status_every`` seconds one status line into the log and, where the output is
        not a terminal, on stdout."""
        running = self.announce()
        states = {cell["name"]: (cell, *cell_progress(cell["out"])) for cell in running}
        left, untimed = self.time_left(states)
        if self.bars:
            self.draw(states, left, untimed)
        if time.monotonic() - self.last_status >= self.status_every:
            self.last_status = time.monotonic()
            line = self.status_line(states, left, untimed)
            if self.plain:
                print(line, flush=True)
            self.write_log(line)

    def position(self, cell, states):
        """(epoch, own pace or None) of a cell still to finish: read now if it runs, else as it was at the start."""
        return states[cell["name"]][1:] if cell["name"] in states else self.queued[cell["name"]]

    def unfinished(self):
        """The jobs still to finish, each with its cells still to finish."""
        jobs = [[cell for cell in job if cell["name"] not in self.ended] for job in self.jobs]
        return [job for job in jobs if job]

    def time_left(self, states):
        """(seconds the sweep has left, or None when nothing is timed yet; cells not yet timed)."""
        paces = {key: list(values) for key, values in self.paces.items()}
        for cell, _, pace in states.values():  # a running cell times the queued seeds of its method and setting
            if pace is not None:
                paces.setdefault((cell["setting"], cell["method"]), []).append(pace)
        jobs_left, running_left, untimed = [], [], 0
        for job in self.unfinished():
            cells_left = []
            for cell in job:
                epoch, pace = self.position(cell, states)
                known = paces.get((cell["setting"], cell["method"]))
                pace = pace if pace is not None else statistics.median(known) if known else None
                if pace is None:
                    untimed += 1
                else:
                    cells_left.append(max(0, self.epochs - epoch) * pace)
            job_left = max(cells_left, default=0.0)  # the cells of a stacked job train together
            jobs_left.append(job_left)
            if any(cell["name"] in states for cell in job):
                running_left.append(job_left)
        if untimed and not any(jobs_left):  # nothing timed: no figure rather than a wrong one
            return None, untimed
        return max(max(running_left, default=0.0), sum(jobs_left) / self.workers), untimed

    def epochs_done(self, states):
        """Epochs trained by the sweep's cells; a finished or failed cell counts in full (nothing more to train)."""
        done = (self.num_done + self.num_failed) * self.epochs
        return done + sum(self.position(cell, states)[0] for job in self.unfinished() for cell in job)

    def left_text(self, left, untimed):
        if left is None:
            return f"time left: not yet known ({untimed} cell(s) without an epoch time yet)"
        return f"time left about {duration(left)}" + (f" + {untimed} cell(s) not yet timed" if untimed else "")

    def status_line(self, states, left, untimed):
        running = ", ".join(f"{name} epoch {epoch}/{self.epochs}" + (f" ({pace:.1f} s/epoch)" if pace else "")
                            for name, (_, epoch, pace) in states.items())
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        return (f"status: {self.num_done} of {self.num_cells} cells done{failed}, "
                f"{duration(time.monotonic() - self.start)} elapsed; running: {running or 'none'}; "
                f"{self.left_text(left, untimed)}")

    def draw(self, states, left, untimed):
        for position, (name, (_, epoch, pace)) in enumerate(states.items(), start=1):
            if name not in self.cell_bars:
                self.cell_bars[name] = tqdm(total=self.epochs, desc=name, unit="epoch", leave=False,
                                            position=position, bar_format="{desc}: {n_fmt}/{total_fmt} epochs |{bar}| "
                                                                          "[{elapsed}{postfix}]")
            bar = self.cell_bars[name]
            bar.n = epoch
            bar.set_postfix_str(f"{pace:.1f} s/epoch" if pace else "", refresh=True)
        self.bar.n = min(self.epochs_done(states), self.bar.total)
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        self.bar.set_postfix_str(f"{self.num_done}/{self.num_cells} cells{failed}; {self.left_text(left, untimed)}",
                                 refresh=True)

    def close(self):
        for bar in self.cell_bars.values():
            bar.close()
        self.bar.close()
