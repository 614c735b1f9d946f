"""ResNet backbone and FPN: shapes, freezing, FrozenBatchNorm, torchvision-format weights."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ciae.config import BackboneConfig, Config
from ciae.modeling.backbone import (FrozenBatchNorm2d, ResNet, StridedConv1x1, build_backbone, group_count,
                                    load_torchvision_weights)
from ciae.modeling.fpn import FPN

DEPTHS = (18, 34, 50, 101)
NORMS = ("frozen_bn", "bn", "gn")


def expected_size(size: int, stride: int) -> int:
    return math.ceil(size / stride)


def check_pyramid(image: torch.Tensor, features: dict, fpn_out: dict, backbone: ResNet, fpn: FPN):
    b, _, h, w = image.shape
    assert list(features) == ["c2", "c3", "c4", "c5"]
    for level, x in features.items():
        s = backbone.strides[level]
        assert x.shape == (b, backbone.out_channels[level], expected_size(h, s), expected_size(w, s))
    assert list(fpn_out) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    for level, x in fpn_out.items():
        s = fpn.strides[level]
        assert x.shape == (b, fpn.out_channels[level], expected_size(h, s), expected_size(w, s))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_output_shapes(depth, norm):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name=f"resnet{depth}", width=8, norm=norm, freeze_at=0))
    fpn = FPN(backbone.out_channels, 16)
    expansion = 4 if depth >= 50 else 1
    assert backbone.out_channels == {f"c{i + 2}": 8 * 2**i * expansion for i in range(4)}
    assert fpn.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    image = torch.randn(2, 3, 64, 96)
    features = backbone(image)
    check_pyramid(image, features, fpn(features), backbone, fpn)


@pytest.mark.parametrize("size", [(97, 130), (33, 65), (200, 136), (31, 31)])
def test_sizes_not_multiple_of_32(size):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="resnet18", width=8, norm="gn", freeze_at=0))
    fpn = FPN(backbone.out_channels, 16)
    image = torch.randn(1, 3, *size, requires_grad=True)
    features = backbone(image)
    out = fpn(features)
    check_pyramid(image, features, out, backbone, fpn)
    sum(x.sum() for x in out.values()).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


@pytest.mark.parametrize("depth", DEPTHS)
def test_torchvision_parameter_counts_and_names(depth):
    """Width 64 matches torchvision's resnet18/34/50/101 without fc (built on meta, no memory)."""
    with torch.device("meta"):
        model = ResNet(depth, width=64, norm="bn")
    counts = {18: 11_176_512, 34: 21_284_672, 50: 23_508_032, 101: 42_500_160}
    assert sum(p.numel() for p in model.parameters()) == counts[depth]
    # torchvision's state-dict key count, less fc.weight and fc.bias
    assert len(model.state_dict()) == {18: 120, 34: 216, 50: 318, 101: 624}[depth]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    if depth >= 50:
        assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
        assert shapes["layer4.2.bn3.running_var"] == (2048,)
        # v1.5: the stride is on the 3x3 conv
        assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    else:
        assert "layer1.0.downsample.0.weight" not in shapes
        assert shapes["layer2.0.downsample.1.running_mean"] == (128,)
        assert shapes["layer4.1.conv2.weight"] == (512, 512, 3, 3)


def test_group_norm_groups():
    assert [group_count(c) for c in (8, 16, 48, 64, 96, 2048, 7)] == [8, 16, 24, 32, 32, 32, 7]
    model = ResNet(50, width=12, norm="gn")
    assert model.bn1.num_groups == 12 and model.layer1[0].bn3.num_groups == 24


@pytest.mark.parametrize("freeze_at", [0, 1, 2])
def test_frozen_stages_get_no_gradient(freeze_at):
    torch.manual_seed(0)
    model = ResNet(18, width=8, norm="bn", freeze_at=freeze_at)
    with torch.no_grad():  # make every block's residual branch live, so every layer gets gradient
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
    model.train()
    frozen = [model.conv1, model.bn1, model.layer1][: {0: 0, 1: 2, 2: 3}[freeze_at]]
    trained = [m for m in (model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4)
               if m not in frozen]
    stats_before = [b.clone() for m in frozen for n, b in m.named_buffers() if "running" in n]
    sum(x.sum() for x in model(torch.randn(2, 3, 64, 64)).values()).backward()
    for m in frozen:
        assert not m.training
        for p in m.parameters():
            assert not p.requires_grad and p.grad is None
    for m in trained:
        assert m.training
        for p in m.parameters():
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    stats_after = [b for m in frozen for n, b in m.named_buffers() if "running" in n]
    assert all(torch.equal(a, b) for a, b in zip(stats_before, stats_after))


