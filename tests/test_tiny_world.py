"""tiny-world, the pretrained tiny UniDiffuser shipped with lora-db, and what DreamBooth does on it.

Subjects come from lora_db.synthetic.subjects: shapes and patterns the world never shows. The margins were measured
on the shipped weights (CPU, one thread, seeded); see the comments beside each.
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_db.config.train import TINY_WORLD_RECOMMENDED
from lora_db.models.loading import tiny_world_dir as asset_dir
from lora_db.synthetic.tiny_world import CLASS_PROMPT, SUBJECT_PROMPT, TEXT_LENGTH, build_clip_tokenizer, world_words
from lora_db.synthetic.world import SHAPES, make_world


def test_the_world_is_deterministic_and_every_word_is_one_token():
    first, second = make_world(6, seed=3), make_world(6, seed=3)
    assert [c for _, c in first] == [c for _, c in second]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(first, second, strict=True))
    assert [c for _, c in make_world(6, seed=4)] != [c for _, c in first]
    tokenizer = build_clip_tokenizer()
    for word in world_words():
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    captions = [c for _, c in make_world(400)]
    assert max(len(tokenizer(c).input_ids) for c in captions) <= TEXT_LENGTH
    assert len(tokenizer(SUBJECT_PROMPT).input_ids) > 6  # the identifier is rare: several byte tokens
    # The class word stands for every shape, so the class prompt is one the model was trained on.
    assert any(c.startswith("a photo of a toy") for c in captions)
    assert {shape for shape in SHAPES if any(f" {shape}" in c for c in captions)} == set(SHAPES)


@pytest.mark.slow
def test_a_small_build_is_deterministic_and_reports_its_vae_on_unseen_subjects(tmp_path):
    """Two builds with the same settings write the same weights, bit for bit (the judge trains in a second
    process); the report holds the VAE's round trip on the subject set."""
    import hashlib

    from lora_db.synthetic.tiny_world import BuildConfig, build

    small = {"world_size": 64, "vae_steps": 3, "vae_small_steps": 1, "vae_pool": 32, "clip_steps": 2,
             "uvit_steps": 2, "uvit_broad_pool": 32, "judge_steps": 2, "judge_pool": 32,
             "uvit_caption_batch": 2, "caption_steps": 2}  # fmt: skip
    digests = []
    for name in ("a", "b"):
        report = build(tmp_path / name, BuildConfig(**small))
        files = sorted((tmp_path / name).rglob("*.safetensors"))
        digests.append({f.relative_to(tmp_path / name): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1] and len(digests[0]) == 7  # five pipeline parts, clip/ and judge/
    assert set(report["vae_held_out_rms"]["per_subject"]) >= {"heart", "robot"}
    assert 0 < report["vae_held_out_rms"]["mean"] <= report["vae_held_out_rms"]["max"]


def test_clip_trained_in_the_second_process_is_the_clip_trained_here(tmp_path, one_thread):
    """The build hands the world to its second process, which trains CLIP there: the weights it hands back are
    those of training the same seeded CLIP on the same pictures, captions and labels in this process."""
    from safetensors.torch import load_file
    from tqdm import tqdm

    from lora_db.synthetic.contrastive import train_clip
    from lora_db.synthetic.tiny_world import BuildConfig, build, build_components, clip_tokens
    from lora_db.synthetic.world import make_scenes, scene_labels

    config = BuildConfig(world_size=48, vae_steps=1, vae_small_steps=1, vae_pool=16, clip_steps=4, uvit_steps=1,
                         uvit_broad_pool=16, judge_steps=1, judge_pool=16, caption_steps=1)  # fmt: skip
    build(tmp_path / "built", config)
    built = load_file(next((tmp_path / "built" / "clip").glob("*.safetensors")))

    parts, clip = build_components(config)
    world = make_scenes(config.world_size, config.seed)
    captions = [scene.caption for _, scene in world]
    pixels = parts["clip_image_processor"](images=[image for image, _ in world], return_tensors="pt")["pixel_values"]
    untrained = {name: tensor.clone() for name, tensor in clip.state_dict().items()}
    train_clip(clip, pixels, clip_tokens(parts["clip_tokenizer"], captions), captions, config,
               lambda steps: tqdm(range(steps), disable=True), scene_labels([scene for _, scene in world]))  # fmt: skip
    here = clip.state_dict()
    assert set(built) <= set(here)
    assert all(torch.equal(built[name], here[name]) for name in built)
    assert any(not torch.equal(built[name], untrained[name]) for name in built)  # it did train


@pytest.mark.slow
def test_clip_s_auxiliary_heads_teach_its_text_tower_the_shapes_and_are_off_by_default(one_thread):
    """Contrastive training alone leaves "a red star" and "a red disc" nearly one embedding (most captions differ in
    colour, pattern or place); the shape and colour heads pull them apart. At 0 the labels change nothing."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from lora_db.synthetic import tiny_world
    from lora_db.synthetic.contrastive import train_clip
    from lora_db.synthetic.world import make_scenes, scene_labels

    scenes = make_scenes(1024, 0)
    prompts = [f"a photo of a red {shape}" for shape in ("star", "disc", "ring", "cross")]

    def trained(weight: float, labels: bool):
        torch.manual_seed(0)
        config = tiny_world.BuildConfig(clip_steps=150, clip_batch=64, clip_aux_weight=weight)
        parts, clip = tiny_world.build_components(config)
        images, captions = [image for image, _ in scenes], [scene.caption for _, scene in scenes]
        pixels = parts["clip_image_processor"](images=images, return_tensors="pt")["pixel_values"]
        tokens = tiny_world.clip_tokens(parts["clip_tokenizer"], captions)
        given = scene_labels([scene for _, scene in scenes]) if labels else None
        train_clip(clip, pixels, tokens, captions, config, lambda steps: tqdm(range(steps), disable=True), given)
        with torch.no_grad():
            ids = tiny_world.clip_tokens(parts["clip_tokenizer"], prompts)
            text = F.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output), dim=-1)
        similarity = text @ text.T
        return clip, ((similarity.sum() - len(prompts)) / (len(prompts) * (len(prompts) - 1))).item()

    plain, plain_similarity = trained(0.0, labels=False)
    off, _ = trained(0.0, labels=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values(), strict=True))
    _, aux_similarity = trained(1.0, labels=True)
    assert plain_similarity > 0.95  # measured 0.991: the shapes' captions are one point to the text tower
    assert aux_similarity < plain_similarity - 0.2  # measured 0.617


def test_the_subject_set_shows_no_shape_of_the_world():
    from lora_db.synthetic.subjects import SUBJECTS, held_out_names

    words = set(world_words())
    for name in held_out_names():
        assert SUBJECTS[name].noun not in words, name
        assert set(SUBJECTS[name].describe_prompt.split()) <= words, name  # (b) is said in the world's words


@pytest.fixture(scope="module")
def world_pipe(one_thread):
    from lora_db.models.loading import load_pipeline

    pipe = load_pipeline("tiny-world")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_a_stock_diffusers_pipeline_with_a_derived_scaling_factor(one_thread):
    from diffusers import UniDiffuserPipeline

    from lora_db.images import to_tensor
    from lora_db.models.random import derive_scaling_factor

    pipe = UniDiffuserPipeline.from_pretrained(asset_dir(), use_safetensors=True)
    build = json.loads((asset_dir() / "build.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(build["scaling_factor"])
    pixels = torch.stack([to_tensor(image) for image, _ in make_world(64, seed=123)])
    # 1 / std of its latents on (unseen pictures of) its world: unit-variance latents, as SD's factor was derived.
    assert derive_scaling_factor(pipe.vae, pixels) == pytest.approx(pipe.vae.config.scaling_factor, rel=0.1)
    total = sum(p.stat().st_size for p in asset_dir().rglob("*.safetensors"))
    assert total < 40 * 2**20  # the limit for the package


def test_the_vae_draws_subjects_it_never_saw(world_pipe):
    """Round trip through the shipped VAE on the subject set (shapes, patterns and colour pairs neither its
    procedural training pictures nor the world draw); the first tiny-world's VAE scored 0.42-0.55 on such."""
    from lora_db.synthetic.subjects import subject_tensor
    from lora_db.synthetic.vae import round_trip_rms

    pixels, _ = subject_tensor()
    rms = round_trip_rms(world_pipe.vae, pixels)
    build = json.loads((asset_dir() / "build.json").read_text())
    assert rms.mean().item() == pytest.approx(build["vae_held_out_rms"]["mean"], abs=2e-3)  # what the build printed
    assert rms.mean().item() < VAE_RMS_MEAN and rms.max().item() < VAE_RMS_MAX, (rms.mean(), rms.max())


VAE_RMS_MEAN, VAE_RMS_MAX = 0.15, 0.3  # measured: see build.json's vae_held_out_rms


def test_captions_give_the_pictures_they_describe(world_pipe):
    """Prompt-dependent images: tiny-world's CLIP matches each sample to its own prompt among the others."""
    from lora_db.evaluation.metrics import ClipPair
    from lora_db.models.sampling import generate_images

    prompts = [
        "a photo of a red star on the beach",
        "a photo of a blue ring at night",
        "a photo of a yellow square with black stripes on grass",
    ]
    clip = ClipPair("tiny-world")
    correct = 0
    for prompt in prompts:
        images = generate_images(world_pipe, prompt, 2, seed=0, num_inference_steps=15)
        scores = {other: sum(clip.similarity(other, images)) for other in prompts}
        correct += max(scores, key=scores.get) == prompt
    assert correct == len(prompts)


def test_the_text_encoder_tells_apart_captions_that_differ_in_one_attribute(world_pipe):
    """What the U-ViT reads of a caption is the text encoder's hidden states: captions that differ only in the
    shape, the colour, the pattern or the place must not be one point to it. The second edition's were for the shape
    (cosine 0.996); heads for shape and colour alone then squeezed out the place (0.961)."""
    import torch.nn.functional as F

    from lora_db.synthetic.tiny_world import clip_tokens

    tokenizer = world_pipe.clip_tokenizer

    def spread(captions: list[str]) -> float:
        with torch.no_grad():
            hidden = F.normalize(world_pipe.text_encoder(clip_tokens(tokenizer, captions))[0].flatten(1), dim=-1)
        n = len(captions)
        return ((hidden @ hidden.T).sum().item() - n) / (n * (n - 1))  # mean cosine between different captions

    star = "a photo of a red star"
    groups = {
        "shape": [f"a photo of a red {shape} at night" for shape in ("star", "disc", "ring", "cross", "square")],
        "colour": [f"a photo of a {colour} star at night" for colour in ("red", "blue", "green", "yellow", "purple")],
        "pattern": [f"{star} with white {pattern} at night" for pattern in ("stripes", "checks", "dots")]
        + [f"{star} with a white letter at night", f"{star} at night"],
        "place": [f"{star} {place}" for place in ("in a room", "at night", "on snow", "on grass", "on yellow")],
    }
    spreads = {name: spread(captions) for name, captions in groups.items()}
    assert all(value < 0.9 for value in spreads.values()), spreads


def test_samples_show_the_place_and_the_colour_their_prompt_says(world_pipe):
    """Model-free, so the model is not its own judge: each sample's backdrop (a 4 x 4 grid of mean colours, the
    centre where the toy stands left out) is nearest the mean backdrop of world pictures of the place its prompt
    names, among seven places; the toy's colour (median of the centre) is nearest the colour its prompt names, among
    the world's sixteen. Chance is 1 in 7 and 1 in 16. Caption builds whose U-ViT trained 3000 steps beside its
    image-to-text examples scored 3 and 5 of 14 places."""
    import random

    import numpy as np

    from lora_db.models.sampling import generate_images
    from lora_db.synthetic.world import COLOURS, SHAPES, Scene, render

    def backdrop(image):
        cells = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(4, 16, 4, 16, 3).mean((1, 3))
        outside = np.ones((4, 4), bool)
        outside[1:3, 1:3] = False
        return cells[outside].ravel()

    def nearest(value, references):
        return min(references, key=lambda name: np.linalg.norm(value - np.asarray(references[name])))

    rng = random.Random(7)
    places = ("in a room", "on grass", "on the beach", "at night", "on snow", "on yellow", "on pink")
    references = {
        place: np.mean(
            [
                backdrop(render(Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), place=place), rng))
                for _ in range(24)
            ],
            axis=0,
        )
        for place in places
    }
    places_right = sum(
        nearest(backdrop(image), references) == place
        for place in places
        for image in generate_images(world_pipe, f"a photo of a toy {place}", 2, seed=0, num_inference_steps=15)
    )
    colours = ("red", "blue", "yellow", "green", "purple", "orange", "black")
    colours_right = sum(
        nearest(np.median(np.asarray(image, dtype=np.float32)[24:40, 24:40].reshape(-1, 3), axis=0), COLOURS) == colour
        for colour in colours
        for image in generate_images(
            world_pipe, f"a photo of a {colour} toy on white", 2, seed=0, num_inference_steps=15
        )
    )
    # the second edition (no caption stage): 9 and 14 of 14; the third: 13 and 14
    assert places_right >= 8 and colours_right >= 12, (places_right, colours_right)


