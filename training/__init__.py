"""The training machinery that every entry point imports: the param schema (``config``), the command line
(``cli``), the run folder (``run_dir``, ``run_lock``, ``checkpoint``), the data on the device (``data``), the
optimiser and its schedule (``optim``), one run's epoch (``loop``), the run of the training script (``trainer``)
and its results (``results``), evaluation (``evaluate``), the layers around the step (``ddp``: torchrun's ranks,
``engine``: stacked seeds, ``stacked``, and CUDA graphs, ``step_graph``), Maziarz et al.'s round-robin protocol
(``round_robin``), what made a result (``provenance``) and TensorBoard (``tensorboard_log``). The training script
is a thin entry point over ``trainer.run``; nothing imports the script."""
