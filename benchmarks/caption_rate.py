"""How often `lora-db caption`'s image-to-text pass names the object and the colour of tiny-world's own pictures.

    taskset -c 1 python benchmarks/caption_rate.py                      # 50 held-out pictures of tiny-world
    python benchmarks/caption_rate.py --guidance-scales 1,2,3,5,8        # the rate at each guidance scale
    python benchmarks/caption_rate.py --model thu-ml/unidiffuser-v1 --count 50

The pictures are the world's (lora_db.synthetic.world: a shape in a colour, maybe a pattern, in a setting), drawn
from a seed the build never used (the build draws its world from seed 0), so none was trained on. Each is captioned
as `lora-db caption` does (`generate_captions`, one seed, 25 steps); a caption counts when it holds the picture's
colour word followed by its shape word ("a photo of a red star ..."; a pattern's or a backdrop's colour does not
count). Unreadable captions (control characters, undecodable bytes) count as misses and are shown escaped.
Results go to OUT/caption_rate.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELD_OUT_SEED = 12345


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-world")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--guidance-scales", type=lambda text: [float(v) for v in text.split(",")], default=[8.0],
        help="comma-separated; the first is the headline (8: lora-db caption's default)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from lora_db.adapters.caption import caption_text
    from lora_db.models.loading import load_pipeline
    from lora_db.models.sampling import generate_captions
    from lora_db.synthetic.world import random_scene, render

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(HELD_OUT_SEED)
    pictures = []
    for _ in range(args.count):
        scene = random_scene(rng)
        pictures.append((scene, render(scene, rng)))
    world_model = args.model.startswith("tiny-world") or (Path(args.model) / "judge").is_dir()
    sampled = []  # the text latents the U-ViT sampled, as the pipeline hands them to the decoder
    decode = pipe.decode_text_latents

    def keep_and_decode(latents, device):
        sampled.append(latents.detach().cpu())
        return decode(latents, device)

    pipe.decode_text_latents = keep_and_decode
    sweeps = []
    for guidance in args.guidance_scales:
        rows = []
        for number, (scene, picture) in enumerate(pictures):
            sampled.clear()
            (text,) = generate_captions(
                pipe, picture, 1, seed=0, num_inference_steps=args.steps, guidance_scale=guidance
            )
            words = text.lower().replace(",", " ").split()
            readable = caption_text(text, None) is not None
            # the object's colour and shape, said together: a pattern's or a backdrop's colour does not count
            named = readable and (scene.colour, scene.shape) in itertools.pairwise(words)
            nearest = _nearest(pipe, scene, sampled[-1]) if world_model else None
            rows.append({"picture": number, "shape": scene.shape, "colour": scene.colour, "caption": text,
                         "readable": readable, "names_both": named, "latent_nearest": nearest})  # fmt: skip
        sweeps.append({
            "guidance_scale": guidance,
            "names_shape_and_colour": sum(r["names_both"] for r in rows) / len(rows),
            "names_colour": sum(_said(r, r["colour"], 4) for r in rows) / len(rows),
            "names_shape": sum(_said(r, r["shape"], 5) for r in rows) / len(rows),
            "readable": sum(r["readable"] for r in rows),
            "latent_nearest_right": (sum(r["latent_nearest"] == [r["colour"], r["shape"]] for r in rows) / len(rows)
                                     if world_model else None),
            "rows": rows,
        })  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    first = sweeps[0]
    summary = {"model": args.model, "pictures": args.count, "steps": args.steps, "seed": 0,
               "names_shape_and_colour": first["names_shape_and_colour"], "readable": first["readable"]}  # fmt: skip
    (args.out / "caption_rate.json").write_text(json.dumps({**summary, "guidance": sweeps}, indent=1) + "\n")
    lines = [
        f"{args.model}: {first['names_shape_and_colour']:.0%} of {args.count} held-out world pictures captioned with "
        f"their colour and shape at `lora-db caption`'s settings (guidance {first['guidance_scale']:g}, "
        f"{args.steps} steps); {first['readable']} captions readable.",
        "",
        "| guidance | colour and shape | colour | shape | readable | latent nearest right |",
        "|---|---|---|---|---|---|",
        *(f"| {s['guidance_scale']:g} | {s['names_shape_and_colour']:.0%} | {s['names_colour']:.0%} | "
          f"{s['names_shape']:.0%} | {s['readable']} | "
          f"{_percent(s['latent_nearest_right'])} |" for s in sweeps),
        "",
        f"Captions at guidance {first['guidance_scale']:g}:",
        "",
        "| picture | shape | colour | caption |",
        "|---|---|---|---|",
        *(f"| {r['picture']} | {r['shape']} | {r['colour']} | {r['caption'][:70]!r} |" for r in first["rows"][:12]),
    ]  # fmt: skip
    (args.out / "caption_rate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _said(row: dict, word: str, position: int) -> bool:
    """The word where the world's captions put it ("a photo of a red star ...": colour 5th, shape 6th word)."""
    words = row["caption"].lower().replace(",", " ").split()
    return row["readable"] and len(words) > position and words[position] == word


def _nearest(pipe, scene, latents) -> list[str]:
    """The colour and shape of the clean caption latent nearest the sampled one, among the picture's whole caption
    with each of the world's colours and shapes put in."""
    import torch

    from lora_db.synthetic.tiny_world import clip_tokens
    from lora_db.synthetic.world import COLOURS, SHAPES, full_caption

    options = list(itertools.product(COLOURS, SHAPES))
    captions = [full_caption(replace(scene, colour=colour, shape=shape)) for colour, shape in options]
    with torch.no_grad():
        clean = pipe.text_decoder.encode(pipe.text_encoder(clip_tokens(pipe.clip_tokenizer, captions))[0]).flatten(1)
    distance = (clean - latents.flatten(1).to(clean.dtype)).pow(2).sum(1)
    return list(options[int(distance.argmin())])


if __name__ == "__main__":
    main()
