"""A held-out CRA set of 60 hand-written everyday photo caption pairs ("everyday-pairs").

Each pair describes one imagined everyday photo twice: `first` is a short alt-text-style
caption (5-12 words), `second` a denser description of the same photo (20-45 words),
reworded (another sentence structure, synonyms, extra plausible details) but, like a real
dense caption, still naming some of the photo's key things. The pairs are
typed out by hand below (no templates, no generation, no randomness) in British English.
Topics vary (food, pets, streets, sport, children, offices, nature, transport, weather,
home, shops, events, work), with some near-topic neighbours (three dog photos, two cats,
three kitchens, three beaches, two rainy streets, two cakes...) that differ in their
details, so an encoder has to read the details; each caption's true partner is still
unambiguous to a human reader.

Protocol: embed the 60 `first` captions and the 60 `second` captions with the encoder under
test and call `pipeline.metrics.caption_retrieval_accuracy(first_embeddings, second_embeddings)`:
all 2N = 120 captions are L2-normalised and each one retrieves its nearest neighbour by cosine
similarity among the other 119 (both sides pooled, itself excluded); a hit is when that
neighbour is its partner. CRA is the fraction of hits over all 120 queries (chance ~1/119).
The finetune-text job reports it as the held-out set "everyday-pairs". The set is for
evaluation only and is never used for training.
"""

from __future__ import annotations

