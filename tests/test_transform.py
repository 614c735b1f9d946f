"""The one preprocessing module: sizes, exact nearest resizing, padding, and the way back from a
prediction at the test size to the image's own size, which validation uses too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ciae.config import Config, InputConfig
from ciae.transform import Transform, output_size, pad_batch, resize_nearest


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


def test_pad_batch_fills_to_a_multiple_of_32():
    maps = [np.ones((3, 40, 50), np.uint8), np.full((3, 33, 70), 2, np.uint8)]
    out = pad_batch(maps, 0)
    assert out.shape == (2, 3, 64, 96) and out.dtype == torch.uint8
    assert (out[0, :, :40, :50] == 1).all() and out[0, :, 40:].sum() == 0 and out[0, :, :, 50:].sum() == 0
    seg = pad_batch([np.zeros((5, 6), np.int64)], -1, (32, 32))
    assert seg.dtype == torch.int64 and (seg[0, 5:] == -1).all() and (seg[0, :5, :6] == 0).all()


def test_decoding_takes_any_mode_and_refuses_bombs():
    import io as _io

    from PIL import Image

    from ciae.transform import ImageError, decode_rgb

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
