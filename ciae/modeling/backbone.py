"""ResNet backbone (He et al., 2016) returning C2-C5, with torchvision's parameter names.

The module tree matches torchvision's ``resnet18/34/50/101`` (``conv1``, ``bn1``,
``layer1``..``layer4``, blocks with ``conv{1,2,3}``, ``bn{1,2,3}`` and ``downsample.0/.1``;
bottlenecks stride on the 3x3 conv, "v1.5"), so torchvision-format ImageNet state dicts load
with :func:`load_torchvision_weights`. ``width`` scales every stage (torchvision's is 64), which
makes a width-16 net small enough for a CPU.

Norm layers (``BackboneConfig.norm``): ``frozen_bn`` (:class:`FrozenBatchNorm2d`, for
pretrained weights), ``bn`` (``nn.BatchNorm2d``) or ``gn`` (``nn.GroupNorm`` with the largest
group count <= 32 that divides the channels). ``freeze_at`` = k freezes the first k of
(stem, layer1, ..., layer4), as detectron2 does: no gradients, and their norms stay in eval
mode, so ``bn`` statistics of frozen stages do not drift either.

Without pretrained weights, convs are kaiming-normal (fan_out) and norms weight 1, bias 0,
except that the last norm of each residual block starts at weight 0 (Goyal et al., 2017:
every block starts as the identity) wherever that weight is trained.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from ciae import checkpoint
from ciae.config import BackboneConfig

LEVELS = ("c2", "c3", "c4", "c5")
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers.

    Loads torchvision ``BatchNorm2d`` keys (``weight``, ``bias``, ``running_mean``,
    ``running_var``; ``num_batches_tracked`` is dropped). x [B, C, H, W] -> [B, C, H, W].
    Its scale and shift are computed once per dtype and kept while the buffers hold still
    (the same tensors, unmodified): in eager mode a forward is then one op, where computing
    them costs a GPU five small kernel launches per layer, seven under bf16 autocast (371 in a
    ResNet-50). ``forward`` takes what follows it in a ResNet too (``norm_act``): the ReLU and a
    residual, itself through another frozen BatchNorm or not, all in one call of
    ``kernels.channel_affine`` (on CUDA one Triton kernel; ``backend`` is the model's
    ``kernel_backend``; compiled, it traces the PyTorch twin, which the compiler fuses itself).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._affine = None     # (what it was computed from, scale [C, 1, 1], shift [C, 1, 1])
        self.backend = "auto"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _compute(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale.to(dtype)[:, None, None], shift.to(dtype)[:, None, None]

    def scale_shift(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each [C, 1, 1] in ``dtype``."""
        if torch.compiler.is_compiling():       # traced into the graph, where the compiler folds them
            return self._compute(dtype)
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        source = (dtype, torch.is_inference_mode_enabled(), buffers, [b._version for b in buffers])
        if self._affine is None or not _same(self._affine[0], source):
            self._affine = (source, *self._compute(dtype))
        return self._affine[1], self._affine[2]

    def forward(self, x: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None,
                residual_norm: FrozenBatchNorm2d | None = None) -> torch.Tensor:
        """x * scale + shift, plus ``residual`` (through ``residual_norm`` where given), then the
        ReLU with ``relu``: one pass over x; the backward keeps only the [C] scales, and the
        output for the ReLU."""
        scale, shift = self.scale_shift(x.dtype)
        rs, rb = (None, None) if residual_norm is None else residual_norm.scale_shift(residual.dtype)
        backend = "torch" if torch.compiler.is_compiling() else self.backend
        return kernels.channel_affine(x, scale, shift, residual, rs, rb, relu, backend=backend)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _same(a: tuple, b: tuple) -> bool:
    """Whether two ``FrozenBatchNorm2d`` sources match: dtype, mode, the same buffer tensors, versions."""
    return a[:2] == b[:2] and all(x is y for x, y in zip(a[2], b[2])) and a[3] == b[3]


def group_count(channels: int) -> int:
    """The largest number of GroupNorm groups <= 32 that divides ``channels``."""
    return max(g for g in range(1, 33) if channels % g == 0)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return GroupNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r}: expected 'frozen_bn', 'bn' or 'gn'")


