"""Per-task accuracy (paper §4.4: the mean over tasks of each task's accuracy, in percent).

Labels of -1 mark images on which a task is not defined (9 digits by reference); they are not counted.
Counts accumulate on the device, so evaluation needs one host sync at the end.
"""
import torch


class TaskAccuracy:
    """Correct predictions and valid labels per task."""

    def __init__(self, num_tasks, device):
        self.correct = torch.zeros(num_tasks, dtype=torch.int64, device=device)
        self.count = torch.zeros(num_tasks, dtype=torch.int64, device=device)

    def update(self, predictions, labels):
        """predictions and labels [T, B] (task-major)."""
        valid = labels >= 0
        self.correct += ((predictions == labels) & valid).sum(dim=-1)
        self.count += valid.sum(dim=-1)

    def update_pairs(self, tasks, predictions, labels):
        """One (image, task) pair per entry, all with a valid label: tasks, predictions, labels [P]."""
        self.correct.index_add_(0, tasks, (predictions == labels).long())
        self.count.index_add_(0, tasks, torch.ones_like(tasks))

    def per_task(self):
        """Accuracy per task in percent [T]; NaN for a task with no valid image."""
        count = self.count.double()
        return (100.0 * self.correct.double() / count).where(count > 0, torch.nan).cpu()

    def mean(self):
        return float(self.per_task().nanmean())


# How a run's reported test figure is chosen (results.json, experiments/table2.py --select): the metrics.jsonl key that
# picks the epoch; "last" is the last evaluated epoch.
SELECTIONS = {"best_val": "val_acc_mean", "best_test": "test_acc_mean", "last": None}


def select_record(history, selection):
    """The epoch record (a metrics.jsonl line) that ``selection`` reports: the first evaluated epoch with the
    highest validation (``best_val``) or test (``best_test``, the authors' choice: optimistic) accuracy, or the
    last evaluated one (``last``); None when no record has the key (no validation split: the authors' protocol)."""
    key = SELECTIONS[selection]
    scored = [record for record in history if record.get(key or "test_acc_mean") is not None]
    if not scored:
        return None
    return scored[-1] if key is None else max(scored, key=lambda record: record[key])
