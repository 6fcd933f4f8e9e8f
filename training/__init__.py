"""The training machinery that every entry point imports: the param schema (``config``), the command line
(``cli``), the run folder (``run_dir``, ``run_lock``, ``checkpoint``), the data on the device (``data``), the
optimiser and its schedule (``optim``), the training loop (``loop``) and its stacked runs (``stacked``), evaluation
(``evaluate``), Maziarz et al.'s round-robin protocol (``round_robin``), what made a result (``provenance``) and
TensorBoard (``tensorboard_log``). The training script is a thin entry point over ``loop.run``; nothing imports the
script."""
