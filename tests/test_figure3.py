"""Figure 3's width-scaled variants: their param files, parameter counts growing with the width, and a tiny sweep
end to end (training script runs, resumable table, plot)."""
import json

import pytest

from training import config
from experiments import figure3
from models import build_model, count_parameters


def test_variants_scale_every_family_and_narrow_the_td_stream(tmp_path):
    found = figure3.variants([0.5, 1.0, 2.0], [1, 4])
    names = [name for name, _, _ in found]
    assert len(found) == 4 * 3 + 2 and "controlnet_td4" in names and "ch_mod_w0.5" in names
    for family in figure3.FAMILIES:
        counts = []
        for name, fam, options in found:
            if fam == family and "_w" in name:
                params = config.load_params(figure3.param_file(tmp_path, name, fam, options))
                assert params["method"] == family and params["setting"] == "9digits"
                counts.append(count_parameters(build_model(params["model"], 9, **params["model_options"]))[1])
        assert counts == sorted(counts) and counts[0] < counts[1] < counts[2], (family, counts)
    td = [count_parameters(build_model("controlnet", 9, **options))[1] for _, fam, options in found
          if "td_channels" in options]
    full = count_parameters(build_model("controlnet", 9))[1]
    assert td[0] < td[1] < full


@pytest.mark.parametrize("flag, value", [("--widths", "0"), ("--widths", "a"), ("--td_channels", "0")])
def test_bad_lists_are_one_line_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        figure3.main([flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_tiny_sweep_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--epochs", "1", "--subset", "200", "--seeds", "0", "--widths", "0.5", "--td_channels", "",
            "--device", "cpu", "--runs_dir", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "out")]
    assert figure3.main(args) == 0
    summary = json.loads((tmp_path / "out" / "figure3.json").read_text())
    assert [p["variant"] for p in summary["points"]] == [f"{f}_w0.5" for f in figure3.FAMILIES]
    assert all(0.0 <= p["acc_mean"] <= 100.0 and p["n"] == 1 for p in summary["points"])
    assert "| controlnet | controlnet_w0.5 |" in (tmp_path / "out" / "figure3.md").read_text()
    first = (tmp_path / "runs" / "controlnet_w0.5" / "seed0" / "results.json").stat().st_mtime_ns
    assert figure3.main(args) == 0  # rerun: every run is done, nothing retrains
    assert (tmp_path / "runs" / "controlnet_w0.5" / "seed0" / "results.json").stat().st_mtime_ns == first
