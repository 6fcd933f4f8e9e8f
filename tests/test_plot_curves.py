"""experiments/plots/curves.py on synthetic runs: grouping by seed, mean ± std by hand, sparse evaluation, labels, errors."""
import json
import sys

import numpy as np
import pytest

from experiments.plots import curves as plot_curves

PARAMS = {"exp_id": "x", "method": "controlnet", "setting": "2digits", "lr": 0.001}


def fake_run(directory, seed, losses, accuracies, method="controlnet", epochs=None, eval_every=1):
    """A run dir as the training script leaves it; accuracy recorded every ``eval_every`` epochs."""
    directory.mkdir(parents=True)
    lines = []
    for epoch, (loss, acc) in enumerate(zip(losses, accuracies), 1):
        record = {"epoch": epoch, "lr": 0.001, "train_loss": loss}
        if epoch % eval_every == 0:
            record.update({"val_acc_mean": acc - 1, "test_acc_mean": acc, "val_acc_per_task": [acc - 2, acc],
                           "test_acc_per_task": [acc - 1, acc + 1]})
        lines.append(json.dumps(record) + "\n")
    (directory / "metrics.jsonl").write_text("".join(lines))
    info = {"method": method, "setting": "2digits", "epochs": epochs or len(losses), "subset": None, "seed": seed,
            "params": {**PARAMS, "method": method}}
    (directory / "results.json").write_text(json.dumps(info))
    return directory


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    fake_run(root / "controlnet" / "seed0", 0, [2.0, 1.0, 0.5], [20.0, 40.0, 60.0])
    fake_run(root / "controlnet" / "seed1", 1, [2.2, 1.4, 0.7], [30.0, 50.0, 70.0])
    fake_run(root / "ch_mod" / "seed0", 0, [2.1, 1.9, 1.7, 1.5], [10.0, 20.0, 30.0, 40.0], method="ch_mod",
             eval_every=2)
    return root


def test_runs_differing_only_by_seed_are_grouped_with_mean_and_sample_std(runs):
    loaded = [plot_curves.load_run(d) for d in plot_curves.find_runs([runs])]
    groups = plot_curves.group_runs(loaded, by_seeds=True)
    assert [parts for parts, _ in groups] == [["ch_mod", "2 digits", "4 epochs", "seed 0"],
                                              ["controlnet", "2 digits", "3 epochs", "mean ± std over seeds 0, 1"]]
    epochs, mean, std = plot_curves.series(groups[1][1], lambda r: r["train_loss"])
    assert epochs.tolist() == [1, 2, 3]
    np.testing.assert_allclose(mean, [2.1, 1.2, 0.6])
    np.testing.assert_allclose(std, [0.1414214, 0.2828427, 0.1414214], rtol=1e-6)  # |a - b| / sqrt(2)
    assert len(plot_curves.group_runs(loaded, by_seeds=False)) == 3  # overlaid: one line per run


def test_sparse_evaluation_gives_accuracy_only_where_recorded(runs):
    run = plot_curves.load_run(runs / "ch_mod" / "seed0")
    epochs, mean, std = plot_curves.series([run], lambda r: r.get("test_acc_mean"))
    assert epochs.tolist() == [2, 4] and mean.tolist() == [20.0, 40.0] and std is None
    epochs, mean, _ = plot_curves.series([run], plot_curves.per_task("val", 0))
    assert epochs.tolist() == [2, 4] and mean.tolist() == [18.0, 38.0]


def test_shared_name_parts_go_to_the_title_and_the_rest_to_the_legend(runs):
    loaded = [plot_curves.load_run(d) for d in plot_curves.find_runs([runs / "controlnet"])]
    shared, labels = plot_curves.split_names(plot_curves.group_runs(loaded, by_seeds=False))
    assert shared == "controlnet, 2 digits, 3 epochs" and labels == ["seed 0", "seed 1"]


