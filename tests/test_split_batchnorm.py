from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocohub.backbones import resnet18
from mocohub.errors import ConfigError, InputError
from mocohub.training import SplitBatchNorm, convert_split_batchnorm


def test_train_mode_normalises_each_split_on_its_own() -> None:
    torch.manual_seed(0)
    bn = SplitBatchNorm(6, num_splits=3, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(12, 6, 4, 4) * 3 + 2
    out = bn(x)
    expected_running_mean = torch.zeros(6)
    expected_running_var = torch.zeros(6)
    for s in range(3):
        part = x[s::3]  # sample i belongs to split i % 3
        plain = nn.BatchNorm2d(6, momentum=0.1)
        plain.load_state_dict(
            {**bn.state_dict(), "running_mean": torch.zeros(6), "running_var": torch.ones(6)}
        )
        torch.testing.assert_close(out[s::3], plain(part), atol=1e-5, rtol=1e-5)
        expected_running_mean += plain.running_mean / 3
        expected_running_var += plain.running_var / 3
    torch.testing.assert_close(bn.running_mean, expected_running_mean)
    torch.testing.assert_close(bn.running_var, expected_running_var)
    assert int(bn.num_batches_tracked) == 1
    # A single BN over the whole batch gives something else: the split matters.
    whole = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
    assert not torch.allclose(out, whole, atol=1e-3)


def test_eval_mode_is_plain_batchnorm_and_keys_are_unchanged() -> None:
    bn = SplitBatchNorm(4, num_splits=2)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    bn.eval()
    x = torch.randn(3, 4, 2, 2)  # any batch size in eval mode
    torch.testing.assert_close(bn(x), (x - 0.5) / torch.sqrt(torch.tensor(2.0) + bn.eps))
    assert set(bn.state_dict()) == set(nn.BatchNorm2d(4).state_dict())


def test_convert_keeps_parameters_and_state_dict() -> None:
    net = resnet18(num_classes=8, small_stem=True, width=8)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    weight = net.bn1.weight
    convert_split_batchnorm(net, 4)
    assert isinstance(net.bn1, SplitBatchNorm) and net.bn1.num_splits == 4
    assert isinstance(net.layer3[0].downsample[1], SplitBatchNorm)
    assert net.bn1.weight is weight
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert list(net.state_dict()) == list(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert net(torch.randn(8, 3, 16, 16)).shape == (8, 8)


def test_errors() -> None:
    bn = SplitBatchNorm(4, num_splits=4)
    with pytest.raises(InputError, match="divisible by 4"):
        bn(torch.randn(6, 4, 2, 2))
    with pytest.raises(ConfigError):
        SplitBatchNorm(4, num_splits=0)
