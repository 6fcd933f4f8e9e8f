"""Every time, count, file name and results.json key the README quotes exists or equals its source: the committed
runs, the committed tables, the sweep's own plan, the repository's files. A number edited by hand that drifts from
the runs, or a link to a moved file, fails here. The times are checked in the README's Table 2 discussion, which
continues setting by setting in docs/results.md."""
import json
import re
from pathlib import Path

import pytest

from experiments import table2, table2_sweep

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
RESULTS = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
BY_SETTING = RESULTS[RESULTS.index("### Table 2, setting by setting"):RESULTS.index("### The open cells")]
TEXT = " ".join(README.split())  # line breaks as spaces, for the phrases that a line may break
TIME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?(h|s|min|minutes|seconds|hours)\b")
# Times measured by hand that no committed file records, each with how the README says it was measured.
HAND_MEASURED = {"19 s": "smoke run from an empty data root, /usr/bin/time", "12 s": "smoke run, data cached",
                 "11 minutes": "the test suite in a fresh-clone .ci/run (7 to 11 minutes)"}
EXTERNAL = {"barakhi/TD_MultiTask"}  # the authors' GitHub repository
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def committed_hours():
    """Every committed run's wall time (h)."""
    return [json.loads(path.read_text())["wall_time_s"] / 3600 for path in (REPO / "results").rglob("results.json")
            if "wall_time_s" in json.loads(path.read_text())]


def table(name):
    return json.loads((REPO / "results" / f"{name}.json").read_text())


def test_every_time_in_hours_is_a_committed_runs_wall_time_and_the_others_are_named_measurements():
    hours = committed_hours()
    found = [(m[1], m[2]) for m in TIME.finditer(README + BY_SETTING)]
    assert any(unit == "h" for _, unit in found)
    for value, unit in found:
        if unit in ("h", "hours"):
            decimals = len(value.split(".")[1]) if "." in value else 0
            assert any(round(h, decimals) == float(value) for h in hours), \
                f"README quotes {value} {unit}, which is no committed run's wall time (results/**/results.json)"
        else:
            assert f"{value} {unit}" in HAND_MEASURED, f"README quotes {value} {unit} with no source"


def cells(name, within=None):
    """The cells of the paper's rows with a run in a committed table; with ``within``, those whose Δ to the paper
    is within (True) or beyond (False) 2 points."""
    found = [cell for method in table2.PAPER_METHODS for cell in table(name)["rows"][method].values() if cell["n"]]
    return found if within is None else [cell for cell in found if (abs(cell["diff"]) <= 2) == within]


def number(text):
    return WORDS[text.lower()] if text.lower() in WORDS else int(text)


def test_cell_counts_are_the_committed_tables():
    quoted = re.findall(r"all (\d+) cells", TEXT)
    assert quoted and {int(n) for n in quoted} == {len(cells("table2_full"))}
    assert [int(n) for n in re.findall(r"(\d+) cells are within 2 points", TEXT)] == \
        [len(cells("table2_full", within=True))]
    assert [int(n) for n in re.findall(r"each of the other (\d+)", TEXT)] == [len(cells("table2_full", within=False))]
    rows_900 = [number(n) for n in re.findall(r"900 epochs of the authors' released README for (\w+) rows", TEXT)]
    assert rows_900 == [len(cells("table2_byref_900"))]


def test_the_sweep_size_is_what_its_dry_run_plans(tmp_path, capsys):
    assert table2_sweep.main(["--dry_run", "--runs_dir", str(tmp_path / "none")]) == 0
    planned = int(re.search(r"(\d+) cell\(s\)", capsys.readouterr().out)[1])
    quoted = re.findall(r"(\d+) methods x (\d+) settings x (\d+) seeds = (\d+) runs", TEXT)
    assert quoted, "the README states the sweep's size as 'M methods x S settings x K seeds = N runs'"
    for methods, settings, seeds, runs in quoted:
        assert (int(methods), int(settings)) == (len(table2_sweep.METHODS), len(table2_sweep.SETTINGS))
        assert int(methods) * int(settings) * int(seeds) == int(runs) == planned


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


@pytest.mark.parametrize("link", sorted(set(re.findall(r"\]\(([^)\s]+)\)", README))))
def test_every_link_names_a_file_and_heading_that_exist(link):
    if link.startswith(("http://", "https://")):
        return
    target, _, anchor = link.partition("#")
    path = REPO / target if target else REPO / "README.md"
    assert path.exists(), f"README links {link}: no such file"
    if anchor:
        assert anchor in anchors(path), f"README links {link}: no such heading in {path.name}"


def quoted_paths():
    """Every code span that names a file or folder of the repository (a placeholder, an output under runs/, and
    the authors' repository left out)."""
    spans = set(re.findall(r"`([^`\n ]+)`", README))
    return sorted(span for span in spans if "/" in span and span not in EXTERNAL and not re.search(r"[<>{}$]", span)
                  and not span.startswith(("runs/", "./", "RUN/")))


@pytest.mark.parametrize("path", quoted_paths())
def test_every_quoted_path_exists(path):
    assert list(REPO.glob(path.rstrip("/"))), f"README names {path}: nothing there"


def test_the_files_of_a_run_are_described_by_their_own_keys():
    run = REPO / "results" / "table2_full" / "9digits" / "controlnet" / "seed0"
    keys = set(json.loads((run / "results.json").read_text()))
    record = set(json.loads((run / "metrics.jsonl").read_text().splitlines()[0]))
    for name, present in (("results.json", keys), ("metrics.jsonl", record)):
        bullet = re.search(rf"^- `{re.escape(name)}`:(.*?)(?=^- |^$)", README, flags=re.MULTILINE | re.DOTALL)[1]
        named = re.findall(r"`(\w+)`", bullet)
        assert named and not set(named) - present, f"README names {set(named) - present} in {name}: no such key"


def test_the_full_data_epochs_quoted_beside_the_smoke_run_are_the_committed_runs():
    quoted = re.search(r"test ([\d.]+)% after epoch 1, ([\d.]+)% after 2,\s+([\d.]+)% after 3: `([^`]+)`", README)
    records = [json.loads(line) for line in (REPO / quoted[4]).read_text().splitlines()[:3]]
    assert [float(quoted[k]) for k in (1, 2, 3)] == [round(r["test_acc_mean"], 2) for r in records]
