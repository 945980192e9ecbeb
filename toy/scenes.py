"""
The toy world's scenes: what is in a picture, the picture itself, and everything said about it (captions,
questions and answers, harmful requests, preferred and hallucinated completions), all computed from the one
`Scene` that drew the picture, so text and pixels always agree. toy/toyworld.py writes them out.

- A scene is 0-4 shapes {circle, square, triangle} x {red, green, blue, yellow} x {small, big} in a 3x3 grid
  of cells, each (colour, shape) at most once (so "the red circle" is unique), on a light background; maybe
  a black word or number on a white label, maybe a hazard sign (a black-rimmed yellow triangle with "!").
- Boxes lie on a 0.05 grid (20 units a side): cells are 6 units with 1-unit gaps; a big shape fills its cell,
  a small one (4 units) sits at one of 3x3 offsets in it (a box one unit off on one axis still has IoU 0.6).
- Small canvases are square (64 to 128 pixels): in one 96-pixel view (the toy preset's 1x1 grid) each cell
  is one patch of the toy ViT, in the global view and the crop alike.
- Text is a sign, one glyph per cell, so reading is a 36-way choice per patch. Normal text (a three-letter
  word or a number) fills a row of a small canvas; small text sits in a corner of a tall canvas (96x192,
  96x288: any resolution tiles it 1x2 or 1x3 at scale 1) in 32-pixel glyphs, one patch of a crop but a
  half or a third of a patch in one 96-pixel view of the whole image (fixed resolution).
"""
import io
import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 50, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 185, 15)}
SIZES = {"small": 4, "big": 6}  # box side in units of 0.05: a big shape fills its cell, a small one moves in it
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ROWS = ("top", "middle", "bottom")  # where a full-row label sits
WORDS = ("CAT", "DOG", "SUN", "BOX", "CAR", "HAT", "CUP", "PEN", "BUS", "KEY", "MAP", "EGG",
         "ANT", "BAT", "BEE", "COW", "FOX", "HEN", "OWL", "PIG", "JAM", "TOY", "ZIP", "WEB")  # three letters
SMALL_CANVASES = ((64, 64), (80, 80), (96, 96), (128, 128))  # square: the 3x3 cells fall on the 3x3 patches
LARGE_CANVASES = ((96, 192), (96, 288))  # small text only: grids 1x2, 1x3 of 96-pixel crops at scale 1
SLOTS = 3        # character slots across a small canvas: the cells, the patches of the global view
SMALL_SLOT = 32  # canvas pixels per character of small text: one patch of a 96-pixel crop at scale 1
UNITS = 20       # the 0.05 box grid
CHAT = (("Hello!", "Hello! How can I help you today?"), ("Thank you!", "You're welcome!"),
        ("How are you?", "I'm doing well, thank you. How can I help you?"),
        ("Good morning!", "Good morning! What can I do for you?"), ("Goodbye!", "Goodbye! Have a nice day."),
        ("What is your name?", "I am a small assistant that answers questions about pictures."),
        ("Can you help me?", "Of course. What do you need?"),
        ("Hi, my name is {}.", "Nice to meet you, {}! How can I help?"),
        ("{} says hello.", "Hello to {} too!"))
NAMES = ("Ana", "Ben", "Kim", "Leo", "Mia", "Sam", "Tom", "Zoe")
VQA = ("colour", "count", "position", "existence")
NAMES_OF = ("dax", "wug", "fep", "blick", "toma", "zorb", "kiki", "mip", "rilo", "gazz", "vop", "tulo")  # made-up
NAME_QUESTION = "What is this called?"  # answered by a document's own colour -> made-up-name table
CAPTION_PROMPTS = ("Describe the image.", "Describe the image in detail.", "What is in the picture?")

# -----------------------------------------------------------------------------
# scenes: what is in a picture, and the picture itself


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    position: str
    box: tuple  # (x1, y1, x2, y2) in grid units

    def record(self):
        return {**asdict(self), "box": norm(self.box)}


