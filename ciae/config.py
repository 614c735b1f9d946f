"""Every knob of the method, with the paper's defaults, in one place.

``Config()`` is the paper's recipe (ResNet-50-FPN, 90k iterations, batch 16, shorter side 800).
``Config.small()`` is the CPU configuration used by the demo and the tests. A config round-trips
through plain dicts (``to_dict`` / ``from_dict``), which is how it travels to Ray workers,
MLflow params and checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("frozen_bn", "bn", "gn")
THING_MODES = ("merged", "specific", "none")  # Table II, embedding side
INSTANCE_CLASS_FROM = ("detector", "embedding")  # Table II, inference side
# keys of earlier versions that configs saved in checkpoints may still hold; read and ignored
RETIRED_KEYS = {"inference": {"oracle"}}    # oracle evaluation is ``evaluate(..., oracle=True)``


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    width: int = 64             # channels of the stem; stages use width * (1, 2, 4, 8) (x4 for bottlenecks)
    norm: str = "frozen_bn"     # frozen_bn with ImageNet weights; bn or gn when training from scratch
    weights: str | None = None  # a local torchvision-format ResNet state dict, or None
    freeze_at: int = 2          # stages frozen with pretrained weights (0 = none, 1 = stem, 2 = stem + res2)


@dataclass
class FPNConfig:
    channels: int = 256


@dataclass
class FCOSConfig:
    """The proposal head on P3-P7 (FCOS), positives only inside instance masks."""

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    size_ranges: tuple[tuple[float, float], ...] = ((0, 64), (64, 128), (128, 256), (256, 512),
                                                    (512, float("inf")))
    num_convs: int = 4
    center_sample_radius: float = 1.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "giou"      # "iou" (the paper's IoU loss [48]) or "giou"
    prior_prob: float = 0.01
    score_thresh: float = 0.05
    pre_nms_topk: int = 1000    # per level
    nms_thresh: float = 0.6
    max_detections: int = 100


@dataclass
class EmbeddingConfig:
    """The embedding branch on P2-P5 and the CIAE loss (Eq. 1-14)."""

    dim: int = 32
    branch_channels: int = 128
    coordconv: bool = True          # Table III
    box_embedding: bool = True      # Table III: fuse the proposal head's box embeddings (P'')
    thing_mode: str = "merged"      # Table II: thing classes merged / specific / none in the CAE
    margin: float = 0.15
    top_k: int = 5
    alpha: float = 2.0              # L = L_CAE + alpha * L_IAE
    thing_weight: float = 5.0       # weight of thing pixels in L_IAE
    box_expand: float = 1.5         # ground-truth boxes expanded for the IAE box filter
    memory_momentum: float = 1e-4   # lambda_t = 1 - memory_momentum * (1 - t / T) ** 3 (Eq. 13)
    pixel_chunk: int = 65536        # pixels per chunk in the PyTorch loss


@dataclass
class InferenceConfig:
    stuff_area: int = 4096              # stuff segments smaller than this become void ...
    stuff_area_ref: int = 800 * 1333    # ... at this image area; scaled by (H * W) / stuff_area_ref
    instance_class_from: str = "detector"   # Table II
    # Not in the paper, which does not say which detections become queries: detections scoring
    # below instance_score_thresh are not queries, and a detection whose query embedding has
    # cosine >= duplicate_similarity with a better-scoring overlapping one is the same instance.
    instance_score_thresh: float = 0.4
    duplicate_similarity: float = 0.9
    min_instance_area: int = 0          # thing segments smaller than this become void


@dataclass
class SolverConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 16
    iterations: int = 90_000
    steps: tuple[int, ...] = (60_000, 80_000)  # lr x gamma at each
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 1e-3
    clip_grad_norm: float | None = None
    checkpoint_every: int = 5000
    seed: int = 0
    amp: bool = True            # bfloat16 autocast of the forward pass on CUDA (no effect on CPU)
    channels_last: bool = True  # NHWC activations and weights: faster convolutions (oneDNN, tensor cores)


@dataclass
class InputConfig:
    shorter_sides: tuple[int, ...] = (800,)   # one drawn per image (scale jitter)
    max_size: int = 1333
    test_shorter_side: int = 800
    flip_prob: float = 0.5
    aspect_grouping: bool = True              # training batches of one orientation (pipeline.feed.stream)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, ImageNet
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    fcos: FCOSConfig = field(default_factory=FCOSConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    input: InputConfig = field(default_factory=InputConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.backbone.name in BACKBONES, f"backbone.name must be one of {BACKBONES}"),
            (self.backbone.norm in NORMS, f"backbone.norm must be one of {NORMS}"),
            (self.embedding.thing_mode in THING_MODES, f"embedding.thing_mode must be one of {THING_MODES}"),
            (self.inference.instance_class_from in INSTANCE_CLASS_FROM,
             f"inference.instance_class_from must be one of {INSTANCE_CLASS_FROM}"),
            (self.fcos.box_loss in ("iou", "giou"), "fcos.box_loss must be 'iou' or 'giou'"),
            (len(self.fcos.strides) == len(self.fcos.size_ranges), "fcos.strides and size_ranges differ in length"),
            (self.embedding.top_k >= 1, "embedding.top_k must be >= 1"),
            (self.embedding.margin >= 0, "embedding.margin must be >= 0"),
            (self.embedding.box_expand >= 1, "embedding.box_expand must be >= 1"),
            (self.inference.instance_class_from == "detector" or self.embedding.thing_mode == "specific",
             "instance classes from the embedding need embedding.thing_mode 'specific'"),
            (len(self.input.shorter_sides) > 0 and min(self.input.shorter_sides) >= 1
             and self.input.test_shorter_side >= 1 and self.input.max_size >= 1,
             "input.shorter_sides (non-empty), test_shorter_side and max_size must be positive"),
            (0 <= self.input.flip_prob <= 1, "input.flip_prob must lie in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid config: {msg}")

    @classmethod
    def small(cls) -> "Config":
        """A CPU-sized configuration: width-reduced ResNet-18 trained from scratch on ~192 px
        images; its 700 steps of batch 4 reach held-out PQ ~0.73 on the demo's synthetic data
        (the demo's default 600, the schedule scaled, ~0.72), ~4.5 min of training on 2 cores."""
        return cls(
            backbone=BackboneConfig(name="resnet18", width=16, norm="gn", freeze_at=0),
            fpn=FPNConfig(channels=64),
            fcos=FCOSConfig(num_convs=2, size_ranges=((0, 32), (32, 64), (64, 128), (128, 256),
                                                      (256, float("inf")))),
            embedding=EmbeddingConfig(branch_channels=32),
            inference=InferenceConfig(),
            solver=SolverConfig(lr=0.01, batch_size=4, iterations=700, steps=(467, 622),
                                warmup_iters=70, checkpoint_every=100, clip_grad_norm=10.0),
            input=InputConfig(shorter_sides=(160, 192, 224), max_size=320, test_shorter_side=192),
        )

    @classmethod
    def load(cls, spec: str) -> "Config":
        """A preset by name (``PRESETS``: 'small', 'paper') or a JSON file of overrides,
        ``{"base": "small"|"paper", section: {key: value}}`` (base 'small' when absent). A bad
        one is a ValueError that starts with ``spec``."""
        import json

        names = ", ".join(repr(k) for k in PRESETS)
        if spec in PRESETS:
            return PRESETS[spec]()
        try:
            with open(spec) as f:
                overrides = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{spec}: not {names} or a readable JSON file ({e})") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"{spec}: expected a JSON object of config sections")
        base = overrides.pop("base", "small")
        if base not in PRESETS:
            raise ValueError(f"{spec}: base must be one of {names}, got {base!r}")
        try:
            return PRESETS[base]().merged(overrides)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{spec}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a (possibly partial) nested dict; unknown keys are an error."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            sub_cls = f.default_factory  # type: ignore[misc]
            known = {g.name: g for g in dataclasses.fields(sub_cls)}
            given = {k: v for k, v in d[f.name].items() if k not in RETIRED_KEYS.get(f.name, ())}
            unknown = set(given) - set(known)
            if unknown:
                raise ValueError(f"unknown config keys in {f.name}: {sorted(unknown)}")
            values = {k: _tupled(v) for k, v in given.items()}
            kwargs[f.name] = sub_cls(**values)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        return cls(**kwargs)

    def merged(self, overrides: dict) -> "Config":
        """This config with a nested dict of overrides applied."""
        d = self.to_dict()
        for section, values in overrides.items():
            if section not in d:
                raise ValueError(f"unknown config section {section!r}")
            d[section].update(values)
        return Config.from_dict(d)


PRESETS = {"small": Config.small, "paper": Config}    # the configs ``Config.load`` knows by name


def _tupled(v):
    """JSON/YAML lists back to the tuples the dataclasses use."""
    if isinstance(v, list):
        return tuple(_tupled(x) for x in v)
    return v
