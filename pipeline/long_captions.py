"""A held-out long-caption CRA set: paraphrase pairs of everyday scenes in near-identical families.

Why: our synthetic shape scenes (`pipeline.scenes`) are told apart by their words, so CRA on
them saturates and cannot show what a fine-tuned LLM encoder adds over a small sentence
encoder. Here every scene (a kitchen, a street, a beach, a workshop...) gets two
descriptions of 80-140 words stating the same facts (people, clothes, actions, counts,
objects, colours, spatial relations, weather) in another sentence order, with other
sentence structures and synonyms. Scenes come in **families** of near-identical scenes that
share every fact and their vocabulary but 2-3 details, spread through the text (one near the
beginning, one in the middle, one near the end: the weather, the colour of a coat, how many
bicycles, what hangs on the back wall, the colour of a dog, on which side of something it
sits...).

Each description is worded independently (order, structures, synonyms), so in wording a
family member is about as close to a description as its true paraphrase: only the details
tell them apart. (When a family shares one wording, the same-side member beats the
paraphrase on wording alone and MiniLM scores ~0; independent wording puts it near 0.2,
and raw SmolLM2 lower, which leaves a fine-tuned encoder room to beat both.)

Protocol: `long_caption_cra(encode, long_caption_pairs())`: N = num_families * family_size
(160 by default) pairs; each of the 2N descriptions retrieves among the other 2N - 1 by
cosine similarity (`pipeline.metrics.caption_retrieval_accuracy`), a hit when its top-1 is
its partner. Deterministic: family f of seed s depends only on (s, f); growing num_families
only appends families.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.metrics import pairs_cra

Form = tuple[str, str]  # (wording of variant 0, wording of variant 1)
Value = tuple[str, str, str]  # (key word found in both wordings, variant 0, variant 1)


@dataclass(frozen=True)
class Domain:
    """One kind of everyday place; every name ends up in the sentence templates below."""

    place: Form
    anchor: Form  # the surface that holds the coloured item
    spot: Form  # what the animal sits next to
    backdrop: Form  # where the wall item hangs
    actions: tuple[Form, ...]
    items: tuple[Form, ...]  # colourable things on the anchor ("a ..." must read well)
    counted: tuple[Form, ...]  # plural noun phrase with its location
    wall: tuple[Value, ...]
    extras: tuple[Form, Form]  # two fixed sentences of background
    pets: tuple[str, ...] = ("dog", "cat")


DOMAINS: tuple[Domain, ...] = (
    Domain(
        place=("a small kitchen", "a compact home kitchen"), anchor=("the wooden table", "the table of pale pine"),
        spot=("the fridge", "the refrigerator"), backdrop=("the back wall", "the wall at the back"),
        actions=(("stirring a pot of soup", "mixing soup in a large pan"), ("washing dishes at the sink", "rinsing plates under the tap"),
            ("rolling out dough", "flattening pastry with a rolling pin"), ("chopping onions", "slicing up an onion")),
        items=(("mug", "coffee mug"), ("teapot", "china teapot"), ("bread bin", "box for bread")),
        counted=(("jars of spices on the shelf", "spice jars lined up along the shelf"), ("eggs in a bowl", "eggs resting in a dish")),
        wall=(("clock", "a round clock", "a large round clock"), ("calendar", "a calendar with a photo of hills", "a calendar showing green hills"),
            ("lemons", "a small painting of lemons", "a little picture of lemons"), ("mirror", "an oval mirror", "a mirror shaped like an egg"),
            ("plate", "a decorative plate", "an ornamental china plate")),
        extras=(("The floor is covered in black and white tiles.", "Black and white tiles cover the floor."),
            ("A radio on the windowsill is playing quietly.", "Quiet music comes from a radio standing on the windowsill.")),
    ),
    Domain(
        place=("a busy shopping street", "a crowded high street"),
        anchor=("the café table on the pavement", "the little pavement table outside the café"), spot=("the lamp post", "the iron street lamp"),
        backdrop=("the brick wall of the bakery", "the bakery's brick front"),
        actions=(("checking a phone", "looking down at a mobile"), ("waiting to cross the road", "waiting at the kerb for the lights"),
            ("carrying shopping bags", "holding several bags of shopping"), ("handing out leaflets", "giving flyers to people walking past")),
        items=(("paper cup", "takeaway cup"), ("cycling helmet", "bike helmet"), ("folded umbrella", "closed umbrella")),
        counted=(("bicycles leaning against the railing", "bikes propped against the railing"),
            ("cars parked along the kerb", "parked cars lining the kerb")),
        wall=(("sign", "a painted sign for fresh bread", "a hand-painted bread sign"),
            ("poster", "a poster for a jazz concert", "a jazz concert poster"), ("flower", "a basket of flowers", "a hanging basket full of flowers"),
            ("clock", "a large clock", "a big clock with roman numerals"), ("flag", "a striped flag", "a flag with stripes")),
        extras=(("A red bus is stopped at the far end of the road.", "At the far end of the road a red bus has pulled up."),
            ("Shop windows line both sides of the pavement.", "Both sides of the pavement are lined with shop windows.")),
    ),
    Domain(
        place=("a city park", "a public park in town"), anchor=("the picnic bench", "the wooden bench for picnics"),
        spot=("the old oak tree", "the big old oak"), backdrop=("the fence behind the pond", "the wooden fence beyond the pond"),
        actions=(("feeding the ducks", "throwing bread to the ducks"), ("reading a paperback", "reading a small novel"),
            ("jogging along the path", "running slowly down the path"), ("flying a kite", "holding the string of a kite")),
        items=(("cool box", "box for keeping drinks cold"), ("picnic basket", "basket for a picnic"), ("water bottle", "bottle of water")),
        counted=(("ducks swimming on the pond", "ducks paddling across the pond"), ("benches along the path", "park benches beside the path")),
        wall=(("lost", "a notice about a lost cat", "a lost-cat notice"), ("map", "a map of the park", "a park map behind glass"),
            ("lantern", "a string of paper lanterns", "a row of paper lanterns"),
            ("birdhouse", "a wooden birdhouse", "a small birdhouse made of wood"), ("banner", "a banner for a summer fair", "a summer fair banner")),
        extras=(("The grass has just been cut.", "Someone has recently mown the lawn."),
            ("A fountain splashes in the middle of the pond.", "In the middle of the pond a fountain is splashing.")),
    ),
    Domain(
        place=("an open-plan office", "a shared office floor"), anchor=("the long desk", "the long shared desk"),
        spot=("the printer", "the office printer"), backdrop=("the back wall", "the rear wall"),
        actions=(("typing on a laptop", "tapping away at a laptop keyboard"), ("talking on the phone", "speaking into a phone"),
            ("writing on a whiteboard", "drawing on the whiteboard with a marker"), ("sorting papers", "arranging a stack of documents")),
        items=(("desk lamp", "reading lamp"), ("stapler", "heavy stapler"), ("ring binder", "folder with rings")),
        counted=(("monitors on the desks", "computer screens on the desks"), ("potted plants by the window", "plants in pots near the window")),
        wall=(("clock", "a wall clock", "a plain clock"), ("chart", "a chart of monthly sales", "a sales chart for the month"),
            ("whiteboard", "a whiteboard full of notes", "a whiteboard covered with notes"),
            ("poster", "a poster about fire safety", "a fire safety poster"),
            ("photograph", "a framed photograph of the team", "a team photograph in a frame")),
        extras=(("The carpet is dark grey.", "Dark grey carpet covers the floor."),
            ("A coffee machine hums in the corner.", "In the corner a coffee machine is humming.")),
    ),
    Domain(
        place=("a sandy beach", "a stretch of sandy shore"), anchor=("the beach towel", "the towel spread on the sand"),
        spot=("the lifeguard chair", "the tall chair of the lifeguard"), backdrop=("the side of the beach hut", "the wall of the little beach hut"),
        actions=(("building a sandcastle", "making a castle out of sand"), ("putting on sun cream", "rubbing on sunscreen"),
            ("reading a magazine", "leafing through a magazine"), ("shaking sand off a towel", "beating the sand out of a towel")),
        items=(("bucket", "plastic bucket"), ("sun hat", "hat for the sun"), ("cool bag", "bag for cold drinks")),
        counted=(("surfboards stuck in the sand", "surfboards planted upright in the sand"),
            ("seagulls near the water", "gulls standing by the water")),
        wall=(("lifebuoy", "a lifebuoy", "a ring-shaped lifebuoy"), ("sign", "a sign about the tides", "a tide times sign"),
            ("wetsuit", "a wetsuit drying", "a wetsuit hung up to dry"), ("net", "a fishing net", "an old fishing net"),
            ("flag", "a red and yellow flag", "a flag in red and yellow")),
        extras=(("Small waves roll onto the shore.", "Gentle waves break along the shore."),
            ("A sailing boat is far out at sea.", "Far out at sea there is a sailing boat.")),
        pets=("dog"),
    ),
    Domain(
        place=("an outdoor market", "a street market in the open air"), anchor=("the fruit stall", "the stall selling fruit"),
        spot=("the vegetable crates", "the crates of vegetables"), backdrop=("the front of the cheese stall", "the cheese stall's front"),
        actions=(("weighing tomatoes", "putting tomatoes on the scales"), ("counting out change", "handing back coins"),
            ("choosing peaches", "picking out peaches"), ("stacking boxes", "piling up crates")),
        items=(("basket", "wicker basket"), ("paper bag", "bag made of paper"), ("cash box", "box for money")),
        counted=(("stalls with striped awnings", "stalls under striped canopies"), ("crates of apples", "boxes full of apples")),
        wall=(("price", "a price board", "a board listing prices"), ("garlic", "a string of garlic", "a rope of garlic bulbs"),
            ("chalkboard", "a chalkboard menu", "a menu written on a chalkboard"), ("bell", "a brass bell", "a little bell made of brass"),
            ("bunting", "a line of bunting", "a row of bunting")),
        extras=(("The air smells of fresh bread and coffee.", "There is a smell of coffee and fresh bread."),
            ("Cobblestones cover the square.", "The square is paved with cobblestones.")),
        pets=("dog"),
    ),
    Domain(
        place=("a primary school classroom", "a classroom for young children"),
        anchor=("the teacher's desk", "the desk at the front used by the teacher"), spot=("the bookcase", "the low bookshelf"),
        backdrop=("the back wall", "the wall at the back of the room"),
        actions=(("pointing at the board", "gesturing at the blackboard"), ("handing out worksheets", "passing round sheets of exercises"),
            ("writing in a notebook", "taking notes in an exercise book"), ("sharpening a pencil", "putting a pencil through the sharpener")),
        items=(("pencil case", "case for pencils"), ("globe", "spinning globe"), ("lunch box", "box for lunch")),
        counted=(("children sitting at their desks", "pupils seated at their desks"), ("chairs stacked by the door", "chairs piled up near the door")),
        wall=(("alphabet", "an alphabet chart", "a chart with the alphabet"), ("map", "a map of the world", "a world map"),
            ("painting", "a row of children's paintings", "a line of paintings by the pupils"), ("timetable", "a timetable", "a weekly timetable"),
            ("clock", "a clock", "a school clock")),
        extras=(("Sunlight falls across the rows of desks.", "The rows of desks are lit by sunlight."),
            ("A class hamster sleeps in its cage.", "In its cage the class hamster is asleep.")),
        pets=("dog"),
    ),
    Domain(
        place=("a train platform", "a railway station platform"), anchor=("the bench on the platform", "the platform bench"),
        spot=("the ticket machine", "the machine selling tickets"), backdrop=("the platform wall", "the wall along the platform"),
        actions=(("looking at the timetable", "reading the departure board"), ("pulling a suitcase", "wheeling a suitcase along"),
            ("drinking coffee", "sipping a coffee"), ("waving at someone", "waving a hand at someone")),
        items=(("suitcase", "travel case"), ("rucksack", "backpack"), ("thermos", "flask")),
        counted=(("people waiting near the edge", "passengers standing near the edge"),
            ("carriages in the waiting train", "coaches in the train at the platform")),
        wall=(("clock", "a station clock", "a big station clock"), ("map", "a map of the rail network", "a rail network map"),
            ("advert", "an advert for a holiday", "a holiday advert"), ("board", "a departure board", "a board of departures"),
            ("poster", "a poster of a lighthouse", "a lighthouse poster")),
        extras=(("A yellow line is painted along the edge.", "Along the edge runs a painted yellow line."),
            ("An announcement echoes from the speakers.", "The speakers are making an announcement.")),
        pets=("dog"),
    ),
    Domain(
        place=("a cosy living room", "a comfortable sitting room"), anchor=("the coffee table", "the low table in front of the sofa"),
        spot=("the sofa", "the settee"), backdrop=("the wall above the fireplace", "the chimney breast"),
        actions=(("knitting a scarf", "working on a knitted scarf"), ("watching television", "looking at the TV"),
            ("playing a board game", "moving pieces in a board game"), ("folding laundry", "folding clean washing")),
        items=(("vase", "flower vase"), ("teacup", "cup of tea"), ("candle", "candle in a holder")),
        counted=(("cushions on the sofa", "cushions piled on the settee"), ("books on the shelf", "books along the shelf")),
        wall=(("landscape", "a painting of a landscape", "a landscape painting"), ("mirror", "a gilded mirror", "a mirror in a gold frame"),
            ("photograph", "a family photograph", "a photograph of the family"), ("clock", "a cuckoo clock", "a wooden cuckoo clock"),
            ("tapestry", "a woven tapestry", "a tapestry")),
        extras=(("A patterned rug lies on the floor.", "On the floor there is a patterned rug."),
            ("A fire is burning in the grate.", "In the grate a fire is burning.")),
    ),
    Domain(
        place=("a carpentry workshop", "a woodworking shop"), anchor=("the workbench", "the heavy bench for working"),
        spot=("the pile of planks", "the stack of timber"), backdrop=("the pegboard at the back", "the pegboard on the rear wall"),
        actions=(("sanding a plank", "smoothing a board with sandpaper"), ("measuring a board", "checking a board with a tape measure"),
            ("hammering a nail", "driving in a nail with a hammer"), ("sawing a beam", "cutting through a beam with a saw")),
        items=(("toolbox", "box of tools"), ("power drill", "cordless drill"), ("paint tin", "tin of paint")),
        counted=(("chairs waiting to be varnished", "unvarnished chairs"), ("clamps on the bench", "clamps lying on the bench")),
        wall=(("saw", "a row of saws", "a line of saws"), ("hammer", "a set of hammers", "several hammers"),
            ("plan", "a drawing of a plan for a cabinet", "a cabinet plan on paper"), ("radio", "a dusty radio", "an old radio covered in dust"),
            ("calendar", "a calendar", "a calendar from a timber merchant")),
        extras=(("Sawdust covers the concrete floor.", "The concrete floor is covered in sawdust."),
            ("The smell of fresh pine fills the room.", "The room smells of freshly cut pine.")),
    ),
)

WEATHER: tuple[Value, ...] = (
    ("sun", "sunny", "the sun is shining brightly"), ("rain", "rainy", "rain is falling steadily"),
    ("snow", "snowy", "snow is drifting down"), ("fog", "foggy", "a thick fog hangs in the air"),
    ("wind", "windy", "a strong wind is blowing"), ("cloud", "cloudy", "heavy clouds fill the sky"),
)
TIMES: tuple[Form, ...] = (("morning", "early in the morning"), ("afternoon", "the middle of the afternoon"), ("evening", "early in the evening"))
PEOPLE: tuple[Form, ...] = (
    ("woman", "lady"), ("man", "gentleman"), ("teenage girl", "girl in her teens"),
    ("grey-haired man", "man with grey hair"), ("young woman", "woman in her twenties"), ("boy", "young lad"),
)
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "grey", "white", "black", "pink", "brown")
GARMENTS: tuple[Form, ...] = (
    ("coat", "overcoat"), ("sweater", "knitted jumper"), ("raincoat", "rain jacket"), ("shirt", "button-up shirt"), ("hoodie", "hooded top"),
)
POSITIONS: tuple[Form, ...] = (
    ("on the left", "over on the left-hand side"), ("in the middle", "right in the centre"), ("on the right", "over on the right-hand side"),
)
FEATURES: tuple[Value, ...] = (
    ("glasses", "wearing glasses", "who has glasses on"), ("hat", "in a wide-brimmed hat", "who wears a broad straw hat"),
    ("backpack", "carrying a backpack", "who carries a backpack on one shoulder"),
    ("headphones", "wearing headphones", "who has headphones over the ears"),
    ("scarf", "in a striped scarf", "who has a striped scarf round the neck"),
)
COUNTS: tuple[str, ...] = ("two", "three", "four", "five", "six", "seven")
FUR: tuple[str, ...] = ("black", "white", "brown", "grey", "ginger")
RELATIONS: tuple[Value, ...] = (
    ("left", "to the left of", "just to the left of"), ("right", "to the right of", "just to the right of"),
    ("front", "in front of", "directly in front of"), ("behind", "behind", "tucked away behind"),
)

# Sentence name -> its structures. `{field}` takes the description's synonym for that field;
# `{time[i]}` / `{weather[i]}` / `{extra0[i]}` pick a grammatical form or a fixed wording.
SENTENCES: dict[str, tuple[str, ...]] = {
    "opening": ("The picture shows {place} on a {weather[1]} {time[0]}.",
                "It is {time[1]}, {weather[2]}, and the view is of {place}.",
                "Here we see {place}; it is {time[1]} and {weather[2]}."),
    "person": ("A {person} in a {colour} {garment} stands {position}, {action}.",
               "{position}, {action}, is a {person} wearing a {colour} {garment}.",
               "Dressed in a {colour} {garment}, a {person} is {action} {position}."),
    "second": ("A {other} {feature} is {other_action} a few steps away.",
               "A second person, a {other} {feature}, is busy {other_action} nearby.",
               "Not far off, {other_action}, is a {other} {feature}."),
    "count": ("There are {count} {counted}.", "You can count {count} {counted}.", "In total, {count} {counted} are visible."),
    "item": ("On {anchor} sits a {item_colour} {item}, next to a {neighbour}.",
             "A {item} in {item_colour} rests on {anchor}, beside a {neighbour}.",
             "A {neighbour} and a {item_colour} {item} have been left on {anchor}."),
    "extra0": ("{extra0[0]}", "{extra0[1]}"),
    "extra1": ("{extra1[0]}", "{extra1[1]}"),
    "pet": ("A {fur} {pet} sits {relation} {spot}.", "{relation} {spot} a {pet} with {fur} fur is sitting.",
            "Sitting {relation} {spot} is a {fur} {pet}."),
    "wall": ("On {backdrop} hangs {wall}.", "{wall} has been fixed to {backdrop}.", "Hanging on {backdrop}, you can see {wall}."),
}
TIED = ("time", "weather", "extra0", "extra1")  # fields whose wording the structure picks
ORDER: tuple[str, ...] = tuple(SENTENCES)  # canonical order: beginning, middle, end in blocks of 3
# Slots a family may vary, by where they sit in the canonical order.
DETAIL_GROUPS: tuple[tuple[str, ...], ...] = (("weather", "colour"), ("count", "item_colour", "feature"), ("relation", "wall", "fur"))
# A paraphrase keeps at most this many of the 9 sentence structures of its partner: fewer
# makes the partner further in wording than a family member is, and MiniLM drops to ~0.
MAX_SHARED_STRUCTURES = 4
MIN_WORDS, MAX_WORDS = 80, 140


@dataclass(frozen=True)
class LongCaptionPair:
    """Two descriptions of one scene; `details` maps each varied slot to its key word."""

    family: int
    scene: int
    first: str
    second: str
    details: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _Plan:
    """How one description words the facts: sentence order, structure and synonym choices."""

    order: tuple[str, ...]
    structures: dict[str, int]
    synonyms: dict[str, int]


def _options(domain: Domain) -> dict[str, Sequence]:
    return {"weather": WEATHER, "colour": COLOURS, "count": COUNTS, "item_colour": COLOURS,
            "feature": FEATURES, "relation": RELATIONS, "wall": domain.wall, "fur": FUR}


def _key(value: str | Value) -> str:
    return value if isinstance(value, str) else value[0]


def _forms(value: str | Form | Value) -> tuple[str, ...]:
    """The synonyms of a field: a plain string has one, a Value drops its key word."""
    if isinstance(value, str):
        return (value,)
    return value if len(value) == 2 else value[1:]


def _render(fields: dict[str, object], plan: _Plan) -> str:
    words = {k: v if k in TIED else _forms(v)[plan.synonyms[k] % len(_forms(v))] for k, v in fields.items()}
    sentences = []
    for name in plan.order:
        text = SENTENCES[name][plan.structures[name]].format(**words)
        sentences.append(text[0].upper() + text[1:])
    return " ".join(sentences)


def _draw_plan(rng: random.Random, fields: Sequence[str], order: Sequence[str]) -> _Plan:
    return _Plan(tuple(order), {n: rng.randrange(len(SENTENCES[n])) for n in ORDER}, {f: rng.randrange(2) for f in fields})


def _plans(rng: random.Random, fields: Sequence[str]) -> tuple[_Plan, _Plan]:
    """A description and its paraphrase, each worded independently, like a family member: the
    paraphrase opens with another sentence, in another order, and re-structures most sentences."""
    blocks = [list(ORDER[i:i + 3]) for i in range(0, len(ORDER), 3)]
    for block in blocks:  # the first keeps beginning / middle / end, shuffled within each
        rng.shuffle(block)
    first = _draw_plan(rng, fields, [name for block in blocks for name in block])
    while True:
        order = rng.sample(ORDER, len(ORDER))
        second = _draw_plan(rng, fields, order)
        shared = sum(first.structures[n] == second.structures[n] for n in ORDER)
        if order[0] != first.order[0] and shared <= MAX_SHARED_STRUCTURES:
            return first, second


def _family(seed: int, family: int, family_size: int) -> list[LongCaptionPair]:
    """One family: the same facts and vocabulary, members differing only in the varied slots."""
    rng = random.Random(f"long-captions/{seed}/{family}")
    domains = list(DOMAINS)
    random.Random(f"long-captions/{seed}").shuffle(domains)  # every domain equally often
    domain = domains[family % len(domains)]
    action, other_action = rng.sample(domain.actions, 2)
    person, other = rng.sample(PEOPLE, 2)
    item, neighbour = rng.sample(domain.items, 2)
    base: dict[str, object] = {
        "place": domain.place, "time": rng.choice(TIMES), "person": person, "garment": rng.choice(GARMENTS),
        "position": rng.choice(POSITIONS), "action": action, "other": other, "other_action": other_action,
        "counted": rng.choice(domain.counted), "anchor": domain.anchor, "item": item, "neighbour": neighbour,
        "pet": rng.choice(domain.pets), "spot": domain.spot, "backdrop": domain.backdrop,
        "extra0": domain.extras[0], "extra1": domain.extras[1],
    }
    options = _options(domain)
    for slot, values in options.items():
        base[slot] = rng.choice(values)
    # 2 or 3 varied slots, each from a different part of the text
    varied = [rng.choice(group) for group in rng.sample(DETAIL_GROUPS, rng.choice((2, 3)))]
    if any(len(options[slot]) < family_size for slot in varied):
        raise ValueError(f"family_size {family_size} exceeds the values of a varied slot in {varied}")
    member_values = {slot: rng.sample(list(options[slot]), family_size) for slot in varied}
    pairs = []
    for member in range(family_size):
        fields = {**base, **{slot: member_values[slot][member] for slot in varied}}
        plan_rng = random.Random(f"long-captions/{seed}/{family}/{member}")
        while True:  # redraw the rare wording that runs outside the length bounds
            texts = [_render(fields, plan) for plan in _plans(plan_rng, list(fields))]
            if all(MIN_WORDS <= len(text.split()) <= MAX_WORDS for text in texts):
                break
        details = tuple((slot, _key(fields[slot])) for slot in varied)
        pairs.append(LongCaptionPair(family, member, texts[0], texts[1], details))
    return pairs


def long_caption_pairs(num_families: int = 40, family_size: int = 4, seed: int = 0) -> list[LongCaptionPair]:
    """num_families * family_size pairs, family by family; families depend only on (seed, family)."""
    if num_families < 1 or family_size < 2:
        raise ValueError(f"need num_families >= 1 and family_size >= 2, got {num_families}, {family_size}")
    return [pair for family in range(num_families) for pair in _family(seed, family, family_size)]


def long_caption_cra(encode: Callable[[list[str]], np.ndarray], pairs: Sequence[LongCaptionPair]) -> float:
    """CRA over the pairs: `encode` maps a list of texts to one embedding row per text."""
    return pairs_cra(encode, [(p.first, p.second) for p in pairs])
