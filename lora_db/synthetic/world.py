"""tiny-world's captioned world (second edition): toys of ten shapes in sixteen colours, plain or with a pattern
in a second colour, standing in five settings or floating on a plain colour, drawn with PIL at 64 px and
captioned compositionally ("a photo of a magenta star with white dots on yellow"), deterministic from a seed.

The first world had four kinds (robot, car, house, ball) in six colours: its CLIP and U-ViT knew a palette, not
shapes, so a LoRA had nothing to bend towards a subject outside it. This one gives the U-ViT a prior over shapes,
colours, patterns and places that words combine freely, and one class word for all of them: a caption says
"toy" instead of the shape a third of the time, so "a photo of a toy" (DreamBooth's class prompt) is a prompt the
model knows, and "a photo of sks toy" can be bent to any subject.

The DreamBooth benchmark subjects (lora_db.synthetic.subjects) are hearts, crescents, arrows, umbrellas and more:
no shape of this world.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from lora_db.synthetic.procedural import (
    coordinates,
    glyph_font,
    mix_colours,
    regular_polygon,
    rotate_points,
    star_points,
)

IMAGE_SIZE = 64
SUPERSAMPLE = 4
CLASS_WORD = "toy"  # the word for any object of the world: DreamBooth's class noun

COLOURS = {
    "red": (222, 40, 40),
    "orange": (250, 138, 28),
    "yellow": (250, 214, 40),
    "lime": (170, 226, 40),
    "green": (40, 150, 60),
    "teal": (30, 160, 150),
    "cyan": (60, 220, 230),
    "blue": (44, 96, 222),
    "navy": (30, 40, 110),
    "purple": (130, 50, 180),
    "magenta": (220, 30, 170),
    "pink": (250, 170, 200),
    "brown": (130, 80, 40),
    "black": (24, 24, 28),
    "white": (245, 245, 245),
    "grey": (140, 140, 146),
}
SHAPES = ("square", "disc", "triangle", "star", "ring", "cross", "diamond", "hexagon", "oval", "bar")
PATTERNS = ("stripes", "checks", "dots", "letter")
SETTINGS = ("in a room", "on grass", "on the beach", "at night", "on snow")
BACKDROP_COLOURS = ("yellow", "cyan", "pink", "white", "black", "grey", "blue", "green", "orange", "lime")
_LETTERS = "AEFHKMNRSTXZ"
_NO_JITTER = random.Random(0)  # regular_polygon draws a jitter per corner; zero jitter needs no randomness


@dataclass(frozen=True)
class Scene:
    """What one picture shows. A caption may name the shape or only "toy", and may leave out the colour, the
    pattern or the place, so every shorter prompt (down to "a photo of a toy") is one the model has seen."""

    shape: str
    colour: str
    pattern: str | None = None  # None: one colour all over
    pattern_colour: str = "white"
    place: str = "in a room"  # a setting, or "on <colour>" for a plain backdrop
    say_shape: bool = True
    say_colour: bool = True
    say_pattern: bool = True
    say_place: bool = True

    @property
    def caption(self) -> str:
        words = [self.colour] if self.say_colour else []
        words.append(self.shape if self.say_shape else CLASS_WORD)
        article = "an" if words[0][0] in "aeiou" else "a"
        text = f"a photo of {article} {' '.join(words)}"
        if self.pattern and self.say_pattern:
            if self.pattern == "letter":
                text += f" with a {self.pattern_colour} letter"
            else:
                text += f" with {self.pattern_colour} {self.pattern}"
        if self.say_place:
            text += f" {self.place}"
        return text


def random_scene(rng: random.Random) -> Scene:
    colour = rng.choice(list(COLOURS))
    pattern = rng.choice((None, None, *PATTERNS))
    pattern_colour = rng.choice([c for c in COLOURS if c != colour])
    if rng.random() < 0.7:
        place = rng.choice(SETTINGS)
    else:
        place = "on " + rng.choice([c for c in BACKDROP_COLOURS if c != colour])
    return Scene(
        shape=rng.choice(SHAPES),
        colour=colour,
        pattern=pattern,
        pattern_colour=pattern_colour,
        place=place,
        say_shape=rng.random() > 0.3,
        say_colour=rng.random() > 0.15,
        say_pattern=rng.random() > 0.2,
        say_place=rng.random() > 0.2,
    )


def make_world(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[tuple[Image.Image, str]]:
    """`count` (picture, caption) pairs; the same seed draws the same world."""
    return [(image, scene.caption) for image, scene in make_scenes(count, seed, size)]


def make_scenes(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[tuple[Image.Image, Scene]]:
    """`count` (picture, scene) pairs: `make_world` with what each picture shows, said or not in its caption."""
    rng = random.Random(seed)
    world = []
    for _ in range(count):
        scene = random_scene(rng)
        world.append((render(scene, rng, size), scene))
    return world


def attributes() -> dict[str, tuple[str, ...]]:
    """Every attribute of a scene a caption can say, with its values: what CLIP's auxiliary heads classify."""
    return {
        "shape": SHAPES,
        "colour": tuple(COLOURS),
        "pattern": ("plain", *PATTERNS),
        "pattern_colour": tuple(COLOURS),
        "place": (*SETTINGS, *(f"on {colour}" for colour in BACKDROP_COLOURS)),
    }


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """What each picture shows and what its caption says, for every attribute (`attributes`): the class index
    (`NAME`), whether the picture shows it (`shows_NAME`: a plain toy has no pattern colour) and whether its caption
    says it (`says_NAME`)."""
    values = attributes()

    def column(name: str, get) -> torch.Tensor:
        return torch.tensor([values[name].index(get(scene)) for scene in scenes])

    def mask(get) -> torch.Tensor:
        return torch.tensor([bool(get(scene)) for scene in scenes])

    return {
        "shape": column("shape", lambda s: s.shape),
        "colour": column("colour", lambda s: s.colour),
        "pattern": column("pattern", lambda s: s.pattern or "plain"),
        "pattern_colour": column("pattern_colour", lambda s: s.pattern_colour),
        "place": column("place", lambda s: s.place),
        "shows_shape": mask(lambda s: True),
        "shows_colour": mask(lambda s: True),
        "shows_pattern": mask(lambda s: True),
        "shows_pattern_colour": mask(lambda s: s.pattern),
        "shows_place": mask(lambda s: True),
        "says_shape": mask(lambda s: s.say_shape),
        "says_colour": mask(lambda s: s.say_colour),
        # a caption that names no pattern does not say the toy is plain: the pattern may just be left out
        "says_pattern": mask(lambda s: s.pattern and s.say_pattern),
        "says_pattern_colour": mask(lambda s: s.pattern and s.say_pattern),
        "says_place": mask(lambda s: s.say_place),
    }


