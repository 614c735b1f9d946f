"""Image preprocessing for training, validation and prediction, in one place (the role of
torchvision's ``GeneralizedRCNNTransform``): decode, resize to a size, pad a batch to a multiple
of 32, and map a prediction back to the image's own size.

* Decode (:func:`decode_rgb`): any image PIL reads to RGB, turned by its EXIF orientation as
  viewers show it; ground truth and sizes are taken in that orientation.
* Resize: the shorter side to a target (drawn from ``InputConfig.shorter_sides`` in training,
  ``test_shorter_side`` otherwise), the longer side capped at ``max_size``; images bilinear
  with PIL's filter into the network's [3, h, w] layout (:func:`resize_chw`), label maps nearest
  (:func:`resize_nearest`).
* Pad: every map of a batch zero-padded (labels with their ignore value) at the bottom and
  right to one size divisible by ``SIZE_DIVISIBILITY``; images to predict are batched by aspect
  ratio (:func:`batch_order`), so that a batch pads little.
* Map back (:func:`resize_nearest`, which ``ciae.modeling.inference.assemble`` applies on the model's
  device, the segments measured at that size from the map before the resize with
  :func:`nearest_cover`): the predicted id map resized (nearest) to the image's size; a segment
  that vanished in the resize is dropped, so every listed segment has pixels, as COCO panoptic
  requires.

``pipeline.feed.targets`` (training targets), ``ciae.engine.predictor`` (prediction on images of any size)
and validation (``pipeline.evaluation.validation.evaluate``) all go through :class:`Transform`, so the three
see the same pixels.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ciae.config import InputConfig

if TYPE_CHECKING:
    import torch  # imported where used (the resizes and batches), not for decoding or sizes

SIZE_DIVISIBILITY = 32
MAX_PIXELS = 100_000_000      # larger images are refused before they are decoded
REDUCING_GAP = 1.5            # a JPEG decoded at a reduced scale stays >= 1.5x its target size


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, anything PIL reads) -> [H, W, 3] uint8 RGB, turned as
    viewers show it.

    The EXIF orientation tag (a phone photo's; JPEG, PNG, TIFF or WebP) is applied with PIL's
    ``ImageOps.exif_transpose``, as browsers, annotation tools and detectron2's ``read_image``
    apply it: a JPEG stored 240 wide and 160 high and tagged 6 decodes to [240, 160, 3]. Sizes
    and ground truth (COCO ``height``/``width``, panoptic PNGs) are taken in this orientation,
    and predictions come out in it; ``exif_orientation`` and ``oriented_size`` give the size
    without decoding. Grey, palette, CMYK, alpha and 16-bit images become 8-bit RGB (16-bit
    values keep their top 8 bits). Raises ValueError with the reason for an empty, non-image,
    truncated or corrupt file (it decodes in full) and, before decoding, for an image of more
    than ``MAX_PIXELS`` pixels (a decompression bomb; turning keeps the count, so the stored
    size is checked)."""
    return _decode(data)[0]


def decode_rgb_scaled(data: bytes, size_for: Callable[[int, int], tuple[int, int]]
                      ) -> tuple[np.ndarray, tuple[int, int]]:
    """``decode_rgb`` for an image that is to be resized to ``size_for(H, W)`` (its own size as
    shown -> the size it will be resized to): a JPEG at least twice ``REDUCING_GAP`` times that
    size on both sides is decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's scaled inverse DCT
    (PIL's ``draft``, as its ``thumbnail`` does), no smaller than ``REDUCING_GAP`` times the
    target, so that the resize after it still shrinks by 1.5x or more. Returns (the [h', w', 3]
    image; the image's own (H, W) as shown). A 12 MP photo (4032x3024) to be labeled at
    1067x800 decodes at 2016x1512 in 28 CPU ms instead of 96 (``benchmarks/label/host.py``), its
    resized pixels 0.3-0.5 levels from the full decode's on average. Other images (a COCO photo, any PNG) decode as
    ``decode_rgb``."""
    return _decode(data, size_for)


