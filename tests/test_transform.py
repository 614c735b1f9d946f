"""The one preprocessing module: sizes, exact nearest resizing, padding, and the way back from a
prediction at the test size to the image's own size, which validation uses too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ciae.config import InputConfig
from ciae.data.transform import (Transform, batch_order, decode_rgb, output_size, pad_batch, padded_size, resize_chw,
                                 resize_nearest)


def test_sizes_follow_the_shorter_side_and_the_cap():
    t = Transform(InputConfig(shorter_sides=(200, 300), max_size=400, test_shorter_side=300))
    assert output_size(427, 640, 200, 400) == (200, 300)
    assert t.test_size(427, 640) == (267, 400)              # 300 is capped by the longer side
    rng = np.random.default_rng(0)
    assert {t.train_size(427, 640, rng) for _ in range(20)} == {(200, 300), (267, 400)}


def test_resize_nearest_takes_the_source_pixel_under_each_centre():
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w, oh, ow = rng.integers(1, 60, 4)
        a = np.arange(h * w).reshape(h, w)
        out = resize_nearest(a, (oh, ow))
        ys, xs = np.divmod(out, w)
        centre_y = (np.arange(oh) + 0.5) * h / oh
        centre_x = (np.arange(ow) + 0.5) * w / ow
        assert (ys[:, 0] <= centre_y).all() and (centre_y < ys[:, 0] + 1).all()
        assert (xs[0] <= centre_x).all() and (centre_x < xs[0] + 1).all()


def _pil_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] -> PIL's bilinear resize, as [3, h, w]."""
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BILINEAR)).transpose(2, 0, 1)


@pytest.mark.parametrize("shape, size", [((480, 640), (800, 1067)), ((1000, 1500), (533, 800)),
                                         ((37, 91), (800, 1333)), ((600, 600), (599, 601)),
                                         ((5000, 20), (1333, 5)), ((7, 3), (1, 1)), ((1, 1), (3, 5)),
                                         ((40, 60), (40, 60))])
def test_resize_chw_is_pils_bilinear_within_one_level(shape, size):
    rng = np.random.default_rng(sum(shape) + sum(size))
    noise = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    y, x = np.mgrid[: shape[0], : shape[1]]
    smooth = np.stack([x * 255 // max(shape[1] - 1, 1), y * 255 // max(shape[0] - 1, 1), (x + y) % 256], -1)
    for image in (noise, smooth.astype(np.uint8)):
        before = image.copy()
        out = resize_chw(image, size)
        assert out.shape == (3, *size) and out.dtype == np.uint8 and out.flags.c_contiguous
        assert np.abs(out.astype(int) - _pil_bilinear(image, size)).max() <= (0 if shape == size else 1)
        assert (image == before).all() and not np.shares_memory(out, image)
    flipped = noise[:, ::-1]                               # a strided view, as a flip gives
    assert (resize_chw(flipped, size) == resize_chw(np.ascontiguousarray(flipped), size)).all()


def test_resize_chw_of_a_photo_differs_from_pil_in_few_values():
    from pathlib import Path

    folder = Path(__file__).parent / "data" / "coco_sample" / "input_images"
    for path in sorted(folder.iterdir()):
        photo = decode_rgb(path.read_bytes())              # read-only, as decode gives it
        for size in (Transform(InputConfig()).test_size(*photo.shape[:2]), (200, 300)):
            diff = np.abs(resize_chw(photo, size).astype(int) - _pil_bilinear(photo, size))
            assert diff.max() <= 1 and (diff > 0).mean() < 5e-3


def test_a_test_batch_pads_the_resized_images_as_they_are():
    t = Transform(InputConfig(test_shorter_side=64, max_size=100))
    images = [np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
              for k, (h, w) in enumerate([(48, 64), (64, 40)])]
    resized = [t.resize_for_test(im) for im in images]
    for im in resized:
        im.flags.writeable = False                         # as the object store gives them
    batch, sizes = t.batch(resized)
    assert sizes == [(64, 85), (100, 62)] and batch.shape == (2, 3, 128, 96)
    for k, ((h, w), im) in enumerate(zip(sizes, resized)):
        assert (batch[k, :, :h, :w].numpy() == im).all()
        assert batch[k, :, h:].sum() == 0 and batch[k, :, :, w:].sum() == 0


def test_pad_batch_fills_to_a_multiple_of_32():
    maps = [np.ones((3, 40, 50), np.uint8), np.full((3, 33, 70), 2, np.uint8)]
    out = pad_batch(maps, 0)
    assert out.shape == (2, 3, 64, 96) and out.dtype == torch.uint8
    assert (out[0, :, :40, :50] == 1).all() and out[0, :, 40:].sum() == 0 and out[0, :, :, 50:].sum() == 0
    seg = pad_batch([np.zeros((5, 6), np.int64)], -1, (32, 32))
    assert seg.dtype == torch.int64 and (seg[0, 5:] == -1).all() and (seg[0, :5, :6] == 0).all()


def test_batch_order_puts_like_shapes_together():
    sizes = [(800, 1067), (1067, 800), (800, 1200), (800, 800), (1067, 800), (800, 1067), (0, 5)]
    order = batch_order(sizes)
    assert order == [1, 4, 3, 0, 5, 2, 6] and batch_order([]) == []
    padded = lambda batches: sum(np.prod(padded_size(b)) * len(b) for b in batches)  # noqa: E731
    pairs = lambda ks: [[sizes[k] for k in ks[i:i + 2]] for i in range(0, 6, 2)]   # noqa: E731
    assert padded(pairs(order[:6])) < 0.85 * padded(pairs(list(range(6))))       # 5.43 M against 6.68 M


def test_decoding_takes_any_mode_and_refuses_bombs():
    import io as _io

    from PIL import Image

    from ciae.data.transform import ImageError, decode_rgb

    def enc(im, fmt="PNG"):
        buf = _io.BytesIO()
        im.save(buf, format=fmt)
        return buf.getvalue()

    grey16 = (np.arange(100, dtype=np.uint16) * 655).reshape(10, 10)
    out = decode_rgb(enc(Image.fromarray(grey16)))
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], (grey16 >> 8).astype(np.uint8)) and (out[..., 0] == out[..., 2]).all()
    for mode in ("L", "P", "LA", "RGBA", "CMYK", "1"):
        assert decode_rgb(enc(Image.new(mode, (7, 5)), "JPEG" if mode == "CMYK" else "PNG")).shape == (5, 7, 3)
    big = Image.new("1", (12000, 9000))                       # 108 MP, tiny as a 1-bit PNG
    with pytest.raises(ImageError, match="12000x9000 is 108 MP, over the 100 MP limit"):
        decode_rgb(enc(big))
    for data, reason in ((b"", "empty file"), (b"GIF89a broken", "unreadable image")):
        with pytest.raises(ImageError, match=reason):
            decode_rgb(data)