def full_caption(scene: Scene) -> str:
    """The caption that says everything the picture shows: what the caption decoder learns to write."""
    return replace(scene, say_shape=True, say_colour=True, say_pattern=True, say_place=True).caption


def vocabulary() -> list[str]:
    """Every word a caption can use, sorted."""
    words = {"a", "an", "photo", "of", "with", "on", CLASS_WORD, *COLOURS, *SHAPES, *PATTERNS}
    for setting in SETTINGS:
        words.update(setting.split())
    return sorted(words)


# -- drawing --------------------------------------------------------------------------------------------------------

_OUTLINE = (40, 40, 50)
_ROOMS = (  # wall, floor
    ((214, 228, 240), (170, 140, 110)),
    ((240, 226, 200), (120, 150, 120)),
    ((225, 215, 235), (150, 150, 160)),
    ((200, 230, 215), (190, 170, 140)),
    ((245, 240, 230), (110, 120, 140)),
    ((60, 64, 80), (120, 100, 80)),
)


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas, horizon = _place(scene.place, big, rng)
    side = round(big * rng.uniform(0.42, 0.72))
    toy = draw_toy(scene, side, rng)
    toy = toy.rotate(rng.uniform(-15.0, 15.0), resample=Image.Resampling.BICUBIC)
    left = round((big - side) / 2 + big * rng.uniform(-0.15, 0.15))
    if horizon is None:
        top = round((big - side) / 2 + big * rng.uniform(-0.12, 0.12))
    else:
        top = round(horizon - side * 0.9 + big * rng.uniform(-0.04, 0.04))
        _shadow(canvas, left + side // 2, top + round(side * 0.93), side)
    canvas.alpha_composite(toy, (left, top))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.BOX)