def _decode(data: bytes, size_for: Callable[[int, int], tuple[int, int]] | None = None
            ) -> tuple[np.ndarray, tuple[int, int]]:
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our limit applies
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{w}x{h} is {w * h / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP "
                                     "limit (a decompression bomb?)")
                if w * h == 0:
                    raise ImageError(f"{w}x{h}: no pixels")
                shown = None                          # the size as shown, when a draft may change it
                if size_for is not None and im.format == "JPEG":
                    turned = exif_orientation(im, data) >= 5
                    shown = (w, h) if turned else (h, w)
                    th, tw = (math.ceil(REDUCING_GAP * v) for v in size_for(*shown))
                    tw, th = (th, tw) if turned else (tw, th)         # on the stored axes
                    if w >= 2 * tw and h >= 2 * th:
                        im.draft(None, (tw, th))                     # the largest scale giving >= that
                ImageOps.exif_transpose(im, in_place=True)   # decodes; without a tag, nothing more
                if im.mode.startswith("I") or im.mode == "F":    # 16/32-bit integers, floats: grey
                    wide = np.asarray(im, dtype=np.float64)
                    grey = np.clip(wide, 0, 255) if im.mode == "F" else np.clip(wide, 0, 65535) / 256
                    image = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
                else:
                    image = np.asarray(im.convert("RGB"))
                return image, shown or image.shape[:2]
    except ImageError:
        raise
    except Image.DecompressionBombError as e:     # PIL's own guard, at twice its limit
        raise ImageError(f"over the {MAX_PIXELS / 1e6:.0f} MP limit (a decompression bomb?): {e}") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(f"unreadable image ({type(e).__name__}: {e})") from None


# PNG chunks that PIL reads EXIF (eXIf, "Raw profile type exif" text) or XMP (iTXt) from
_PNG_EXIF_CHUNKS = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})


def _png_has_exif_chunks(data: bytes) -> bool:
    """Whether PNG bytes have a chunk of ``_PNG_EXIF_CHUNKS`` (walks the chunk headers only)."""
    pos = 8
    while pos + 8 <= len(data):
        if data[pos + 4:pos + 8] in _PNG_EXIF_CHUNKS:
            return True
        pos += 12 + struct.unpack_from(">I", data, pos)[0]
    return False


def exif_orientation(im: Image.Image, data: bytes | None = None) -> int:
    """The EXIF orientation (1-8) that ``ImageOps.exif_transpose`` applies to an opened image,
    1 when it has none. PIL decodes a PNG whose EXIF is not in its header to look for it after
    the pixels; given the file's ``data``, a PNG without the chunks it could be in is known to
    have none without decoding."""
    if data is not None and im.format == "PNG" and "exif" not in im.info and not _png_has_exif_chunks(data):
        return 1
    value = im.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in range(1, 9) else 1


def oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """A stored (width, height) -> the (width, height) viewers show for an EXIF orientation:
    5-8 turn the image a quarter (or transpose it), swapping the sides."""
    return (size[1], size[0]) if orientation >= 5 else size