# ------------------------------------------------------------------------- EXIF orientation


def _photo(orientation: int | None, fmt: str = "JPEG", size: tuple[int, int] = (240, 160)) -> bytes:
    """A picture stored ``size`` (w, h) with a red block in its stored top-left corner, tagged
    with an EXIF ``orientation`` (none when None), as a phone saves one."""
    import io as _io

    from PIL import Image

    w, h = size
    rgb = np.full((h, w, 3), (30, 90, 200), np.uint8)
    rgb[: h // 4, : w // 4] = (250, 20, 20)
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    buf = _io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def _viewer(data: bytes) -> np.ndarray:
    """What a viewer shows: PIL's own ``ImageOps.exif_transpose``."""
    import io as _io

    from PIL import Image, ImageOps

    with Image.open(_io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _stored(data: bytes) -> np.ndarray:
    import io as _io

    from PIL import Image

    with Image.open(_io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_decoding_turns_a_phone_photo_as_viewers_show_it():
    """Stored 240 wide and 160 high, tagged 6 (turn a quarter clockwise to view): decoded 160
    wide and 240 high, the stored top-left block at the top right, as a viewer shows it."""
    from ciae.data.transform import decode_rgb

    data = _photo(6)
    out = decode_rgb(data)
    assert out.shape == (240, 160, 3) and out.dtype == np.uint8
    assert np.array_equal(out, _viewer(data))
    assert np.array_equal(out, np.rot90(_stored(data), k=-1))      # a quarter turn clockwise
    red = (out[..., 0] > 200) & (out[..., 2] < 60)
    ys, xs = np.nonzero(red)
    assert ys.max() < 70 and xs.min() > 110                        # the top-right corner
    assert not red[:, :80].any() and not red[120:].any()


def test_every_orientation_decodes_as_pil_transposes_it():
    """Orientations 1-8, in JPEG and PNG (eXIf chunk): ``decode_rgb`` agrees with
    ``ImageOps.exif_transpose``, and ``exif_orientation`` / ``oriented_size`` give its size
    without decoding; an untagged image, or one tagged 1, decodes as stored."""
    import io as _io

    from PIL import Image

    from ciae.data.transform import decode_rgb, exif_orientation, oriented_size

    for fmt in ("JPEG", "PNG"):
        for orientation in (None, *range(1, 9)):
            data = _photo(orientation, fmt)
            out = decode_rgb(data)
            assert np.array_equal(out, _viewer(data)), (fmt, orientation)
            with Image.open(_io.BytesIO(data)) as im:
                found = exif_orientation(im, data)
                assert found == (orientation or 1)
                w, h = oriented_size(im.size, found)
            assert out.shape == (h, w, 3)
            assert (h, w) == ((240, 160) if (orientation or 1) >= 5 else (160, 240))
            if (orientation or 1) == 1:
                assert np.array_equal(out, _stored(data))


def test_a_png_without_exif_chunks_is_not_decoded_to_find_its_orientation():
    """PIL decodes a PNG to look for EXIF after its pixels; ``exif_orientation`` given the bytes
    skips that when no chunk could hold it, and reads a tag after the pixels when one does."""
    import io as _io
    import struct
    import zlib

    from PIL import Image

    from ciae.data.transform import exif_orientation

    data = _photo(None, "PNG")
    with Image.open(_io.BytesIO(data)) as im:
        assert exif_orientation(im, data) == 1 and im.tile              # not decoded (tiles pending)
    exif = Image.Exif()
    exif[0x0112] = 8
    chunk = b"eXIf" + exif.tobytes()
    tail = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
    late = data[:-12] + tail + data[-12:]                            # eXIf after IDAT, before IEND
    with Image.open(_io.BytesIO(late)) as im:
        assert "exif" not in im.info and exif_orientation(im, late) == 8


def _coco_photo(orientation: int | None = None, fmt: str = "JPEG", mode: str = "RGB", scale: int = 1) -> bytes:
    """The COCO sample's first photo (640 wide, 427 high; ``scale`` times that, bicubic)
    re-encoded, tagged with an EXIF ``orientation`` (none when None)."""
    import io as _io
    from pathlib import Path

    from PIL import Image

    path = sorted((Path(__file__).parent / "data" / "coco_sample" / "input_images").iterdir())[0]
    out = _io.BytesIO()
    kw = {"quality": 90} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    im = Image.open(path).convert(mode)
    im.resize((im.width * scale, im.height * scale), Image.BICUBIC).save(out, fmt, **kw)
    return out.getvalue()


def _drafted(data: bytes, target_wh: tuple[int, int]) -> np.ndarray:
    """PIL's own scaled decode (``draft``) to at least ``target_wh`` on the stored axes, turned."""
    import io as _io

    from PIL import Image, ImageOps

    with Image.open(_io.BytesIO(data)) as im:
        im.draft(None, target_wh)
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.mark.parametrize("orientation", [None, 6])
def test_a_large_jpeg_decodes_at_a_reduced_scale_for_its_test_size(orientation):
    """2560x1708 to be labeled at 400 px: libjpeg decodes it at half its size (1280x854, at least
    1.5x the test size), which the resize takes to the test size; the image's own size is the
    full one, as shown (turned by orientation 6), and the pixels are within a level of the
    full decode's on average."""
    t = Transform(InputConfig(test_shorter_side=400, max_size=2000))
    data = _coco_photo(orientation, scale=4)
    image, size = t.decode_for_test(data)
    shown = (2560, 1708) if orientation == 6 else (1708, 2560)
    test = t.test_size(*shown)
    assert size == shown and image.shape == (3, *test)
    least = [int(np.ceil(1.5 * v)) for v in test]             # (h, w) as shown
    small = _drafted(data, tuple(least) if orientation == 6 else tuple(least[::-1]))
    assert small.shape[:2] == ((1280, 854) if orientation == 6 else (854, 1280))
    assert np.array_equal(image, resize_chw(small, test))
    full = t.resize_for_test(decode_rgb(data))
    assert np.abs(image.astype(int) - full).mean() < 1


@pytest.mark.parametrize("fmt, mode, shorter", [("JPEG", "RGB", 300), ("JPEG", "L", 300), ("PNG", "RGB", 100),
                                                ("JPEG", "RGB", 143), ("JPEG", "CMYK", 100)])
def test_decoding_for_the_test_size_is_the_full_decode_where_no_scale_helps(fmt, mode, shorter):
    """A JPEG less than twice 1.5x its test size on a side (shorter side 300 or 143 of 427), or
    any PNG, decodes in full: the same bytes as ``resize_for_test(decode_rgb(...))``; a grey or
    CMYK JPEG at a reduced scale is RGB like the full decode."""
    t = Transform(InputConfig(test_shorter_side=shorter, max_size=2000))
    data = _coco_photo(None, fmt, mode)
    image, size = t.decode_for_test(data)
    full = t.resize_for_test(decode_rgb(data))
    assert size == (427, 640) and image.shape == full.shape
    if mode == "CMYK":
        assert np.abs(image.astype(int) - full).mean() < 3
    else:
        assert np.array_equal(image, full)