def draw_toy(scene: Scene, side: int, rng: random.Random) -> Image.Image:
    """The object alone on a transparent square: its shape filled with its colour or pattern, outlined."""
    mask = Image.new("L", (side, side), 0)
    grown = Image.new("L", (side, side), 0)
    line = max(2, side // 40)
    _shape(ImageDraw.Draw(mask), scene.shape, side, 0)
    _shape(ImageDraw.Draw(grown), scene.shape, side, line)
    fill = _pattern(scene, side, rng)
    toy = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    toy.paste((*_OUTLINE, 255), (0, 0, side, side), grown)
    toy.paste(fill, (0, 0), mask)
    return toy


def _shape(draw: ImageDraw.ImageDraw, shape: str, side: int, grow: int) -> None:
    c, r = side / 2, side * 0.42 + grow
    if shape == "square":
        draw.rectangle((c - r * 0.85, c - r * 0.85, c + r * 0.85, c + r * 0.85), fill=255)
    elif shape == "disc":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=255)
    elif shape == "oval":
        draw.ellipse((c - r, c - r * 0.6, c + r, c + r * 0.6), fill=255)
    elif shape == "bar":
        draw.rectangle((c - r * 0.35, c - r, c + r * 0.35, c + r), fill=255)
    elif shape == "triangle":
        draw.polygon(regular_polygon(c, c + r * 0.15, r * 1.1, 3, -math.pi / 2, 0.0, _NO_JITTER), fill=255)
    elif shape == "diamond":
        draw.polygon([(c, c - r), (c + r * 0.7, c), (c, c + r), (c - r * 0.7, c)], fill=255)
    elif shape == "hexagon":
        draw.polygon(regular_polygon(c, c, r, 6, 0.0, 0.0, _NO_JITTER), fill=255)
    elif shape == "star":
        draw.polygon(star_points(c, c, r * 1.05, 5, 0.45, -math.pi / 2), fill=255)
    elif shape == "ring":
        width = round(r * 0.38 + 2 * grow)
        draw.ellipse((c - r, c - r, c + r, c + r), outline=255, width=width)
    else:  # cross
        arm = r * 0.32
        plus = [(-arm, -r), (arm, -r), (arm, -arm), (r, -arm), (r, arm), (arm, arm),
                (arm, r), (-arm, r), (-arm, arm), (-r, arm), (-r, -arm), (-arm, -arm)]  # fmt: skip
        draw.polygon(rotate_points([(c + x, c + y) for x, y in plus], c, c, 0.0), fill=255)


def _pattern(scene: Scene, side: int, rng: random.Random) -> Image.Image:
    a = np.array(COLOURS[scene.colour], dtype=np.float32)
    b = np.array(COLOURS[scene.pattern_colour], dtype=np.float32)
    if scene.pattern is None:
        return Image.new("RGB", (side, side), COLOURS[scene.colour])
    period = side * rng.uniform(0.16, 0.26)
    if scene.pattern == "stripes":
        u, _ = coordinates(side, rng.choice((0.0, math.pi / 2, math.pi / 4)))
        return mix_colours(a, b, (((u / period) % 1.0) < 0.5).astype(np.float32))
    if scene.pattern == "checks":
        u, v = coordinates(side, 0.0)
        return mix_colours(a, b, ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32))
    if scene.pattern == "dots":
        u, v = coordinates(side, 0.0)
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return mix_colours(a, b, (du * du + dv * dv < 0.09).astype(np.float32))
    image = Image.new("RGB", (side, side), COLOURS[scene.colour])  # letter: one big glyph in the middle
    draw = ImageDraw.Draw(image)
    font = glyph_font(round(side * 0.45))
    draw.text((side / 2, side / 2), rng.choice(_LETTERS), fill=COLOURS[scene.pattern_colour], font=font, anchor="mm")
    return image


def _place(place: str, size: int, rng: random.Random) -> tuple[Image.Image, int | None]:
    """The background and the horizon row a toy stands on (None: it floats on a plain colour)."""
    shade = Image.linear_gradient("L").resize((size, size))
    if place.startswith("on ") and place[3:] in COLOURS:
        colour = COLOURS[place[3:]]
        light = tuple(min(255, round(c * 1.08 + 12)) for c in colour)
        image = Image.composite(Image.new("RGBA", (size, size), colour), Image.new("RGBA", (size, size), light), shade)
        return image, None
    horizon = round(size * rng.uniform(0.6, 0.74))
    if place == "in a room":
        wall, floor = rng.choice(_ROOMS)
        top = tuple(min(255, c + 30) for c in wall)
    elif place == "on grass":
        wall, floor, top = (120, 180, 240), (74, 150, 58), (200, 230, 255)
    elif place == "on the beach":
        wall, floor, top = (90, 170, 220), (232, 210, 150), (190, 225, 250)
    elif place == "on snow":
        wall, floor, top = (150, 170, 200), (236, 240, 248), (205, 215, 232)
    else:  # at night
        wall, floor, top = (16, 22, 58), (52, 52, 66), (40, 44, 90)
    image = Image.composite(Image.new("RGBA", (size, size), wall), Image.new("RGBA", (size, size), top), shade)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, horizon, size, size), fill=floor)
    if place == "on the beach":
        draw.rectangle((0, horizon - size // 14, size, horizon), fill=(40, 110, 190))
    elif place == "at night":
        moon = rng.uniform(0.1, 0.9) * size
        draw.ellipse((moon - size * 0.05, size * 0.08, moon + size * 0.05, size * 0.18), fill=(240, 240, 200))
    return image, horizon


def _shadow(scene: Image.Image, centre_x: int, centre_y: int, side: int) -> None:
    shadow = Image.new("RGBA", scene.size, (0, 0, 0, 0))
    rx, ry = side * 0.34, side * 0.06
    ImageDraw.Draw(shadow).ellipse((centre_x - rx, centre_y - ry, centre_x + rx, centre_y + ry), (0, 0, 0, 90))
    scene.alpha_composite(shadow.filter(ImageFilter.GaussianBlur(max(1.0, side / 40))))
