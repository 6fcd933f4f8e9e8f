"""What the training loop asks of every model besides its forward pass, as class attributes and hooks that do
nothing unless a model needs them (only the Gumbel-matrix model does, models/gumbel_matrix.py). One run's step
(training/loop.py) calls them on its model; the stacked engine (training/engine.py) calls the same hooks on the stacked
model, which runs them for every replica with that replica's tensors (training/stacked.py).

- ``location_output``: the forward keyword that returns the model's localisation output with its logits
  (``"with_td_map"``: ControlNet's TD map; ``"with_location"``: a baseline's location head), or None: the model
  cannot train the localisation loss (``spatial_loss_weight``).
- ``before_step(update, options)``: before the forward pass of the run's ``update``-th step (0-based, counted over
  the epochs); ``options``: the param file's ``router_options`` (``{}`` or None for a model without routers). What
  it sets for the forward pass it writes in place into tensors that it keeps: a CUDA graph of the step replays the
  forward pass with the tensors it was captured with (the hook itself runs eagerly before every step).
- ``penalty(options)``: a loss on the model's own parameters whose gradient the step adds after the task losses'
  (``after_backward``), or None; added after the processes of a distributed run averaged their gradients, it is the
  same on every rank.
- ``epoch_record()``: entries the model adds to every epoch's record in metrics.jsonl (and to results.json).
- ``parameter_groups(lr, options)``: the optimiser's parameter groups (one group at ``lr`` by default).

A module of the model that draws random numbers in training (the Gumbel noise of a learned allocation, dropout
masks) declares it with the class attribute ``random_draws``, which says how the stacked engine feeds every replica
the draws of its separate run (a generator seeded as that run seeds torch's, training/stacked.py); with nothing fed,
the module draws from torch's global generator, as in a separate run:

- ``"uniform"``: the module draws one U(0, 1) tensor per forward pass, of the shape that its ``noise_shape()``
  returns, and takes it instead through its attribute ``noise`` (None: draw it). A stacked replica draws these
  tensors before its forward pass, every such module in module order, so in a separate run they must be drawn in
  that order and before any draw of a module fed ``"generator"``. Batchable: such a model stacks in either mode,
  ``loop`` or ``vmap``.
- ``"generator"``: the module draws through its attribute ``generator`` (a ``torch.Generator``, None: torch's
  global one), which a replica sets to its own; stacking mode ``loop`` only. ``random_draws_label`` names what it
  draws, for the message that refuses ``vmap``.

A module that draws without declaring it draws from torch's global generator in a stacked run too, which no replica's
separate run does.
"""
RANDOM_DRAWS = ("uniform", "generator")


class TrainingHooks:
    """The defaults: no localisation output, every hook a no-op, one parameter group."""

    location_output = None

    def before_step(self, update, options):
        """Called before the forward pass of every training step (default: nothing)."""

    def penalty(self, options):
        """A loss on the model's own parameters added to the step's (default: none)."""
        return None

    def after_backward(self, options):
        """After the step's backward pass: adds the gradient of ``penalty(options)``, if any. (A model defines
        ``penalty``; this method is the step's, and the stacked model's sums its replicas' penalties.)"""
        penalty = self.penalty(options)
        if penalty is not None:
            penalty.backward()

    def epoch_record(self):
        """Entries for the epoch's record (default: none)."""
        return {}

    def parameter_groups(self, lr, options):
        """The optimiser's parameter groups (default: every parameter at ``lr``)."""
        return [{"params": list(self.parameters()), "lr": lr}]
