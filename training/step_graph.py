"""The training step as a CUDA graph: on a GPU a LeNet-sized step is bound by kernel launches,
so the gradient part of every full batch (zero_grad, forward, the weighting's backward, the model's ``after_backward``,
the loss bookkeeping) is captured once into a ``torch.cuda.CUDAGraph`` and replayed; the model's ``before_step`` runs
eagerly before each replay (writing in place what the forward pass reads), the optimiser step and the weighting's
``after_step`` eagerly after it (a handful of foreach kernels), so that the optimiser, its
learning-rate schedule and its checkpoints are those of an eager run.

The captured function reads only device tensors that keep their storage from epoch to epoch (``StepGraph.stage``
copies each epoch's data order, task draws and loss counters into them; the batch position is a step
index tensor that the step itself advances) and returns the gradients it wrote, which become the parameters'
``.grad`` after every replay. The model's own noise comes from generators registered with the graph (the stacked
replicas' generators, torch's default one for a single run), which a replay advances as the eager step would. The
last, partial batch of an epoch takes the eager path. If a capture raises, the run logs one line and continues
eagerly.
"""
import torch

from runtime import distributed
from training.config import ParamError
from training.run_dir import log

WARMUP_STEPS = 3  # eager steps on a side stream before the capture (torch.cuda.graphs' whole-network example)


class CudaBackend:
    """Warm-up and capture on a CUDA device with ``torch.cuda.graph``."""

    def __init__(self, device):
        self.device = device

    def warm_up(self, step):
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def capture(self, gradients, generators):
        """A replay function of the captured ``gradients``: each call replays the graph and returns the gradient
        tensors that the capture produced (refilled by the replay)."""
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.device)
        for generator in generators:
            graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph):
                outputs = gradients()
        finally:
            torch.cuda.set_stream(stream)  # a capture that failed in capture_end leaves its own stream current

        def replay():
            graph.replay()
            return outputs
        return replay


class StepGraph:
    """The captured full-batch step of a stacked group (``training.engine.StackedGroup``), kept from epoch to epoch and
    captured anew when ``stage`` gets another key (other data tensors or shapes). ``backend`` warms up and captures
    (``CudaBackend``; the tests inject one that calls the function)."""

    def __init__(self, backend, warmup=WARMUP_STEPS):
        self.backend, self.warmup = backend, warmup
        self.key = self.static = self.replay = None
        self.warmed, self.failed = 0, None

    def stage(self, live, key):
        """The tensors that the step reads this epoch: ``live`` itself when the key is new (they become the static
        ones, and the graph is captured again), else the static tensors holding copies of ``live``."""
        if key != self.key:
            self.key, self.static, self.replay, self.warmed = key, live, None, 0
            return live
        for name, tensor in live.items():
            if tensor is not None:
                self.static[name].copy_(tensor)
        return self.static

    def step(self, gradients, update, parameters, generators):
        """One full-batch step: ``gradients`` (returns every parameter's ``.grad``) then ``update``, as a replay
        once captured, eagerly while warming up or after a failed capture."""
        if self.failed is None and self.replay is None and self.warmed >= self.warmup:
            try:
                self.replay = self.backend.capture(gradients, generators)
            except Exception as err:  # the run goes on eagerly; the graph is an optimisation
                while err.__context__ is not None:  # the first error, not capture_end's on leaving the capture
                    err = err.__context__
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log(f"CUDA graph capture failed ({self.failed}); the training step runs eagerly")
                for parameter in parameters:
                    parameter.grad = None
        if self.replay is None:
            if self.failed is None:
                self.warmed += 1
                self.backend.warm_up(lambda: (gradients(), update()))
            else:
                gradients()
                update()
            return
        for parameter, grad in zip(parameters, self.replay()):
            parameter.grad = grad
        update()


def build(choice, device, num_runs, params):
    """The ``StepGraph`` of a group of ``num_runs`` runs for ``--cuda_graphs choice``, or None (the eager step):
    'auto' captures a stacked group (several seeds) on CUDA, 'on' also a single run; never on another device, under
    torchrun or with the localisation loss (``ParamError`` for 'on' there)."""
    unsupported = "it needs a CUDA device" if device.type != "cuda" else \
        "it does not run under torchrun" if distributed.launched() else \
        "the localisation loss (spatial_loss_weight > 0) is not captured" if params["spatial_loss_weight"] > 0 else None
    if choice == "on" and unsupported:
        raise ParamError(f"--cuda_graphs on: {unsupported}; allowed here: auto, off")
    if choice == "off" or unsupported or (choice == "auto" and num_runs == 1):
        return None
    return StepGraph(CudaBackend(device))
