"""The training script run in the test's process, on a param file of the test's own."""
import json

import train_multi_task_counter_stream as train_script


def write_params(directory, params):
    """``params`` as ``directory``/params.json; its path."""
    path = directory / "params.json"
    path.write_text(json.dumps(params))
    return path


def run_main(capsys, *args):
    """The training script's ``main`` on ``args``: (exit code, stdout, stderr)."""
    code = train_script.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
