"""Synthetic scenes and sample photos: determinism, ground truth, captions (no Ray)."""

from __future__ import annotations

import io
import json
import random
import socket

import numpy as np
import pytest

from pipeline.samples import load_photo, sample_photos
from pipeline.scenes import (
    COLOURS, SHAPES, SIZE_FRACTION, SIZES, Scene, SceneObject, caption_set,
    dense_caption, generate_scenes, paraphrases, render, short_caption,
)


def _png(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render(scene).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return generate_scenes(60, seed=3, image_size=128, max_objects=5)


def test_vocabulary_sizes():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and SIZES == ("small", "medium", "large")
    assert len(set(COLOURS.values())) == len(COLOURS)


def test_same_seed_same_scenes_and_pixels(scenes):
    again = generate_scenes(60, seed=3, image_size=128, max_objects=5)
    assert again == scenes
    for a, b in zip(scenes[:10], again[:10]):
        assert _png(a) == _png(b)


def test_scene_i_independent_of_n(scenes):
    assert generate_scenes(7, seed=3, image_size=128, max_objects=5) == scenes[:7]
    assert generate_scenes(100, seed=3, image_size=128, max_objects=5)[:60] == scenes


def test_different_seeds_differ(scenes):
    other = generate_scenes(60, seed=4, image_size=128, max_objects=5)
    assert sum(a.objects != b.objects for a, b in zip(scenes, other)) > 50


def test_scene_invariants(scenes):
    counts = set()
    for s in scenes:
        assert 1 <= len(s.objects) <= 5
        counts.add(len(s.objects))
        assert len({(o.shape, o.colour) for o in s.objects}) == len(s.objects)
        assert all(o.colour != s.background for o in s.objects)
        for i, a in enumerate(s.objects):
            ha = SIZE_FRACTION[a.size] / 2
            assert ha <= a.x <= 1 - ha and ha <= a.y <= 1 - ha
            for b in s.objects[i + 1:]:  # bounding boxes never intersect
                hb = SIZE_FRACTION[b.size] / 2
                assert abs(a.x - b.x) >= ha + hb or abs(a.y - b.y) >= ha + hb
    assert counts == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("image_size", [24, 128, 224])
def test_render_contains_each_object(image_size):
    for s in generate_scenes(60, seed=3, image_size=image_size):
        img = render(s)
        assert img.mode == "RGB" and img.size == (s.image_size, s.image_size)
        px = np.asarray(img)
        for o in s.objects:
            colour = COLOURS[o.colour]
            cx, cy = int(o.x * s.image_size), int(o.y * s.image_size)
            if o.shape == "ring":
                # Hollow: background at the centre, object colour in its box.
                assert tuple(px[cy, cx]) == COLOURS[s.background]
                r = int(SIZE_FRACTION[o.size] * s.image_size / 2)
                box = px[cy - r:cy + r + 1, cx - r:cx + r + 1].reshape(-1, 3)
                assert (box == colour).all(axis=1).sum() > r
            else:
                assert tuple(px[cy, cx]) == colour, (s.scene_id, o)


def test_region_grid():
    def region(x, y):
        return SceneObject("circle", "red", "small", x, y).region()
    assert region(0.1, 0.1) == "top left"
    assert region(0.5, 0.1) == "top"
    assert region(0.5, 0.5) == "centre"
    assert region(0.9, 0.5) == "right"
    assert region(0.1, 0.9) == "bottom left"
    assert region(0.9, 0.9) == "bottom right"


def test_dense_caption_is_complete(scenes):
    for s in scenes:
        text = dense_caption(s)
        assert text == dense_caption(s)
        assert s.background in text
        for o in s.objects:
            assert f"{o.size} {o.colour} {o.shape}" in text
        n = len(s.objects)
        # One relation sentence per unordered pair.
        relations = sum(text.count(w) for w in (" left of ", " right of ", " above ", " below "))
        assert relations == n * (n - 1) // 2


def _mentioned(caption: str, s: Scene) -> int:
    return sum(f"{o.colour} {o.shape}" in caption for o in s.objects)


def test_short_caption_is_partial(scenes):
    rng = random.Random(0)
    many = [s for s in scenes if len(s.objects) >= 3]
    assert many
    for s in many:
        for _ in range(20):
            cap = short_caption(s, rng)
            assert 0 < len(cap.split()) < 15
            assert _mentioned(cap, s) <= 2 < len(s.objects)
            assert not any(w in cap for w in (" left", " right", " above", " below"))


def test_paraphrases_distinct_and_short(scenes):
    for s in scenes:
        caps = paraphrases(s, 6, random.Random(s.scene_id))
        assert len(caps) == 6 and len(set(caps)) == 6
        assert all(0 < len(c.split()) < 15 for c in caps)


def test_caption_set_deterministic(scenes):
    s = scenes[5]
    shorts, dense = caption_set(s, 4, seed=11)
    assert (shorts, dense) == caption_set(s, 4, seed=11)
    assert len(shorts) == 5 and len(set(shorts)) == 5
    assert dense == dense_caption(s)
    assert any(caption_set(t, 4, seed=12)[0] != caption_set(t, 4, seed=11)[0] for t in scenes[:10])


def test_dict_round_trip(scenes):
    for s in scenes:
        d = json.loads(json.dumps(s.to_dict()))
        assert Scene.from_dict(d) == s


def test_from_dict_rejects_unknown_shape(scenes):
    d = scenes[0].to_dict()
    d["objects"][0]["shape"] = "blob"
    with pytest.raises(ValueError):
        Scene.from_dict(d)


def test_sample_photos_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("sample photos must load without network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    photos = sample_photos()
    assert 6 <= len(photos) <= 10
    modes = set()
    for p in photos:
        assert p.captions and all(c.strip() for c in p.captions)
        assert len(p.dense_caption.split()) > 20
        img = load_photo(p.name)
        assert min(img.size) >= 64
        modes.add(img.mode)
    assert {"RGB", "L"} <= modes
