"""The toy world: scenes of 1-4 objects drawn with Pillow on cluttered backgrounds, with their ground truth.

Everything is a function of a `random.Random`: the same seed gives the same scenes, images and texts on
any machine (Pillow's drawing is integer arithmetic; no global random state and no numpy).

The world's one planted bias: each ANCHOR kind brings its PARTNER into the scene with probability
PLANT_P (a star with a moon 90% of the time, ...). A model trained on these scenes learns the prior, and
can be caught naming the partner when it is absent, as POPE's adversarial split catches LLaVA on COCO.
"""
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 112   # image side in pixels: LLaVA's 336 / 3, so patch 14 gives an 8 x 8 grid of 64 patches
KINDS = ("circle", "square", "triangle", "star", "moon", "heart", "cross", "ring",
         "diamond", "arrow", "house", "tree", "flower", "bolt")
PLURALS = {k: k + "s" for k in KINDS} | {"cross": "crosses"}
COLOURS = {"red": (220, 30, 30), "orange": (245, 130, 0), "yellow": (240, 220, 20), "green": (20, 160, 40),
           "blue": (30, 70, 230), "purple": (140, 40, 190), "white": (250, 250, 250), "black": (15, 15, 15)}
SIZES = {"small": 22, "medium": 30, "large": 40}      # bounding-box side in pixels
PAIRS = {"star": "moon", "house": "tree", "flower": "heart"}  # anchor -> planted partner
PLANT_P = 0.9                                          # P(partner in scene | anchor in scene) in training scenes
COUNTS = (1, 2, 3, 4)
COUNT_WEIGHTS = (2, 3, 3, 2)
NUMBERS = ("zero", "one", "two", "three", "four")
GRID = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


@dataclass(frozen=True)
class Obj:
    kind: str
    colour: str
    size: str
    x: int  # bounding-box left, top (pixels)
    y: int

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def position(self) -> str:
        """Where its centre lies on a 3 x 3 grid over the image ("top left", ..., "center", ...)."""
        cx, cy = self.x + self.side / 2, self.y + self.side / 2
        return GRID[3 * min(int(3 * cy / SIZE), 2) + min(int(3 * cx / SIZE), 2)]

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # each kind at most once; ordered left to right
    background: int           # seed of the background texture and clutter

    @property
    def kinds(self) -> set[str]:
        return {o.kind for o in self.objects}

    def get(self, kind: str) -> Obj:
        return next(o for o in self.objects if o.kind == kind)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------- sampling

def sample_kinds(rng: random.Random, plant_p: float = PLANT_P) -> list[str]:
    """1-4 distinct kinds, uniform, then each anchor brings its partner with probability plant_p (taking the
    place of a non-anchor if the scene is full)."""
    kinds = rng.sample(KINDS, rng.choices(COUNTS, COUNT_WEIGHTS)[0])
    for anchor, partner in PAIRS.items():
        if anchor in kinds and partner not in kinds and rng.random() < plant_p:
            if len(kinds) < max(COUNTS):
                kinds.append(partner)
            else:  # replace the last kind that is neither an anchor nor the anchor's own pair
                spare = [k for k in kinds if k not in PAIRS and k not in PAIRS.values()]
                if spare:
                    kinds[kinds.index(spare[-1])] = partner
    return kinds


def probe_kinds(rng: random.Random) -> list[str]:
    """A probe scene: one anchor WITHOUT its partner, plus 0-2 other kinds (never that partner)."""
    anchor = rng.choice(sorted(PAIRS))
    others = [k for k in KINDS if k not in (anchor, PAIRS[anchor])]
    return [anchor] + rng.sample(others, rng.choice((0, 1, 1, 2, 2)))


def place(rng: random.Random, kinds: list[str]) -> tuple[Obj, ...]:
    """Colours and sizes uniform; positions uniform over the image, boxes apart by >= 3 px (rejection)."""
    objs = []
    for kind in kinds:
        colour, size = rng.choice(tuple(COLOURS)), rng.choice(tuple(SIZES))
        for attempt in range(200):
            if attempt == 100:
                size = "small"  # a crowded scene: make room
            side = SIZES[size]
            x, y = rng.randrange(2, SIZE - side - 1), rng.randrange(2, SIZE - side - 1)
            if all(x + side + 3 <= o.x or o.x + o.side + 3 <= x or y + side + 3 <= o.y or o.y + o.side + 3 <= y
                   for o in objs):
                objs.append(Obj(kind, colour, size, x, y))
                break
    return tuple(sorted(objs, key=lambda o: (o.x, o.y)))


