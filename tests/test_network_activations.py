"""The inference networks' single-slope PReLUs run as in-place leaky ReLUs (issue 20):
the shipped models must give exactly the values the stock MONAI network gives, in float32
and under bfloat16 autocast, or every evaluation figure in the cards would be stale."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch
from torch import nn

from models.restoration import (
    HU_SCALE,
    RestorationModel,
    ScalarLeakyReLU,
    load_weights,
    scalar_prelus_in_place,
    to_network,
)
from models.sct import SctModel
from models.synthesis import SynthesisModel


def _stock(model: object) -> nn.Module:
    """The same network as ``model.net``, built and loaded the way MONAI ships it (PReLU)."""
    fresh = _rebuild(model)
    fresh.load_state_dict(load_weights(model.meta.verified_weights(model.directory)))  # type: ignore[attr-defined]
    return fresh.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]


def _rebuild(model: object) -> nn.Module:
    if isinstance(model, RestorationModel):
        from models.restoration import Architecture

        a = model.meta.architecture
        return Architecture(tuple(a["channels"]), tuple(a["strides"]), int(a["num_res_units"])).build()
    if isinstance(model, SctModel):
        from models.sct import SctArchitecture

        a = model.meta.architecture
        return SctArchitecture(tuple(a["channels"]), tuple(a["strides"]), int(a["num_res_units"])).build()
    assert isinstance(model, SynthesisModel)
    from models.synthesis import SynthesisArchitecture

    a = model.meta.architecture
    return SynthesisArchitecture(
        len(model.inputs), tuple(a["channels"]), tuple(a["strides"]), int(a["num_res_units"])
    ).build()


def _ct_slices(size: int = 128) -> torch.Tensor:
    """Two SIMULATED low-dose CT slices (head and chest) in the network's units."""
    from models.sim.ldct import make_case

    anatomies: tuple[Literal["head", "chest"], ...] = ("head", "chest")
    planes = [make_case(a, 4100 + k, size=size, dose=0.25).low_dose_hu for k, a in enumerate(anatomies)]
    return torch.from_numpy(to_network(np.stack(planes))[:, None])


def _input_for(model: object) -> torch.Tensor:
    if isinstance(model, RestorationModel):
        return _ct_slices()
    net: nn.Module = model.net  # type: ignore[attr-defined]
    channels = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels
    rng = np.random.default_rng(7)  # MR-like normalised intensities: smooth blobs plus noise
    base = rng.random((2, channels, 8, 8)).astype(np.float32) * 1.5
    x = torch.nn.functional.interpolate(torch.from_numpy(base), size=(128, 128), mode="bilinear")
    return x + 0.05 * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))


@pytest.fixture(scope="module", params=["restoration", "sct", "synthesis"])
def model(request: pytest.FixtureRequest) -> object:
    if request.param == "restoration":
        return RestorationModel.shipped(precision="float32")
    if request.param == "sct":
        return SctModel.shipped()
    return SynthesisModel.shipped("synthesis-t1w-t2w-to-flair")


def test_every_single_slope_prelu_is_replaced(model: object) -> None:
    net: nn.Module = model.net  # type: ignore[attr-defined]
    assert not any(isinstance(m, nn.PReLU) for m in net.modules())
    assert sum(isinstance(m, ScalarLeakyReLU) for m in net.modules()) > 0


@pytest.mark.parametrize("bfloat16", [False, True], ids=["float32", "bfloat16"])
def test_outputs_identical_to_the_stock_network(model: object, bfloat16: bool) -> None:
    stock = _stock(model)
    x = _input_for(model).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        expected = stock(x.clone())
        got = model.net(x.clone())  # type: ignore[attr-defined]
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype
        worst = float((g.float() - e.float()).abs().max()) * HU_SCALE
        assert torch.equal(g, e), f"largest difference {worst} (x {HU_SCALE:g})"


def test_input_left_untouched_and_training_out_of_place() -> None:
    """In place only on the activation the layer before made; with autograd (a network
    being trained) it computes out of place, so the graph stays valid."""
    layer = ScalarLeakyReLU(0.25)
    x = torch.tensor([-2.0, 3.0], requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(x.detach(), torch.tensor([-2.0, 3.0]))
    assert torch.equal(y.detach(), torch.tensor([-0.5, 3.0]))
    assert torch.equal(x.grad, torch.tensor([0.25, 1.0]))  # type: ignore[arg-type]


def test_multi_slope_prelu_is_kept() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.PReLU(3), nn.Conv2d(3, 3, 1), nn.PReLU())
    assert scalar_prelus_in_place(net) == 1
    assert isinstance(net[1], nn.PReLU) and isinstance(net[3], ScalarLeakyReLU)
