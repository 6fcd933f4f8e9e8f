"""What the training loop asks of every model besides its forward pass, as class attributes and hooks that do
nothing unless a model needs them (only the Gumbel-matrix model does, models/gumbel_matrix.py).

- ``location_output``: the forward keyword that returns the model's localisation output with its logits
  (``"with_td_map"``: ControlNet's TD map; ``"with_location"``: a baseline's location head), or None: the model
  cannot train the localisation loss (``spatial_loss_weight``).
- ``before_step(update, options)``: before the forward pass of the run's ``update``-th step (0-based, counted over
  the epochs); ``options``: the param file's ``router_options`` (``{}`` or None for a model without routers).
- ``after_backward(options)``: after the loss's backward pass, before the optimiser step (gradients of penalties
  that are not part of the task losses).
- ``epoch_record()``: entries the model adds to every epoch's record in metrics.jsonl (and to results.json).
- ``parameter_groups(lr, options)``: the optimiser's parameter groups (one group at ``lr`` by default).
"""


class TrainingHooks:
    """The defaults: no localisation output, every hook a no-op, one parameter group."""

    location_output = None

    def before_step(self, update, options):
        """Called before the forward pass of every training step (default: nothing)."""

    def after_backward(self, options):
        """Called after the backward pass of every training step (default: nothing)."""

    def epoch_record(self):
        """Entries for the epoch's record (default: none)."""
        return {}

    def parameter_groups(self, lr, options):
        """The optimiser's parameter groups (default: every parameter at ``lr``)."""
        return [{"params": list(self.parameters()), "lr": lr}]
