"""Pictures: overlays colour each segment distinctly, outline instances on their boundaries and
write class names; the embedding PCA separates regions that lie along different directions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.visualize import (OUTLINE, embedding_pca, instance_boundaries, label_position,
                                           overlay, segment_colors)

CATEGORIES = [{"id": 7, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
              {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]}]


def scene(h: int = 40, w: int = 60):
    """Sky (segment 1) everywhere, two cars (2, 3) and a void strip at the bottom."""
    ids = np.ones((h, w), np.int32)
    ids[5:20, 5:25] = 2
    ids[10:30, 30:55] = 3
    ids[-4:] = 0
    segments = [{"id": 1, "category_id": 7}, {"id": 2, "category_id": 3}, {"id": 3, "category_id": 3}]
    image = np.full((h, w, 3), 100, np.uint8)
    return image, ids, segments


def has_other_neighbour(ids: np.ndarray) -> np.ndarray:
    p = np.pad(ids, 1, mode="edge")
    c = p[1:-1, 1:-1]
    return (p[:-2, 1:-1] != c) | (p[2:, 1:-1] != c) | (p[1:-1, :-2] != c) | (p[1:-1, 2:] != c)


def test_overlay_colours_segments_apart_and_outlines_instances():
    image, ids, segments = scene()
    out = overlay(image, ids, segments, CATEGORIES, alpha=0.5, labels=False)
    assert out.shape == image.shape and out.dtype == np.uint8

    outline = (out == OUTLINE).all(axis=2)
    # outlines: exactly the thing pixels with a neighbour of another id
    assert outline.any()
    assert np.array_equal(outline, instance_boundaries(ids, [2, 3]))
    assert has_other_neighbour(ids)[outline].all()
    assert not outline[ids == 1].any()          # stuff is not outlined

    colours = {}
    for sid in (1, 2, 3):
        inner = (ids == sid) & ~outline
        values = np.unique(out[inner].reshape(-1, 3), axis=0)
        assert len(values) == 1, f"segment {sid} is not one colour"
        colours[sid] = tuple(values[0])
    assert len(set(colours.values())) == 3      # two cars of one category differ too
    expected = segment_colors(segments, CATEGORIES)
    for sid, c in colours.items():
        assert c == tuple(round(0.5 * 100 + 0.5 * v) for v in expected[sid])
    assert expected[1] == (70, 130, 180)        # the category's own colour first
    assert np.array_equal(out[ids == 0], image[ids == 0])   # void keeps the image


def test_many_instances_of_one_category_get_distinct_colours():
    segments = [{"id": i, "category_id": 3} for i in range(1, 61)]
    assert len(set(segment_colors(segments, CATEGORIES).values())) == 60


def test_overlay_writes_class_names_on_their_segments():
    image, ids, segments = scene(80, 160)
    plain = overlay(image, ids, segments, CATEGORIES, labels=False)
    named = overlay(image, ids, segments, CATEGORIES, labels=True)
    changed = (plain != named).any(axis=2)
    assert changed.sum() > 50
    for sid in (2, 3):  # the text sits over each car's centre
        x, y = label_position(ids == sid)
        assert changed[max(0, y - 3):y + 4, max(0, x - 8):x + 9].any()
    # a label at the picture's edge is moved inside it whole: as many text pixels as mid-picture
    text_pixels = []
    for x0 in (0, 97):
        ids1 = np.zeros((30, 200), np.int32)
        ids1[:, x0:x0 + 6] = 1
        named = overlay(np.zeros((30, 200, 3), np.uint8), ids1, [{"id": 1, "category_id": 7}],
                        CATEGORIES, min_label_area=1)
        text_pixels.append(int((named.min(axis=2) > 128).sum()))   # light text on the dark box
    assert text_pixels[0] == text_pixels[1] > 10


def test_overlay_refuses_ids_missing_from_segments_info():
    image, ids, segments = scene()
    with pytest.raises(ValueError, match=r"\[3\]"):
        overlay(image, ids, segments[:2], CATEGORIES)


def test_embedding_pca_separates_three_directions():
    """Background at the origin and three regions along three orthonormal directions: four
    clusters, whose centred means span exactly three dimensions."""
    rng = np.random.default_rng(0)
    d, h, w = 16, 12, 40
    basis, _ = np.linalg.qr(rng.normal(size=(d, 3)))
    region = np.repeat(np.arange(4), w // 4)[None, :].repeat(h, 0)   # [h, w] in {0, 1, 2, 3}
    centres = np.concatenate([np.zeros((d, 1)), 3.0 * basis], axis=1)   # [D, 4]
    emb = centres[:, region] + rng.normal(scale=0.05, size=(d, h, w))
    rgb = embedding_pca(emb)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    means = np.array([rgb[region == r].mean(axis=0) for r in range(4)])
    spread = max(rgb[region == r].astype(float).std(axis=0).max() for r in range(4))
    gaps = [np.linalg.norm(means[a] - means[b]) for a in range(4) for b in range(a + 1, 4)]
    assert min(gaps) > 100 and spread < 15
    # deterministic, torch input accepted, resizable
    assert np.array_equal(embedding_pca(torch.from_numpy(emb).float()), embedding_pca(emb.astype(np.float32)))
    assert embedding_pca(emb, size=(48, 160)).shape == (48, 160, 3)


def test_embedding_pca_of_a_flat_map_is_defined():
    """A map without variance (every pixel the same, or one pixel) has no principal direction:
    one colour, the same for any constant, and no NaN turned into a byte."""
    with np.errstate(all="raise"):                  # a 0/0 or NaN cast would raise here
        rgb = embedding_pca(np.ones((4, 5, 6)))
        other = embedding_pca(np.full((4, 5, 6), -3.5))
        single = embedding_pca(np.ones((4, 1, 1)))
    assert rgb.shape == (5, 6, 3) and rgb.dtype == np.uint8 and single.shape == (1, 1, 3)
    assert (rgb == rgb[0, 0]).all() and np.array_equal(rgb, other) and np.array_equal(single[0, 0], rgb[0, 0])


def test_panel_puts_image_prediction_ground_truth_and_pca_side_by_side():
    from pipeline.evaluation.visualize import CAPTION_HEIGHT, PANEL_GAP, panel

    image, ids, segments = scene()
    h, w = ids.shape
    gt = np.where(ids == 3, 1, ids)                          # the ground truth has one car fewer
    emb = torch.randn(6, h // 4, w // 4)
    full = panel(image, ids, segments, CATEGORIES, gt=(gt, segments[:2]), embedding=emb)
    assert full.shape == (CAPTION_HEIGHT + h, 4 * w + 3 * PANEL_GAP, 3)
    tiles = [full[CAPTION_HEIGHT:, k * (w + PANEL_GAP): k * (w + PANEL_GAP) + w] for k in range(4)]
    assert np.array_equal(tiles[0], image)
    assert np.array_equal(tiles[1], overlay(image, ids, segments, CATEGORIES))
    assert np.array_equal(tiles[2], overlay(image, gt, segments[:2], CATEGORIES))
    assert np.array_equal(tiles[3], embedding_pca(emb, size=(h, w)))
    assert full[:CAPTION_HEIGHT].any()                       # captions are written
    assert panel(image, ids, segments, CATEGORIES).shape == (CAPTION_HEIGHT + h, 2 * w + PANEL_GAP, 3)