def _write_photos(name: str, folder):
    from lora_db.synthetic.subjects import subject_photos

    folder.mkdir(parents=True, exist_ok=True)
    for n, photo in enumerate(subject_photos(name)):
        photo.save(folder / f"{name}-{n}.png")
    return folder


SUBJECT, OTHER = "heart", "arrow"  # two subjects of the set: shapes the world never shows


@pytest.fixture(scope="module")
def dreambooth_runs(tmp_path_factory, one_thread):
    """A LoRA run on an unseen subject, and one on another subject."""
    from lora_db.config.train import TrainConfig
    from lora_db.training.loop import train

    work = tmp_path_factory.mktemp("dreambooth")
    common = {
        "model": "tiny-world",
        "instance_prompt": SUBJECT_PROMPT,
        **TINY_WORLD_RECOMMENDED,
        "class_generation_steps": 15,
        "overwrite": True,
        "report_to": "none",
    }
    photos = _write_photos(SUBJECT, work / "photos")
    train(TrainConfig(output_dir=work / "plain", instance_dir=photos, **common))
    other = _write_photos(OTHER, work / "other-photos")
    train(TrainConfig(output_dir=work / "other", instance_dir=other, **common))
    return work


@pytest.mark.slow
def test_dreambooth_learns_an_unseen_subject_beyond_words_and_other_adapters(dreambooth_runs, one_thread):
    """The adapter beats (a) the base with the subject prompt, (b) the base with a describing prompt and (c) an
    adapter of another subject, by the judge (no part of the model) and by the model-free pixel score."""
    from lora_db.config.evaluate import EvalConfig
    from lora_db.evaluation.evaluate import evaluate
    from lora_db.synthetic.subjects import SUBJECTS

    work = dreambooth_runs
    config = EvalConfig(
        out=work / "eval",
        instance_dir=work / "photos",
        model="tiny-world",
        adapters=[str(work / name / "adapter.safetensors") for name in ("plain", "other")],
        prompts=[SUBJECT_PROMPT],
        describe=[SUBJECTS[SUBJECT].describe_prompt],
        class_prompt=CLASS_PROMPT,
        num_images=4,
        num_inference_steps=20,
        guidance_scale=3.0,
    )
    result = evaluate(config)
    assert result.judge["source"] == "model" and result.judge["path"].endswith("judge")  # not the model's CLIP
    rows = {row["label"]: row["prompts"][SUBJECT_PROMPT] for row in result.rows}
    classes = {row["label"]: row["class"] for row in result.rows}
    describe = result.standing[SUBJECT_PROMPT]["describe"]
    plain = rows["plain"]
    # Measured over the 12 held-out subjects (benchmarks/quality.py, guidance 3, these settings): the judge puts the
    # adapter above (a) by +0.542 (12/12), (b) by +0.066 (9/12) and (c) by +0.613 (12/12); the pixel score above
    # (a) by +0.059 (11/12), (b) by +0.076 (12/12) and (c) by +0.076 (12/12). Heart: judge 0.942 against (a) 0.506,
    # (b) 0.928, (c, the arrow's adapter) 0.500; pixel 0.881 against 0.820, 0.782, 0.753.
    for name, row in (("(a) base", rows["base"]), ("(b) words", describe), ("(c) other", rows["other"])):
        assert plain["dino"] > row["dino"] + (MARGIN_JUDGE_WORDS if row is describe else MARGIN_JUDGE), (
            name, plain["dino"], row["dino"])  # fmt: skip
        assert plain["pixel"] > row["pixel"] + MARGIN_PIXEL, (name, plain["pixel"], row["pixel"])
    assert 0 < classes["plain"]["prior_similarity"] < 1


