"""Seeds of the everyday caption corpus: what the local LLM is asked to caption.

Synthetic-scene captions alone are a narrow language (a few shapes, colours and
relations). Stage 1 generalises better with everyday photo captions, so the embedded
default also builds a broad corpus: each item is a (topic, photo style) seed; the
recaption job's text mode turns it into a short caption, then a dense rewrite and a
paraphrase of that caption, giving (short, dense) and (short, paraphrase) pairs.
No images are involved; items are ids in the caption store.
"""

from __future__ import annotations

import random

from pipeline.versioning import stable_hash

TOPICS = [
    "a farmers market on a Saturday morning", "a child's birthday party in a garden", "a crowded subway car at rush hour",
    "a fisherman mending nets on a pier", "a bakery window full of bread", "a dog catching a frisbee in a park",
    "a snowy mountain village at dusk", "a street food stall at night", "an old man reading a newspaper on a bench",
    "a classroom during an art lesson", "a cyclist riding through autumn leaves", "a family cooking dinner together",
    "a rainy city street with umbrellas", "a surfer carrying a board on the beach", "a cat sleeping on a windowsill",
    "a wedding couple dancing", "a marathon runner crossing the finish line", "a library reading room",
    "a tractor plowing a field", "a busy airport departure hall", "a campfire under the stars",
    "a barista making latte art", "children playing football in a dusty yard", "a hospital corridor",
    "a flower shop on a corner", "a construction crane over a building site", "a horse grazing in a meadow",
    "a rock band playing on a small stage", "a grandmother knitting by the fire", "a food truck line at lunchtime",
    "a sailboat on a calm lake", "a teenager skateboarding down a ramp", "a chess game in a city park",
    "a laundromat late at night", "a pottery class", "a vegetable garden in summer", "a train crossing a bridge",
    "a night market lit by lanterns", "a mechanic repairing a car engine", "a beach volleyball match",
    "a toddler taking first steps", "a picnic on a hillside", "a crowded stadium during a match",
    "a lighthouse on a rocky coast", "a street musician playing violin", "a kitchen after a big meal",
    "a hiker resting on a mountain trail", "a science fair in a school gym", "a bookshop with tall shelves",
    "a snowball fight in a backyard", "a yoga class on a rooftop", "a harbor full of fishing boats",
    "a parade with marching bands", "a home office with two monitors", "a vineyard at harvest time",
    "a bus stop in the rain", "a carousel at a fair", "a chef plating a dessert", "a deer crossing a forest road",
    "a laboratory with glass beakers", "a ferry leaving the port", "a city skyline at sunset",
    "a grocery store checkout", "a potter's wheel spinning clay", "an ice skating rink", "a desert road trip",
    "a dentist's waiting room", "a child feeding ducks at a pond", "a protest march downtown",
    "a quiet temple courtyard", "a fire truck at an emergency", "a tea ceremony", "a florist arranging roses",
    "a baseball game at a small field", "a graduation ceremony", "a mountain lake reflecting trees",
    "a tailor measuring a suit", "a crowded beach in August", "a family photo at a reunion",
]

STYLES = [
    "a phone snapshot of", "a news photo of", "a stock photo of", "a travel photo of", "a close-up photo of",
    "a wide-angle photo of", "a black-and-white photo of", "a candid photo of", "an overhead photo of", "a blurry photo of",
]

SHORT_PROMPT = "Write a short caption, under 15 words, for {caption}. Reply with the caption only."
DENSE_PROMPT = "Rewrite this short photo caption as a detailed description of the scene: {caption}"
PARAPHRASE_PROMPT = "Say the same as this photo caption in different words, in one sentence. Reply with that sentence only: {caption}"


def seeds(num_items: int, seed: int = 0) -> list[tuple[str, str]]:
    """(item_id, seed text) pairs: distinct (style, topic) combinations, deterministic."""
    combos = [(style, topic) for topic in TOPICS for style in STYLES]
    if num_items > len(combos):
        raise ValueError(f"the everyday corpus has {len(combos)} distinct seeds; asked for {num_items}")
    random.Random(seed).shuffle(combos)
    return [(f"everyday-{stable_hash([s, t], 12)}", f"{s} {t}") for s, t in combos[:num_items]]