class GroupNorm2d(nn.GroupNorm):
    """GroupNorm with ``group_count`` groups, and with ``relu`` the ReLU after it, in one call of
    ``kernels.group_norm``: on CUDA the Triton kernels keep a bfloat16 channels-last map as it is,
    where PyTorch's ``group_norm`` under autocast converts it to float32 NCHW and back (about
    seven times the memory traffic). nn.GroupNorm's parameters and state-dict keys; ``backend`` is
    the model's ``kernel_backend``. Compiled (``torch.compile``), it traces the PyTorch twin,
    which the compiler fuses itself."""

    def __init__(self, channels: int, relu: bool = False):
        super().__init__(group_count(channels), channels)
        self.relu = relu
        self.backend = "auto"

    def forward(self, x: torch.Tensor, relu: bool | None = None) -> torch.Tensor:
        """The norm, then the ReLU with ``relu`` (None: the module's ``relu``)."""
        backend = "torch" if torch.compiler.is_compiling() else self.backend
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                  self.relu if relu is None else relu, backend=backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu" if self.relu else "")


def norm_act(norm: nn.Module, x: torch.Tensor, relu: bool = True, residual: torch.Tensor | None = None,
             residual_norm: nn.Module | None = None) -> torch.Tensor:
    """relu(norm(x) + residual_norm(residual)): a ResNet's norm and what follows it (the residual
    term where given, through ``residual_norm`` where given; the ReLU with ``relu``), in one
    call where the norms allow: ``FrozenBatchNorm2d`` all of it, ``GroupNorm2d`` the norm and
    ReLU of a term without a residual; otherwise the norm, then the sum and the ReLU in place."""
    if isinstance(norm, FrozenBatchNorm2d) and (residual_norm is None or isinstance(residual_norm, FrozenBatchNorm2d)):
        return norm(x, relu, residual, residual_norm)
    if isinstance(norm, GroupNorm2d) and residual is None:
        return norm(x, relu)
    y = norm(x)
    if residual is not None:
        y += residual if residual_norm is None else residual_norm(residual)
    return torch.relu_(y) if relu else y


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class StridedConv1x1(nn.Conv2d):
    """A 1x1 conv with a stride (a shortcut's projection). On the CPU with fewer than 16 input
    channels it subsamples its input and convolves at stride 1, the same function of the same
    weights: there, oneDNN's AVX-512 strided 1x1 kernel (torch 2.13) writes past a buffer in its
    weight gradient (channels-last, even input sizes from about 40 x 60), and the process crashes
    some ops later. x [B, in, H, W] -> [B, out, ceil(H / stride), ceil(W / stride)]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.in_channels >= 16:
            return super().forward(x)
        return F.conv2d(x[:, :, ::self.stride[0], ::self.stride[1]], self.weight)


def shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Module | None:
    """The projection shortcut (``downsample``) where the block changes shape, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    conv = StridedConv1x1(in_channels, out_channels, stride) if stride > 1 else conv1x1(in_channels, out_channels)
    return nn.Sequential(conv, make_norm(norm, out_channels))