EVERYDAY_PAIRS: tuple[tuple[str, str], ...] = (
    # pets
    (
        "a man walking his dog in the rain",
        "On a wet grey afternoon, a man in a dark raincoat holds an umbrella while his small brown terrier trots beside him on the "
        "pavement, its lead slack and its fur soaked.",
    ),
    (
        "a black labrador catching a frisbee in a park",
        "Leaping high above the mown grass of a sunny city park, a glossy black retriever snaps a flying red plastic disc out of the "
        "air while its owner watches from a distance.",
    ),
    (
        "a puppy asleep on a grey sofa",
        "Curled up between two cushions on a charcoal-coloured couch, a young golden pup naps with its nose tucked under one paw, a "
        "chewed rope toy lying forgotten by the armrest.",
    ),
    (
        "a ginger cat sitting on a sunny windowsill",
        "An orange tabby cat perches on the ledge of a bright window, squinting into the morning sunshine, with a potted basil plant "
        "beside it and the net curtains pulled aside.",
    ),
    (
        "a kitten playing with a ball of wool",
        "A tiny grey-and-white kitten rolls onto its back on a living-room rug, batting with both front paws at a tangled ball of "
        "blue knitting yarn.",
    ),
    # food and kitchens
    (
        "a bowl of ramen with a boiled egg",
        "Steam rises from a deep ceramic bowl of noodle soup topped with sliced pork, spring onions, a sheet of nori and a "
        "soft-boiled egg cut in half to show its runny yolk.",
    ),
    (
        "a slice of pepperoni pizza on a paper plate",
        "A single triangular slice of cheesy pizza covered in rounds of spicy red pepperoni sits on a flimsy white paper plate, "
        "grease soaking into its edges, on a takeaway counter.",
    ),
    (
        "a stack of pancakes with berries and syrup",
        "Three fluffy golden pancakes are piled on a breakfast plate, scattered with fresh blueberries and raspberries, while maple "
        "syrup drips down their sides beside a small pat of melting butter.",
    ),
    (
        "a woman chopping vegetables in a bright kitchen",
        "In a sunlit white kitchen, a woman slices carrots and red peppers on a wooden chopping board with a large knife, a pot of "
        "water simmering on the hob behind her.",
    ),
    (
        "a messy kitchen counter after a dinner party",
        "Dirty wine glasses, stacked plates smeared with sauce, an empty roasting tin and crumpled napkins crowd the kitchen worktop "
        "late at night, after the dinner guests have gone home.",
    ),
    (
        "a father and daughter baking biscuits together",
        "A dad and his young daughter, both dusted with flour, press cutters into rolled-out dough on the kitchen table, a tray of "
        "star-shaped biscuits waiting to go into the oven.",
    ),
    # beaches
    (
        "a crowded beach on a hot summer day",
        "Hundreds of sunbathers lie on towels under colourful parasols along a packed beach on a scorching afternoon, while swimmers "
        "splash in the shallow turquoise water beneath a cloudless sky.",
    ),
    (
        "an empty beach at sunset with one surfer",
        "As the sun sinks towards the horizon and paints the sky orange and pink, a lone surfer in a wetsuit carries a board across "
        "the otherwise deserted sand towards the waves.",
    ),
    (
        "children building a sandcastle by the sea",
        "Two small kids in sun hats kneel near the waterline, patting wet sand into towers with plastic buckets and spades and "
        "decorating their castle with shells and a little paper flag.",
    ),
    # streets and weather
    (
        "a busy city street at night with neon signs",
        "After dark, crowds of pedestrians stream along a city-centre street lined with glowing pink and blue neon shop signs, taxis "
        "crawling past with their headlamps reflected on the tarmac.",
    ),
    (
        "a quiet cobbled lane in an old village",
        "A narrow cobblestone alley winds between whitewashed village cottages with blue shutters and window boxes of flowers, nobody "
        "in sight except a tabby dozing in a doorway.",
    ),
    (
        "a cyclist waiting at a red traffic light",
        "A cyclist in a yellow jacket and helmet rests one foot on the kerb, balancing a road bike at a busy junction while the "
        "traffic signal glows red and cars pass in front.",
    ),
    (
        "commuters with umbrellas at a rainy zebra crossing",
        "On a downpour-soaked morning, dozens of office workers hurry over the striped pedestrian crossing under black, red and "
        "see-through umbrellas, puddles splashing around their shoes.",
    ),
    (
        "lightning over a city skyline at night",
        "A jagged bolt of lightning splits a dark purple sky above a cluster of illuminated skyscrapers, heavy storm clouds hanging "
        "low over the towers of the city.",
    ),
    (
        "parked cars buried in snow on a residential street",
        "After an overnight blizzard, a suburban road lies under a thick white blanket of snow, the cars parked along the kerb "
        "covered up to their wing mirrors and footprints winding along the pavement.",
    ),
    # sport
    (
        "two teams playing football on a muddy pitch",
        "Players in red and white kits slide and tackle on a waterlogged, muddy football field, their shorts and socks splattered "
        "brown, as a referee jogs behind them in the drizzle.",
    ),
    (
        "a tennis player serving on a clay court",
        "A woman in a white tennis dress tosses the ball high above her head and arches her back to serve, her shoes kicking up "
        "orange clay dust on the baseline.",
    ),
    (
        "a runner crossing a marathon finish line",
        "Exhausted but smiling, a marathon runner wearing a race number raises both arms as he breaks the finishing tape under a "
        "large inflatable arch, spectators cheering behind barriers.",
    ),
    (
        "kids playing basketball in a school gym",
        "A group of young pupils in blue PE kits dribble and pass an orange basketball on the polished wooden floor of the school "
        "sports hall, one boy leaping towards the hoop.",
    ),
    (
        "a swimmer doing laps in an outdoor pool",
        "Under a clear morning sky, a lone swimmer in a black cap and goggles cuts through the blue water of an open-air lane pool, "
        "arms reaching forward in a steady front crawl.",
    ),
    (
        "a woman jogging through a park in autumn",
        "Wearing a grey hoodie and earbuds, a female jogger strides along a gravel path through the park, the ground carpeted with "
        "red and yellow autumn leaves and bare branches arching above her.",
    ),
    # children and family
    (
        "a toddler taking her first steps",
        "Wobbling on chubby legs across a living-room carpet, a baby girl in a pink romper takes her first unsteady steps towards her "
        "beaming mother, who kneels a few feet away with open arms.",
    ),
    (
        "a boy blowing out candles on his birthday cake",
        "Seven small flames flicker on top of a chocolate birthday cake as a little boy in a paper crown leans forward to blow, "
        "surrounded by friends in party hats and a bunch of balloons.",
    ),
    (
        "a boy feeding ducks at a pond",
        "A young lad in a green anorak crouches at the edge of the pond, tossing bits of bread to a cluster of ducks paddling towards "
        "him, while his grandfather stands close behind.",
    ),
    (
        "a family having a picnic on a hillside",
        "Parents and two children sit on a checked picnic blanket on a grassy slope, sharing sandwiches, fruit and a flask of tea, "
        "with rolling fields and a village spread out below them.",
    ),
    (
        "a teacher reading a story to a class",
        "Sitting on a low chair at the front of a colourful classroom, a teacher holds up an open picture book while about twenty "
        "young children sit cross-legged on the carpet, listening.",
    ),
    # offices
    (
        "a man typing on a laptop in an open-plan office",
        "Among rows of shared desks under fluorescent lights, a bearded man in a checked shirt taps at his laptop keyboard, "
        "headphones around his neck and a coffee mug by his elbow.",
    ),
    (
        "a team meeting around a whiteboard",
        "Five colleagues sit along a long conference table while a woman in a blazer points at sticky notes and diagrams drawn on the "
        "whiteboard at the front of the meeting room.",
    ),
    (
        "a home office desk with two monitors",
        "In a spare bedroom turned into a workspace, a pair of computer screens glow side by side on a wooden desk beside a keyboard, "
        "a plant, a notebook and a mug of tea going cold.",
    ),
    # nature
    (
        "a waterfall in a green forest",
        "White water tumbles over mossy rocks into a clear pool deep in the woods, surrounded by ferns and tall trees whose leaves "
        "filter the light into soft green shadows.",
    ),
    (
        "a deer standing in a misty meadow at dawn",
        "In the pale early-morning fog, a lone deer pauses among the long wet grass of a meadow, ears pricked and head raised, a line "
        "of dark trees barely visible in the background.",
    ),
    (
        "snow-capped mountains reflected in a lake",
        "Jagged white mountain peaks rise above a still alpine lake whose glassy surface mirrors them perfectly, with pine trees on "
        "the shore and a few wispy clouds overhead.",
    ),
    # transport
    (
        "a red double-decker bus at a bus stop",
        "Passengers queue on the pavement to board a scarlet double-decker bus pulled up at a shelter, its destination sign reading "
        "Victoria above the windscreen.",
    ),
    (
        "a crowded commuter train at rush hour",
        "Packed shoulder to shoulder, office workers stand holding overhead straps inside a train carriage, many staring at their "
        "phones as the morning service rattles between stations.",
    ),
    (
        "a plane taking off at sunset",
        "A large white passenger plane lifts off the runway with its landing gear still down, silhouetted against an orange evening "
        "sky streaked with thin clouds.",
    ),
    (
        "a ferry leaving a harbour",
        "A big white car ferry pulls away from the quay of a small harbour, churning a wake of foam, as seagulls circle its funnel "
        "and a few passengers wave from the upper deck.",
    ),
    (
        "a man changing a flat tyre by the roadside",
        "Kneeling on the gravel verge of a country road, a driver in a hi-vis vest loosens the wheel nuts of a flat tyre with a "
        "wrench while his hatchback rests on a jack, hazard lights blinking.",
    ),
    # home
    (
        "a cosy living room with a fireplace",
        "A crackling log fire in the fireplace warms a snug lounge furnished with a worn leather armchair, a knitted throw, shelves "
        "of books and a sleeping spaniel on the hearth rug.",
    ),
    (
        "an unmade bed in a sunlit bedroom",
        "Rumpled white sheets and a tossed duvet cover a double bed, morning sunshine slanting through half-open blinds onto a "
        "bedside table holding a lamp, a book and a glass of water.",
    ),
    (
        "a man mowing the lawn in his back garden",
        "On a bright weekend afternoon, a middle-aged homeowner in shorts pushes a petrol lawnmower across striped green grass, a "
        "wooden fence and a vegetable patch visible behind him.",
    ),
    (
        "a woman painting a bedroom wall light blue",
        "Standing on a small stepladder, a young woman in splattered overalls rolls pale sky-blue paint onto a bare wall, dust sheets "
        "covering the floor and the bed pushed to the middle of the room.",
    ),
    # shops
    (
        "a checkout queue in a supermarket",
        "Shoppers with loaded trolleys wait in line at a supermarket till while a cashier scans groceries on the conveyor belt, "
        "chocolate bars and magazines displayed by the register.",
    ),
    (
        "a florist arranging roses in her shop",
        "Behind a counter crowded with buckets of tulips and lilies, a florist trims the stems of deep red roses and gathers them "
        "into a bouquet wrapped in brown paper.",
    ),
    (
        "a baker taking bread out of the oven",
        "At dawn in a small bakery, a baker in a white apron slides a long wooden peel out of a brick oven, carrying rows of crusty "
        "golden loaves.",
    ),
    (
        "fresh fruit stacked at a market stall",
        "Pyramids of oranges, apples, bananas and mangoes are piled high on an outdoor market trader's table under a striped awning, "
        "handwritten price cards stuck into each heap of fruit.",
    ),
    (
        "a barista pouring latte art",
        "Carefully tilting a small metal jug, a tattooed barista swirls steamed milk into a cup of espresso, forming a leaf pattern "
        "on the creamy surface of the latte.",
    ),
    # events
    (
        "a bride and groom cutting their wedding cake",
        "The newly married couple, she in a lace gown and he in a navy suit, hold a silver knife together over a three-tier white "
        "wedding cake decorated with fresh flowers as guests snap photos.",
    ),
    (
        "a rock band playing on a small stage",
        "Under red and blue spotlights in a cramped pub venue, a guitarist, bassist and drummer play loud rock for a packed crowd, "
        "the singer gripping the microphone stand with both hands.",
    ),
    (
        "graduates throwing their caps in the air",
        "A row of students in black gowns toss their mortarboards high into a blue sky on the steps of a university building, "
        "laughing and cheering at the end of graduation day.",
    ),
    (
        "fireworks over a river on New Year's Eve",
        "Bursts of gold, green and red fireworks explode above the dark river at midnight, their colours reflected on the water as "
        "crowds on the bridge gaze upwards to welcome the new year.",
    ),
    # work
    (
        "a mechanic repairing a car engine",
        "Leaning under the raised bonnet of a silver saloon in a cluttered garage, a mechanic in oil-stained blue overalls tightens a "
        "bolt on the engine with a socket wrench, a work lamp hanging beside him.",
    ),
    (
        "builders on scaffolding at a construction site",
        "Builders in orange hard hats and high-visibility jackets stand on the metal scaffolding around a half-finished brick "
        "building, passing up planks while a tall crane swings overhead.",
    ),
    (
        "a nurse checking on a patient in a hospital bed",
        "In a bright hospital ward, a nurse in blue scrubs adjusts the drip beside an elderly man propped up on pillows, a monitor "
        "showing his heart rate nearby.",
    ),
    (
        "a farmer driving a tractor across a field",
        "A green tractor ploughs long brown furrows across a wide field under a big cloudy sky, the farmer in a flat cap visible "
        "through the cab window and gulls following behind.",
    ),
    (
        "an old man reading a newspaper on a park bench",
        "A grey-haired gentleman in a tweed jacket sits on a wooden bench beneath a large oak tree, spectacles on his nose, absorbed "
        "in the newspaper spread across his knees.",
    ),
)


def everyday_pairs() -> list[tuple[str, str]]:
    """The 60 (short, dense) pairs as a new list, in a fixed order."""
    return list(EVERYDAY_PAIRS)
