"""The open-cells table (experiments/table2_gaps.py) on runs made from a committed results.json."""
import json
import shutil
import statistics
from pathlib import Path

from experiments import table2_gaps

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "table2_full" / "9digits" / "controlnet" / "seed0"


def fake_run(folder, seed, acc, overrides=()):
    """A copy of the committed ControlNet 9-digit run with another seed, accuracy and overrides."""
    folder.mkdir(parents=True)
    run = json.loads((COMMITTED / "results.json").read_text())
    run.update({"seed": seed, "test_acc_mean": acc, "test_acc_mean_last": acc - 0.5,
                "test_acc_mean_best_test": acc + 0.5, "overrides": list(overrides)})
    (folder / "results.json").write_text(json.dumps(run))
    return run


def baseline(tmp_path):
    target = tmp_path / "full" / "9digits" / "controlnet" / "seed0"
    shutil.copytree(COMMITTED, target)
    return json.loads((target / "results.json").read_text())["test_acc_mean"]


def test_default_variant_adds_the_committed_seed_and_variants_compare_to_it(tmp_path):
    committed = baseline(tmp_path)
    gaps = tmp_path / "gaps"
    fake_run(gaps / "seeds" / "default" / "9digits" / "controlnet" / "seed1", 1, 86.0)
    fake_run(gaps / "seeds" / "default" / "9digits" / "controlnet" / "seed2", 2, 88.0)
    fake_run(gaps / "routing" / "sigma" / "9digits" / "controlnet" / "seed0", 0, 80.0,
             ["model_options.sigma=0.25"])
    out = tmp_path / "gaps.md"
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"seeds": "ControlNet holds at n = 3."}))
    assert table2_gaps.main(["--runs_dir", str(gaps), "--baseline", str(tmp_path / "full"),
                             "--answers", str(answers), "--out", str(out)]) == 0
    text = out.read_text()
    values = [committed, 86.0, 88.0]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    seeds_row = next(line for line in text.splitlines() if line.startswith("| default |"))
    assert f"**{mean:.2f}** ± {std:.2f}" in seeds_row and "| 0,1,2 |" in seeds_row
    assert f"| 88.07 | {mean - 88.07:+.2f} |" in seeds_row                        # the paper's ControlNet, 9 by loc
    sigma_row = next(line for line in text.splitlines() if line.startswith("| sigma |"))
    assert f"| {committed:.2f} | {80.0 - committed:+.2f} |" in sigma_row and "`model_options.sigma=0.25`" in sigma_row
    assert "**Answer.** ControlNet holds at n = 3." in text
    assert "## routing\n\n**Answer.** runs in progress." in text


def test_runs_of_one_row_with_other_overrides_are_refused(tmp_path, capsys):
    baseline(tmp_path)
    gaps = tmp_path / "gaps"
    fake_run(gaps / "q" / "v" / "9digits" / "controlnet" / "seed0", 0, 80.0, ["lr=0.002"])
    fake_run(gaps / "q" / "v" / "9digits" / "controlnet" / "seed1", 1, 81.0)
    code = table2_gaps.main(["--runs_dir", str(gaps), "--baseline", str(tmp_path / "full"),
                             "--out", str(tmp_path / "x.md")])
    assert code == 2 and not (tmp_path / "x.md").exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: q/v/9digits/controlnet: its runs differ in protocol or overrides") and "\n" not in err


def test_missing_runs_dir_is_one_line(tmp_path, capsys):
    assert table2_gaps.main(["--runs_dir", str(tmp_path / "none"), "--out", str(tmp_path / "x.md")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_variant_without_validation_split_shows_its_best_test_epoch_beside_the_committed_ones(tmp_path):
    baseline(tmp_path)
    committed = json.loads((COMMITTED / "results.json").read_text())["test_acc_mean_best_test"]
    run = fake_run(tmp_path / "gaps" / "q" / "authors" / "9digits" / "controlnet" / "seed0", 0, 0.0,
                   ["protocol=authors"])
    run.update({"test_acc_mean": None, "best_epoch": None, "test_acc_mean_best_test": 89.0})
    (tmp_path / "gaps" / "q" / "authors" / "9digits" / "controlnet" / "seed0" / "results.json").write_text(
        json.dumps(run))
    row = table2_gaps.collect(tmp_path / "gaps", tmp_path / "full")["q"][0]
    assert row["selection"] == "best_test" and row["acc"] == (89.0, None) and row["committed"] == committed
    line = table2_gaps.render_row(row)
    assert "**89.00** (best test epoch: no validation split)" in line and f"| {89.0 - committed:+.2f} |" in line