MARGIN_JUDGE, MARGIN_JUDGE_WORDS, MARGIN_PIXEL = 0.3, 0.005, 0.03  # measured: see the comments in the test


def run_benchmark(name: str, args: str, out, work, monkeypatch) -> None:
    """benchmarks/NAME.py's main() with `args`, as its command line would run it."""
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args.split(), "--out", str(out), "--work", str(work)])
    module.main()


@pytest.mark.slow
def test_quality_benchmark_writes_table_chart_and_rows(tmp_path, monkeypatch, one_thread):
    args = (
        "--subjects heart,arrow --configs lora-r8-mlp-long,lora-r4-prior,full --steps 2 --num-images 2 "
        "--inference-steps 2 --class-images 2"
    )
    run_benchmark("quality", args, tmp_path, tmp_path, monkeypatch)
    results = json.loads((tmp_path / "quality.json").read_text())
    recommended = "lora-r8-mlp-long"
    assert results["subjects"] == ["heart", "arrow"] and results["configurations"] == [
        recommended,
        "lora-r4-prior",
        "full",
    ]
    rows = results["summary"]["rows"]
    assert list(rows) == [recommended, "lora-r4-prior", "full", "base", "describe", "other", "photos", "ceiling"]
    assert rows["full"]["trainable_parameters"] > 10 * rows[recommended]["trainable_parameters"]
    for subject, scores in results["per_subject"].items():
        assert scores["other_subject"] != subject  # (c) is another subject's adapter
        for key in (recommended, "full", "base", "describe", "other", "photos", "ceiling"):
            assert -1 <= scores[key]["judge"] <= 1 and -1 <= scores[key]["pixel"] <= 1, (subject, key)
        assert scores["base"]["prior_similarity"] == pytest.approx(1.0)
    margins = results["summary"]["margins"]
    assert set(margins) == {f"{b}/{m}" for b in ("base", "describe", "other") for m in ("judge", "pixel")}
    text = (tmp_path / "quality.md").read_text()
    assert "| LoRA rank 4 + prior preservation |" in text and "(b) base model, describing prompt" in text
    assert (tmp_path / "quality.png").is_file()


