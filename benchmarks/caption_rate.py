"""How often `lora-db caption`'s image-to-text pass names the object and the colour of tiny-world's own pictures.

    taskset -c 1 python benchmarks/caption_rate.py                      # 50 held-out pictures of tiny-world
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELD_OUT_SEED = 12345


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-world")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from lora_db.adapters.caption import caption_text
    from lora_db.models.loading import load_pipeline
    from lora_db.models.sampling import generate_captions
    from lora_db.synthetic.world import random_scene, render

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(HELD_OUT_SEED)
    rows = []
    for number in range(args.count):
        scene = random_scene(rng)
        picture = render(scene, rng)
        (text,) = generate_captions(pipe, picture, 1, seed=0, num_inference_steps=args.steps)
        words = text.lower().replace(",", " ").split()
        readable = caption_text(text, None) is not None
        # the object's colour and shape, said together: a pattern's or a backdrop's colour does not count
        named = readable and (scene.colour, scene.shape) in itertools.pairwise(words)
        rows.append({"picture": number, "shape": scene.shape, "colour": scene.colour, "caption": text,
                     "readable": readable, "names_both": named})  # fmt: skip
    rate = sum(row["names_both"] for row in rows) / len(rows)
    readable = sum(row["readable"] for row in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model, "pictures": len(rows), "names_shape_and_colour": rate, "readable": readable}
    (args.out / "caption_rate.json").write_text(json.dumps({**summary, "rows": rows}, indent=1) + "\n")
    lines = [
        f"{args.model}: {rate:.0%} of {len(rows)} held-out world pictures captioned with their shape and colour; "
        f"{readable} captions readable.",
        "",
        "| picture | shape | colour | caption |",
        "|---|---|---|---|",
        *(f"| {r['picture']} | {r['shape']} | {r['colour']} | {r['caption'][:60]!r} |" for r in rows[:10]),
    ]
    (args.out / "caption_rate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
