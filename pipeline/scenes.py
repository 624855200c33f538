"""Deterministic synthetic scenes with exact ground truth.

This is the pipeline's embedded dataset: each scene is a plain background with
1..max_objects flat-coloured shapes. Because we generate the scene we know
everything about it, so we can derive two kinds of caption from the same truth:

* short captions - alt-text style, *partial* (1-2 objects, no spatial words),
  like the noisy web captions CLIP is normally trained on;
* a dense caption - long, fully specified (every object, attribute, position
  and pairwise relation), like the rich captions LLM2CLIP feeds its LLM
  text encoder.

The gap between the two is exactly what the LLM encoder is meant to exploit,
and since the truth is exact, evaluation (retrieval, attribute binding) needs
no human labels.

Everything is deterministic: scene ``i`` of seed ``s`` depends only on
``(s, i)`` (never on ``n`` or on global RNG state), and captions depend only on
``(scene, seed)``. Only stdlib, numpy and PIL are imported.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring",
)

# Saturated, well-separated colours so that a colour word maps to one region of
# colour space (no "dark red" vs "brown" ambiguity for the encoders to learn).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "purple": (130, 50, 170),
    "orange": (245, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "pink": (245, 130, 190),
    "brown": (120, 70, 30),
    "cyan": (40, 200, 220),
    "grey": (128, 128, 128),
}

SIZES: tuple[str, ...] = ("small", "medium", "large")

# Object side length as a fraction of the image side.
SIZE_FRACTION: dict[str, float] = {"small": 0.12, "medium": 0.20, "large": 0.30}

_EDGE_MARGIN = 0.01   # keep shapes off the image border
_GAP = 0.02           # minimum gap between bounding boxes (absorbs pixel rounding)
_PLACE_TRIES = 100    # rejection-sampling attempts per object

_REGIONS = (("top left", "top", "top right"),
            ("left", "centre", "right"),
            ("bottom left", "bottom", "bottom right"))

# How each region reads in a sentence ("... is in the top left of the image").
_REGION_PHRASE = {
    "top left": "in the top left corner", "top": "at the top",
    "top right": "in the top right corner", "left": "on the left side",
    "centre": "in the centre", "right": "on the right side",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}

# Synonyms used only by paraphrases; the first entry is the canonical word that
# short_caption and dense_caption use.
_SHAPE_WORDS = {
    "circle": ("circle", "round shape", "disc", "dot"),
    "square": ("square", "box-like tile", "block", "square tile"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "five-pointed star", "star shape"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "hexagon": ("hexagon", "six-sided shape", "honeycomb cell"),
    "cross": ("cross", "plus sign", "plus shape"),
    "ring": ("ring", "hoop", "donut shape", "hollow ring"),
}
_COLOUR_WORDS = {"grey": ("grey", "gray"), "purple": ("purple", "violet"),
                 "cyan": ("cyan", "turquoise"), "pink": ("pink", "rose-pink")}
_SIZE_WORDS = {"small": ("small", "little", "tiny"),
               "medium": ("medium", "medium-sized", "mid-sized"),
               "large": ("large", "big")}

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                 "eight", "nine", "ten", "eleven", "twelve")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, normalised 0..1, (0, 0) = top-left
    y: float

    def __post_init__(self) -> None:
        # Validate here so that from_dict on bad data fails loudly, not at render time.
        if self.shape not in SHAPES or self.colour not in COLOURS or self.size not in SIZES:
            raise ValueError(f"invalid scene object: {self}")

    def region(self) -> str:
        col = min(int(self.x * 3), 2)
        row = min(int(self.y * 3), 2)
        return _REGIONS[row][col]


@dataclass(frozen=True)
class Scene:
    scene_id: str
    background: str
    objects: tuple[SceneObject, ...]
    image_size: int

    def to_dict(self) -> dict:
        return {
            "scene_id": self.scene_id,
            "background": self.background,
            "image_size": self.image_size,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size,
                 "x": o.x, "y": o.y, "region": o.region()}  # region is derived; informational
                for o in self.objects
            ],
        }

    @classmethod
    def from_dict(cls, d) -> "Scene":
        objects = tuple(
            SceneObject(shape=o["shape"], colour=o["colour"], size=o["size"],
                        x=float(o["x"]), y=float(o["y"]))
            for o in d["objects"]
        )
        return cls(scene_id=str(d["scene_id"]), background=str(d["background"]),
                   objects=objects, image_size=int(d["image_size"]))


# --------------------------------------------------------------------------- generation

def _make_scene(seed: int, index: int, image_size: int, max_objects: int) -> Scene:
    # One independent stream per (seed, index): scene i never depends on n.
    rng = np.random.default_rng([seed, index])
    colours = list(COLOURS)
    background = colours[int(rng.integers(len(colours)))]
    # Distinct (shape, colour) pairs, none in the background colour, so every
    # object can be named unambiguously as "the <colour> <shape>".
    pairs = [(s, c) for s in SHAPES for c in colours if c != background]
    n_objects = int(rng.integers(1, max_objects + 1))
    chosen = rng.choice(len(pairs), size=min(n_objects, len(pairs)), replace=False)

    placed: list[SceneObject] = []
    for k in chosen:
        shape, colour = pairs[int(k)]
        size = SIZES[int(rng.integers(len(SIZES)))]
        half = SIZE_FRACTION[size] / 2
        lo, hi = half + _EDGE_MARGIN, 1.0 - half - _EDGE_MARGIN
        for _ in range(_PLACE_TRIES):
            x, y = round(float(rng.uniform(lo, hi)), 4), round(float(rng.uniform(lo, hi)), 4)
            if all(abs(x - o.x) >= half + SIZE_FRACTION[o.size] / 2 + _GAP
                   or abs(y - o.y) >= half + SIZE_FRACTION[o.size] / 2 + _GAP
                   for o in placed):
                placed.append(SceneObject(shape, colour, size, x, y))
                break
        # If no free spot was found the object is dropped: the scene is simply
        # smaller, and the ground truth still describes exactly what is drawn.
    return Scene(f"scene-{index:06d}", background, tuple(placed), image_size)


def generate_scenes(n: int, seed: int = 0, image_size: int = 128,
                    max_objects: int = 5) -> list[Scene]:
    """Scenes 0..n-1 for ``seed``; growing ``n`` only appends scenes."""
    # Below 24 px a small ring's hole closes up and the truth would lie.
    if n < 0 or seed < 0 or max_objects < 1 or image_size < 24:
        raise ValueError("need n >= 0, seed >= 0, max_objects >= 1, image_size >= 24")
    return [_make_scene(seed, i, image_size, max_objects) for i in range(n)]


# --------------------------------------------------------------------------- rendering

def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, image_size: int) -> None:
    fill = COLOURS[o.colour]
    cx, cy = o.x * image_size, o.y * image_size
    r = SIZE_FRACTION[o.size] * image_size / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if o.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif o.shape == "square":
        draw.rectangle(box, fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif o.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif o.shape == "hexagon":
        draw.polygon([(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3))
                      for k in range(6)], fill=fill)
    elif o.shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif o.shape == "ring":
        # Hollow: the centre shows the background, which is what makes it a ring.
        draw.ellipse(box, outline=fill, width=max(1, round(r * 0.35)))
    else:  # pragma: no cover - guarded by SceneObject validation
        raise ValueError(o.shape)


def render(scene: Scene) -> Image.Image:
    """RGB image of the scene; pure function of the scene (no anti-aliasing)."""
    img = Image.new("RGB", (scene.image_size, scene.image_size), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_object(draw, o, scene.image_size)
    return img


# --------------------------------------------------------------------------- captions

def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _number(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _words(o: SceneObject, rng: random.Random, vary: bool) -> tuple[str, str, str]:
    """(size, colour, shape) words for one object, synonyms only when ``vary``."""
    if not vary:
        return o.size, o.colour, o.shape
    return (rng.choice(_SIZE_WORDS[o.size]), rng.choice(_COLOUR_WORDS.get(o.colour, (o.colour,))),
            rng.choice(_SHAPE_WORDS[o.shape]))


# Templates by how many objects they mention. {z} size, {c} colour, {s} shape,
# {bg} background, {n} object count. None use spatial words: short captions are
# meant to be as vague as web alt-text.
_T0 = ("shapes on a {bg} background", "{n} shapes on a {bg} background",
       "colourful geometric shapes", "flat shapes on a plain {bg} backdrop",
       "abstract geometric clip art")
_T0_ONE = ("a single shape on a {bg} background", "a lone shape on a plain {bg} backdrop",
           "minimal geometric clip art")
_T1 = ("{a_cs}", "{c} {s}", "photo of {a_zcs}", "{a_cs} on a {bg} background",
       "picture of {a_cs}", "an image with {a_zcs}", "simple graphic of {a_cs}",
       "{c} {s} clip art", "flat {c} {s} illustration", "minimal {c} {s} icon",
       "{a_zcs} on a plain background")
_T1_MANY = ("{a_cs} among other shapes", "{a_cs} and some other shapes")
_T2 = ("{c} {s} and {c2} {s2}", "{a_cs} with {a_cs2}", "{c} {s}, {c2} {s2}",
       "geometric shapes including {a_cs} and {a_cs2}", "{a_zcs} and {a_zcs2}",
       "{c} and {c2} shapes")


def _sample_caption(scene: Scene, rng: random.Random, vary: bool) -> str:
    objs = scene.objects
    n = len(objs)
    bg = scene.background
    if vary:
        bg = rng.choice(_COLOUR_WORDS.get(bg, (bg,)))
    # Mention 0, 1 or 2 objects, but never all of a 3+ object scene.
    roll = rng.random()
    if roll < 0.1 or n == 0:
        return rng.choice(_T0 if n > 1 else _T0_ONE).format(bg=bg, n=_number(n))
    if n >= 2 and roll > 0.6:
        o1, o2 = rng.sample(objs, 2)
        z, c, s = _words(o1, rng, vary)
        z2, c2, s2 = _words(o2, rng, vary)
        return rng.choice(_T2).format(
            c=c, s=s, c2=c2, s2=s2, a_cs=_article(f"{c} {s}"), a_cs2=_article(f"{c2} {s2}"),
            a_zcs=_article(f"{z} {c} {s}"), a_zcs2=_article(f"{z2} {c2} {s2}"))
    o = rng.choice(objs)
    z, c, s = _words(o, rng, vary)
    templates = _T1 + (_T1_MANY if n >= 2 else ())
    return rng.choice(templates).format(
        c=c, s=s, bg=bg, a_cs=_article(f"{c} {s}"), a_zcs=_article(f"{z} {c} {s}"))


def short_caption(scene: Scene, rng: random.Random) -> str:
    """One alt-text style caption naming at most two objects, canonical words."""
    return _sample_caption(scene, rng, vary=False)


def paraphrases(scene: Scene, k: int, rng: random.Random,
                exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """``k`` distinct short captions using synonyms; none equal to ``exclude``."""
    seen = set(exclude)
    out: list[str] = []
    for _ in range(200 * k + 200):
        if len(out) == k:
            break
        cap = _sample_caption(scene, rng, vary=True)
        if cap not in seen:
            seen.add(cap)
            out.append(cap)
    if len(out) < k:  # the template space is in the hundreds; this is a usage bug
        raise ValueError(f"could not produce {k} distinct paraphrases for {scene.scene_id}")
    return out


def _relation(a: SceneObject, b: SceneObject) -> str:
    # Dominant-axis rule: describe the pair along whichever axis separates them
    # more, so each pair gets exactly one unambiguous relation.
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        rel = "to the left of" if dx > 0 else "to the right of"
    else:
        rel = "above" if dy > 0 else "below"
    return f"The {a.colour} {a.shape} is {rel} the {b.colour} {b.shape}."


def dense_caption(scene: Scene) -> str:
    """Every object with size, colour, shape and region, then all pairwise relations."""
    n = len(scene.objects)
    noun = "object" if n == 1 else "objects"
    parts = [f"The image shows {_number(n)} {noun} on a plain {scene.background} background."]
    for i, o in enumerate(scene.objects):
        lead = "There is" if i == 0 else "There is also"
        parts.append(f"{lead} {_article(f'{o.size} {o.colour} {o.shape}')} "
                     f"{_REGION_PHRASE[o.region()]} of the image.")
    for i in range(n):
        for j in range(i + 1, n):
            parts.append(_relation(scene.objects[i], scene.objects[j]))
    if n == 1:
        parts.append("No other objects appear in the image.")
    return " ".join(parts)


def caption_rng(scene: Scene, seed: int) -> random.Random:
    """RNG seeded from (seed, scene_id) via sha256: stable across processes and
    Python versions (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{scene.scene_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def caption_set(scene: Scene, paraphrase_count: int, seed: int) -> tuple[list[str], str]:
    """([short_caption] + paraphrases, dense caption), deterministic in (scene, seed)."""
    rng = caption_rng(scene, seed)
    first = short_caption(scene, rng)
    shorts = [first] + paraphrases(scene, paraphrase_count, rng, exclude=(first,))
    return shorts, dense_caption(scene)
