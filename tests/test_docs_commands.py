"""The docs cannot drift: every ``python <script>.py ...``, ``python -m <module> ...`` (or ``torchrun ...
<script>.py ...``) command shown in the README and docs/ names a script or module that exists and arguments its
parser accepts; the training script's and the Table 2 sweep's commands are also run with ``--dry_run`` (the
model is built and counted, the sweep's cells listed, nothing trained); and every ``params/...json`` path they
name exists."""
import importlib.util
import itertools
import argparse
import functools
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md")])

# Shell placeholders, expanded over one of their documented values (the loops in docs/results.md and
# docs/experiments.md); a command with any other placeholder fails, so that this list stays explicit.
PLACEHOLDERS = {"${n}": "40", "${m}": "controlnet", "$p": "clevr_40tasks_controlnet"}
# Commands whose arguments are not parsed (only their script or module is checked), with the reason.
SKIPPED = {
    "...": "arguments elided in prose (e.g. `python -m experiments.table2_sweep ...`)",
}
COMMAND = re.compile(r"(?:^|(?<=[\s;(]))(?:python\s+(?:-m\s|\S+\.py)|torchrun\s+--)[^;|&#`]*")
PARAM_PATH = re.compile(r"params/[\w./{},*<>$-]*\.json")


def fenced_blocks(text):
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def inline_spans(text):
    without_blocks = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", without_blocks)]


def shown_commands(text):
    """Every python / torchrun command of the fenced blocks (continuations joined, comments dropped) and of the
    inline code spans that start with one."""
    found = []
    for block in fenced_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            found += [m.group(0).strip() for m in COMMAND.finditer(line)]
    found += [span for span in inline_spans(text) if COMMAND.match(span)]
    return found


def all_commands():
    return sorted({(path.relative_to(REPO).as_posix(), command) for path in DOCS
                   for command in shown_commands(path.read_text())})


def script_and_arguments(command):
    """(script path relative to the repository, or the module of ``python -m``; its argv) with the placeholders
    expanded."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    words = shlex.split(command)
    if words[0] == "python" and words[1] == "-m":
        return words[2], words[3:]
    script = next(i for i, word in enumerate(words) if word.endswith(".py"))
    return words[script], words[script + 1:]


def exists(script):
    if script.endswith(".py"):
        return (REPO / script).is_file()
    return importlib.util.find_spec(script) is not None


@functools.lru_cache(maxsize=None)
def load(script):
    if not script.endswith(".py"):
        return importlib.import_module(script)
    name = "docs_command_" + re.sub(r"\W", "_", script[:-3])
    spec = importlib.util.spec_from_file_location(name, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_commands_of_every_page_are_found():
    commands = {command for _, command in all_commands()}
    assert "python -m pytest -q tests" in commands
    assert ("python train_multi_task_counter_stream.py --param_file=params/mmnist_counter_9tasks_params.json "
            "--epochs 100") in commands
    assert any(c.startswith("torchrun --nproc_per_node=N train_multi_task_counter_stream.py") for c in commands)
    assert any(c.startswith("python train_multi_task_counter_stream.py --param_file=params/clevr_like_${n}tasks")
               for c in commands)
    assert len(commands) > 40


@pytest.mark.parametrize("page,command", all_commands(), ids=lambda x: x[:100])
def test_a_shown_command_names_a_script_and_arguments_that_exist(page, command, capsys, monkeypatch):
    script, argv = script_and_arguments(command)
    if any(marker in command for marker in SKIPPED):  # arguments elided: the script or module must still exist
        assert script == "pytest" or exists(script), f"{page}: `{command}`: {script} does not exist"
        return
    assert not [w for w in argv if re.search(r"[<>$]", w)], f"{page}: unexpanded placeholder in `{command}`"
    if script == "pytest":  # python -m pytest <test files>
        missing = [w for w in argv if not w.startswith("-") and not (REPO / w.split("::")[0]).exists()]
        assert not missing, f"{page}: `{command}` names missing test files {missing}"
        return
    assert exists(script), f"{page}: `{command}`: {script} does not exist"
    module = load(script)
    assert hasattr(module, "parse_args"), f"{script} has no parse_args(argv) to check `{command}` with"
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def recording(parser, *args, **kwargs):
        parsers.append(parser)
        return original(parser, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    try:
        module.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{page}: `{command}` is refused by {script}'s parser (exit {exit_.code}): "
                    f"{capsys.readouterr().err.strip()}")
    # argparse also takes an abbreviation (--subse for --subset): a renamed flag must not pass as a prefix.
    abbreviated = [word.split("=")[0] for word in argv if word.startswith("--")
                   and word.split("=")[0] not in parsers[-1]._option_string_actions]
    assert not abbreviated, f"{page}: `{command}`: {abbreviated} are not {script}'s flags (only prefixes of them)"


def expanded(path):
    """`params/a_{b,c}.json` -> params/a_b.json, params/a_c.json (shell brace expansion, one level)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[part] if i % 2 == 0 else part.split(",") for i, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def param_paths():
    found = set()
    for page in DOCS:
        for path in PARAM_PATH.findall(page.read_text()):
            if not re.search(r"[<>$]", path):  # a pattern such as params/mmnist_<setting>_<method>.json
                found.update((page.relative_to(REPO).as_posix(), p) for p in expanded(path))
    return sorted(found)


