"""The switches of ch-mod and task routing (models/modulation.py): gated sites, units switched off, tied masks,
and the straight-through mask gradient of Strezoski et al.'s in-place ``input.data.mul_(mask)``."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import LENET_PARAMS, build_model, count_parameters
from models.modulation import TaskRoutedLeNet
from training import config

PARAM_FILE = "params/mmnist_9digits_task_routing.json"


def images(n=6, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gated,extra", [("conv1,conv2,pool2", 50), ("conv1,conv2", 30), ("conv2", 20),
                                         ("pool2,conv1", 30)])
@pytest.mark.parametrize("name", ["ch_mod", "task_routing"])
def test_gated_sites_and_their_parameter_counts(name, gated, extra):
    model = build_model(name, 9, gated=gated)
    assert count_parameters(model)[0] == LENET_PARAMS + extra * 9
    sites = model.modulation.keys() if name == "ch_mod" else [b[5:] for b, _ in model.named_buffers()]
    assert sorted(sites) == sorted(gated.split(","))


def test_ungated_site_is_untouched():
    """Gates on conv1 and conv2 only: switching pool2's (absent) gate cannot change the output, while the
    default model's pool2 mask does."""
    torch.manual_seed(0)
    model = build_model("task_routing", 9, gated="conv1,conv2")
    gates = {site: model.mask(site)[torch.zeros(6, dtype=torch.long)][:, :, None, None] for site in ("conv1", "conv2")}
    torch.testing.assert_close(model(images(), torch.zeros(6, dtype=torch.long)), model.bu(images(), gates),
                               rtol=0, atol=0)


def test_units_off_count_and_sigma_fraction():
    torch.manual_seed(0)
    by_count = build_model("task_routing", 9, units_off=3)
    torch.manual_seed(0)
    by_fraction = build_model("task_routing", 9, sigma=0.25)
    for site, channels in (("conv1", 10), ("conv2", 20), ("pool2", 20)):
        assert by_count.mask(site).sum(dim=1).eq(channels - 3).all()
        assert by_fraction.mask(site).sum(dim=1).eq(channels - int(channels * 0.25)).all()
    # The default (neither given) is sigma 0.5, drawn exactly as before the switches existed.
    torch.manual_seed(0)
    default = build_model("task_routing", 9)
    torch.manual_seed(0)
    half = build_model("task_routing", 9, sigma=0.5)
    assert all(torch.equal(default.mask(s), half.mask(s)) for s in ("conv1", "conv2", "pool2"))
    assert default.mask("conv2").sum(dim=1).eq(10).all()


def test_tied_masks_share_conv2s_mask_and_count_it_once():
    torch.manual_seed(0)
    tied = build_model("task_routing", 9, tied_masks=True)
    assert tied.mask("pool2") is tied.mask("conv2")
    assert count_parameters(tied)[0] == LENET_PARAMS + 30 * 9
    # Untied, the channels of conv2 that reach the FC layer are those on in both masks (fewer than 10 of 20);
    # tied, exactly conv2's 10.
    torch.manual_seed(0)
    untied = build_model("task_routing", 9)
    reach = untied.mask("conv2") * untied.mask("pool2")
    assert (reach.sum(dim=1) < 10).all()
    assert tied.mask("conv2").sum(dim=1).eq(10).all()
    # Tied, the pool2 gate changes nothing: the units it would switch off are already 0 after conv2's mask and ReLU.
    tasks = torch.arange(6) % 9
    conv2_only = {s: tied.mask(s)[tasks][:, :, None, None] for s in ("conv1", "conv2")}
    torch.testing.assert_close(tied(images(), tasks), tied.bu(images(), conv2_only), rtol=0, atol=0)
    # So at one seed tied masks are the model gated on conv1 and conv2 only: the same draws, the same outputs.
    torch.manual_seed(0)
    gated = build_model("task_routing", 9, gated="conv1,conv2")
    assert all(torch.equal(gated.mask(s), tied.mask(s)) for s in ("conv1", "conv2"))
    assert all(torch.equal(p, q) for p, q in zip(gated.parameters(), tied.parameters()))
    torch.testing.assert_close(gated(images(), tasks), tied(images(), tasks), rtol=0, atol=0)


