"""A handful of real photos bundled with scikit-image, with our own captions.

Synthetic scenes (``pipeline.scenes``) have exact ground truth but look nothing
like real images; these few photos give smoke tests and demos a taste of
natural-image input. Every image here ships *inside* the scikit-image wheel,
so loading needs no network (images that skimage fetches with pooch are
deliberately left out). Captions and descriptions were written for this
project by looking at the images; they are not copied from anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SamplePhoto:
    name: str                    # the skimage.data function name
    captions: tuple[str, ...]    # short, alt-text style
    dense_caption: str           # detailed multi-sentence description


_PHOTOS: tuple[SamplePhoto, ...] = (
    SamplePhoto(
        "astronaut",
        ("astronaut in an orange flight suit", "portrait of a smiling astronaut",
         "woman astronaut with a helmet and an American flag"),
        "A studio portrait of a smiling woman with short light brown hair wearing a bright "
        "orange spacesuit. A round mission patch and a name tag are sewn on the chest of the "
        "suit. An American flag hangs on the left side of the picture and a model of the space "
        "shuttle stands on the right. A white and black helmet rests in the bottom right corner "
        "in front of her.",
    ),
    SamplePhoto(
        "chelsea",
        ("close-up of a tabby cat", "cat face with green eyes"),
        "A close-up photograph of a tabby cat's face filling most of the frame. The cat has "
        "striped brown and grey fur, large yellow-green eyes and a pink nose, with long white "
        "whiskers. It looks slightly to the side of the camera. The background is blurred and "
        "pale.",
    ),
    SamplePhoto(
        "coffee",
        ("espresso in a red cup", "cup of coffee on a wooden table",
         "red coffee cup and saucer with a spoon"),
        "A top-down view of a cup of espresso on a wooden table. The cup is red on the outside "
        "and white inside, and the coffee has a light brown crema on top. It sits on a matching "
        "red saucer with a small metal spoon resting beside the cup. The wood grain of the "
        "table is visible around the saucer.",
    ),
    SamplePhoto(
        "rocket",
        ("rocket on the launch pad at dusk", "white rocket between launch towers"),
        "A tall white rocket stands upright on its launch pad in the centre of the picture. "
        "Several lattice towers rise on both sides of it against a deep blue evening sky. Bright "
        "floodlights shine with star-shaped glare along the bottom of the image. The scene is "
        "dim apart from the lights and the rocket itself.",
    ),
    SamplePhoto(
        "camera",
        ("man with a camera on a tripod", "black and white photo of a cameraman"),
        "A black and white photograph of a man in a dark coat looking through a camera mounted "
        "on a tripod. He stands on the left, bending towards the camera, on a wide grassy field. "
        "Buildings and a tall tower are visible far away on the horizon. The sky is plain and "
        "light.",
    ),
    SamplePhoto(
        "coins",
        ("ancient coins on a dark background", "rows of old silver coins"),
        "A grayscale photograph of about two dozen ancient coins laid out in four rows on a dark "
        "background. The coins are of different sizes and show heads in profile and standing "
        "figures. Some are worn and slightly irregular in shape. Bright coin surfaces stand out "
        "against the darker cloth behind them.",
    ),
    SamplePhoto(
        "horse",
        ("black silhouette of a horse", "horse shape on a white background"),
        "A solid black silhouette of a horse standing in profile on a plain white background. "
        "The horse faces to the right, with its head raised and its tail hanging down on the "
        "left. All four legs are visible and no other details or textures are drawn.",
    ),
    SamplePhoto(
        "moon",
        ("surface of the moon", "grey lunar surface with craters"),
        "A grayscale image of a patch of the lunar surface in flat, low-contrast grey. A bright, "
        "round crater stands out near the top left. Darker rough patches run diagonally down "
        "through the middle and bottom of the image, and small craters are scattered all over.",
    ),
    SamplePhoto(
        "hubble_deep_field",
        ("galaxies in deep space", "thousands of galaxies on a black sky"),
        "A deep space image with a black background packed with many small galaxies and stars. "
        "Most of them are tiny specks of white, blue, orange and red light. A few larger "
        "galaxies appear as fuzzy orange and white ovals. There is no foreground object; the "
        "whole frame is filled with distant light sources.",
    ),
    SamplePhoto(
        "brick",
        ("grey brick wall", "brick pavement texture"),
        "A grayscale close-up of a brick wall seen at a slight angle. Long rectangular bricks "
        "are laid in staggered rows and separated by thin light lines of mortar. The bricks "
        "are a uniform mid grey and the pattern fills the whole image.",
    ),
)


def sample_photos() -> list[SamplePhoto]:
    """All sample photos (each loadable offline with :func:`load_photo`)."""
    return list(_PHOTOS)


def load_photo(name: str) -> Image.Image:
    """Load one sample photo from the data bundled inside scikit-image.

    Keeps the natural mode: colour photos are "RGB", grayscale ones "L", and
    the boolean horse silhouette becomes "L" with values 0/255.
    """
    if name not in {p.name for p in _PHOTOS}:
        raise KeyError(f"unknown sample photo {name!r}")
    # Imported lazily: skimage is slow to import and only needed here.
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return Image.fromarray(arr)
