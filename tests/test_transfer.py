"""Host-device copies that do not wait for the device (`ptqbench.transfer`)."""

from __future__ import annotations

import pytest
import torch

from ptqbench.transfer import download, upload

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_round_trip_keeps_every_value(device):
    host = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    on_device = upload(host, torch.device(device))
    assert on_device.device.type == device
    back, arrived = download(on_device * 2)
    if device == "cpu":
        assert arrived is None
    else:
        assert back.is_pinned() and arrived is not None
        arrived.synchronize()
    assert torch.equal(back, host * 2)
