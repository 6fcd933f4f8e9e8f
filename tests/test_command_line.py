"""The training script's one command line for both trainers: every committed result's recorded command still
parses and picks the trainer that made it; a flag of the other trainer fails with one line and exit 2; the param
file is read once per run."""
import builtins
import io
import json
import re
import shlex
from pathlib import Path

import pytest

import train_multi_task_counter_stream as train_script
from tiny_rotated_mnist import use_tiny_rotated_mnist
from training import cli, config

REPO = Path(__file__).resolve().parents[1]
# The round-robin trainer's own script of the day (docs/architecture.md, "Where things moved"): the same arguments
# are the training script's today.
ROUND_ROBIN_SCRIPT = "gumbel_experiment.py"
SCRIPT = "train_multi_task_counter_stream.py"


def recorded_commands():
    """(results file, its recorded command) of every committed result made by the training script or by the
    round-robin trainer's own script of its day."""
    found = []
    for path in sorted(REPO.glob("results/**/results.json")):
        command = json.loads(path.read_text()).get("command")
        if isinstance(command, str) and shlex.split(command)[1] in (SCRIPT, ROUND_ROBIN_SCRIPT):
            found.append((path.relative_to(REPO).as_posix(), command))
    return found


def recorded_param_file(recorded, results):
    """The JSON object of the param file ``recorded`` that a committed run read: the repository's file of that name
    under params/ (the recorded path may be another checkout's), else the params recorded in its results.json."""
    local = REPO / "params" / recorded.rpartition("params/")[2]
    return json.loads(local.read_text()) if "params/" in recorded and local.is_file() else results["params"]


def test_the_recorded_commands_are_found():
    commands = recorded_commands()
    scripts = [shlex.split(command)[1] for _, command in commands]
    assert scripts.count(ROUND_ROBIN_SCRIPT) == 8 and scripts.count(SCRIPT) > 250


@pytest.mark.parametrize("path,command", recorded_commands(), ids=lambda x: x[:90])
def test_a_recorded_command_parses_and_selects_the_trainer_that_made_it(path, command):
    results = json.loads((REPO / path).read_text())
    argv = shlex.split(command)[2:]
    args = train_script.parse_args(argv)  # a refused command exits (SystemExit fails the test)
    made_by = "round_robin" if shlex.split(command)[1] == ROUND_ROBIN_SCRIPT else "trainer"
    raw = recorded_param_file(args.param_file, results)
    assert train_script.trainer_of(raw) == made_by
    train_script.check_flags(args, raw, made_by)  # no flag of the other trainer
    # the same meaning: every flag lands where its trainer reads it, with the value written
    parser, _ = train_script.build_parser()
    words = iter(argv)
    for word in words:
        name, _, value = word[2:].partition("=")
        action = next(a for a in parser._actions if f"--{name}" in a.option_strings)
        if action.nargs == 0:
            assert getattr(args, action.dest) is True
            continue
        value = value or next(words)
        got, written = getattr(args, action.dest), action.type(value) if action.type else value
        assert written in got if action.default == [] else got == written, (name, got)  # --set: one of a list
    assert args.seed == results.get("seed", args.seed)
    if made_by == "round_robin":
        assert args.steps == results["steps"] and args.threads == 1


@pytest.mark.parametrize("param_file,argv,refused", [
    ("params/gumbel_mnist/gumbel_matrix.json", ["--device", "cpu", "--resume"], "--device, --resume"),
    ("params/gumbel_mnist/no_sharing.json", ["--set", "lr=0.1"], "--set"),
    ("params/gumbel_mnist/no_sharing.json", ["--stack_mode=loop"], "--stack_mode"),
    ("params/gumbel_mnist/no_sharing.json", ["--tensorb"], "--tensorboard"),  # an abbreviation counts too
    ("params/mmnist_counter_9tasks_params.json", ["--steps", "5"], "--steps"),
    ("params/mmnist_2digits_gradnorm.json", ["--threads=2", "--dry_run"], "--threads"),
])
def test_a_flag_of_the_other_trainer_is_one_line_and_exit_2(param_file, argv, refused, capsys):
    assert train_script.main(["--param_file", param_file, *argv]) == 2
    err = capsys.readouterr().err
    dataset = json.loads((REPO / param_file).read_text()).get("dataset", "multi_mnist")
    assert err.count("\n") == 1 and err.startswith(f"error: {param_file}: key 'dataset' is \"{dataset}\" (")
    assert f"which takes no {refused}; allowed: --param_file, --epochs, --seed, --out, --subset, --data_root, " \
           "--dry_run, " in err
    assert ("--steps, --threads\n" in err) == (dataset == "rotated_mnist")


