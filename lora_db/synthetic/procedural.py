"""A broad procedural picture distribution for training tiny-world's VAE and its judge.

tiny-world's first VAE learned robots, cars, houses and balls in six colours and decoded nothing else (a star,
a checkered square or a teal background came back as blobs, round-trip RMS 0.42-0.55). A decoder can only
draw what it was trained on, so this generator covers what a user may bring rather than one world:

- colours anywhere in HSV (hue, saturation and value drawn independently, with extra weight on the saturated
  and the near-grey ends, where flat-shaded subjects live);
- shapes: regular and irregular polygons (3-8 sides), stars (4-8 points), discs and ellipses, rings, crosses,
  and glyphs (letters and digits in PIL's default font), optionally outlined, rotated at any angle;
- fills: solid, stripes, checks, dots, linear gradients, smooth noise and fine-grain noise;
- one to several objects on a plain, split (two-tone), gradient or textured background.

Everything is drawn at `SUPERSAMPLE` times the size and reduced with a box filter, which anti-aliases edges the
way a camera (and the subject photos) would. Picture `index` of seed `seed` is a pure function of the two, so
a training run can draw pictures on the fly or cache a pool and stay deterministic.

The DreamBooth benchmark subjects (subjects.py) come from a different generator with shapes and patterns this
one never draws (hearts, crescents, arrows, zigzags, ...), so a round trip on them measures generalisation.
"""

from __future__ import annotations

import colorsys
import functools
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 256 px for 64 px pictures; 4x4 box averaging anti-aliases every edge
SHAPES = ("polygon", "star", "disc", "ring", "cross", "glyph")
FILLS = ("solid", "stripes", "checks", "dots", "gradient", "smooth_noise", "grain")
BACKGROUNDS = ("plain", "split", "gradient", "textured")
GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrtwy0123456789&#?@%"

_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def glyph_font(size: int) -> ImageFont.FreeTypeFont:
    """PIL's bundled font (no file on disk needed), cached per size: loading one costs about 1 ms."""
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


# -- colours --------------------------------------------------------------------------------------------------------


def random_colour(rng: random.Random) -> np.ndarray:
    """An RGB colour in [0, 255] (float32), uniform in hue, with saturation and value pushed towards the ends.

    Uniform HSV rarely gives pure black, white or fully saturated colours, which are exactly what flat
    subjects (a magenta star, a cyan wall) are made of, so a third of the draws snap to an end.
    """
    hue = rng.random()
    saturation = rng.choice((rng.random(), 1.0, rng.uniform(0.0, 0.15), rng.uniform(0.6, 1.0)))
    value = rng.choice((rng.random(), 1.0, rng.uniform(0.0, 0.2), rng.uniform(0.6, 1.0)))
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255.0


def contrasting_colour(rng: random.Random, other: np.ndarray) -> np.ndarray:
    """A random colour at least a little apart from `other`, so that a pattern or an object is visible."""
    for _ in range(8):
        colour = random_colour(rng)
        if np.abs(colour - other).sum() > 90:
            return colour
    return colour


# -- fills: an (H, W, 3) float array for any region ----------------------------------------------------------------


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def coordinates(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by `angle`: u runs along the pattern direction, v across it."""
    y, x = _grid(size)
    cos, sin = math.cos(angle), math.sin(angle)
    return x * cos + y * sin, -x * sin + y * cos


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(c + 0.5) for c in colour)


def mix_colours(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> Image.Image:
    """Colour a where t is 0, b where t is 1: PIL's uint8 compositing, ~10x faster than float numpy at 256 px."""
    size = t.shape[::-1]
    weight = Image.fromarray((t * 255.0 + 0.5).astype(np.uint8), mode="L")
    return Image.composite(Image.new("RGB", size, _rgb(b)), Image.new("RGB", size, _rgb(a)), weight)


def random_fill(rng: random.Random, size: int, kind: str | None = None, base: np.ndarray | None = None) -> Image.Image:
    """A patterned size x size RGB image: `kind` from FILLS (random when None), periods relative to `size`.

    Periods stay at or above about 3 output pixels: finer ones alias to mush at 64 px, and neither a VAE nor a
    viewer can tell them from noise (which `grain` covers).
    """
    kind = kind or rng.choice(FILLS)
    a = random_colour(rng) if base is None else base
    b = contrasting_colour(rng, a)
    if kind == "solid":
        return Image.new("RGB", (size, size), _rgb(a))
    angle = rng.uniform(0.0, math.pi)
    period = size * rng.uniform(0.05, 0.25)
    if kind == "stripes":
        u, _ = coordinates(size, angle)
        return mix_colours(a, b, (((u / period) % 1.0) < rng.uniform(0.3, 0.7)).astype(np.float32))
    if kind == "checks":
        u, v = coordinates(size, rng.choice((0.0, 0.0, math.pi / 4, angle)))
        return mix_colours(a, b, ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32))
    if kind == "dots":
        u, v = coordinates(size, rng.choice((0.0, angle)))
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return mix_colours(a, b, (du * du + dv * dv < rng.uniform(0.04, 0.2)).astype(np.float32))
    if kind == "gradient":
        u, _ = coordinates(size, rng.uniform(0.0, 2 * math.pi))
        low, high = u.min(), u.max()
        return mix_colours(a, b, (u - low) / max(high - low, 1.0))
    if kind == "smooth_noise":
        cells = rng.choice((2, 3, 4, 6, 8))
        grid = np.random.default_rng(rng.getrandbits(32)).random((cells, cells)).astype(np.float32)
        t = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC))
        return mix_colours(a, b, np.clip(t, 0.0, 1.0))
    # grain: per-pixel noise around one colour (grey or coloured), drawn at output resolution so that the box
    # filter keeps it
    noise_rng = np.random.default_rng(rng.getrandbits(32))
    small = size // SUPERSAMPLE
    grain = noise_rng.normal(0.0, rng.uniform(8.0, 40.0), (small, small, 3 if rng.random() < 0.5 else 1))
    pixels = np.clip(a[None, None, :] + grain + 0.5, 0.0, 255.0).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB").resize((size, size), Image.Resampling.NEAREST)


