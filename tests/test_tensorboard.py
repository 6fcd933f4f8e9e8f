"""--tensorboard: without the package, one line and exit 2 before anything is written; with it (a fake
SummaryWriter module here, so that the suite needs no tensorboard), the scalars of every epoch at step = epoch."""
import json
import sys
import types
from collections import defaultdict

import pytest

from runtime import distributed
import train_multi_task_counter_stream as train_script
from training import tensorboard_log
from test_train import param_file

RUN = ["--epochs", 2, "--subset", 300, "--device", "cpu"]


class FakeWriter:
    """Records what SummaryWriter would write: {tag: [(step, value)]}."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.closed = log_dir, purge_step, False
        self.scalars = defaultdict(list)
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars[tag].append((step, value))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeWriter.made = []
    return FakeWriter


def test_without_tensorboard_one_line_and_exit_2_before_any_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    out = tmp_path / "run"
    code = train_script.main(["--param_file", str(param_file(tmp_path)), *map(str, RUN), "--out", str(out),
                              "--tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --tensorboard needs the tensorboard package") and "pip install tensorboard" in err
    assert not out.exists()


def test_every_epoch_is_logged_with_loss_accuracy_lr_and_task_weights(tmp_path, capsys, fake_tensorboard,
                                                                      one_thread):
    out = tmp_path / "run"
    params = param_file(tmp_path, method="kendall", batch_size=64, eval_every=2)
    assert train_script.main(["--param_file", str(params), *map(str, RUN), "--out", str(out), "--tensorboard"]) == 0
    (writer,) = fake_tensorboard.made
    assert writer.log_dir == str(out / "tensorboard") and writer.purge_step is None and writer.closed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert writer.scalars["loss/train"] == [(1, records[0]["train_loss"]), (2, records[1]["train_loss"])]
    assert writer.scalars["lr"] == [(1, 0.003), (2, 0.003)]
    evaluated = records[1]  # eval_every 2: only epoch 2 has accuracies
    assert "test_acc_mean" not in records[0]
    for split in ("val", "test"):
        assert writer.scalars[f"accuracy_{split}/mean"] == [(2, evaluated[f"{split}_acc_mean"])]
        for task in (0, 1):
            assert writer.scalars[f"accuracy_{split}/task_{task}"] == [(2, evaluated[f"{split}_acc_per_task"][task])]
    for task in (0, 1):
        assert writer.scalars[f"task_weight/task_{task}"] == [(e + 1, records[e]["task_weights"][task]) for e in (0, 1)]
    assert len(writer.scalars) == 2 + 2 * 3 + 2


def test_a_resumed_run_purges_the_steps_after_its_checkpoint(tmp_path):
    writer = tensorboard_log.open_writer(FakeWriter, tmp_path, 3)
    assert writer.purge_step == 4 and writer.log_dir == str(tmp_path / "tensorboard")


def test_only_rank_0_writes(tmp_path, capsys, fake_tensorboard, monkeypatch, one_thread):
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # this process plays a rank other than 0
    out = tmp_path / "run"
    params = param_file(tmp_path, batch_size=64)
    assert train_script.main(["--param_file", str(params), "--epochs", "1", "--subset", "300", "--device", "cpu",
                              "--out", str(out), "--tensorboard"]) == 0
    assert fake_tensorboard.made == []