class DataMulRouted(nn.Module):
    """A hand-built reference of the original layer: the masks multiply the feature maps in place on ``.data``,
    so autograd never sees them."""

    def __init__(self, routed):
        super().__init__()
        self.routed = routed

    def forward(self, x, tasks):
        bu = self.routed.bu

        def mask(site, value):
            value.data.mul_(self.routed.mask(site)[tasks][:, :, None, None])
            return value

        conv1 = mask("conv1", bu.conv1(x))
        conv2 = mask("conv2", bu.conv2(F.max_pool2d(F.relu(conv1), 2)))
        pool2 = mask("pool2", F.max_pool2d(F.relu(conv2), 2))
        return bu.head(F.relu(bu.fc(pool2.flatten(1))))


def gradients(model, forward):
    model.zero_grad()
    F.cross_entropy(forward(images().double(), torch.arange(6) % 9), torch.arange(6)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_straight_through_gradient_equals_in_place_data_mul_reference():
    torch.manual_seed(0)
    model = TaskRoutedLeNet(9, mask_gradient="straight_through").double()
    reference = DataMulRouted(model)
    x, tasks = images().double(), torch.arange(6) % 9
    torch.testing.assert_close(model(x, tasks), reference(x, tasks), rtol=0, atol=0)
    ours, theirs = gradients(model, model), gradients(model, reference)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-15)
    # It differs from the masked gradient where no ReLU follows the mask (pool2 -> fc): the fc weights of the
    # switched-off pool2 units get no gradient when masked (their input is 0 either way), and the conv2 filters
    # behind them receive one only straight through.
    masked = gradients(model, lambda *a: TaskRoutedLeNet.forward(masked_view(model), *a))
    assert not torch.allclose(masked["bu.conv2.weight"], ours["bu.conv2.weight"])
    torch.testing.assert_close(masked["bu.fc.weight"], ours["bu.fc.weight"], rtol=1e-12, atol=1e-15)


def masked_view(model):
    model.mask_gradient = "masked"
    return model


def test_straight_through_reaches_units_masked_at_pool2_only():
    """Gated at pool2 only: masked, conv2 filters whose channel task 0 switches off get no gradient; straight
    through, they do."""
    torch.manual_seed(0)
    model = TaskRoutedLeNet(9, gated="pool2")
    off = model.mask("pool2")[0] == 0
    tasks = torch.zeros(6, dtype=torch.long)
    for mode, expect_zero in (("masked", True), ("straight_through", False)):
        model.mask_gradient = mode
        model.zero_grad()
        F.cross_entropy(model(images(), tasks), torch.arange(6)).backward()
        assert (model.bu.conv2.weight.grad[off].abs().sum() == 0) == expect_zero


@pytest.mark.parametrize("override,message", [
    ("model_options.gated=conv3", "gated must be a comma list of distinct sites among conv1,conv2,pool2"),
    ("model_options.gated=conv1,conv1", "distinct sites"),
    ("model_options.units_off=5", "sigma (a fraction) or units_off (a count), not both"),
    ("model_options.mask_gradient=st", "mask_gradient must be one of masked, straight_through"),
    ("model_options.tied_masks=1", "'model_options.tied_masks' must be bool"),
])
def test_bad_switches_fail_with_one_line(override, message):
    with pytest.raises(config.ParamError, match=re.escape(message)) as err:
        config.load_params(PARAM_FILE, [override])
    assert "\n" not in str(err.value)


def test_units_off_out_of_range_names_the_site():
    with pytest.raises(config.ParamError, match="units_off must be an integer from 0 to 9 \\(gated site conv1"):
        config.load_params(PARAM_FILE, ["model_options.sigma=null", "model_options.units_off=10"])
    params = config.load_params(PARAM_FILE, ["model_options.sigma=null", "model_options.units_off=12",
                                             "model_options.gated=conv2,pool2"])
    assert params["model_options"]["units_off"] == 12