def sample_scene(rng: random.Random, probe: bool = False, plant_p: float = PLANT_P) -> Scene:
    kinds = probe_kinds(rng) if probe else sample_kinds(rng, plant_p)
    return Scene(place(rng, kinds), rng.randrange(2**31))


# ------------------------------------------------------------------------------------------------ drawing

def _poly(cx, cy, r, n, start=-90.0, inner=None):
    """Vertices of a regular n-gon (or a star if `inner` is the inner radius ratio) around (cx, cy)."""
    pts = []
    for i in range(n * (2 if inner else 1)):
        rr = r * (inner if inner and i % 2 else 1)
        a = math.radians(start + i * 360 / (n * (2 if inner else 1)))
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def shape_mask(kind: str, side: int) -> Image.Image:
    """An 'L' mask (side x side) of the kind's silhouette: 255 inside."""
    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    s, c, r = side - 1, (side - 1) / 2, (side - 1) / 2
    if kind == "circle":
        d.ellipse((0, 0, s, s), fill=255)
    elif kind == "square":
        d.rectangle((s * 0.1, s * 0.1, s * 0.9, s * 0.9), fill=255)
    elif kind == "triangle":
        d.polygon([(c, 0), (s, s * 0.9), (0, s * 0.9)], fill=255)
    elif kind == "star":
        d.polygon(_poly(c, c * 1.08, r, 5, inner=0.42), fill=255)
    elif kind == "moon":
        d.ellipse((0, 0, s, s), fill=255)
        d.ellipse((s * 0.32, -s * 0.08, s * 1.2, s * 0.82), fill=0)
    elif kind == "heart":
        d.ellipse((0, s * 0.05, s * 0.55, s * 0.58), fill=255)
        d.ellipse((s * 0.45, s * 0.05, s, s * 0.58), fill=255)
        d.polygon([(s * 0.03, s * 0.42), (s * 0.97, s * 0.42), (c, s)], fill=255)
    elif kind == "cross":
        d.rectangle((s * 0.36, 0, s * 0.64, s), fill=255)
        d.rectangle((0, s * 0.36, s, s * 0.64), fill=255)
    elif kind == "ring":
        d.ellipse((0, 0, s, s), fill=255)
        d.ellipse((s * 0.28, s * 0.28, s * 0.72, s * 0.72), fill=0)
    elif kind == "diamond":
        d.polygon([(c, 0), (s * 0.8, c), (c, s), (s * 0.2, c)], fill=255)
    elif kind == "arrow":
        d.polygon([(0, s * 0.38), (s * 0.55, s * 0.38), (s * 0.55, s * 0.12), (s, c), (s * 0.55, s * 0.88),
                   (s * 0.55, s * 0.62), (0, s * 0.62)], fill=255)
    elif kind == "house":
        d.polygon([(c, 0), (s, s * 0.45), (0, s * 0.45)], fill=255)
        d.rectangle((s * 0.15, s * 0.45, s * 0.85, s), fill=255)
        d.rectangle((s * 0.42, s * 0.68, s * 0.58, s), fill=0)  # the door
    elif kind == "tree":
        d.polygon([(c, 0), (s * 0.95, s * 0.72), (s * 0.05, s * 0.72)], fill=255)
        d.rectangle((s * 0.4, s * 0.72, s * 0.6, s), fill=255)
    elif kind == "flower":
        for a in range(0, 360, 72):
            px, py = c + r * 0.55 * math.cos(math.radians(a - 90)), c + r * 0.55 * math.sin(math.radians(a - 90))
            d.ellipse((px - r * 0.42, py - r * 0.42, px + r * 0.42, py + r * 0.42), fill=255)
        d.ellipse((c - r * 0.22, c - r * 0.22, c + r * 0.22, c + r * 0.22), fill=0)
    elif kind == "bolt":
        d.polygon([(s * 0.6, 0), (s * 0.15, s * 0.58), (s * 0.45, s * 0.58), (s * 0.3, s), (s * 0.85, s * 0.4),
                   (s * 0.55, s * 0.4), (s * 0.75, 0)], fill=255)
    else:
        raise ValueError(f"unknown kind {kind}")
    return m