@pytest.mark.slow
def test_quality_benchmark_takes_baseline_c_from_the_row_given(tmp_path, monkeypatch, one_thread):
    """--other-from lora-r4: (c) is the next subject's rank-4 adapter and the 1200-step row is not trained; a second
    row is compared with the first subject by subject."""
    args = (
        "--subjects heart,arrow --configs lora-r4,lora-r4-ema --other-from lora-r4 --steps 2 --num-images 2 "
        "--inference-steps 2"
    )
    run_benchmark("quality", args, tmp_path, tmp_path, monkeypatch)
    results = json.loads((tmp_path / "quality.json").read_text())
    assert results["configurations"] == ["lora-r4", "lora-r4-ema"]
    assert not (tmp_path / "heart" / "lora-r8-mlp-long").exists()
    for subject, other in (("heart", "arrow"), ("arrow", "heart")):
        copied = (tmp_path / subject / "other-subject.safetensors").read_bytes()
        assert copied == (tmp_path / other / "lora-r4" / "adapter.safetensors").read_bytes()
    scores = results["per_subject"].values()
    margins = results["summary"]["row_margins"]["lora-r4"]
    assert margins["other/judge"]["mean"] == pytest.approx(
        sum(s["lora-r4"]["judge"] - s["other"]["judge"] for s in scores) / 2
    )
    assert results["summary"]["margins"] == {}  # the recommended row's own table needs that row
    text = (tmp_path / "quality.md").read_text()
    assert "(c) the next subject's lora-r4 adapter" in text
    ema_minus_plain = sum(s["lora-r4-ema"]["judge"] - s["lora-r4"]["judge"] for s in scores) / 2
    paired = text.split("Each row minus LoRA rank 4, per subject")[1]
    assert f"| {ema_minus_plain:+.3f} (" in paired.split("| LoRA rank 4 + EMA of the weights (decay 0.995) ")[1]


