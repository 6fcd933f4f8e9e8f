"""The time left that ends every epoch line (hand-computed: the median epoch time so far, times the epochs still to
train) and the batch bar, drawn only when stdout is a terminal."""
import io
import sys

import pytest

from training import progress


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.4, "0s"), (44.6, "45s"), (59.4, "59s"), (59.6, "1m00s"), (60, "1m00s"), (725, "12m05s"),
    (3599.4, "59m59s"), (3599.6, "1h00m"), (4330, "1h12m"), (4351, "1h13m"), (36000 + 59 * 60 + 45, "11h00m"),
    (100 * 3600, "100h00m"),
])
def test_duration_shows_seconds_below_a_minute_minutes_below_an_hour_then_hours(seconds, text):
    assert progress.duration(seconds) == text


def records(*times):
    return [{"epoch": epoch, "epoch_time_s": seconds, "train_loss": 1.0} for epoch, seconds in enumerate(times, 1)]


def test_seconds_left_is_the_median_epoch_time_so_far_times_the_epochs_still_to_train():
    # times 10, 50, 12: median 12 (the mean would be 24); 3 of 10 epochs done, 7 left: 84 s
    assert progress.seconds_left(records(10.0, 50.0, 12.0), 10) == 84.0
    # an even count: the median is the mean of the middle two, (12 + 20) / 2 = 16; 6 left: 96 s
    assert progress.seconds_left(records(10.0, 50.0, 12.0, 20.0), 10) == 96.0
    assert progress.duration(progress.seconds_left(records(40.0, 45.6, 47.0), 100)) == "1h14m"  # 97 x 45.6 = 4423 s = 73.7 min
    assert progress.seconds_left(records(10.0, 50.0), 2) == 0.0  # the last epoch: nothing left


def test_seconds_left_of_a_resumed_run_counts_its_recorded_epochs():
    """A resumed run's history holds the epochs before the resume (its metrics.jsonl records): one fast epoch after
    the resume does not make the estimate a fast one."""
    history = records(3600.0, 3600.0, 10.0)
    assert progress.seconds_left(history, 5) == 2 * 3600.0


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_batch_bar_is_drawn_on_a_terminal_only(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert list(progress.batch_bar(2, 10)(range(5))) == [0, 1, 2, 3, 4]
    assert "epoch 3/10" in terminal.getvalue() and "\r" in terminal.getvalue()
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    assert list(progress.batch_bar(2, 10)(range(5))) == [0, 1, 2, 3, 4]
    assert piped.getvalue() == ""