def background(seed: int) -> Image.Image:
    """A muted, blotchy texture with clutter (thin lines, arcs, specks), so no patch is trivially blank."""
    rng = random.Random(seed)
    base = [rng.randrange(95, 185) for _ in range(3)]
    # Low-frequency texture: a 7 x 7 grid of jittered base colours, smoothly upsampled.
    cells = bytes(max(0, min(255, b + rng.randrange(-28, 29))) for _ in range(49) for b in base)
    img = Image.frombytes("RGB", (7, 7), cells).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(img)

    def muted():
        return tuple(max(0, min(255, b + rng.randrange(-45, 46))) for b in base)
    for _ in range(rng.randrange(6, 14)):
        x0, y0 = rng.randrange(SIZE), rng.randrange(SIZE)
        if rng.random() < 0.5:
            d.line((x0, y0, x0 + rng.randrange(-40, 41), y0 + rng.randrange(-40, 41)), fill=muted(), width=rng.choice((1, 2)))
        else:
            r = rng.randrange(5, 20)
            a = rng.randrange(360)
            d.arc((x0 - r, y0 - r, x0 + r, y0 + r), a, a + rng.randrange(40, 200), fill=muted(), width=1)
    for _ in range(rng.randrange(20, 50)):
        x0, y0 = rng.randrange(SIZE), rng.randrange(SIZE)
        d.point((x0, y0), fill=muted()) if rng.random() < 0.5 else d.rectangle((x0, y0, x0 + 1, y0 + 1), fill=muted())
    return img


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image: the background, then each object's silhouette in its colour."""
    img = background(scene.background)
    for o in scene.objects:
        img.paste(COLOURS[o.colour], (o.x, o.y), shape_mask(o.kind, o.side))
    return img


# -------------------------------------------------------------------------------------------------- text

CAPTION_PROMPTS = ("Generate a short caption of this image.", "What is in this image?",
                   "What can you see in this image?", "Describe this image.")


def caption(scene: Scene) -> str:
    """"A large red star, a small blue moon and a medium green tree.": the objects in the catalogue's order
    (KINDS), not left to right. Which object comes next is then a fixed function of the last one named, which
    the toy LLM learns to read from the image tokens; left to right, it has to compare the columns of patches,
    and trained on the scene's words it repeated an object in 26 of 60 captions against 1 of 60 this way
    (docs/toy.md). The order is a convention of this world: CHAIR, recall and the colour and size
    scores ignore it; only the lab's "exact" compares a caption with this one."""
    parts = [f"a {o.phrase}" for o in sorted(scene.objects, key=lambda o: KINDS.index(o.kind))]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


# The forms in which the benchmarks ask (minidamro.eval sends them by default), besides the world's own:
# POPE's question with the DAMRO / VCD scripts' suffix, and MME's yes/no questions, which end in MME_SUFFIX.
POPE_SUFFIX = " Please answer this question with one word."  # = minidamro.eval.data.POPE_SUFFIX
MME_SUFFIX = " Please answer yes or no."
FORMS = ("toy", "pope", "mme")


def existence_question(kind: str, form: str = "toy") -> str:
    """POPE's question 'Is there a/an X in the image?' (form "toy", as generate and the lab ask it); with the
    POPE scripts' suffix ("pope"); or as MME's existence task asks ("mme": 'Is there a/an X in this image?
    Please answer yes or no.')."""
    if form == "mme":
        return f"Is there {article(kind)} {kind} in this image?{MME_SUFFIX}"
    return f"Is there {article(kind)} {kind} in the image?" + (POPE_SUFFIX if form == "pope" else "")


def existence_qa(kind: str, scene: Scene) -> tuple[str, str]:
    return existence_question(kind), "Yes" if kind in scene.kinds else "No"


