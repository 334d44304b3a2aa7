"""tiny-world's captioned world: coloured, patterned shapes in rooms, outdoors or on backdrops, with captions built
from the same parts ("a photo of a red star with blue stripes on the beach").

tiny-world's CLIP and U-ViT learn from this world, so a LoRA has a prior to bend: sixteen colour names, ten kinds of
shape, four patterns with a second colour, seven settings and sixteen plain backdrops, one or two objects, and
captions that leave parts out so that short prompts ("a photo of a star", "a photo of a toy") are prompts the
model knows. "toy" names any standing object: it is the class word of the DreamBooth subjects
(`lora_db.synthetic.subjects`), whose shapes and patterns this world never draws.

Every picture is drawn at 4x and box-filtered (anti-aliased edges, as in a photo), deterministic from its seed.
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFilter

from lora_db.synthetic.procedural import SUPERSAMPLE, draw_shape

IMAGE_SIZE = 64
COLOURS = {
    "red": (222, 44, 40),
    "orange": (245, 136, 30),
    "yellow": (250, 212, 32),
    "lime": (164, 222, 44),
    "green": (40, 150, 62),
    "teal": (24, 150, 140),
    "cyan": (64, 220, 236),
    "blue": (40, 92, 222),
    "navy": (26, 36, 112),
    "purple": (132, 60, 182),
    "magenta": (222, 40, 204),
    "pink": (250, 164, 194),
    "brown": (132, 82, 40),
    "white": (246, 246, 246),
    "grey": (132, 132, 132),
    "black": (28, 28, 28),
}
SHAPES = ("triangle", "square", "diamond", "pentagon", "hexagon", "star", "disc", "ring", "cross", "letter")
PATTERNS = ("stripes", "checks", "dots", "speckles")
SETTINGS = ("in a room", "on grass", "on the beach", "at night", "on snow")
CLASS_WORD = "toy"  # what any standing object may be called; the subjects' class
CLASS_PROMPT = f"a photo of a {CLASS_WORD}"
TEXT_LENGTH = 24  # tokens: one per world word; the longest caption takes 19 with start and end
_SIDES = {"triangle": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6}


@dataclass(frozen=True)
class Thing:
    """One object: a shape, its colour, and optionally a pattern in a second colour."""

    shape: str
    colour: str
    pattern: str | None = None
    pattern_colour: str | None = None
    say_colour: bool = True
    say_pattern_colour: bool = True
    call_it_toy: bool = False

    def words(self) -> str:
        noun = CLASS_WORD if self.call_it_toy else self.shape
        text = f"{self.colour} {noun}" if self.say_colour else noun
        if self.pattern is not None:
            second = f"{self.pattern_colour} " if self.say_pattern_colour else ""
            text += f" with {second}{self.pattern}"
        return text


@dataclass(frozen=True)
class Scene:
    """What one picture shows: one or two things in a setting (or on a plain backdrop of a named colour)."""

    things: tuple[Thing, ...]
    setting: str  # one of SETTINGS, or "on COLOUR"
    say_setting: bool = True
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def caption(self) -> str:
        objects = " and ".join(("an " if t.words()[0] in "aeiou" else "a ") + t.words() for t in self.things)
        return f"a photo of {objects}" + (f" {self.setting}" if self.say_setting else "")


def world_words() -> list[str]:
    """Every word a caption can use: the tokenizer gives each one token."""
    words = {"a", "an", "and", "with", "photo", "of", "on", CLASS_WORD, *COLOURS, *SHAPES, *PATTERNS}
    for setting in SETTINGS:
        words.update(setting.split())
    return sorted(words)


def random_scene(rng: random.Random) -> Scene:
    count = 1 if rng.random() < 0.75 else 2
    things = []
    for _ in range(count):
        colour = rng.choice(list(COLOURS))
        pattern = rng.choice(PATTERNS) if rng.random() < 0.4 else None
        second = rng.choice([c for c in COLOURS if c != colour]) if pattern else None
        things.append(
            Thing(
                shape=rng.choice(SHAPES),
                colour=colour,
                pattern=pattern,
                pattern_colour=second,
                say_colour=rng.random() > 0.15,
                say_pattern_colour=rng.random() > 0.3,
                call_it_toy=count == 1 and rng.random() < 0.12,
            )
        )
    setting = rng.choice(SETTINGS) if rng.random() < 0.7 else "on " + rng.choice(list(COLOURS))
    return Scene(tuple(things), setting, say_setting=rng.random() > 0.2)


def make_world(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[tuple[Image.Image, str]]:
    """`count` captioned pictures; picture i depends only on (seed, i)."""
    world = []
    for index in range(count):
        rng = random.Random(seed * 1_000_003 + index)
        scene = random_scene(rng)
        world.append((render(scene, rng, size), scene.caption))
    return world


# -- drawing --------------------------------------------------------------------------------------------------------


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: float = 0.04) -> tuple[int, int, int]:
    """A named colour as a photo shows it: hue, saturation and value moved a little."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    h = (h + rng.uniform(-amount, amount)) % 1.0
    s = min(1.0, max(0.0, s + rng.uniform(-2 * amount, 2 * amount)))
    v = min(1.0, max(0.0, v + rng.uniform(-2 * amount, 2 * amount)))
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(min(255, max(0, round(c * factor))) for c in rgb)


