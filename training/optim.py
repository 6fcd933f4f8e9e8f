"""The optimiser and its learning-rate schedule (paper Table 1: Adam, lr 1e-3, halved at 30/60/90% of training)."""
import torch


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
    """The model's groups (``model.parameter_groups``: every parameter at ``lr``, or the model's own split, e.g. the
    learned allocation logits at ``router_options.lr``), the weighting's parameters in the first group."""
    groups = model.parameter_groups(params["lr"], params.get("router_options"))
    if weighting is not None:
        groups[0]["params"] = list(groups[0]["params"]) + list(weighting.parameters())
    return groups


def base_learning_rates(params, model):
    """The initial lr of each optimiser group (``parameter_groups``), before the schedule's factor."""
    return [group["lr"] for group in model.parameter_groups(params["lr"], params.get("router_options"))]


def make_optimizer(params, groups):
    if params["optimizer"] == "Adam":
        return torch.optim.Adam(groups, lr=params["lr"])
    if params["optimizer"] == "SGD":
        return torch.optim.SGD(groups, lr=params["lr"], momentum=params["momentum"])
    return torch.optim.RMSprop(groups, lr=params["lr"])
