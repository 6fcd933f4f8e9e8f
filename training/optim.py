"""The optimiser and its learning-rate schedule (paper Table 1: Adam, lr 1e-3, halved at 30/60/90% of training)."""
import torch

from models.gumbel_matrix import router_parameters


SHORTEST_SCHEDULE = 7  # fewer epochs keep a constant lr (see lr_factor)


def lr_factor(params, epoch, epochs):
    """The authors' schedule: halve the lr before every 0-based epoch e with (e + 1) % int(0.3 * epochs) == 0
    (epochs 29, 59, 89 of 100), i.e. at 30/60/90% of training; at most three halvings. Runs shorter than 7 epochs
    (smoke runs) keep a constant lr: there the rule would halve before the first epoch (period 1 for 4-6 epochs;
    the original halves every epoch below 4)."""
    period = int(epochs * 0.3)
    if params["lr_schedule"] == "none" or epochs < SHORTEST_SCHEDULE:
        return 1.0
    return 0.5 ** min(3, (epoch + 1) // period)


def describe_schedule(params, epochs):
    """The schedule in words, with the (1-based) epochs that start at a halved lr, e.g. 'lr halved at epochs
    30, 60, 90'."""
    factors = [lr_factor(params, epoch, epochs) for epoch in range(epochs)]
    halved = [epoch + 1 for epoch in range(epochs) if factors[epoch] < (factors[epoch - 1] if epoch else 1.0)]
    if not halved:
        return "constant lr" + (f" (fewer than {SHORTEST_SCHEDULE} epochs)" if params["lr_schedule"] != "none" else "")
    return f"lr halved at epochs {', '.join(map(str, halved))}"


def parameter_groups(params, model, weighting):
    """The weights (and the weighting's own parameters) at ``lr``; learned allocation logits (gumbel_matrix) in a
    group of their own at ``router_options.lr`` (the original's second Adam; Adam is per parameter, so one Adam
    with two groups is the same)."""
    logits = router_parameters(model)
    weights = [p for p in model.parameters() if all(p is not q for q in logits)]
    groups = [weights + (list(weighting.parameters()) if weighting else []), logits]
    return [{"params": group, "lr": lr} for group, lr in zip(groups, base_learning_rates(params))]


def base_learning_rates(params):
    """The initial lr of each optimiser group (``parameter_groups``), before the schedule's factor."""
    return [params["lr"]] + ([params["router_options"]["lr"]] if params.get("router_options") else [])


def make_optimizer(params, groups):
    if params["optimizer"] == "Adam":
        return torch.optim.Adam(groups, lr=params["lr"])
    if params["optimizer"] == "SGD":
        return torch.optim.SGD(groups, lr=params["lr"], momentum=params["momentum"])
    return torch.optim.RMSprop(groups, lr=params["lr"])