_GROUNDS = {  # setting -> (sky or wall, floor), before jitter
    "in a room": None,  # a random wall and floor of the room palette
    "on grass": ((150, 200, 240), (70, 150, 60)),
    "on the beach": ((130, 190, 240), (230, 204, 150)),
    "at night": ((18, 22, 52), (40, 42, 60)),
    "on snow": ((196, 208, 224), (244, 246, 250)),
}
_ROOMS = (((236, 228, 214), (150, 110, 80)), ((214, 226, 236), (110, 110, 120)), ((240, 236, 200), (120, 90, 70)))


def _backdrop(scene: Scene, rng: random.Random, big: int) -> tuple[Image.Image, int | None]:
    """The background at the supersampled size, and the floor line (None on a plain backdrop)."""
    if scene.setting.startswith("on ") and scene.setting[3:] in COLOURS:
        return Image.new("RGB", (big, big), _jitter(COLOURS[scene.setting[3:]], rng, 0.02)), None
    wall, floor = _GROUNDS[scene.setting] or rng.choice(_ROOMS)
    horizon = round(big * rng.uniform(0.5, 0.72))
    canvas = Image.new("RGB", (big, big), _jitter(wall, rng, 0.02))
    ImageDraw.Draw(canvas).rectangle((0, horizon, big, big), fill=_jitter(floor, rng, 0.02))
    if scene.setting == "on grass":  # blades of grass: short strokes of a darker green
        draw = ImageDraw.Draw(canvas)
        for _ in range(60):
            x, y = rng.uniform(0, big), rng.uniform(horizon, big)
            draw.line((x, y, x + rng.uniform(-3, 3), y - rng.uniform(6, 14)), fill=(50, 120, 45), width=3)
    return canvas, horizon


def _pattern_fill(thing: Thing, rng: random.Random, big: int, night: bool) -> Image.Image:
    factor = 0.55 if night else 1.0
    base = _shade(_jitter(COLOURS[thing.colour], rng), factor)
    fill = Image.new("RGB", (big, big), base)
    if thing.pattern is None:
        return fill
    second = _shade(_jitter(COLOURS[thing.pattern_colour], rng), factor)
    draw = ImageDraw.Draw(fill)
    period = big * rng.uniform(0.06, 0.1)
    if thing.pattern == "stripes":
        width = period * rng.uniform(0.35, 0.6)
        for k in range(-2, int(2 * big / period) + 2):
            x = k * period
            draw.polygon([(x, 0), (x + width, 0), (x + width - big, big), (x - big, big)], fill=second)
    elif thing.pattern == "checks":
        cells = int(big / period) + 1
        for i in range(cells):
            for j in range(cells):
                if (i + j) % 2:
                    draw.rectangle((i * period, j * period, (i + 1) * period, (j + 1) * period), fill=second)
    elif thing.pattern == "dots":
        radius = period * rng.uniform(0.22, 0.32)
        for i in range(int(big / period) + 1):
            for j in range(int(big / period) + 1):
                cx, cy = (i + 0.5 + 0.5 * (j % 2)) * period, (j + 0.5) * period
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=second)
    else:  # speckles: small random flecks
        for _ in range(int(big * big / (period * period) * 1.5)):
            x, y, r = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(2, 5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=second)
    return fill


def _mask(shape: str, big: int, cx: float, cy: float, radius: float, rng: random.Random) -> Image.Image:
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape in _SIDES:
        sides = _SIDES[shape]
        upright = {"triangle": -math.pi / 2, "square": math.pi / 4, "diamond": 0.0}.get(shape, -math.pi / 2)
        rotation = upright + rng.uniform(-0.25, 0.25)
        squash = 0.7 if shape == "diamond" else 1.0
        points = [
            (cx + radius * squash * math.cos(rotation + 2 * math.pi * k / sides),
             cy + radius * math.sin(rotation + 2 * math.pi * k / sides))
            for k in range(sides)
        ]  # fmt: skip
        draw.polygon(points, fill=255)
    else:
        kind = {"letter": "glyph"}.get(shape, shape)
        draw_shape(draw, kind, cx, cy, radius, rng)
    return mask


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas, horizon = _backdrop(scene, rng, big)
    night = scene.setting == "at night"
    count = len(scene.things)
    slots = [rng.uniform(0.3, 0.7)] if count == 1 else sorted([rng.uniform(0.18, 0.4), rng.uniform(0.6, 0.82)])
    for thing, slot in zip(scene.things, slots, strict=True):
        radius = big * rng.uniform(0.16, 0.3) / (1.0 + 0.3 * (count - 1))
        cx = slot * big
        if horizon is None:  # a flat picture: anywhere, no shadow
            cy = rng.uniform(radius, big - radius)
        else:  # standing on the floor, a shadow beneath
            base = rng.uniform(horizon + 0.2 * (big - horizon), big - 0.05 * big)
            cy = base - radius
            shadow = Image.new("L", (big, big), 0)
            ImageDraw.Draw(shadow).ellipse(
                (cx - radius * 0.9, base - radius * 0.12, cx + radius * 0.9, base + radius * 0.12), fill=110
            )
            canvas.paste((0, 0, 0), (0, 0), shadow.filter(ImageFilter.GaussianBlur(big / 64)))
        mask = _mask(thing.shape, big, cx, cy, radius, random.Random(rng.getrandbits(32)))
        outline = mask.filter(ImageFilter.MaxFilter(9))
        canvas.paste((30, 30, 38), (0, 0), outline)
        canvas.paste(_pattern_fill(thing, rng, big, night), (0, 0), mask)
    return canvas.reduce(SUPERSAMPLE)