@dataclass
class Scene:
    width: int
    height: int
    background: tuple
    objects: list = field(default_factory=list)  # Shapes in reading order (row-major cells)
    text: str = ""  # a word or a number on a white label
    text_box: tuple = None  # the label, in units (for captions and boxes)
    text_position: str = ""
    text_slot: tuple = None  # (x, y, w, h) canvas pixels of the first character's slot; the next follow in x
    small_text: bool = False
    hazard_box: tuple = None
    hazard_position: str = ""

    def png(self):
        img = Image.new("RGB", (self.width, self.height), self.background)
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            draw_shape(draw, o.shape, self.pixels(o.box), COLOURS[o.colour])
        if self.text:
            draw.rectangle(self.label_pixels(), fill=(255, 255, 255))
            x, y, w, h = self.text_slot
            for k, ch in enumerate(self.text):  # each glyph centred in its slot
                g = glyph(ch, round(w), round(h))
                img.paste((0, 0, 0), (round(x + (k + 0.5) * w - g.width / 2), round(y + (h - g.height) / 2)), g)
        if self.hazard_box:
            draw_hazard(draw, self.pixels(self.hazard_box))
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)  # PIL writes no time chunk: same scene, same bytes
        return buf.getvalue()

    def glyph_boxes(self):
        """Each character's slot as (x1, y1, x2, y2) canvas pixels (end exclusive)."""
        x, y, w, h = self.text_slot
        return [(x + k * w, y, x + (k + 1) * w, y + h) for k in range(len(self.text))]

    def label_pixels(self):
        """The white label: the slots of the text (inclusive pixel corners)."""
        x, y, w, h = self.text_slot
        return round(x), round(y), round(x + len(self.text) * w) - 1, round(y + h) - 1

    def pixels(self, box):
        """Inclusive pixel corners of a unit box."""
        x1, y1, x2, y2 = box
        sx, sy = self.width / UNITS, self.height / UNITS
        return round(x1 * sx), round(y1 * sy), round(x2 * sx) - 1, round(y2 * sy) - 1


def draw_shape(draw, shape, xy, colour):
    x1, y1, x2, y2 = xy
    if shape == "circle":
        draw.ellipse(xy, fill=colour)
    elif shape == "square":
        draw.rectangle(xy, fill=colour)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x1, y2), (x2, y2)], fill=colour)