def residual(x: torch.Tensor, downsample: nn.Sequential | None) -> tuple[torch.Tensor, nn.Module | None]:
    """A block's shortcut as ``norm_act``'s (residual, residual_norm): the input itself, or the
    projection's conv output and its norm."""
    return (x, None) if downsample is None else (downsample[0](x), downsample[1])


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). x [B, in, H, W] -> [B, channels, H/stride, W/stride]."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = make_norm(norm, channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = make_norm(norm, channels)
        self.downsample = shortcut(in_channels, channels, stride, norm)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = norm_act(self.bn1, self.conv1(x))
        return norm_act(self.bn2, self.conv2(out), True, *residual(x, self.downsample))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4 (ResNet-50/101).

    x [B, in, H, W] -> [B, 4 * channels, H/stride, W/stride].
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = conv1x1(in_channels, channels)
        self.bn1 = make_norm(norm, channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = make_norm(norm, channels)
        self.conv3 = conv1x1(channels, channels * self.expansion)
        self.bn3 = make_norm(norm, channels * self.expansion)
        self.downsample = shortcut(in_channels, channels * self.expansion, stride, norm)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = norm_act(self.bn1, self.conv1(x))
        out = norm_act(self.bn2, self.conv2(out))
        return norm_act(self.bn3, self.conv3(out), True, *residual(x, self.downsample))


ARCHITECTURES: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet without its classifier: x [B, 3, H, W] (normalised) -> C2-C5.

    ``out_channels`` and ``strides`` map "c2".."c5" to channels (width * (1, 2, 4, 8), x4 for
    bottlenecks) and strides (4, 8, 16, 32). A level of stride s is ceil(H / s) x ceil(W / s).
    """

    def __init__(self, depth: int, width: int = 64, norm: str = "frozen_bn", freeze_at: int = 0):
        super().__init__()
        if depth not in ARCHITECTURES:
            raise ValueError(f"unsupported ResNet depth {depth}: expected one of {sorted(ARCHITECTURES)}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5 (stem, layer1..layer4), got {freeze_at}")
        block, counts = ARCHITECTURES[depth]
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = width
        for i, count in enumerate(counts):
            channels = width * 2**i
            blocks = []
            for j in range(count):
                blocks.append(block(in_channels, channels, 2 if i > 0 and j == 0 else 1, norm))
                in_channels = channels * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = {level: width * 2**i * block.expansion for i, level in enumerate(LEVELS)}
        self.strides = dict(STRIDES)

        stages = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
        self.frozen = tuple(name for stage in stages[:freeze_at] for name in stage)
        for name in self.frozen:
            getattr(self, name).requires_grad_(False)
        self._init_weights()
        self.train()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # trained norms only: a fixed zero would kill the block
            if isinstance(m, (BasicBlock, Bottleneck)) and m.last_norm.weight.requires_grad:
                nn.init.zeros_(m.last_norm.weight)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, 3, H, W] -> {"c2": [B, out_channels["c2"], H/4, W/4], ..., "c5": [.., H/32, W/32]}."""
        x = self.maxpool(norm_act(self.bn1, self.conv1(x)))
        out = {}
        for level, layer in zip(LEVELS, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            out[level] = x
        return out


def load_torchvision_weights(model: ResNet, path: str) -> None:
    """Load a local torchvision-format ResNet state dict file into ``model``
    (``load_torchvision_state``)."""
    load_torchvision_state(model, checkpoint.torchvision_state(checkpoint.load(path, path), path), path)


def load_torchvision_state(model: ResNet, state: Mapping[str, torch.Tensor], name: str) -> list[str]:
    """Load a torchvision-format ResNet state dict into ``model``; returns the keys loaded.

    ``fc.*`` and ``num_batches_tracked`` are ignored; any other missing, unexpected or
    shape-mismatched key raises a ValueError naming ``name`` and the keys."""
    if any(isinstance(m, nn.GroupNorm) for m in model.modules()):
        raise ValueError(f"cannot load {name} into a GroupNorm ResNet: ImageNet weights carry "
                         "BatchNorm statistics; use norm 'frozen_bn' or 'bn'")

    def kept(key: str) -> bool:
        return not key.startswith("fc.") and not key.endswith("num_batches_tracked")

    given = {k: v for k, v in state.items() if kept(k)}
    expected = {k: v for k, v in model.state_dict().items() if kept(k)}
    missing = [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in given]
    unexpected = [f"{k} {tuple(v.shape)}" for k, v in given.items() if k not in expected]
    mismatched = [f"{k} {tuple(given[k].shape)} in file, {tuple(v.shape)} in model"
                  for k, v in expected.items() if k in given and given[k].shape != v.shape]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape-mismatched", mismatched)) if keys]
    if problems:
        raise ValueError(f"{name} does not fit this ResNet; " + "; ".join(problems))
    model.load_state_dict(given, strict=False)
    return sorted(given)


def build_backbone(cfg: BackboneConfig) -> ResNet:
    """The ResNet that ``cfg`` describes, with ``cfg.weights`` loaded when set."""
    depth = {f"resnet{d}": d for d in ARCHITECTURES}.get(cfg.name)
    if depth is None:
        raise ValueError(f"unknown backbone {cfg.name!r}: expected resnet18, resnet34, resnet50 or resnet101")
    model = ResNet(depth, width=cfg.width, norm=cfg.norm, freeze_at=cfg.freeze_at)
    if cfg.weights:
        load_torchvision_weights(model, cfg.weights)
    return model