def test_residual_blocks_start_as_identity_where_trained():
    for norm in ("bn", "gn"):
        model = ResNet(50, width=8, norm=norm)
        blocks = [*model.layer1, *model.layer4]
        assert all(torch.all(block.bn3.weight == 0) for block in blocks)
        assert all(torch.all(block.bn1.weight == 1) for block in blocks)
        assert torch.all(model.layer1[0].downsample[1].weight == 1)
    # fixed norms are never zeroed (the blocks would stay dead)
    assert all(torch.all(block.bn2.weight == 1) for block in ResNet(18, width=8, norm="frozen_bn").layer1)
    frozen_stage = ResNet(50, width=8, norm="bn", freeze_at=2).layer1
    assert all(torch.all(block.bn3.weight == 1) for block in frozen_stage)


def test_frozen_batchnorm_matches_eval_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(24)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3.0)
    bn.eval()
    frozen = FrozenBatchNorm2d(24)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, strict load passes
    assert not list(frozen.parameters())
    x = torch.randn(3, 24, 7, 5)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)


def test_frozen_batchnorm_is_one_pass_and_keeps_layout_dtype_and_gradient():
    """One op over the activation (a GPU's memory traffic), channels-last in and out, bf16 stays
    bf16, the gradient is eval BatchNorm's, and the backward keeps only the [C] scale."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.running_var.uniform_(0.1, 3.0)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 8, 6, 5).to(memory_format=torch.channels_last).requires_grad_()
    full = []

    class FullSize(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.is_tensor(out) and out.numel() == x.numel() and func._schema.name != "aten::detach":
                full.append(func._schema.name)
            return out

    saved = []
    with FullSize(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = frozen(x)
    assert full == ["aten::addcmul"] and saved == [torch.Size([8, 1, 1])]
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    xr = x.detach().clone().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(bn(xr), xr, g)[0])
    xb = x.detach().bfloat16()
    assert frozen(xb).dtype == torch.bfloat16
    torch.testing.assert_close(frozen(xb).float(), bn(xb.float()), rtol=2e-2, atol=2e-2)


def test_frozen_batchnorm_keeps_its_scale_and_shift_while_its_buffers_hold_still():
    """After the first call a forward dispatches one op; changed, reloaded or moved buffers, another
    dtype and inference mode each give a fresh scale and shift, so the output is always eval
    BatchNorm's and a grad-mode forward after an inference-mode one can still backward."""
    from ciae.utils.opcount import OpCounter

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    frozen = FrozenBatchNorm2d(6)
    x = torch.randn(2, 6, 5, 4)

    def check(dtype=torch.float32, tol=1e-6):
        torch.testing.assert_close(frozen(x.to(dtype)).float(), bn(x.to(dtype).float()), rtol=tol, atol=tol)

    frozen.load_state_dict(bn.state_dict())
    check()
    with OpCounter() as c:
        frozen(x)
    assert c.num_ops == 1 and c.ops["addcmul"] == 1, dict(c.ops)
    with torch.no_grad():
        for b in (bn, frozen):                       # in place: the same tensors, new versions
            b.running_var.mul_(3.0)
            b.bias.add_(1.0)
    check()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
    frozen.load_state_dict(bn.state_dict())          # copied into the buffers
    check()
    check(torch.bfloat16, 3e-2)
    check()
    frozen.to(torch.float64)                         # new buffer tensors
    bn.to(torch.float64)
    torch.testing.assert_close(frozen(x.double()), bn(x.double()))
    frozen.float()
    bn.float()
    with torch.inference_mode():
        frozen(x)
    xg = x.clone().requires_grad_()
    frozen(xg).sum().backward()                      # the inference-mode scale is not the one saved
    assert xg.grad is not None


STRIDED_1X1_TRAINING = """
import torch
from ciae.modeling.backbone import ResNet
net = ResNet(18, width=8, norm="gn").to(memory_format=torch.channels_last)
for i in range(4):
    x = torch.randn(2, 3, 256, 320).to(memory_format=torch.channels_last)
    sum(v.float().mean() for v in net(x).values()).backward()
    held = [torch.randn(1000 + 37 * j) for j in range(50)]   # reuse the heap a kernel may have hurt
print("trained")
"""


def test_a_narrow_backbone_trains_on_the_cpu_without_oneDNN_corrupting_the_heap():
    """Width 8 (the tests' size) at 256 x 320, channels-last: the shortcuts' strided 1x1 convs
    have 8 input channels. With a plain strided ``nn.Conv2d`` there, oneDNN's AVX-512 weight
    gradient corrupts the heap and the process dies (``StridedConv1x1``), so it runs in a
    process of its own, with glibc's heap checks on."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, "-c", STRIDED_1X1_TRAINING], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root, "MALLOC_CHECK_": "3"}, timeout=300)
    assert run.returncode == 0 and "trained" in run.stdout, (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("cin,size", [(8, (2, 8, 12, 10)), (8, (1, 8, 7, 9)), (16, (2, 16, 12, 10))])
def test_strided_conv1x1_is_the_plain_strided_conv(cin, size):
    torch.manual_seed(0)
    ours = StridedConv1x1(cin, 2 * cin, 2)
    x = torch.randn(size, requires_grad=True)       # contiguous: oneDNN's other kernel, which is sound
    y = ours(x)
    want = F.conv2d(x, ours.weight, stride=2)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (x, ours.weight), g),
                               torch.autograd.grad(want, (x, ours.weight), g))


def torchvision_state_dict(model: ResNet) -> dict[str, torch.Tensor]:
    """``model``'s weights as torchvision stores a ResNet: BatchNorm keys and a classifier."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in [k for k in state if k.endswith("running_var")]:
        state[k.replace("running_var", "num_batches_tracked")] = torch.tensor(100)
    state["fc.weight"] = torch.randn(1000, model.out_channels["c5"])
    state["fc.bias"] = torch.randn(1000)
    return state