# -- shapes: an L mask at the supersampled size ---------------------------------------------------------------------


def regular_polygon(cx, cy, radius, sides, rotation, jitter, rng) -> list[tuple[float, float]]:
    points = []
    for k in range(sides):
        angle = rotation + 2 * math.pi * k / sides
        r = radius * (1.0 + rng.uniform(-jitter, jitter))
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def star_points(cx, cy, radius, points, inner, rotation) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = radius if k % 2 == 0 else radius * inner
        angle = rotation + math.pi * k / points
        out.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return out


def rotate_points(points, cx, cy, angle) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in points]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, rng: random.Random,
               fill: int = 255) -> None:  # fmt: skip
    """Draw shape `kind` centred at (cx, cy) with outer radius `radius` into an L image, value `fill`."""
    rotation = rng.uniform(0.0, 2 * math.pi)
    if kind == "polygon":
        sides = rng.randint(3, 8)
        draw.polygon(regular_polygon(cx, cy, radius, sides, rotation, rng.choice((0.0, 0.0, 0.25)), rng), fill=fill)
    elif kind == "star":
        points = rng.randint(4, 8)
        draw.polygon(star_points(cx, cy, radius, points, rng.uniform(0.35, 0.6), rotation), fill=fill)
    elif kind == "disc":
        ry = radius * rng.choice((1.0, rng.uniform(0.5, 1.0)))
        box = [(cx - radius, cy - ry), (cx + radius, cy + ry)]
        draw.ellipse(box, fill=fill)
    elif kind == "ring":
        ry = radius * rng.choice((1.0, rng.uniform(0.6, 1.0)))
        width = max(2, round(radius * rng.uniform(0.15, 0.5)))
        draw.ellipse([(cx - radius, cy - ry), (cx + radius, cy + ry)], outline=fill, width=width)
    elif kind == "cross":
        arm = radius * rng.uniform(0.18, 0.4)
        plus = [(-arm, -radius), (arm, -radius), (arm, -arm), (radius, -arm), (radius, arm), (arm, arm),
                (arm, radius), (-arm, radius), (-arm, arm), (-radius, arm), (-radius, -arm), (-arm, -arm)]  # fmt: skip
        draw.polygon(rotate_points([(cx + x, cy + y) for x, y in plus], cx, cy, rotation), fill=fill)
    else:  # glyph: drawn upright on its own canvas, then rotated a little and pasted
        font = glyph_font(max(8, round(radius * 2.2)))
        text = rng.choice(GLYPHS)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        side = round(max(right - left, bottom - top) * 1.5) + 2
        glyph = Image.new("L", (side, side), 0)
        ImageDraw.Draw(glyph).text(((side - right - left) / 2, (side - bottom - top) / 2), text, fill=fill,
                                   font=font)  # fmt: skip
        glyph = glyph.rotate(rng.uniform(-40.0, 40.0), resample=Image.Resampling.BILINEAR)
        draw._image.paste(glyph, (round(cx - side / 2), round(cy - side / 2)), glyph)


# -- backgrounds and scenes -----------------------------------------------------------------------------------------