@pytest.mark.slow
def test_qlora_quality_benchmark_scores_each_adapter_on_both_bases(tmp_path, monkeypatch, one_thread):
    args = "--seeds 0,1 --kinds bf16,nf4 --steps 3 --num-images 1 --inference-steps 2"
    run_benchmark("qlora_quality", args, tmp_path, tmp_path / "w", monkeypatch)
    rows = json.loads((tmp_path / "qlora-quality.json").read_text())["rows"]
    assert [(r["kind"], r["seed"]) for r in rows] == [("bf16", 0), ("nf4", 0), ("bf16", 1), ("nf4", 1)]
    assert all(-1 <= r["judge"] <= 1 and -1 <= r["judge_full_base"] <= 1 for r in rows)
    assert all(r["judge"] == r["judge_full_base"] for r in rows if r["kind"] == "bf16")
    nf4 = [r for r in rows if r["kind"] == "nf4"]
    assert all(r["judge"] != r["judge_full_base"] for r in nf4)  # sampled on two different bases
    assert "| nf4 |" in (tmp_path / "qlora-quality.md").read_text()


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory, one_thread):
    """The same DreamBooth run (bf16 compute) on the bf16 base and on the NF4 base."""
    from lora_db.config.train import TrainConfig
    from lora_db.training.loop import train

    work = tmp_path_factory.mktemp("qlora")
    _write_photos(SUBJECT, work / "photos")
    common = {
        "model": "tiny-world",
        "instance_dir": work / "photos",
        "instance_prompt": SUBJECT_PROMPT,
        **TINY_WORLD_RECOMMENDED,
        "mixed_precision": "bf16",
        "overwrite": True,
    }
    for kind in ("none", "nf4"):
        train(TrainConfig(output_dir=work / kind, quantize_base=kind, **common))
    return work