def randomized(model: ResNet) -> ResNet:
    """``model`` with random norm statistics and affine parameters (convs keep their init)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_load_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    source = randomized(ResNet(18, width=64, norm="frozen_bn"))
    state = torchvision_state_dict(source)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    model = build_backbone(BackboneConfig(name="resnet18", width=64, norm="frozen_bn", weights=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    bn_model = ResNet(18, width=64, norm="bn")
    load_torchvision_weights(bn_model, str(path))
    bn_model.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(model(x).values(), bn_model(x).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_wrapped_state_dict(tmp_path, wrapper):
    torch.manual_seed(0)
    state = torchvision_state_dict(randomized(ResNet(50, width=8, norm="bn")))
    path = tmp_path / "resnet50.pth"
    torch.save({wrapper: state, "epoch": 90}, path)
    model = build_backbone(BackboneConfig(name="resnet50", width=8, norm="frozen_bn", weights=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_mismatched_file_names_file_and_keys(tmp_path):
    state = torchvision_state_dict(ResNet(18, width=8, norm="bn"))
    state["layer9.0.conv1.weight"] = torch.zeros(2, 2)
    del state["layer3.1.bn2.bias"]
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        load_torchvision_weights(ResNet(18, width=16, norm="frozen_bn"), str(path))
    msg = str(e.value)
    assert str(path) in msg
    assert "1 missing: layer3.1.bn2.bias (64,)" in msg
    assert "1 unexpected: layer9.0.conv1.weight (2, 2)" in msg
    assert "shape-mismatched: conv1.weight (8, 3, 7, 7) in file, (16, 3, 7, 7) in model" in msg
    assert "fc." not in msg and "num_batches_tracked" not in msg


def test_group_norm_refuses_imagenet_weights(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torchvision_state_dict(ResNet(18, width=8, norm="bn")), path)
    with pytest.raises(ValueError, match="GroupNorm"):
        build_backbone(BackboneConfig(name="resnet18", width=8, norm="gn", weights=str(path)))


class Payload:
    """Unpickling it would create ``marker``: the loader must never get that far."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "payload": Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="not a loadable checkpoint or state dict .*weights_only") as e:
        load_torchvision_weights(ResNet(18, width=8), str(path))
    assert str(e.value).startswith(f"{path}: ")
    assert not marker.exists()


def test_non_state_dict_file_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="state dict"):
        load_torchvision_weights(ResNet(18, width=8), str(path))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="resnet152"):
        build_backbone(BackboneConfig(name="resnet152"))
    with pytest.raises(ValueError, match="freeze_at"):
        ResNet(18, width=8, freeze_at=6)
    with pytest.raises(ValueError, match="norm"):
        ResNet(18, width=8, norm="ln")
    with pytest.raises(ValueError, match="in_channels"):
        FPN({"c3": 8, "c4": 16, "c5": 32}, 16)


def test_fpn_init_and_gradients_reach_inputs():
    torch.manual_seed(0)
    in_channels = {"c2": 8, "c3": 16, "c4": 32, "c5": 64}
    fpn = FPN(in_channels, 16)
    for m in fpn.modules():
        if isinstance(m, nn.Conv2d):
            bound = math.sqrt(3.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1]))  # a = 1
            assert m.weight.abs().max() <= bound and torch.all(m.bias == 0)
    features = {c: torch.randn(2, ch, 40 // 2**i, 52 // 2**i, requires_grad=True)
                for i, (c, ch) in enumerate(in_channels.items())}
    out = fpn(features)
    assert out["p2"].shape == (2, 16, 40, 52) and out["p7"].shape == (2, 16, 2, 2)
    sum(x.square().sum() for x in out.values()).backward()
    for c, x in features.items():
        assert x.grad is not None and x.grad.abs().sum() > 0, c


def test_small_config_pyramid():
    cfg = Config.small()
    backbone = build_backbone(cfg.backbone)
    fpn = FPN(backbone.out_channels, cfg.fpn.channels)
    image = torch.randn(1, 3, 96, 128)
    features = backbone(image)
    check_pyramid(image, features, fpn(features), backbone, fpn)