def random_background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.choices(BACKGROUNDS, weights=(3, 3, 2, 2))[0]
    if kind == "plain":
        return random_fill(rng, size, "solid")
    if kind == "gradient":
        return random_fill(rng, size, "gradient")
    if kind == "textured":
        return random_fill(rng, size, rng.choice(FILLS[1:]))
    # split: two tones along a line; horizontal most often, as a wall and a floor
    a, b = random_colour(rng), random_colour(rng)
    angle = rng.choice((math.pi / 2, math.pi / 2, rng.uniform(0.0, math.pi)))
    u, _ = coordinates(size, angle)
    offset = np.quantile(u, rng.uniform(0.3, 0.8))
    upper = random_fill(rng, size, rng.choice(("solid", "solid", "gradient")), base=a)
    lower = random_fill(rng, size, rng.choice(("solid", "solid", "gradient", "smooth_noise")), base=b)
    below = Image.fromarray(((u > offset) * 255).astype(np.uint8), mode="L")
    return Image.composite(lower, upper, below)


def render(rng: random.Random, size: int = IMAGE_SIZE, extra_backgrounds: list[random.Random] = ()) -> Image.Image:
    """One picture: a background and one to five objects, each a filled shape, sometimes outlined.

    With `extra_backgrounds`, the same objects are also drawn on one more background per generator, and a list
    comes back: the judge's "same objects, other setting" views. The first picture does not depend on them.
    """
    big = size * SUPERSAMPLE
    canvases = [random_background(rng, big)]
    canvases += [random_background(other, big) for other in extra_backgrounds]
    count = rng.choices((1, 2, 3, 4, 5), weights=(4, 3, 2, 1, 1))[0]
    for _ in range(count):
        kind = rng.choice(SHAPES)
        radius = big * rng.uniform(0.08, 0.45) / (1.0 + 0.25 * (count - 1))
        cx, cy = rng.uniform(0.1, 0.9) * big, rng.uniform(0.1, 0.9) * big
        mask = Image.new("L", (big, big), 0)
        seed = rng.getrandbits(32)
        draw_shape(ImageDraw.Draw(mask), kind, cx, cy, radius, random.Random(seed))
        fill = random_fill(rng, big, rng.choices(FILLS, weights=(6, 2, 2, 2, 2, 1, 1))[0])
        if rng.random() < 0.3:  # an outline: the same shape grown by a few pixels, in its own colour
            grown = Image.new("L", (big, big), 0)
            draw_shape(ImageDraw.Draw(grown), kind, cx, cy, radius + rng.uniform(4, 12), random.Random(seed))
            colour = _rgb(random_colour(rng))
            for canvas in canvases:
                canvas.paste(colour, (0, 0, big, big), grown)
        for canvas in canvases:
            canvas.paste(fill, (0, 0), mask)
    pictures = [canvas.reduce(SUPERSAMPLE) for canvas in canvases]
    return pictures if extra_backgrounds else pictures[0]


def picture(seed: int, index: int, size: int = IMAGE_SIZE) -> Image.Image:
    """Picture `index` of the stream `seed`: independent of every other index, so pools can be drawn in any order."""
    return render(random.Random(seed * 1_000_003 + index), size)


def picture_pair(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[Image.Image, Image.Image]:
    """Picture `index` of stream `seed` and the same objects on another background (for self-supervision)."""
    first, second = render(random.Random(seed * 1_000_003 + index), size, [random.Random(~(seed * 1_000_003 + index))])
    return first, second


# -- tensors --------------------------------------------------------------------------------------------------------


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1], as lora_db.data.to_tensor and the VAE expect."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] back to a PIL picture."""
    array = ((pixels.permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB")


def pictures(seed: int, start: int, count: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Pictures start..start+count-1 of stream `seed` as an (N, 3, size, size) tensor in [-1, 1]."""
    return torch.stack([to_tensor(picture(seed, index, size)) for index in range(start, start + count)])


def pool_uint8(seed: int, count: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A cached pool as (N, 3, size, size) uint8: a quarter of float32's memory (20 000 pictures: 245 MB)."""
    arrays = [np.asarray(picture(seed, index, size), dtype=np.uint8) for index in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def uint8_to_unit(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1.0


def batches(seed: int, batch_size: int, size: int = IMAGE_SIZE) -> Iterator[torch.Tensor]:
    """An endless stream of fresh (batch_size, 3, size, size) batches in [-1, 1], deterministic from `seed`."""
    start = 0
    while True:
        yield pictures(seed, start, batch_size, size)
        start += batch_size


def contact_sheet(images: list[Image.Image], columns: int = 8, scale: int = 2) -> Image.Image:
    """The pictures in a grid, enlarged `scale` times (nearest), for looking at the distribution."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width * scale, rows * height * scale), "white")
    for n, image in enumerate(images):
        tile = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)
        sheet.paste(tile, ((n % columns) * width * scale, (n // columns) * height * scale))
    return sheet


if __name__ == "__main__":
    import sys
    import time

    started = time.perf_counter()
    sample = [picture(0, n) for n in range(64)]
    print(f"{(time.perf_counter() - started) / 64 * 1000:.1f} ms per picture")
    contact_sheet(sample).save(sys.argv[1] if len(sys.argv) > 1 else "procedural_sheet.png")
