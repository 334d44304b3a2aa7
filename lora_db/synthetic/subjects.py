"""A DreamBooth benchmark subject set that tiny-world's training never sees.

The DreamBooth paper benchmarks on 30 subjects with 4-6 photos each. These are procedural stand-ins: each subject
has a fixed identity (shape, pattern and colour pair) and `PHOTOS` photos that vary position, scale, a slight
rotation and the background, the way photos of one object vary.

They are drawn by this module alone, with shapes and patterns that procedural.py (the VAE's and the judge's
training distribution) never draws: hearts, crescents, arrows, spirals, bolts, keyholes, teardrops, clouds,
tetromino blocks, hourglasses, leaves and umbrellas; zigzags, waves, bullseyes, plaid, bands and halves; colour
pairs chosen by hand. So a VAE round trip or a judge score on them measures generalisation, not memory.

Four subjects are "issue probes" (issue 17's new-user trials and the project's demo robot). Their shapes (star,
triangle, disc) overlap procedural.py, so they are flagged `probe=True` and can be left out of the held-out set.

    SUBJECTS["heart"].describe_prompt  # "a photo of a red toy with pink stripes", in tiny-world's words
    subject_photos("heart")            # five 64 px PIL images
    write_subject_photos("heart", "photos")  # the same, as photos/heart-00.png ... (`lora-db demo-images --subject`)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from lora_db.images import to_tensor
from lora_db.io import atomic_write
from lora_db.synthetic.demo import draw_demo_toy

SUPERSAMPLE = 4
PHOTOS = 5
IDENTIFIER = "sks"
CLASS_WORD = "toy"  # tiny-world's word for any standing object (lora_db.synthetic.world.CLASS_WORD)
# Each subject described with the words tiny-world knows (colours, its shapes, stripes/checks/dots): the prompt a
# user without DreamBooth would try. The subjects' own shapes are not among those words, by construction.
WORLD_DESCRIPTIONS = {
    "heart": "a photo of a red toy with pink stripes",
    "crescent": "a photo of a yellow toy with navy stripes",
    "arrow": "a photo of a lime toy with green stripes",
    "spiral": "a photo of an orange ring",
    "bolt": "a photo of a yellow toy",
    "keyhole": "a photo of a brown square with a black letter",
    "teardrop": "a photo of a blue disc with white stripes",
    "cloud": "a photo of a purple toy with white checks",
    "l_block": "a photo of a navy toy with lime stripes",
    "hourglass": "a photo of a red triangle with white stripes",
    "leaf": "a photo of a green toy with lime stripes",
    "umbrella": "a photo of a red toy with white stripes",
    "magenta_star": "a photo of a magenta star on yellow",
    "checkered_cube": "a photo of a red square with white checks on cyan",
    "teal_triangle": "a photo of a teal triangle with purple dots",
    "robot": "a photo of a red toy with teal stripes",
}

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Subject:
    """One subject: its identity is `shape` + `pattern` + `colours`; the rest says how photos vary."""

    name: str
    noun: str  # what a person would call it: "heart"
    description: str  # plain English: "a coral heart with pale pink waves"
    shape: str
    pattern: str
    colours: tuple[Colour, Colour]
    outline: Colour | None = (40, 40, 50)
    backdrop: Colour | None = None  # a fixed background colour that belongs to the identity ("on yellow")
    probe: bool = False  # an issue probe: its shape also occurs in procedural.py

    @property
    def instance_prompt(self) -> str:
        """The DreamBooth prompt: the rare identifier and tiny-world's class word for any standing object."""
        return f"a photo of {IDENTIFIER} {CLASS_WORD}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {CLASS_WORD}"

    @property
    def describe_prompt(self) -> str:
        """The closest description in tiny-world's own words: the baseline an adapter must beat."""
        return WORLD_DESCRIPTIONS[self.name]


# -- shape masks: draw white (255) on an L canvas of side `s` -------------------------------------------------------


def _heart(draw: ImageDraw.ImageDraw, s: int) -> None:
    points = []
    for k in range(120):
        t = 2 * math.pi * k / 120
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((s * (0.5 + x / 36), s * (0.47 - y / 36)))
    draw.polygon(points, fill=255)