def test_param_paths_are_found():
    names = {path for _, path in param_paths()}
    assert {"params/mmnist_counter_9tasks_params.json", "params/clevr_like_40tasks_task_routing.json",
            "params/gumbel_mnist/*.json"} <= names


@pytest.mark.parametrize("page,path", param_paths())
def test_a_named_param_file_exists(page, path):
    assert sorted(REPO.glob(path)), f"{page} names {path}, which does not exist"


def test_a_wrong_flag_in_a_shown_command_is_caught(capsys):
    """The check above can fail: the README's main command with a flag the training script does not have."""
    script, argv = script_and_arguments("python train_multi_task_counter_stream.py "
                                        "--param_file=params/mmnist_counter_9tasks_params.json --no_such_flag 1")
    with pytest.raises(SystemExit):
        load(script).parse_args(argv)
    assert "--no_such_flag" in capsys.readouterr().err


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_slug_is_githubs():
    assert slug('Adding a task (paper §4.5 "Adding Tasks", Table 4), reduced (CPU)') == \
        "adding-a-task-paper-45-adding-tasks-table-4-reduced-cpu"
    assert slug("Sec. 5.3, MNIST + Fashion-MNIST") == "sec-53-mnist--fashion-mnist"


def links():
    found = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if not re.match(r"[a-z]+:", target):
                found.append((page.relative_to(REPO).as_posix(), target))
    return sorted(set(found))


@pytest.mark.parametrize("page,target", links())
def test_a_relative_link_points_at_a_file_and_heading_that_exist(page, target):
    path, _, anchor = target.partition("#")
    file = (REPO / page).parent / path if path else REPO / page
    assert file.exists(), f"{page} links {target}: {path} does not exist"
    if anchor:
        headings = re.findall(r"^#+ (.*)$", file.read_text(), flags=re.MULTILINE)
        assert anchor in {slug(h) for h in headings}, f"{page} links {target}: no such heading in {path or page}"


def dry_runnable():
    """The shown commands of the training script (not --eval_only; round-robin param files too) and of the Table 2
    sweep."""
    found = []
    for page, command in all_commands():
        if any(marker in command for marker in SKIPPED) or command.startswith("torchrun"):
            continue
        script, argv = script_and_arguments(command)
        if script == "train_multi_task_counter_stream.py" and "--eval_only" not in argv:
            found.append((page, command))
        elif script == "experiments.table2_sweep":
            found.append((page, command))
    return found


@pytest.mark.parametrize("page,command", dry_runnable(), ids=lambda x: x[:100])
def test_a_shown_training_or_sweep_command_runs_with_dry_run(page, command, capsys):
    """Run, not only parsed: the param file loads and checks, the model builds and is counted (on the meta
    device), the sweep lists its cells; nothing is trained or written."""
    script, argv = script_and_arguments(command)
    argv = [word for word in argv if word not in ("--resume", "--tensorboard")] + ["--dry_run"]
    code = load(script).main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"{page}: `{command}` with --dry_run exits {code}: {captured.err.strip()[-500:]}"
    assert captured.out.strip(), f"{page}: `{command}` with --dry_run printed nothing"