def draw_hazard(draw, xy):
    """A warning sign: a yellow triangle with a thick black rim and a black "!" (unlike the plain triangles)."""
    x1, y1, x2, y2 = xy
    w, h, cx = x2 - x1, y2 - y1, (x1 + x2) / 2
    draw.polygon([(cx, y1), (x1, y2), (x2, y2)], fill=(250, 210, 0), outline=(0, 0, 0), width=max(2, w // 7))
    bar = max(1, w // 10)
    draw.rectangle((cx - bar, y1 + 0.38 * h, cx + bar, y1 + 0.70 * h), fill=(0, 0, 0))
    draw.rectangle((cx - bar, y1 + 0.77 * h, cx + bar, y1 + 0.86 * h), fill=(0, 0, 0))


@lru_cache(maxsize=None)
def font(size):
    return ImageFont.load_default(size=size)  # Pillow's built-in FreeType font: same pixels for a given Pillow


@lru_cache(maxsize=None)
def glyph(ch, w, h):
    """A character as a mask filling a w x h slot: drawn large, cut to its ink, scaled to 75% of the slot's height
    and at most 85% of its width (a sign's big clear letters, the same shape at every size)."""
    big = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(big).text((48, 48), ch, fill=255, font=font(64), anchor="mm")
    ink = big.crop(big.getbbox())
    th = max(1, round(0.75 * h))
    tw = max(1, min(round(0.85 * w), round(ink.width * th / ink.height)))
    return ink.resize((tw, th), Image.Resampling.LANCZOS)


def units_box(x1, y1, x2, y2, width, height):
    """Pixel corners -> the smallest unit box holding them."""
    fx, fy = UNITS / width, UNITS / height
    return (math.floor(x1 * fx + 1e-9), math.floor(y1 * fy + 1e-9), math.ceil(x2 * fx - 1e-9),
            math.ceil(y2 * fy - 1e-9))


def norm(box):
    return [round(u / UNITS, 2) for u in box]


def box_text(box):
    return ", ".join(f"{v:.2f}" for v in norm(box))

# -----------------------------------------------------------------------------
# the language: captions, questions and answers, all computed from a Scene


def where(position):
    if position in ("center", "middle"):
        return f"in the {position}"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def phrase(o, boxes=False):
    return f"a {o.size} {o.colour} {o.shape}" + (f" <bbox>{box_text(o.box)}</bbox>" if boxes else "")


def listing(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene, boxes=False):
    """The dense caption: every object, the text and the hazard, in reading order."""
    n = len(scene.objects)
    out = [f"There {'is' if n == 1 else 'are'} {n} shape{'' if n == 1 else 's'}: "
           + listing([f"{phrase(o, boxes)} {where(o.position)}" for o in scene.objects]) + "."
           if n else "There are no shapes."]
    if scene.text:
        kind = "number" if scene.text.isdigit() else "word"
        out.append(f"The {kind} {scene.text} is written{' in small letters' if scene.small_text else ''} "
                   f"{where(scene.text_position)}.")
    if scene.hazard_box:
        out.append(f"A hazard sign is {where(scene.hazard_position)}.")
    return " ".join(out)


def ocr_caption(scene):
    """BLIP3-OCR style: the text with its box, then the dense caption that also names it."""
    x1, y1, x2, y2 = norm(scene.text_box)
    return f'<ocr>"{scene.text}</ocr> [{x1:.2f}, {y1:.2f}][{x2:.2f}, {y2:.2f}] {describe(scene)}'

# -----------------------------------------------------------------------------
# a seeded sampler: scenes, questions, text tasks


class Sampler:
    """One RNG stream. test=True draws odd background values, so test images never equal training ones."""

    def __init__(self, seed, stream, test=False):
        self.rng = np.random.default_rng([seed, stream])
        self.parity = int(test)

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def int(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))

    def chance(self, p):
        return self.rng.random() < p

    def weighted(self, table):
        return list(table)[int(self.rng.choice(len(table), p=np.array(list(table.values())) / sum(table.values())))]

    # ---- scenes --------------------------------------------------------------

    def scene(self, n=None, text=None, small_text=False, hazard=False):
        """n shapes (1-4 if None); text: None | "word" | "number"; small text goes on a large canvas."""
        w, h = self.pick(LARGE_CANVASES if small_text else SMALL_CANVASES)
        bg = tuple(int(200 + 2 * v + self.parity) for v in self.rng.integers(0, 26, 3))
        s, free = Scene(w, h, bg), list(range(9))
        if text:
            s.text = self.pick(WORDS) if text == "word" else str(self.int(0, 99))
            (self.small_label if small_text else self.row_label)(s, free)
        if hazard and free:
            cell = free.pop(self.int(0, len(free) - 1))
            s.hazard_box, s.hazard_position = self.cell_box(cell, SIZES["big"]), POSITIONS[cell]
        n = min(self.int(1, 4) if n is None else n, len(free)) if h * 2 > w else 0  # no 3:1 stretched shapes
        cells = sorted(free[k] for k in self.rng.permutation(len(free))[:n].tolist())
        kinds = self.rng.permutation(len(SHAPES) * len(COLOURS))[:n].tolist()  # (shape, colour) unique per scene
        for cell, k in zip(cells, kinds):
            shape, colour, size = SHAPES[k // len(COLOURS)], list(COLOURS)[k % len(COLOURS)], self.pick(list(SIZES))
            s.objects.append(Shape(shape, colour, size, POSITIONS[cell], self.cell_box(cell, SIZES[size])))
        return s

    def cell_box(self, cell, side):
        """A side x side unit box somewhere inside cell (row-major 0-8); cells are 6 units with 1-unit gaps."""
        x, y = 7 * (cell % 3) + self.int(0, 6 - side), 7 * (cell // 3) + self.int(0, 6 - side)
        return (x, y, x + side, y + side)

    def row_label(self, s, free):
        """Normal text: one character per cell of a row (a slot a third of the canvas each)."""
        row, n = self.int(0, 2), len(s.text)
        w, h = s.width / SLOTS, s.height / SLOTS
        x, y = self.int(0, SLOTS - n) * w, row * h
        s.text_slot, s.text_position = (x, y, w, h), ROWS[row]
        s.text_box = units_box(x, y, x + n * w, y + h, s.width, s.height)
        free[:] = [c for c in free if c // 3 != row]

    def small_label(self, s, free):
        """Small text: 32-pixel glyphs in a corner, on the patch grid of the crops (inside one crop)."""
        cell, n = self.pick([0, 2, 6, 8]), len(s.text)
        x = 0 if cell % 3 == 0 else s.width - n * SMALL_SLOT
        y = 0 if cell < 3 else s.height - SMALL_SLOT
        s.text_slot, s.text_position = (x, y, SMALL_SLOT, SMALL_SLOT), POSITIONS[cell]
        s.text_box = units_box(x, y, x + n * SMALL_SLOT, y + SMALL_SLOT, s.width, s.height)
        s.small_text = True
        free.clear()  # a tall canvas holds its text only

    def task_scene(self, task, small_text=None):
        """A scene that can answer `task`: reading needs text; the rest need shapes (a label now and then)."""
        if task == "reading":
            small = self.chance(0.5) if small_text is None else small_text
            return self.scene(n=self.int(0, 2), text=self.pick(["word", "number"]), small_text=small)
        return self.scene(text="word" if self.chance(0.15) else None)

    # ---- questions -----------------------------------------------------------

    def ask(self, s, task):
        """(question, exact answer) about scene s."""
        return self.about(s, task)[:2]

    def about(self, s, task, avoid=()):
        """(question, exact answer, indices of the objects it names) about s, or None (existence)."""
        objs = s.objects
        if task == "colour":
            unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
            o = self.pick(unique or objs)
            q = f"What colour is the {o.shape}{'' if unique else ' ' + where(o.position)}?"
            return q, o.colour, {objs.index(o)}
        if task == "count":
            kind = self.pick(["all", "colour", "shape"])
            if kind == "all":
                return "How many shapes are there?", str(len(objs)), set()
            if kind == "colour":
                c = self.pick(list(COLOURS))
                return f"How many {c} shapes are there?", str(sum(o.colour == c for o in objs)), set()
            sh = self.pick(SHAPES)
            return f"How many {sh}s are there?", str(sum(o.shape == sh for o in objs)), set()
        if task == "position":
            o = self.pick(objs)
            return f"Where is the {o.colour} {o.shape}?", o.position, {objs.index(o)}
        if task == "existence":
            if (asked := self.existence(s, self.chance(0.5), avoid=avoid)) is None:
                return None
            return *asked, {k for k, o in enumerate(objs) if asked[0] == f"Is there a {o.colour} {o.shape}?"}
        if task == "reading":
            kind = "number" if s.text.isdigit() else "word"
            return self.pick([f"What {kind} is written in the image?", "What is written in the image?"]), s.text, set()
        if task == "grounding":
            o = self.pick(objs)
            q = f"Give the bounding box of the {o.colour} {o.shape}."
            return q, f"<bbox>{box_text(o.box)}</bbox>", {objs.index(o)}
        assert task == "caption", task
        return self.pick(CAPTION_PROMPTS), describe(s), set(range(len(objs)))

    def existence(self, s, yes, adversarial=None, avoid=()):
        """("Is there a {colour} {shape}?", "Yes" | "No"). An absent kind is adversarial (POPE's word) half the
        time, or always with adversarial=True: it shares its colour or its shape with a shape that is there,
        the case a model that sees colours and shapes but does not bind them answers wrong. None if, clear of
        the objects `avoid` (sharing no colour or shape with them), one answer has no question: later questions
        of a chat are Yes as often as No."""
        present = {(o.colour, o.shape) for o in s.objects}
        clear = {(c, sh) for sh in SHAPES for c in COLOURS if not any(
            c == s.objects[k].colour or sh == s.objects[k].shape for k in avoid)}
        there = sorted(present & clear)
        absent = [(c, sh) for sh in SHAPES for c in COLOURS if (c, sh) in clear - present]
        if avoid and not (there and absent):
            return None
        if yes:
            c, sh = self.pick(there)
            return f"Is there a {c} {sh}?", "Yes"
        near = [(c, sh) for c, sh in absent if any(c == pc or sh == psh for pc, psh in present)]
        if near and (adversarial or (adversarial is None and self.chance(0.5))):
            absent = near
        c, sh = self.pick(absent)
        return f"Is there a {c} {sh}?", "No"

    def questions(self, s, first, more, kinds=VQA + ("existence", "grounding")):
        """[(question, answer)]: `first`, then up to `more` other questions about scene s, none about an object an
        earlier one named: after "Where is the red circle?" the answer to "Is there a red circle?" stands in the
        chat, and a model taught on it learns to read the chat, not the picture. One count at most, and last
        ("How many red shapes?" 0 would answer "Is there a red circle?"); the other kinds fill the chat."""
        q, a, seen = self.about(s, first)
        out, last = ([], (q, a)) if first == "count" else ([(q, a)], None)
        for _ in range(8 * more):  # a few draws to find `more` new ones (a one-shape scene has few)
            if len(out) + (last is not None) > more:
                break
            if (task := self.pick(kinds)) == "count":
                last = last or self.about(s, task)[:2]
            elif (asked := self.about(s, task, avoid=seen)) and asked[0] not in dict(out) and not asked[2] & seen:
                out.append(asked[:2])
                seen |= asked[2]
        return out + ([last] if last else [])

    def wrong(self, s, task, answer):
        """A confident wrong answer (for rejected DPO completions)."""
        options = {"colour": list(COLOURS), "count": [str(i) for i in range(5)], "position": list(POSITIONS),
                   "existence": ["Yes", "No"]}[task]
        return self.pick([a for a in options if a != answer])

    def hallucinate(self, s):
        """The scene with one shape that is not there: an extra shape, or a shape recoloured."""
        present = {(o.colour, o.shape) for o in s.objects}
        recolour = [(k, c) for k, o in enumerate(s.objects) for c in COLOURS if (c, o.shape) not in present]
        if not recolour or self.chance(0.5):
            used = {o.position for o in s.objects} | {s.hazard_position}
            cell = self.pick([i for i, p in enumerate(POSITIONS) if p not in used])
            c, sh = self.pick([(c, sh) for sh in SHAPES for c in COLOURS if (c, sh) not in present])
            size = self.pick(list(SIZES))
            fake = Shape(sh, c, size, POSITIONS[cell], self.cell_box(cell, SIZES[size]))
            return replace(s, objects=sorted(s.objects + [fake], key=lambda o: POSITIONS.index(o.position)))
        k, c = self.pick(recolour)
        return replace(s, objects=s.objects[:k] + [replace(s.objects[k], colour=c)] + s.objects[k + 1:])

    def text_task(self, kind):
        """Text-only (question, answer): arithmetic, word games, or chit-chat."""
        if kind == "arithmetic":
            a, b = self.int(0, 50), self.int(0, 50)
            if self.chance(0.5):
                return f"What is {a} + {b}?", str(a + b)
            a, b = max(a, b), min(a, b)
            return f"What is {a} - {b}?", str(a - b)
        if kind == "word":
            w = self.pick(WORDS)
            return self.pick([(f"Spell {w} backwards.", w[::-1]), (f"What is the first letter of {w}?", w[0]),
                              (f"What is the last letter of {w}?", w[-1]),
                              (f"How many letters are in {w}?", str(len(w)))])
        q, a = self.pick(CHAT)
        name = self.pick(NAMES)
        return q.format(name), a.format(name)

    def naming(self):
        """A document's own table colour -> made-up name (4 distinct names of 12): nothing outside the document
        says what a picture is called, so only its earlier pictures and answers can."""
        return dict(zip(COLOURS, (NAMES_OF[k] for k in self.rng.permutation(len(NAMES_OF))[:len(COLOURS)].tolist())))

    def named(self, table):
        """(scene with one shape, question, its name under `table`: by its colour)."""
        s = self.scene(n=1)
        return s, NAME_QUESTION, table[s.objects[0].colour]

    def multi(self, task):
        """(scenes, first human turn with its <image> markers, answer) for a multi-image task."""
        ordinal = ("the first", "the second", "the third")
        if task == "more":
            a, b = self.scene(), self.scene()
            while len(b.objects) == len(a.objects):
                b = self.scene()
            return [a, b], "<image>\n<image>\nWhich image has more shapes?", ordinal[len(b.objects) > len(a.objects)]
        if task == "total":
            a, b = self.scene(), self.scene()
            return [a, b], "<image>\n<image>\nHow many shapes are there in total?", str(len(a.objects) + len(b.objects))
        if task == "both":  # as many Yes as No
            yes, options = self.chance(0.5), []
            while not options:
                a, b = self.scene(), self.scene()
                common = {o.colour for o in a.objects} & {o.colour for o in b.objects}
                options = [c for c in COLOURS if (c in common) == yes]
            return ([a, b], f"Image 1: <image>\nImage 2: <image>\nDo both images contain a {self.pick(options)} shape?",
                    "Yes" if yes else "No")
        scenes = [self.scene() for _ in range(3)]  # "which": exactly one image holds the named shape
        k, o = self.int(0, 2), None
        while o is None:
            o = self.pick(scenes[k].objects)
            if any((p.colour, p.shape) == (o.colour, o.shape) for j in (0, 1, 2) if j != k for p in scenes[j].objects):
                scenes[k], o = self.scene(), None
        return (scenes, f"Image 1: <image>\nImage 2: <image>\nImage 3: <image>\nWhich image contains a {o.colour} "
                f"{o.shape}?", ordinal[k])

    def about_pair(self, a, b, more, first):
        """Up to `more` further (question, answer) turns about the same two scenes (multi-image SFT) after the
        question `first`: one count at most in a conversation, since two give the rest away (the total is the
        two images' counts; which has more follows from them)."""
        n, m = len(a.objects), len(b.objects)
        c = self.pick(list(COLOURS))
        both = any(o.colour == c for o in a.objects) and any(o.colour == c for o in b.objects)
        counts = [("How many shapes are there in total?", str(n + m)),
                  ("How many shapes are there in the first image?", str(n)),
                  ("How many shapes are there in the second image?", str(m))]
        if n != m:
            counts.append(("Which image has more shapes?", ("the first", "the second")[m > n]))
        turns = [(f"Do both images contain a {c} shape?", "Yes" if both else "No")]
        if not any(q in first for q, _ in counts):
            turns.append(self.pick(counts))
        turns = [t for t in turns if t[0] not in first]
        return [turns[k] for k in self.rng.permutation(len(turns))[:more].tolist()]