def _subject_fidelity(work, adapter, quantize_base: str) -> float:
    """The judge's score of four samples of the subject prompt, from the adapter on the base it was trained on."""
    from lora_db.adapters.hotswap import load_pipeline
    from lora_db.evaluation.judge import load_model_judge
    from lora_db.evaluation.metrics import TrainingEval
    from lora_db.images import find_images, load_image

    pipe = load_pipeline("tiny-world", [adapter] if adapter else [], quantize_base=quantize_base)
    pipe.set_progress_bar_config(disable=True)
    photos = [load_image(p) for p in find_images(work / "photos")]
    score = TrainingEval(
        pipe,
        photos,
        SUBJECT_PROMPT,
        None,
        judge=load_model_judge("tiny-world", pipe),
        num_images=4,
        seed=0,
        num_inference_steps=15,
    )
    return score(0)["eval/dino"]


@pytest.mark.slow
def test_an_nf4_trained_adapter_learns_the_subject_as_well_as_a_bf16_trained_one(qlora_runs):
    """QLoRA on tiny-world: each adapter sampled on the base it was trained on (`sample --quantize-base nf4`, or
    `merge --dequantized-base`, which computes the same)."""
    work = qlora_runs
    bf16 = _subject_fidelity(work, work / "none" / "adapter.safetensors", "none")
    nf4 = _subject_fidelity(work, work / "nf4" / "adapter.safetensors", "nf4")
    nf4_base = _subject_fidelity(work, None, "nf4")
    # Measured on this edition (benchmarks/qlora_quality.py, CPU, one thread, training seeds 0-4, the judge):
    # bf16 0.838 0.854 0.743 0.846 0.792, nf4 0.784 0.768 0.888 0.758 0.805 (mean -0.014); this test trains with
    # seed 0.
    assert nf4 > bf16 - MARGIN_QLORA, (nf4, bf16)
    assert nf4 > nf4_base + MARGIN_JUDGE / 2, (nf4, nf4_base)


MARGIN_QLORA = 0.1
