"""The demo subject: a toy robot (teal head, red body, yellow star) photographed in rooms, drawn with PIL.

`lora-db demo-images DIR` writes its photos, so a demo and the tests train on a subject without downloading any."""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from lora_db.io import atomic_write

_WALL_FLOOR_COLOURS = (
    ((214, 228, 240), (170, 140, 110)),
    ((240, 226, 200), (120, 150, 120)),
    ((225, 215, 235), (150, 150, 160)),
    ((200, 230, 215), (190, 170, 140)),
    ((245, 240, 230), (110, 120, 140)),
    ((235, 210, 205), (160, 130, 100)),
)


_SUPERSAMPLE = 4


def make_demo_images(folder: str | Path, count: int = 5, size: int = 256, seed: int = 0) -> list[Path]:
    """Write `count` offline photos of one toy robot in varied poses and rooms: subject_00.png, ..."""
    rng = random.Random(seed)
    toy = draw_demo_toy(size * _SUPERSAMPLE)
    paths = []
    for number in range(count):
        image = _demo_scene(toy, size, rng)
        path = Path(folder) / f"subject_{number:02d}.png"
        paths.append(atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG")))
    return paths


def _demo_scene(toy: Image.Image, size: int, rng: random.Random) -> Image.Image:
    wall, floor = rng.choice(_WALL_FLOOR_COLOURS)
    horizon = round(size * rng.uniform(0.6, 0.72))
    scene = _background(size, wall, floor, horizon)
    toy_size = round(size * 0.62 * rng.uniform(0.82, 1.05))
    posed = toy.rotate(rng.uniform(-12.0, 12.0), resample=Image.Resampling.BICUBIC)
    posed = posed.resize((toy_size, toy_size), Image.Resampling.LANCZOS)
    left = round((size - toy_size) / 2 + size * rng.uniform(-0.12, 0.12))
    top = round(horizon - toy_size * 0.85 + size * rng.uniform(-0.04, 0.04))
    _draw_shadow(scene, left + toy_size // 2, top + round(toy_size * 0.93), toy_size)
    scene.alpha_composite(posed, (left, top))
    return scene.convert("RGB")


def _background(size: int, wall: tuple, floor: tuple, horizon: int) -> Image.Image:
    # A soft vertical shade on the wall keeps backgrounds from being flat fills the model could ignore.
    shade = Image.linear_gradient("L").resize((size, size))
    scene = Image.composite(Image.new("RGBA", (size, size), wall), Image.new("RGBA", (size, size), "white"), shade)
    ImageDraw.Draw(scene).rectangle((0, horizon, size, size), fill=floor)
    return scene


def _draw_shadow(scene: Image.Image, centre_x: int, centre_y: int, toy_size: int) -> None:
    shadow = Image.new("RGBA", scene.size, (0, 0, 0, 0))
    rx, ry = toy_size * 0.32, toy_size * 0.06
    ImageDraw.Draw(shadow).ellipse((centre_x - rx, centre_y - ry, centre_x + rx, centre_y + ry), (0, 0, 0, 90))
    scene.alpha_composite(shadow.filter(ImageFilter.GaussianBlur(max(1.0, toy_size / 40))))


ROBOT_OUTLINE = (40, 40, 50, 255)


def draw_robot(side: int, *, head: tuple, body: tuple, antenna: tuple, star: tuple | None = None) -> Image.Image:
    """The toy robot of the demo photos and of tiny-world's world, on a transparent square: antenna, arms (head
    colour), legs, body, head, eyes, mouth, and a star on its body when `star` is a colour."""
    robot = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(robot)

    def box(x0, y0, x1, y1):
        return (x0 * side, y0 * side, x1 * side, y1 * side)

    outline, line = ROBOT_OUTLINE, max(1, side // 90)
    draw.line(box(0.5, 0.13, 0.5, 0.24), fill=outline, width=line * 2)
    draw.ellipse(box(0.455, 0.07, 0.545, 0.16), fill=antenna, outline=outline, width=line)
    for x0 in (0.13, 0.77):
        draw.rounded_rectangle(box(x0, 0.54, x0 + 0.1, 0.76), side * 0.04, head, outline, line)
    for x0 in (0.3, 0.55):
        draw.rectangle(box(x0, 0.84, x0 + 0.15, 0.92), fill=outline)
    draw.rounded_rectangle(box(0.22, 0.5, 0.78, 0.87), side * 0.06, body, outline, line)
    draw.rounded_rectangle(box(0.27, 0.22, 0.73, 0.5), side * 0.06, head, outline, line)
    for cx in (0.4, 0.6):
        draw.ellipse(box(cx - 0.055, 0.3, cx + 0.055, 0.41), fill="white", outline=outline, width=line)
        draw.ellipse(box(cx - 0.022, 0.335, cx + 0.022, 0.38), fill=outline)
    draw.rounded_rectangle(box(0.42, 0.43, 0.58, 0.46), side * 0.01, outline)
    if star is not None:
        draw.polygon(_star(0.5 * side, 0.685 * side, 0.11 * side), fill=star, outline=outline)
    return robot


def draw_demo_toy(side: int) -> Image.Image:
    """A teal-headed, red-bodied robot with a yellow star: distinctive enough to recognise across photos."""
    teal, red, yellow = (31, 163, 163, 255), (232, 67, 46, 255), (255, 212, 0, 255)
    return draw_robot(side, head=teal, body=red, antenna=yellow, star=yellow)


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points