def output_size(h: int, w: int, shorter: int, max_size: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``shorter`` with the longer side <= ``max_size``."""
    scale = min(shorter / min(h, w), max_size / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def resize_chw(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 RGB (as decoded) -> [3, h, w] uint8 (as the network reads it), bilinear,
    antialiased when shrinking: PIL's ``Image.resize(BILINEAR)`` filter, by torch's uint8 kernel,
    never more than one level from PIL's values (on photos fewer than 1 value in 200 off). The
    kernel writes [3, h, w]; giving that layout saves the transposition every consumer made
    after it. 640x480 -> 1067x800: 2.1-2.4 CPU ms against PIL's 7.1-7.4 and a transposition's
    2.3 (one torch thread: the calling thread's, a Ray task's one)."""
    import torch

    plain = image.flags.c_contiguous and image.flags.writeable and min(image.strides) > 0
    chw = torch.from_numpy(image if plain else image.copy()).permute(2, 0, 1)   # (torch: no read-only or flipped)
    if image.shape[:2] != tuple(size):
        chw = torch.nn.functional.interpolate(chw[None], size=tuple(size), mode="bilinear", align_corners=False,
                                              antialias=True)[0]
    return chw.contiguous().numpy()


def resize_nearest(a, size: tuple[int, int]):
    """[H, W] label map (numpy array or torch tensor) -> [h, w] of the same kind, nearest:
    output pixel i takes source row floor((i + 0.5) H / h), computed exactly in integers (and
    likewise for columns)."""
    h, w = a.shape
    oh, ow = size
    if (h, w) == (oh, ow):
        return a
    if isinstance(a, np.ndarray):
        arange = functools.partial(np.arange, dtype=np.int64)
    else:                                  # index vectors made on the tensor's device
        import torch

        arange = functools.partial(torch.arange, device=a.device)
    ys = arange(1, 2 * oh, 2) * h // (2 * oh)
    xs = arange(1, 2 * ow, 2) * w // (2 * ow)
    return a[ys[:, None], xs[None, :]]


def nearest_cover(size_in, size_out, length: int):
    """The inverse of ``resize_nearest`` along one axis, for a batch: size_in, size_out [B] int64
    tensors (the axis's length in and out of each image's resize), ``length`` >= max(size_in)
    -> first, count [B, length] int64: for each source index, the first output index that takes
    it and how many do (0 for a source index >= size_in, or skipped by a shrinking resize).
    Output index r takes source floor((2 r + 1) size_in / (2 size_out)), so the first one taking
    source i is ceil((2 size_out i - size_in) / (2 size_in))."""
    import torch

    i = torch.arange(length + 1, device=size_in.device)
    n_in, n_out = size_in[:, None], size_out[:, None]
    start = ((2 * n_out * i + n_in - 1) // (2 * n_in)).clamp_max_(n_out)     # [B, length + 1]
    return start[:, :-1], start[:, 1:] - start[:, :-1]


def sizes_on(sizes: Sequence[Sequence[int]], device):
    """Per-image integers ([B, k] nested sequences: sizes) -> an int64 tensor [B, k] on ``device``
    without a host sync: on a GPU through pinned memory and a non-blocking copy."""
    import torch

    host = torch.from_numpy(np.asarray(sizes, dtype=np.int64).reshape(len(sizes), -1))
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def padded_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The smallest (H, W) divisible by SIZE_DIVISIBILITY that holds every size."""
    d = SIZE_DIVISIBILITY
    return (-(-max(s[0] for s in sizes) // d) * d, -(-max(s[1] for s in sizes) // d) * d)


def batch_order(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """The (h, w) of images to batch -> their indices by increasing aspect ratio w / h (ties in
    order): consecutive batches of that order hold images of like shape, so that padding each to
    its largest image adds little, where a batch of both orientations pads to a square (1.5-1.6x
    the pixels of its images in COCO-like mixes, 1.07-1.12x sorted within 64 images:
    benchmarks/RESULTS.md)."""
    return sorted(range(len(sizes)), key=lambda k: sizes[k][1] / max(sizes[k][0], 1))


def pad_batch(maps: Sequence[np.ndarray], fill: int, size: tuple[int, int] | None = None,
              pin_memory: bool = False) -> torch.Tensor:
    """Maps [..., h_i, w_i] of one dtype -> [B, ..., H, W] padded with ``fill`` at the bottom and
    right; (H, W) = ``size`` or ``padded_size`` of the maps. ``pin_memory`` (CUDA only): made in
    page-locked memory, which a non-blocking copy to the GPU reads without waiting for the work
    queued before it (a copy from pageable memory first waits for all of it)."""
    import torch

    hh, ww = size or padded_size([m.shape[-2:] for m in maps])
    out = torch.full((len(maps), *maps[0].shape[:-2], hh, ww), fill,
                     dtype=torch.from_numpy(np.empty(0, maps[0].dtype)).dtype, device="cpu", pin_memory=pin_memory)
    view = out.numpy()          # the same memory; numpy copies any array in, read-only or strided
    for k, m in enumerate(maps):
        view[k, ..., : m.shape[-2], : m.shape[-1]] = m
    return out


class Transform:
    """Sizes, batches and the way back, for one ``InputConfig``."""

    def __init__(self, cfg: InputConfig):
        self.cfg = cfg

    def train_size(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        """A training size: the shorter side drawn from ``shorter_sides`` (scale jitter)."""
        return output_size(h, w, int(rng.choice(self.cfg.shorter_sides)), self.cfg.max_size)

    def test_size(self, h: int, w: int) -> tuple[int, int]:
        return output_size(h, w, self.cfg.test_shorter_side, self.cfg.max_size)

    def decode_for_test(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoded image bytes -> ([3, h, w] uint8 at its test size, the image's own (H, W) as
        shown): ``resize_for_test(decode_rgb(data))``, a large JPEG decoded at a reduced scale
        first (``decode_rgb_scaled``)."""
        image, size = decode_rgb_scaled(data, self.test_size)
        return resize_chw(image, self.test_size(*size)), size

    def resize_for_test(self, image: np.ndarray) -> np.ndarray:
        """An [H, W, 3] uint8 RGB image of any size -> [3, h, w] uint8 at its test size."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.dtype} {image.shape}")
        return resize_chw(image, self.test_size(*image.shape[:2]))

    @staticmethod
    def batch(images: Sequence[np.ndarray], pin_memory: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """[3, h, w] uint8 images (``resize_for_test``'s) -> ([B, 3, Hp, Wp] uint8 zero-padded,
        in page-locked memory with ``pin_memory`` (``pad_batch``), the (h, w) of each)."""
        return pad_batch(images, 0, pin_memory=pin_memory), [tuple(im.shape[1:]) for im in images]