def attribute_qa(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """One colour, count or position question with its answer."""
    o = rng.choice(scene.objects)
    what = rng.choice(("colour", "count", "position"))
    if what == "colour":
        return f"What colour is the {o.kind}?", o.colour.capitalize() + "."
    if what == "count":
        n = len(scene.objects)
        return "How many objects are there?", f"{NUMBERS[n].capitalize()}."
    where = o.position
    return f"Where is the {o.kind}?", ("In the center." if where == "center" else f"At the {where}.")


MME_TASKS = ("existence", "count", "position", "color")  # MME's hallucination subsets, in its order


def mme_qa(task: str, scene: Scene, answer: bool, rng: random.Random) -> tuple[str, str]:
    """One of MME's yes/no questions about the scene, in the form of the MME task `task`, whose answer is
    `answer` ("Yes" / "No"). A no-question asks about an absent kind, a wrong count, another of the nine
    places, or another colour of a present object."""
    o = rng.choice(scene.objects)
    if task == "existence":
        absent = [k for k in KINDS if k not in scene.kinds]
        return existence_question(o.kind if answer else rng.choice(absent), "mme"), "Yes" if answer else "No"
    if task == "count":
        n = len(scene.objects) if answer else rng.choice([c for c in COUNTS if c != len(scene.objects)])
        q = "Is there one object in this image?" if n == 1 else f"Are there {NUMBERS[n]} objects in this image?"
    elif task == "position":
        where = o.position if answer else rng.choice([g for g in GRID if g != o.position])
        q = f"Is the {o.kind} in the center of the image?" if where == "center" else \
            f"Is the {o.kind} at the {where} of the image?"
    elif task == "color":
        colour = o.colour if answer else rng.choice([c for c in COLOURS if c != o.colour])
        q = f"Is there {article(colour)} {colour} {o.kind} in this image?"
    else:
        raise ValueError(f"unknown MME task {task}")
    return q + MME_SUFFIX, "Yes" if answer else "No"


def conversation(rng: random.Random, scene: Scene, absent_pool=KINDS) -> list[tuple[str, str]]:
    """Everything the world says about one scene, as turns in random order (the tokenizer's corpus): one
    caption, up to two existence questions with answer yes and two with answer no (absent kinds drawn uniformly
    from `absent_pool`), and two attribute questions."""
    present = [o.kind for o in scene.objects]
    absent = [k for k in absent_pool if k not in scene.kinds]
    turns = [(rng.choice(CAPTION_PROMPTS), caption(scene))]
    turns += [existence_qa(k, scene) for k in rng.sample(present, min(2, len(present)))]
    turns += [existence_qa(k, scene) for k in rng.sample(absent, 2)]
    turns += [attribute_qa(rng, scene) for _ in range(2)]
    rng.shuffle(turns)
    return turns


def existence_questions(rng: random.Random, scene: Scene, n: int, absent_pool=KINDS,
                        forms: tuple = ("toy",)) -> list[tuple[str, str]]:
    """n existence questions in POPE's form, each independently "Yes" or "No" with probability 1/2: the kind
    drawn uniformly from those present, or from the absent ones in `absent_pool` (a kind may be asked twice),
    each in a form drawn uniformly from `forms` (existence_question)."""
    present = [o.kind for o in scene.objects]
    absent = [k for k in absent_pool if k not in scene.kinds]
    out = []
    for _ in range(n):
        kind = rng.choice(present if rng.random() < 0.5 else absent)
        form = forms[0] if len(forms) == 1 else rng.choice(forms)  # one form: the stream the old recipe drew
        out.append((existence_question(kind, form), "Yes" if kind in scene.kinds else "No"))
    return out


# ---------------------------------------------------------------------------------- vocabulary (CHAIR)

WORD_TO_KIND = {k: k for k in KINDS} | {p: k for k, p in PLURALS.items()}


def mentioned_kinds(text: str) -> list[str]:
    """Every mention of an object kind in `text`, in order, repeats included (singular or plural form).
    Every word of the world's vocabulary that names a kind maps to exactly that kind."""
    word, out = "", []
    for ch in text.lower() + " ":
        if "a" <= ch <= "z":
            word += ch
        else:
            if word in WORD_TO_KIND:
                out.append(WORD_TO_KIND[word])
            word = ""
    return out