def test_given_flags_reads_the_command_line_as_argparse_does():
    parser = cli.ArgumentParser()
    parser.add_argument("--subset", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", action="append", default=[])
    assert cli.given_flags(parser, []) == []
    assert cli.given_flags(parser, ["--seed", "0", "--resu", "--set=a=1"]) == ["--seed", "--resume", "--set"]
    assert parser.parse_args([]).seed == 0 and parser.parse_args([]).set == []  # the defaults are back


class Opens:
    """Counts the reads of one file: the param-file reader's calls and every open() of its path."""

    def __init__(self, monkeypatch, path):
        self.path, self.reads, self.opens = Path(path).resolve(), 0, 0
        read, opener = config.read_param_file, io.open

        def counting_read(*args, **kwargs):
            self.reads += 1
            return read(*args, **kwargs)

        def counting_open(file, *args, **kwargs):
            if isinstance(file, (str, Path)) and Path(file).resolve() == self.path:
                self.opens += 1
            return opener(file, *args, **kwargs)

        monkeypatch.setattr(config, "read_param_file", counting_read)
        monkeypatch.setattr(io, "open", counting_open)
        monkeypatch.setattr(builtins, "open", counting_open)


@pytest.mark.parametrize("param_file,expected", [
    ("params/mmnist_counter_9tasks_params.json", {"method": "controlnet", "num_params": 34333}),
    # 4 tasks x 3 routed layers x 4 components x 2 logits (on, off) = 96 allocation logits
    ("params/gumbel_mnist/gumbel_matrix.json", {"num_weights": 3080, "num_logits": 96}),
    ("params/gumbel_mnist/no_sharing.json", {"num_logits": 0}),
])
def test_a_dry_run_reads_the_param_file_once(param_file, expected, monkeypatch, capsys):
    opens = Opens(monkeypatch, param_file)
    assert train_script.main(["--param_file", param_file, "--dry_run"]) == 0
    assert (opens.reads, opens.opens) == (1, 1)
    printed = json.loads(capsys.readouterr().out)
    assert expected.items() <= printed.items()


def test_a_round_robin_dry_run_reads_no_data(monkeypatch, capsys):
    from training import round_robin

    def no_data(*args):
        raise AssertionError("a dry run loads no data")

    monkeypatch.setattr(round_robin, "load_rotated_mnist", no_data)
    assert train_script.main(["--param_file", "params/gumbel_mnist/gumbel_matrix.json", "--steps", "3",
                              "--dry_run"]) == 0


def test_a_round_robin_run_reads_the_param_file_once(tmp_path, monkeypatch):
    use_tiny_rotated_mnist(monkeypatch, train=32, test=16)
    param_file = "params/gumbel_mnist/no_sharing.json"
    opens = Opens(monkeypatch, param_file)
    assert train_script.main(["--param_file", param_file, "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    assert (opens.reads, opens.opens) == (1, 1)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 2


def test_the_flag_groups_in_the_docs_are_the_parsers():
    """docs/experiments.md's table of the three groups names exactly the parser's flags of each."""
    parser, groups = train_script.build_parser()
    text = (REPO / "docs" / "experiments.md").read_text()
    rows = {row.split("|")[1].strip(): re.findall(r"(?:^ |, )`(--\w+)", row.split("|")[2])
            for row in text.split("## One training script, two trainers")[1].split("\n\n")[2].splitlines()[2:]}
    only = {name: cli.flags(group) for name, group in groups.items()}
    assert rows == {"both trainers": [flag for flag in cli.flags(parser) if not any(flag in f for f in only.values())],
                    "the Table 1 trainer only": only["trainer"],
                    "the round-robin protocol only": only["round_robin"]}