def _crescent(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.ellipse((0.1 * s, 0.1 * s, 0.9 * s, 0.9 * s), fill=255)
    draw.ellipse((0.32 * s, 0.02 * s, 1.04 * s, 0.74 * s), fill=0)


def _arrow(draw: ImageDraw.ImageDraw, s: int) -> None:
    shape = [(0.08, 0.4), (0.55, 0.4), (0.55, 0.2), (0.92, 0.5), (0.55, 0.8), (0.55, 0.6), (0.08, 0.6)]
    draw.polygon([(x * s, y * s) for x, y in shape], fill=255)


def _spiral(draw: ImageDraw.ImageDraw, s: int) -> None:
    points = []
    for k in range(400):
        t = k / 400 * 3.0 * 2 * math.pi
        r = 0.03 + 0.4 * t / (3.0 * 2 * math.pi)
        points.append((s * (0.5 + r * math.cos(t)), s * (0.5 + r * math.sin(t))))
    draw.line(points, fill=255, width=round(0.075 * s), joint="curve")


def _bolt(draw: ImageDraw.ImageDraw, s: int) -> None:
    shape = [(0.58, 0.04), (0.2, 0.56), (0.46, 0.56), (0.36, 0.96), (0.8, 0.4), (0.53, 0.4), (0.7, 0.04)]
    draw.polygon([(x * s, y * s) for x, y in shape], fill=255)


def _keyhole(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.rounded_rectangle((0.18 * s, 0.06 * s, 0.82 * s, 0.94 * s), radius=0.12 * s, fill=255)


def _keyhole_hole(draw: ImageDraw.ImageDraw, s: int, colour: tuple) -> None:
    """The hole is painted (black), not cut: a cut-out would show the photo's background through the plate."""
    draw.ellipse((0.38 * s, 0.24 * s, 0.62 * s, 0.48 * s), fill=colour)
    draw.polygon([(0.44 * s, 0.42 * s), (0.56 * s, 0.42 * s), (0.62 * s, 0.76 * s), (0.38 * s, 0.76 * s)], fill=colour)


def _teardrop(draw: ImageDraw.ImageDraw, s: int) -> None:
    cx, cy, r = 0.5 * s, 0.63 * s, 0.29 * s
    tip = (cx, 0.05 * s)
    angle = math.asin(r / (cy - tip[1]))  # tangent points from the tip to the circle
    left = (cx - r * math.cos(angle), cy - r * math.sin(angle))
    right = (cx + r * math.cos(angle), cy - r * math.sin(angle))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    draw.polygon([tip, right, (cx, cy), left], fill=255)


def _cloud(draw: ImageDraw.ImageDraw, s: int) -> None:
    for cx, cy, r in ((0.3, 0.58, 0.17), (0.5, 0.45, 0.22), (0.7, 0.56, 0.17), (0.4, 0.62, 0.15), (0.6, 0.64, 0.15)):
        draw.ellipse(((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s), fill=255)
    draw.rounded_rectangle((0.14 * s, 0.56 * s, 0.86 * s, 0.76 * s), radius=0.1 * s, fill=255)


def _l_block(draw: ImageDraw.ImageDraw, s: int) -> None:
    for col, row in ((0, 0), (0, 1), (0, 2), (1, 2)):
        x0, y0 = 0.25 + col * 0.24, 0.14 + row * 0.24
        draw.rectangle((x0 * s, y0 * s, (x0 + 0.235) * s, (y0 + 0.235) * s), fill=255)


def _hourglass(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.polygon([(0.24 * s, 0.14 * s), (0.76 * s, 0.14 * s), (0.53 * s, 0.5 * s), (0.76 * s, 0.86 * s),
                  (0.24 * s, 0.86 * s), (0.47 * s, 0.5 * s)], fill=255)  # fmt: skip
    draw.rectangle((0.16 * s, 0.06 * s, 0.84 * s, 0.14 * s), fill=255)
    draw.rectangle((0.16 * s, 0.86 * s, 0.84 * s, 0.94 * s), fill=255)


def _leaf(draw: ImageDraw.ImageDraw, s: int) -> None:
    """A pointed oval (widest a little below the middle) on a short stem."""
    rows = [0.05 + 0.8 * k / 60 for k in range(61)]
    half = [0.3 * math.sin(math.pi * (y - 0.05) / 0.8) ** 0.8 for y in rows]
    outline = [(0.5 - w, y) for y, w in zip(rows, half, strict=True)]
    outline += [(0.5 + w, y) for y, w in zip(reversed(rows), reversed(half), strict=True)]
    draw.polygon([(x * s, y * s) for x, y in outline], fill=255)
    draw.line([(0.5 * s, 0.8 * s), (0.5 * s, 0.97 * s)], fill=255, width=round(0.04 * s))


def _umbrella(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.pieslice((0.08 * s, 0.14 * s, 0.92 * s, 0.98 * s), 180, 360, fill=255)
    draw.line([(0.5 * s, 0.56 * s), (0.5 * s, 0.86 * s)], fill=255, width=round(0.045 * s))
    draw.arc((0.5 * s, 0.78 * s, 0.66 * s, 0.94 * s), 0, 180, fill=255, width=round(0.045 * s))


def _star(draw: ImageDraw.ImageDraw, s: int) -> None:
    points = []
    for k in range(10):
        r = 0.46 if k % 2 == 0 else 0.46 * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((s * (0.5 + r * math.cos(angle)), s * (0.53 + r * math.sin(angle))))
    draw.polygon(points, fill=255)


def _triangle(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.polygon([(0.5 * s, 0.08 * s), (0.94 * s, 0.88 * s), (0.06 * s, 0.88 * s)], fill=255)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, int], None]] = {
    "heart": _heart,
    "crescent": _crescent,
    "arrow": _arrow,
    "spiral": _spiral,
    "bolt": _bolt,
    "keyhole": _keyhole,
    "teardrop": _teardrop,
    "cloud": _cloud,
    "l_block": _l_block,
    "hourglass": _hourglass,
    "leaf": _leaf,
    "umbrella": _umbrella,
    "star": _star,
    "triangle": _triangle,
}


# -- patterns: an RGB image of side `s` from two colours; none of them is in procedural.py --------------------------


def _pattern(kind: str, s: int, a: Colour, b: Colour) -> Image.Image:
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
    if kind == "solid":
        t = np.zeros_like(x)
    elif kind == "zigzag":  # chevrons: horizontal stripes bent into a zigzag
        t = (((y + 0.08 * np.abs((x / 0.16) % 2.0 - 1.0)) / 0.14) % 1.0 < 0.5).astype(np.float32)
    elif kind == "waves":
        t = (((y + 0.04 * np.sin(x * 2 * math.pi * 3)) / 0.16) % 1.0 < 0.45).astype(np.float32)
    elif kind == "bullseye":  # concentric rings about the shape's centre
        t = ((np.hypot(x - 0.5, y - 0.55) / 0.12) % 1.0 < 0.5).astype(np.float32)
    elif kind == "plaid":  # two crossed sets of translucent bands
        t = 0.5 * ((x / 0.25) % 1.0 < 0.35) + 0.5 * ((y / 0.25) % 1.0 < 0.35)
    elif kind == "band":  # one broad diagonal band across the shape
        t = (np.abs(x - y) < 0.14).astype(np.float32)
    elif kind == "halves":  # left half one colour, right half the other
        t = (x > 0.5).astype(np.float32)
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    weight = Image.fromarray((t * 255 + 0.5).astype(np.uint8), mode="L")
    return Image.composite(Image.new("RGB", (s, s), b), Image.new("RGB", (s, s), a), weight)


def draw_subject(subject: Subject, side: int) -> Image.Image:
    """The subject on a transparent side x side RGBA square: pattern inside its shape, outline around it."""
    if subject.shape == "robot":
        return draw_demo_toy(side)
    if subject.shape == "cube":
        return _checkered_cube(side, *subject.colours)
    mask = Image.new("L", (side, side), 0)
    SHAPES[subject.shape](ImageDraw.Draw(mask), side)
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    if subject.outline is not None:
        grown = mask.filter(ImageFilter.MaxFilter(2 * max(1, side // 90) + 1))
        image.paste((*subject.outline, 255), (0, 0, side, side), grown)
    image.paste(_pattern(subject.pattern, side, *subject.colours), (0, 0), mask)
    if subject.shape == "keyhole":
        _keyhole_hole(ImageDraw.Draw(image), side, (*subject.colours[1], 255))
    if subject.shape == "triangle":  # issue probe: a teal triangle with a purple disc
        ImageDraw.Draw(image).ellipse(
            (0.36 * side, 0.5 * side, 0.64 * side, 0.78 * side), fill=(*subject.colours[1], 255)
        )
    return image


def _checkered_cube(side: int, a: Colour, b: Colour, cells: int = 3) -> Image.Image:
    """An isometric cube whose three visible faces are checkered, shaded as lit from the top left."""
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    s = side
    top, centre, bottom = (0.5 * s, 0.08 * s), (0.5 * s, 0.48 * s), (0.5 * s, 0.94 * s)
    left, right = (0.1 * s, 0.28 * s), (0.9 * s, 0.28 * s)
    faces = (  # origin, edge u, edge v, brightness
        (left, (top[0] - left[0], top[1] - left[1]), (centre[0] - left[0], centre[1] - left[1]), 1.0),
        (left, (centre[0] - left[0], centre[1] - left[1]), (0.0, bottom[1] - centre[1]), 0.78),
        (centre, (right[0] - centre[0], right[1] - centre[1]), (0.0, bottom[1] - centre[1]), 0.58),
    )
    for origin, u, v, light in faces:
        for i in range(cells):
            for j in range(cells):
                colour = a if (i + j) % 2 == 0 else b
                shaded = (*tuple(round(c * light) for c in colour), 255)

                def corner(p, q, origin=origin, u=u, v=v):
                    return (
                        origin[0] + u[0] * p / cells + v[0] * q / cells,
                        origin[1] + u[1] * p / cells + v[1] * q / cells,
                    )

                draw.polygon([corner(i, j), corner(i + 1, j), corner(i + 1, j + 1), corner(i, j + 1)], fill=shaded)
    outline = (40, 40, 50, 255)
    line = max(1, side // 90)
    hexagon = [
        top,
        right,
        (right[0], right[1] + bottom[1] - centre[1]),
        bottom,
        (left[0], left[1] + bottom[1] - centre[1]),
        left,
    ]
    draw.polygon(hexagon, outline=outline, width=line)
    draw.line([left, centre, right], fill=outline, width=line)
    draw.line([centre, bottom], fill=outline, width=line)
    return image


# -- the subject set ------------------------------------------------------------------------------------------------

SUBJECT_LIST = (
    Subject("heart", "heart", "a coral heart with pale pink waves", "heart", "waves", ((250, 96, 96), (255, 214, 222))),
    Subject(
        "crescent",
        "moon",
        "a golden crescent moon with a navy zigzag",
        "crescent",
        "zigzag",
        ((236, 180, 36), (30, 40, 110)),
    ),
    Subject("arrow", "arrow", "a lime arrow with a dark green band", "arrow", "band", ((170, 226, 40), (20, 96, 44))),
    Subject(
        "spiral",
        "spiral",
        "an orange spiral",
        "spiral",
        "solid",
        ((250, 130, 20), (250, 130, 20)),
        outline=(90, 40, 10),
    ),
    Subject(
        "bolt",
        "bolt",
        "a lemon yellow lightning bolt with a black border",
        "bolt",
        "solid",
        ((255, 236, 60), (255, 236, 60)),
        outline=(10, 10, 10),
    ),
    Subject(
        "keyhole", "lock", "a brass plate with a black keyhole", "keyhole", "solid", ((196, 156, 70), (22, 22, 26))
    ),
    Subject(
        "teardrop",
        "drop",
        "a sky blue teardrop with white rings",
        "teardrop",
        "bullseye",
        ((70, 170, 240), (245, 250, 255)),
    ),
    Subject(
        "cloud", "cloud", "a lavender cloud with white plaid", "cloud", "plaid", ((176, 150, 230), (255, 255, 255))
    ),
    Subject(
        "l_block",
        "block",
        "an indigo L-shaped block with mint zigzags",
        "l_block",
        "zigzag",
        ((60, 50, 160), (150, 240, 200)),
    ),
    Subject(
        "hourglass", "hourglass", "a maroon and sand hourglass", "hourglass", "halves", ((128, 24, 48), (226, 200, 150))
    ),
    Subject(
        "leaf", "leaf", "a dark green leaf with a light green band", "leaf", "band", ((30, 110, 50), (160, 220, 110))
    ),
    Subject(
        "umbrella",
        "umbrella",
        "a red and white umbrella",
        "umbrella",
        "halves",
        ((220, 30, 40), (250, 250, 250)),
    ),
    # issue probes: the trials of issue 17 and the project's own demo robot
    Subject(
        "magenta_star",
        "star",
        "a magenta star on yellow",
        "star",
        "solid",
        ((220, 30, 170), (220, 30, 170)),
        backdrop=(250, 214, 40),
        probe=True,
    ),
    Subject(
        "checkered_cube",
        "cube",
        "a red and white checkered cube on cyan",
        "cube",
        "checks",
        ((220, 40, 40), (250, 250, 250)),
        backdrop=(60, 220, 230),
        probe=True,
    ),
    Subject(
        "teal_triangle",
        "triangle",
        "a teal triangle with a purple disc",
        "triangle",
        "solid",
        ((30, 160, 150), (130, 50, 180)),
        probe=True,
    ),
    Subject(
        "robot",
        "robot",
        "a toy robot with a teal head, a red body and a yellow star",
        "robot",
        "solid",
        ((31, 163, 163), (232, 67, 46)),
        probe=True,
    ),
)
SUBJECTS = {subject.name: subject for subject in SUBJECT_LIST}


# -- photos ---------------------------------------------------------------------------------------------------------

_ROOMS = (  # wall, floor
    ((214, 228, 240), (170, 140, 110)),
    ((240, 226, 200), (120, 150, 120)),
    ((200, 230, 215), (190, 170, 140)),
    ((60, 64, 80), (120, 100, 80)),
    ((245, 240, 230), (110, 120, 140)),
)
_PLAINS = ((236, 236, 236), (40, 44, 52), (200, 216, 232), (250, 232, 214), (150, 160, 150))


def _backdrop(subject: Subject, size: int, rng: random.Random) -> tuple[Image.Image, int | None]:
    """A photo background and the horizon row the subject stands on (None: the subject floats on a plain)."""
    shade = Image.linear_gradient("L").resize((size, size))
    if subject.backdrop is not None:  # the colour is part of the identity: vary only its lighting and the floor
        light = tuple(min(255, round(c * 1.1 + 10)) for c in subject.backdrop)
        dark = tuple(round(c * rng.uniform(0.7, 0.85)) for c in subject.backdrop)
        image = Image.composite(
            Image.new("RGB", (size, size), subject.backdrop), Image.new("RGB", (size, size), light), shade
        )
        if rng.random() < 0.5:
            horizon = round(size * rng.uniform(0.62, 0.75))
            ImageDraw.Draw(image).rectangle((0, horizon, size, size), fill=dark)
            return image, horizon
        return image, None
    kind = rng.choice(("room", "room", "plain", "outdoors"))
    if kind == "plain":
        colour = rng.choice(_PLAINS)
        top = tuple(min(255, c + 25) for c in colour)
        return Image.composite(Image.new("RGB", (size, size), colour), Image.new("RGB", (size, size), top), shade), None
    if kind == "outdoors":
        sky, ground = (110, 175, 235), rng.choice(((80, 150, 60), (220, 200, 150), (150, 150, 150)))
        wall, top = sky, (200, 228, 250)
    else:
        wall, ground = rng.choice(_ROOMS)
        top = tuple(min(255, c + 30) for c in wall)
    image = Image.composite(Image.new("RGB", (size, size), wall), Image.new("RGB", (size, size), top), shade)
    horizon = round(size * rng.uniform(0.6, 0.74))
    ImageDraw.Draw(image).rectangle((0, horizon, size, size), fill=ground)
    return image, horizon


def _photo(subject: Subject, toy: Image.Image, size: int, rng: random.Random) -> Image.Image:
    big = size * SUPERSAMPLE
    scene, horizon = _backdrop(subject, big, rng)
    scene = scene.convert("RGBA")
    side = round(big * rng.uniform(0.5, 0.78))
    posed = toy.rotate(rng.uniform(-12.0, 12.0), resample=Image.Resampling.BICUBIC)
    posed = posed.resize((side, side), Image.Resampling.LANCZOS)
    left = round((big - side) / 2 + big * rng.uniform(-0.14, 0.14))
    if horizon is None:
        top = round((big - side) / 2 + big * rng.uniform(-0.12, 0.12))
    else:  # stand on the floor, with a soft shadow
        top = round(horizon - side * 0.88 + big * rng.uniform(-0.04, 0.04))
        shadow = Image.new("RGBA", scene.size, (0, 0, 0, 0))
        cx, cy, rx, ry = left + side / 2, top + side * 0.93, side * 0.34, side * 0.06
        ImageDraw.Draw(shadow).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), (0, 0, 0, 90))
        scene.alpha_composite(shadow.filter(ImageFilter.GaussianBlur(max(1.0, side / 40))))
    left = min(max(left, -side // 8), big - side + side // 8)
    top = min(max(top, -side // 8), big - side + side // 8)
    scene.alpha_composite(posed, (max(left, 0), max(top, 0)), (max(-left, 0), max(-top, 0)))
    return scene.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def subject_photos(name: str, size: int = 64, count: int = PHOTOS, seed: int = 0) -> list[Image.Image]:
    """`count` photos of subject `name`: one identity, varied position, scale, rotation and background."""
    subject = SUBJECTS[name]
    index = SUBJECT_LIST.index(subject)
    rng = random.Random(seed * 7919 + index)
    toy = draw_subject(subject, 512)  # drawn once, then scaled to each photo's size
    return [_photo(subject, toy, size, rng) for _ in range(count)]


def write_subject_photos(
    name: str, folder: str | Path, count: int = PHOTOS, size: int = 64, seed: int = 0
) -> list[Path]:
    """`subject_photos` written to FOLDER/NAME-00.png, NAME-01.png, ... (`lora-db demo-images --subject NAME`)."""
    paths = []
    for number, photo in enumerate(subject_photos(name, size=size, count=count, seed=seed)):
        path = Path(folder) / f"{name}-{number:02d}.png"
        paths.append(atomic_write(path, lambda tmp, photo=photo: photo.save(tmp, format="PNG")))
    return paths


def subject_tensor(names: list[str] | None = None, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """Every photo of the named subjects (default: all) as (N, 3, size, size) in [-1, 1], and whose each one is."""
    pixels, owners = [], []
    for name in names or list(SUBJECTS):
        for photo in subject_photos(name, size):
            pixels.append(to_tensor(photo))
            owners.append(name)
    return torch.stack(pixels), owners


def held_out_names() -> list[str]:
    """Subjects whose shapes procedural.py never draws (the issue probes are left out)."""
    return [subject.name for subject in SUBJECT_LIST if not subject.probe]


if __name__ == "__main__":
    import sys

    rows = [subject_photos(subject.name) for subject in SUBJECT_LIST]
    sheet = Image.new("RGB", (PHOTOS * 128, len(rows) * 128), "white")
    for r, row in enumerate(rows):
        for c, photo in enumerate(row):
            sheet.paste(photo.resize((128, 128), Image.Resampling.NEAREST), (c * 128, r * 128))
    sheet.save(sys.argv[1] if len(sys.argv) > 1 else "subjects_sheet.png")
