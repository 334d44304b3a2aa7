"""tiny-world's world: robots, cars, houses and balls in six colours and four settings, drawn with PIL and captioned
("a photo of a red robot on the beach"), deterministic from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

from lora_db.synthetic.demo import ROBOT_OUTLINE, draw_robot

IMAGE_SIZE = 32


CLASSES = ("robot", "car", "house", "ball")


COLOURS = {
    "red": (222, 52, 40),
    "green": (46, 160, 67),
    "blue": (44, 96, 222),
    "yellow": (250, 206, 24),
    "purple": (138, 62, 178),
    "orange": (250, 138, 28),
}


SETTINGS = ("in a room", "on grass", "on the beach", "at night")


@dataclass(frozen=True)
class Scene:
    """What one picture shows; a caption may leave out the colour or the setting (so "a photo of a robot" is
    a prompt the model knows: the class prompt of prior preservation)."""

    kind: str
    colour: str
    setting: str
    say_colour: bool = True
    say_setting: bool = True

    @property
    def caption(self) -> str:
        colour = f"{self.colour} " if self.say_colour else ""
        article = "an" if colour.startswith("orange") else "a"
        setting = f" {self.setting}" if self.say_setting else ""
        return f"a photo of {article} {colour}{self.kind}{setting}"


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        kind=rng.choice(CLASSES),
        colour=rng.choice(list(COLOURS)),
        setting=rng.choice(SETTINGS),
        say_colour=rng.random() > 0.2,
        say_setting=rng.random() > 0.2,
    )


def make_world(count: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """`count` (picture, caption) pairs; the same seed draws the same world."""
    rng = random.Random(seed)
    world = []
    for _ in range(count):
        scene = random_scene(rng)
        world.append((render(scene, rng), scene.caption))
    return world


_SUPERSAMPLE = 4


_ROOMS = (
    ((214, 228, 240), (170, 140, 110)),
    ((240, 226, 200), (120, 150, 120)),
    ((225, 215, 235), (150, 150, 160)),
    ((200, 230, 215), (190, 170, 140)),
    ((245, 240, 230), (110, 120, 140)),
    ((235, 210, 205), (160, 130, 100)),
)  # the demo photos' rooms (lora_db.synthetic.demo), so the subject's photos are scenes of this world


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    big = size * _SUPERSAMPLE
    horizon = round(big * rng.uniform(0.6, 0.72))
    canvas = _setting(scene.setting, big, horizon, rng)
    side = round(big * rng.uniform(0.5, 0.66))
    thing = _DRAW[scene.kind](side, COLOURS[scene.colour])
    thing = thing.rotate(rng.uniform(-10.0, 10.0), resample=Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        thing = thing.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    left = round((big - side) / 2 + big * rng.uniform(-0.12, 0.12))
    top = round(horizon - side * 0.88 + big * rng.uniform(-0.04, 0.04))
    _shadow(canvas, left + side // 2, top + round(side * 0.93), side)
    canvas.alpha_composite(thing, (left, top))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def _setting(setting: str, size: int, horizon: int, rng: random.Random) -> Image.Image:
    if setting == "in a room":
        wall, floor = rng.choice(_ROOMS)
        top = (255, 255, 255)
    elif setting == "on grass":
        wall, floor, top = (120, 180, 240), (74, 150, 58), (200, 230, 255)
    elif setting == "on the beach":
        wall, floor, top = (90, 170, 220), (232, 210, 150), (190, 225, 250)
    else:
        wall, floor, top = (16, 22, 58), (52, 52, 66), (40, 44, 90)
    shade = Image.linear_gradient("L").resize((size, size))
    scene = Image.composite(Image.new("RGBA", (size, size), wall), Image.new("RGBA", (size, size), top), shade)
    draw = ImageDraw.Draw(scene)
    draw.rectangle((0, horizon, size, size), fill=floor)
    if setting == "on the beach":
        draw.rectangle((0, horizon - size // 14, size, horizon), fill=(40, 110, 190))
    elif setting == "at night":
        moon = rng.uniform(0.1, 0.9) * size
        draw.ellipse((moon - size * 0.05, size * 0.08, moon + size * 0.05, size * 0.18), fill=(240, 240, 200))
    return scene


def _shadow(scene: Image.Image, centre_x: int, centre_y: int, side: int) -> None:
    shadow = Image.new("RGBA", scene.size, (0, 0, 0, 0))
    rx, ry = side * 0.34, side * 0.06
    ImageDraw.Draw(shadow).ellipse((centre_x - rx, centre_y - ry, centre_x + rx, centre_y + ry), (0, 0, 0, 90))
    scene.alpha_composite(shadow.filter(ImageFilter.GaussianBlur(max(1.0, side / 40))))


_OUTLINE = ROBOT_OUTLINE


def _canvas(side: int):
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))

    def box(x0, y0, x1, y1):
        return (x0 * side, y0 * side, x1 * side, y1 * side)

    return image, ImageDraw.Draw(image), box, max(1, side // 90)


def _draw_robot(side: int, colour: tuple) -> Image.Image:
    """The demo photos' robot in one colour all over, grey antenna, no star: the subject's two colours and star
    are never seen."""
    return draw_robot(side, head=colour, body=colour, antenna=(170, 170, 178, 255))


def _draw_car(side: int, colour: tuple) -> Image.Image:
    image, draw, box, line = _canvas(side)
    draw.polygon([(0.28 * side, 0.62 * side), (0.36 * side, 0.42 * side), (0.66 * side, 0.42 * side),
                  (0.76 * side, 0.62 * side)], fill=colour, outline=_OUTLINE, width=line)  # fmt: skip
    draw.polygon([(0.37 * side, 0.6 * side), (0.41 * side, 0.47 * side), (0.63 * side, 0.47 * side),
                  (0.69 * side, 0.6 * side)], fill=(200, 225, 240, 255))  # fmt: skip
    draw.rounded_rectangle(box(0.08, 0.6, 0.92, 0.82), side * 0.05, colour, _OUTLINE, line)
    draw.ellipse(box(0.86, 0.65, 0.92, 0.71), fill=(255, 240, 170, 255))
    for cx in (0.27, 0.73):
        draw.ellipse(box(cx - 0.1, 0.72, cx + 0.1, 0.92), fill=_OUTLINE)
        draw.ellipse(box(cx - 0.045, 0.775, cx + 0.045, 0.865), fill=(180, 180, 185, 255))
    return image


def _draw_house(side: int, colour: tuple) -> Image.Image:
    image, draw, box, line = _canvas(side)
    roof = (*(round(c * 0.55) for c in colour[:3]), 255)
    draw.rectangle(box(0.2, 0.45, 0.8, 0.92), fill=colour, outline=_OUTLINE, width=line)
    draw.polygon([(0.12 * side, 0.47 * side), (0.5 * side, 0.12 * side), (0.88 * side, 0.47 * side)],
                 fill=roof, outline=_OUTLINE, width=line)  # fmt: skip
    draw.rectangle(box(0.43, 0.66, 0.57, 0.92), fill=(110, 70, 40, 255), outline=_OUTLINE, width=line)
    for x0 in (0.26, 0.64):
        draw.rectangle(box(x0, 0.54, x0 + 0.1, 0.64), fill=(200, 230, 250, 255), outline=_OUTLINE, width=line)
    return image


def _draw_ball(side: int, colour: tuple) -> Image.Image:
    image, draw, box, line = _canvas(side)
    draw.ellipse(box(0.2, 0.32, 0.8, 0.92), fill=colour, outline=_OUTLINE, width=line)
    draw.chord(box(0.2, 0.32, 0.8, 0.92), 200, 340, fill=(250, 250, 250, 255), outline=_OUTLINE, width=line)
    draw.ellipse(box(0.33, 0.42, 0.43, 0.52), fill=(255, 255, 255, 200))
    return image


_DRAW = {"robot": _draw_robot, "car": _draw_car, "house": _draw_house, "ball": _draw_ball}
