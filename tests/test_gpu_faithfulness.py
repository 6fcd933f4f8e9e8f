"""The CUDA path's faithfulness, checked on CPU: float32 means IEEE float32 unless the params allow TF32
(runtime/precision.py, the ``tf32`` key, results.json's record), and the captured training step never waits for the
host (a capture records kernels; a host synchronisation inside it fails on a GPU, or bakes a value into the graph)."""
import json

import pytest
import torch
from torch.overrides import TorchFunctionMode

from runtime import precision
from training import cli, config, engine, step_graph
from training.data import MNIST_STATS

from test_stacked import RUN, gpu_allocation, run_script, separate_run, toy_data


@pytest.fixture
def restore_precision():
    """The flags as the test found them, afterwards (they are process-wide)."""
    saved = precision.float32_precision()
    yield
    torch.backends.cudnn.conv.fp32_precision = saved["conv"]
    torch.backends.cuda.matmul.fp32_precision = saved["matmul"]


def test_set_float32_precision_follows_the_flag(restore_precision):
    """IEEE float32 for convolutions and matmuls by default, TF32 only when allowed; torch's own default is TF32 for
    convolutions, so a run that sets nothing would use it."""
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert precision.set_float32_precision(False) == {"conv": "ieee", "matmul": "ieee"}
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("ieee", "ieee")
    assert precision.set_float32_precision(True) == {"conv": "tf32", "matmul": "tf32"}
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("tf32", "tf32")
    cli.resolve_device("cpu")  # every command picks its device there: IEEE float32 unless told otherwise
    assert precision.float32_precision() == {"conv": "ieee", "matmul": "ieee"}


def test_tf32_key_is_checked_and_documented():
    assert config.load_params("params/mmnist_2digits_uniform_scaling.json")["tf32"] is False
    assert config.load_params("params/mmnist_2digits_uniform_scaling.json", ["tf32=true"])["tf32"] is True
    with pytest.raises(config.ParamError, match="key 'tf32' must be bool, got 1; allowed: bool"):
        config.load_params("params/mmnist_2digits_uniform_scaling.json", ["tf32=1"])
    with pytest.raises(config.ParamError, match="key 'batch_size' must be int, got true"):
        config.load_params("params/mmnist_2digits_uniform_scaling.json", ["batch_size=true"])
    assert "| `tf32` | bool | false | bool |" in config.schema_markdown()


@pytest.mark.parametrize("overrides,expected", [([], "ieee"), (["--set", "tf32=true"], "tf32")])
def test_script_sets_the_precision_and_records_it(tmp_path, capsys, restore_precision, overrides, expected):
    """The training script sets the flags from the params where it sets up the device (starting from torch's
    defaults, TF32 convolutions) and writes them into results.json next to the params."""
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "tf32", "none"
    code, captured = run_script(capsys, "--param_file", "params/mmnist_2digits_uniform_scaling.json",
                                "--epochs", "1", *RUN[2:], *overrides, "--out", tmp_path)
    assert code == 0, captured.err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["cuda_fp32_precision"] == {"conv": expected, "matmul": expected}
    assert results["params"]["tf32"] is (expected == "tf32")
    assert precision.float32_precision() == {"conv": expected, "matmul": expected}


class HostSync(RuntimeError):
    """A host synchronisation inside the captured region."""


