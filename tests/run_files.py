"""Reading a run's files in tests."""
import json

TIMING = ("epoch_time_s", "time")  # the only metrics.jsonl fields that differ between two runs of the same epochs


def metrics_without_timing(run_dir):
    """metrics.jsonl of ``run_dir`` as a list of records, without the wall-clock fields."""
    return [{key: value for key, value in json.loads(line).items() if key not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