@pytest.mark.parametrize("extra", [[], ["--group", "seeds", "--per_task"]])
def test_writes_a_png_with_every_panel(runs, tmp_path, extra):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    out = tmp_path / "figs" / "curves.png"
    assert plot_curves.main([str(runs), "--out", str(out), *extra]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = [plot_curves.load_run(d) for d in plot_curves.find_runs([runs])]
    fig = plot_curves.plot(plt, plot_curves.group_runs(loaded, "--group" in extra), "--per_task" in extra, [runs])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == (5 if extra else 3)  # loss, val, test (+ one panel per task)
    assert visible[0].get_xlabel() == "epoch" and "accuracy (%)" == visible[2].get_ylabel()
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == (["ch_mod, 4 epochs, seed 0", "controlnet, 3 epochs, mean ± std over seeds 0, 1"] if extra else
                      ["ch_mod, 4 epochs, seed 0", "controlnet, 3 epochs, seed 0", "controlnet, 3 epochs, seed 1"])
    plt.close(fig)


def test_default_output_is_under_runs():
    assert plot_curves.parse_args(["x"]).out == "runs/curves.png"


@pytest.mark.parametrize("content,expected", [
    (None, "not found"),
    ("", "holds no metrics.jsonl"),
    ('{"epoch": 1, "train_loss": 2.0}\n{"epoch": 2,\n', "metrics.jsonl: line 2 is not JSON"),
    ('{"epoch": 1}\n', "line 1 lacks 'epoch' or 'train_loss'"),
    ("\n", "is empty: the run has not finished an epoch yet"),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, capsys, content, expected):
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
        if content:
            (run / "metrics.jsonl").write_text(content)
    assert plot_curves.main([str(run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_says_how_to_install(monkeypatch, capsys, runs):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_curves.main([str(runs)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_a_long_list_of_sources_wraps_inside_the_figure_title(runs):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    sources = [runs / "controlnet" / f"a_long_folder_name_number_{k}" / "seed0" for k in range(8)]
    loaded = [plot_curves.load_run(d) for d in plot_curves.find_runs([runs])]
    fig = plot_curves.plot(plt, plot_curves.group_runs(loaded, False), False, sources)
    title = fig._suptitle.get_text().splitlines()
    assert len(title) > 2 and max(map(len, title)) <= plot_curves.TITLE_WIDTH
    assert " ".join(title[1:]).replace(", ", ",").count(str(runs / "controlnet")) == 8  # every source, none cut
    plt.close(fig)


def test_colors_by_method_give_a_method_one_hue_dark_then_light(runs, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fake_run(runs / "controlnet" / "seed2", 2, [2.3, 1.5, 0.9], [25.0, 45.0, 65.0])
    loaded = [plot_curves.load_run(d) for d in plot_curves.find_runs([runs])]
    groups = plot_curves.group_runs(loaded, by_seeds=False)
    tab20 = plt.get_cmap("tab20")
    assert plot_curves.line_styles(plt, groups, by_method=True) == [  # ch_mod; controlnet seeds 0, 1, 2
        (tab20(0), "-"), (tab20(2), "-"), (tab20(3), "-"), (tab20(3), "-.")]
    assert len({color for color, _ in plot_curves.line_styles(plt, groups, by_method=False)}) == 4
    out = tmp_path / "by_method.png"
    assert plot_curves.main([str(runs), "--colors", "method", "--out", str(out)]) == 0 and out.is_file()
    fig = plot_curves.plot(plt, groups, False, [runs], by_method=True)
    assert [line.get_color() for line in fig.axes[0].get_lines()] == [tab20(i) for i in (0, 2, 3, 3)]
    plt.close(fig)


def test_labels_name_the_params_that_differ_between_the_runs_and_only_those(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    a = fake_run(tmp_path / "a", 0, [2.0, 1.0], [20.0, 40.0])
    b = fake_run(tmp_path / "b", 0, [2.0, 1.5], [20.0, 30.0])
    info = json.loads((b / "results.json").read_text())
    info["params"].update({"lr": 0.003, "batch_size": 256, "protocol": "held_out"})  # protocol: the default
    (b / "results.json").write_text(json.dumps(info))
    loaded = [plot_curves.load_run(d) for d in (a, b)]
    groups = plot_curves.group_runs(loaded, by_seeds=True)
    shared, labels = plot_curves.split_names(groups)
    assert shared == "controlnet, 2 digits, 2 epochs, seed 0"
    assert labels == ["batch_size=512, lr=0.001", "batch_size=256, lr=0.003"]
    fig = plot_curves.plot(plt, groups, False, [a, b])
    assert [text.get_text() for text in fig.legends[0].get_texts()] == labels
    for ax in fig.axes:  # 2 epochs: ticks at whole epochs only
        assert all(float(tick).is_integer() for tick in ax.get_xticks())
    lines = fig.axes[2].get_lines()  # test accuracy: one marker shape per line
    assert len({line.get_marker() for line in lines}) == 2
    plt.close(fig)


def test_labels_name_the_method_options_that_differ_where_a_run_sets_them(tmp_path):
    options = {"a": {"sigma": 0.5}, "b": {"sigma": 0.25}, "c": {"sigma": 0.5, "gated": "conv1,conv2"}, "d": None}
    for name, model_options in options.items():
        run = fake_run(tmp_path / name, 0, [2.0, 1.0], [20.0, 40.0], method="task_routing" if model_options else "ch_mod")
        info = json.loads((run / "results.json").read_text())
        info["params"]["model_options"] = model_options or {}
        (run / "results.json").write_text(json.dumps(info))
    loaded = [plot_curves.load_run(tmp_path / name) for name in options]
    shared, labels = plot_curves.split_names(plot_curves.group_runs(loaded, by_seeds=False))
    assert shared == "2 digits, 2 epochs, seed 0"
    assert labels == ["task_routing, model_options.sigma=0.5", "task_routing, model_options.sigma=0.25",
                      "task_routing, model_options.gated=conv1,conv2, model_options.sigma=0.5", "ch_mod"]


def test_from_epoch_leaves_out_the_first_epochs_and_says_so(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    loaded = plot_curves.from_epoch([plot_curves.load_run(d) for d in plot_curves.find_runs([runs])], 2)
    groups = plot_curves.group_runs(loaded, by_seeds=False)
    fig = plot_curves.plot(plt, groups, False, [runs], first=2)
    assert [line.get_xdata().tolist() for line in fig.axes[0].get_lines()] == [[2, 3, 4], [2, 3], [2, 3]]
    assert [line.get_xdata().tolist() for line in fig.axes[2].get_lines()][0] == [2, 4]  # ch_mod: every 2nd epoch
    assert "(epochs 2 on)" in fig._suptitle.get_text().splitlines()[0]
    plt.close(fig)
    for first, expected in ((4, "has no epoch from 4 on"), (0, "give an epoch, 1 or more")):
        assert plot_curves.main([str(runs), "--from_epoch", str(first), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --from_epoch {first}: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