# the Tensor methods and torch functions that wait for the device or copy host data to it: values read on the host,
# Python branches on tensor values (bool, int, float, index), and ops whose output size depends on the values
HOST_SYNCS = {"item", "cpu", "numpy", "tolist", "__array__", "__bool__", "__int__", "__float__", "__index__",
              "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "tensor", "as_tensor"}


def _is_host_sync(func, args, kwargs):
    name = getattr(func, "__name__", "")
    if name in HOST_SYNCS:
        return name
    if name in ("to", "copy_") and any(str(arg) == "cpu" for arg in (*args[1:], *kwargs.values())):
        return f"{name}('cpu')"  # a device-to-host copy
    if name in ("__getitem__", "__setitem__", "index_put_") and len(args) > 1:
        index = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
        if any(torch.is_tensor(i) and i.dtype == torch.bool for i in index):
            return f"{name} with a boolean mask"  # its size depends on the values
    return None


class NoHostSync(TorchFunctionMode):
    """Inside it, every host synchronisation of ``HOST_SYNCS`` (and ``.to('cpu')``, boolean-mask indexing) raises
    ``HostSync`` naming it: on CPU, where nothing waits, the test of what a CUDA graph capture forbids."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = _is_host_sync(func, args, kwargs)
        if sync:
            raise HostSync(f"Tensor.{sync} inside the captured step")
        return func(*args, **kwargs)


def test_the_guard_catches_every_kind_of_host_sync():
    x = torch.randn(4)
    for sync in (lambda: x.sum().item(), lambda: x.cpu(), lambda: x.numpy(), lambda: x.tolist(),
                 lambda: bool(x.sum() > 0), lambda: 1 if x[0] > 0 else 0, lambda: float(x[0]), lambda: int(x[0]),
                 lambda: x.nonzero(), lambda: x[x > 0], lambda: torch.tensor([1.0]), lambda: x.to("cpu"),
                 lambda: x.unique()):
        with NoHostSync(), pytest.raises(HostSync):
            sync()
    with NoHostSync():  # device-side alternatives pass
        torch.where(x > 0, x, 0.0).sum().add_(1).clamp(min=0)
        x.index_select(0, torch.zeros(1, dtype=torch.int64))


class NoHostSyncBackend:
    """``step_graph.CudaBackend`` on CPU with the capture's rule: the captured function runs under ``NoHostSync``,
    at its capture (whose results the first replay hands back: one computation per step) and at every replay."""

    def __init__(self):
        self.captures = self.replays = 0

    def warm_up(self, step):
        step()

    def capture(self, gradients, generators):
        with NoHostSync():
            outputs = gradients()
        self.captures += 1
        first = [True]

        def replay():
            self.replays += 1
            if first.pop() if first else False:
                return outputs
            with NoHostSync():
                grads = gradients()
            for output, grad in zip(outputs, grads):
                if output is not grad:
                    output.copy_(grad)
            return outputs
        return replay


GRAPHED_STEPS = [(f"params/mmnist_9digits_{method}.json", []) for method in gpu_allocation.TABLE2] + [
    ("params/mmnist_9digits_gumbel_matrix_budget075.json", []),
    ("params/mmnist_9digits_byref_controlnet.json", []),
    ("params/mmnist_9digits_byref_mgda.json", ["dropout=\"sener_koltun\""])]


def graphed_epoch(param_file, overrides, seeds, mode, sync_free=True):
    """One epoch of 14 images in batches of 4 of the runs ``seeds`` (a stack of one for a single run, as
    ``--cuda_graphs on`` trains it) with its full batches under ``NoHostSyncBackend``: the step graph, the backend."""
    params = config.load_params(param_file, ["batch_size=4"] + overrides)
    runs = [separate_run(params, seed, 9) for seed in seeds]
    mode = mode or ("loop" if params["dropout"] != "none" else engine.AUTO_STACK_MODES["cuda"])
    graphs = step_graph.StepGraph(NoHostSyncBackend(), warmup=1)
    group = engine.StackedGroup(runs, params, list(seeds), mode, graphs)
    if group.weighting is not None:
        group.weighting.rule.sync_free = sync_free
    group.train_epoch(toy_data(params["setting"], n=14), params, 0, MNIST_STATS)
    return graphs, graphs.backend


@pytest.mark.parametrize("seeds,mode", [((0, 1), "loop"), ((0, 1), None), ((5,), None)],
                         ids=["stacked-loop", "stacked-cuda-mode", "single-run"])
@pytest.mark.parametrize("param_file,overrides", GRAPHED_STEPS, ids=[p.split("/")[-1][:-5] + "-dropout" * bool(o)
                                                                      for p, o in GRAPHED_STEPS])
def test_captured_step_never_waits_for_the_host(param_file, overrides, seeds, mode):
    """Every Table 2 method's captured step, stacked (the loop mode, and CUDA's default mode: vmap, loop with
    dropout) and as a single run under ``--cuda_graphs on``: no host synchronisation at its capture and replays."""
    graphs, backend = graphed_epoch(param_file, overrides, seeds, mode)
    assert graphs.failed is None, graphs.failed
    assert (backend.captures, backend.replays) == (1, 2)  # 3 full batches: a warm-up, a capture, a replay


def test_the_check_catches_sener_koltuns_solver_in_the_step(capsys):
    """MGDA's iterative solver (``find_min_norm_element``: its vectors on the host) inside the captured step fails
    the capture: the guard sees what the real capture would reject."""
    graphs, backend = graphed_epoch("params/mmnist_9digits_mgda.json", [], (5,), "loop", sync_free=False)
    assert graphs.failed is not None and graphs.failed.startswith("HostSync: Tensor."), graphs.failed
    assert backend.captures == 0


def test_a_single_run_under_cuda_graphs_on_is_a_stack_of_one_with_its_errors():
    """``--cuda_graphs on`` trains a single run as a stack of one: a weighting without a stacked form, or MGDA beyond
    the host-free solver's tasks, is one line naming that flag (not --seeds) and the ways out."""
    pcgrad = config.load_params("params/mmnist_9digits_pcgrad.json")
    with pytest.raises(config.ParamError, match=r"^--cuda_graphs on: weighting 'pcgrad' has no stacked form; "
                                                r"allowed: .*mgda, or --cuda_graphs auto or off$"):
        engine.check_stackable(pcgrad, 9, "auto", "--cuda_graphs on")
    mgda = config.load_params("params/mmnist_9digits_mgda.json")
    with pytest.raises(config.ParamError, match=r"^--cuda_graphs on: stacked MGDA \(its host-free solver\) solves "
                                                r"up to 12 tasks, setting '9digits' has 13; allowed: --cuda_graphs "
                                                r"auto or off$"):
        engine.check_stackable(mgda, 13, "auto", "--cuda_graphs on")
    engine.check_stackable(mgda, 9, "auto", "--cuda_graphs on")
