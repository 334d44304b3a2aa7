"""`lora-db eval` on the tiny random model: the metrics' definitions, the outputs, run folders, determinism, errors;
the judge (a random ViT in a copy of tiny-world), subject and control prompts, the reference rows, the plot.

Whether the metrics show learning is tested on the pretrained tiny-world (tests/test_tiny_world.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import assert_one_line_error, run_cli

from lora_db.evaluation.metrics import (
    clip_t_text,
    identifier_of,
    is_subject_prompt,
    mean_cross_similarity,
    mean_pairwise_distance,
    nearest_pixel_similarity,
    paired_similarity,
    pixel_similarity,
    pixel_thumbnails,
)


def test_metric_definitions_on_known_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    assert mean_cross_similarity(a, b) == pytest.approx(2**-0.5)
    assert mean_pairwise_distance(a) == pytest.approx(1.0)  # orthogonal: distance 1
    assert mean_pairwise_distance(torch.cat([b, b, b])) == pytest.approx(0.0, abs=1e-6)
    assert paired_similarity(a, a.flip(0)) == pytest.approx(0.0)
    assert paired_similarity(a, a) == pytest.approx(1.0)
    assert clip_t_text("a photo of sks robot, sksx", ["sks"]) == "a photo of a robot, sksx"
    assert clip_t_text("a photo of sks robot", []) == "a photo of sks robot"
    assert clip_t_text("a photo of sks robot and zwx dog", ["sks", "zwx"]) == "a photo of a robot and a dog"


def test_pixel_similarity_is_one_minus_half_the_rms_and_prefers_a_near_copy(instance_dir):
    from PIL import Image, ImageDraw

    from lora_db.images import find_images, load_image

    black, white, grey = (Image.new("RGB", (32, 32), c) for c in ("black", "white", (128, 128, 128)))
    similarity = pixel_similarity(pixel_thumbnails([black]), pixel_thumbnails([white, black, grey]))
    assert similarity.tolist()[0] == pytest.approx([0.0, 1.0, 0.5], abs=3e-3)  # RMS 2, 0 and about 1 on [-1, 1]
    photos = [load_image(path) for path in find_images(instance_dir)]
    near_copy = photos[2].copy()
    ImageDraw.Draw(near_copy).rectangle((0, 0, 4, 4), fill="black")  # one photo with a corner blacked out
    other_subject = Image.new("RGB", photos[2].size, (40, 90, 200))
    ImageDraw.Draw(other_subject).ellipse((20, 20, 70, 70), fill=(250, 220, 30))  # a yellow disc on blue
    reference = pixel_thumbnails(photos)
    copy_score = nearest_pixel_similarity(pixel_thumbnails([near_copy]), reference)
    assert copy_score > nearest_pixel_similarity(pixel_thumbnails([other_subject]), reference) + 0.1
    # Nearest, not mean: a copy of one photo scores as that photo, though the subject moves in the others.
    assert copy_score > pixel_similarity(pixel_thumbnails([near_copy]), reference).mean().item() + 0.01
    assert copy_score > 0.95


def test_subject_prompts_are_those_naming_the_identifier():
    from lora_db.adapters.spec import AdapterFile
    from lora_db.errors import LoraDBError
    from lora_db.evaluation.evaluate import split_prompts, subject_identifiers

    assert identifier_of("a photo of sks robot", "a photo of a robot") == "sks"
    assert identifier_of("a photo of sks robot", "") is None  # nothing to compare with
    assert identifier_of("a photo of sks red robot", "a photo of a robot") is None  # two words: which one?

    def adapter(instance_prompt, class_prompt=""):
        metadata = {"instance_prompt": instance_prompt, "class_prompt": class_prompt}
        return AdapterFile(path=None, tensors={}, specs={}, metadata=metadata)

    inferred = subject_identifiers(None, [adapter("a photo of sks robot", "a photo of a robot")], None)
    assert inferred == ["sks"]
    # An adapter trained without a class prompt: eval's --class-prompt is what the instance prompt is compared with.
    assert subject_identifiers(None, [adapter("a photo of zwx dog")], "a photo of a dog") == ["zwx"]
    assert subject_identifiers("ohwx", [adapter("a photo of sks robot", "a photo of a robot")], None) == ["ohwx"]
    prompts = ["a photo of sks robot", "a photo of a red car", "sks robot on the beach"]
    assert split_prompts(prompts, ["sks"], False) == ([prompts[0], prompts[2]], [prompts[1]])
    assert all(is_subject_prompt(p, []) for p in prompts)  # no identifier known: every prompt is a subject prompt
    with pytest.raises(LoraDBError, match="no --prompt contains the identifier ohwx"):
        split_prompts(prompts, ["ohwx"], True)


@pytest.fixture(scope="module")
def tiny_run(instance_dir, tmp_path_factory, one_thread):
    from lora_db.config.train import TrainConfig
    from lora_db.training.loop import train

    out = tmp_path_factory.mktemp("run") / "robot"
    config = TrainConfig(
        model="tiny",
        instance_dir=instance_dir,
        instance_prompt="a photo of sks robot",
        output_dir=out,
        max_train_steps=4,
        checkpointing_steps=2,
        learning_rate=5e-3,
    )
    train(config)
    return out


def _eval_args(instance_dir, run, out, *extra):
    return (
        "eval",
        "--model",
        "tiny",
        "--adapter",
        run,
        "--instance-dir",
        instance_dir,
        "--prompt",
        "a photo of sks robot",
        "--prompt",
        "a photo of a dog",
        "--class-prompt",
        "a photo of a robot",
        "--num-images",
        "2",
        "--num-inference-steps",
        "2",
        "--out",
        out,
        *extra,
    )


def test_eval_of_a_run_folder_scores_every_checkpoint(tiny_run, instance_dir, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, *_eval_args(instance_dir, tiny_run, tmp_path / "eval"))
    assert code == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [(r["label"], r["step"]) for r in result["rows"]] == [("base", None), ("robot-step2", 2), ("robot-step4", 4)]
    base, *adapters = result["rows"]
    assert base["class"]["prior_similarity"] == pytest.approx(1.0)  # the base against itself
    for row in result["rows"]:
        assert set(row["prompts"]) == {"a photo of sks robot", "a photo of a dog"}
        for score in row["prompts"].values():
            assert -1 <= score["clip_i"] <= 1 and score["diversity"] >= 0
            assert score["dino"] is None and score["clip_t"] is None  # not asked for: absent, not made up
    # The final adapter is checkpoint-4's weights: one row, and a trained adapter changes the samples.
    assert adapters[-1]["class"]["prior_similarity"] < 1.0
    for name in ("grid-00.png", "grid-01.png", "grid-02.png", "instance.png", "metrics.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    # 3 rows x 3 prompts x 2 seeds, and the 4 photos after the VAE round trip
    assert len(list((tmp_path / "eval" / "samples").glob("*.png"))) == 3 * 3 * 2 + 4
    assert "CLIP-I" in out and "robot-step4" in out and "CLIP-T: not measured" in out
    assert result["reference"]["images"] == 4
    # "sks" from the run's instance prompt against --class-prompt: the dog prompt is a control prompt.
    assert result["identifiers"] == ["sks"] and result["control_prompts"] == ["a photo of a dog"]
    assert "a photo of a dog (control)" in out and "a photo of sks robot (control)" not in out
    assert set(result["standing"]) == {"a photo of sks robot"}
    standing = result["standing"]["a photo of sks robot"]
    assert standing["describe"] is None  # not asked for
    for name in ("photos", "ceiling"):
        assert (
            -1 <= standing[name]["clip_i"] <= 1 and 0 <= standing[name]["pixel"] <= 1 and standing[name]["dino"] is None
        )
        assert out.count(f"\n{name} ") == 1
    best = result["best_checkpoint"]
    assert best["label"] in ("robot-step2", "robot-step4") and best["metric"] == "clip_i"
    assert f"best checkpoint: {best['label']}" in out
    from PIL import Image

    with Image.open(tmp_path / "eval" / "grid-01.png") as grid:
        assert grid.text["title"] == "a photo of a dog (control prompt)"
    with Image.open(tmp_path / "eval" / "grid-00.png") as grid:
        assert json.loads(grid.text["rows"])[:2] == ["real photos", "ceiling (VAE round trip)"]


def test_same_seed_same_numbers(tiny_run, instance_dir, tmp_path, monkeypatch, capsys):
    from lora_db.config.evaluate import EvalConfig
    from lora_db.evaluation.evaluate import evaluate

    def rows(out):
        config = EvalConfig(
            out=out,
            instance_dir=instance_dir,
            model="tiny",
            adapters=[str(tiny_run / "adapter.safetensors")],
            prompts=["a photo of sks robot"],
            class_prompt="a photo of a robot",
            num_images=2,
            num_inference_steps=2,
        )
        return evaluate(config).rows

    first, second = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert first == second
    # A different seed gives different samples, so the equality above is not vacuous.
    config = EvalConfig(
        out=tmp_path / "c",
        instance_dir=instance_dir,
        model="tiny",
        prompts=["a photo of sks robot"],
        num_images=2,
        num_inference_steps=2,
        seed=5,
    )
    assert evaluate(config).rows[0]["subject"]["clip_i"] != first[0]["subject"]["clip_i"]


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--dino", "no-such-org/no-such-dino"), ("--dino no-such-org/no-such-dino", "cannot load")),
        (("--clip-model", "/no/such/clip"), ("--clip-model /no/such/clip", "cannot load")),
        (("--num-images", "1"), ("--num-images must be at least 2",)),
    ],
)
def test_eval_refuses_bad_options_in_one_line(extra, fragments, tiny_run, instance_dir, tmp_path, monkeypatch, capsys):
    result = run_cli(monkeypatch, capsys, *_eval_args(instance_dir, tiny_run, tmp_path / "eval"), *extra)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "eval").exists()


def test_eval_refuses_a_folder_that_is_not_a_run(instance_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    result = run_cli(monkeypatch, capsys, *_eval_args(instance_dir, tmp_path / "empty", tmp_path / "eval"))
    assert_one_line_error(result, "not a lora-db run")


def test_train_eval_steps_logs_the_metrics(tiny_config, one_thread):
    from lora_db.training.loop import train

    config = tiny_config(
        max_train_steps=3,
        eval_steps=2,
        num_eval_images=2,
        validation_inference_steps=2,
        class_prompt="a photo of a robot",
        class_dir=tiny_config().output_dir.parent / "class",
        num_class_images=2,
        class_generation_steps=2,
    )
    train(config)
    lines = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [line for line in lines if "eval/clip_i" in line]
    assert [line["step"] for line in scored] == [2, 3]  # every 2 steps and at the end
    for line in scored:
        assert {"loss", "eval/diversity", "eval/pixel", "eval/prior_similarity", "eval/class_diversity"} <= set(line)
        assert 0 < line["eval/prior_similarity"] <= 1
        assert "eval/dino" not in line  # the tiny model ships no judge


def test_dino_with_a_local_vit_folder(tiny_run, instance_dir, tmp_path, monkeypatch, capsys):
    """--dino takes any transformers ViT folder (offline here: a small random one), scored like CLIP-I."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False)  # fmt: skip
    vit.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    code, out, _ = run_cli(
        monkeypatch, capsys, *_eval_args(instance_dir, tiny_run, tmp_path / "eval", "--dino", tmp_path / "vit")
    )
    assert code == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert 0 < result["reference"]["dino"] <= 1
    assert all(-1 <= p["dino"] <= 1 for row in result["rows"] for p in row["prompts"].values())
    assert "DINO" in out.splitlines()[0]


def _row(label, step, scores, adapter="run"):
    """An eval.json row with these (clip_i, dino, pixel) per prompt."""
    prompts = {p: dict(zip(("clip_i", "dino", "pixel"), v, strict=True)) for p, v in scores.items()}
    return {"label": label, "adapter": adapter, "step": step, "prompts": prompts, "class": None}


SUBJECT, CONTROL = "a photo of sks robot", "a photo of a red car"


def test_best_checkpoint_and_plot_follow_the_subject_prompt_only(tmp_path):
    """A control prompt scoring high must not name the best checkpoint, nor appear in the plot."""
    from lora_db.evaluation.plot import plot_series, save_plot
    from lora_db.evaluation.standing import best_checkpoint

    rows = [
        _row("base", None, {SUBJECT: (0.2, 0.1, 0.5), CONTROL: (0.3, 0.3, 0.5)}, adapter="none"),
        _row("run-step2", 2, {SUBJECT: (0.6, 0.4, 0.6), CONTROL: (0.9, 0.95, 0.9)}),  # mean of both: the highest
        _row("run-step4", 4, {SUBJECT: (0.5, 0.7, 0.7), CONTROL: (0.1, 0.1, 0.4)}),
    ]
    assert best_checkpoint(rows, [SUBJECT], "dino") == {"label": "run-step4", "step": 4, "metric": "dino", "score": 0.7}
    assert best_checkpoint(rows, [SUBJECT], "clip_i")["label"] == "run-step2"  # no judge: CLIP-I decides
    assert best_checkpoint(rows[:1], [SUBJECT], "dino") is None  # no checkpoint rows
    reference = {"clip_i": 0.9, "dino": 0.8, "pixel": 0.85}
    standing = {SUBJECT: {"photos": reference, "ceiling": {k: v - 0.1 for k, v in reference.items()}}}
    lines, references = plot_series(rows, standing, "dino", with_class=False)
    assert [(name, values) for name, _, values in lines] == [
        (f"DINO: {SUBJECT}", [(0, 0.1), (2, 0.4), (4, 0.7)]),  # the base at step 0
        (f"pixel: {SUBJECT}", [(0, 0.5), (2, 0.6), (4, 0.7)]),
    ]
    assert [(name, round(y, 6)) for name, _, y, _ in references] == [
        ("ceiling DINO", 0.7), ("photos DINO", 0.8), ("ceiling pixel", 0.75), ("photos pixel", 0.85),
    ]  # fmt: skip
    best = best_checkpoint(rows, [SUBJECT], "dino")
    from PIL import Image

    with Image.open(save_plot(tmp_path / "metrics.png", rows, standing, "dino", False, best)) as plot:
        assert plot.height > 400  # a legend line per series


def test_grids_carry_their_prompt_as_a_title():
    from PIL import Image

    from lora_db.images import image_grid

    cells = [[Image.new("RGB", (32, 32), "red")] * 2]
    plain = image_grid(cells, ["base"], ["seed 0", "seed 1"])
    titled = image_grid(cells, ["base"], ["seed 0", "seed 1"], title="a photo of sks robot (subject prompt)")
    assert titled.width == plain.width and titled.height > plain.height
    band = titled.crop((0, 0, titled.width, titled.height - plain.height))
    assert band.convert("L").getextrema()[0] < 100  # dark text in the band above the grid
    assert list(titled.crop((0, titled.height - plain.height, titled.width, titled.height)).getdata()) == list(
        plain.getdata()
    )


@pytest.fixture(scope="module")
def judged_world(tmp_path_factory):
    """A copy of tiny-world (its components linked) with a small random ViT judge, as the shipped one is laid out."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from lora_db.models.loading import tiny_world_dir

    folder = tmp_path_factory.mktemp("world") / "tiny-world"
    folder.mkdir()
    for part in tiny_world_dir().iterdir():
        if part.name != "judge":
            (folder / part.name).symlink_to(part)
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False)  # fmt: skip
    vit.save_pretrained(folder / "judge")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "judge")
    return folder


def _world_eval(instance_dir, out, *extra):
    return (
        "eval", "--instance-dir", instance_dir, "--prompt", SUBJECT, "--prompt", CONTROL, "--identifier", "sks",
        "--num-images", "2", "--num-inference-steps", "2", "--out", out, *extra,
    )  # fmt: skip


def test_a_model_with_a_judge_scores_the_dino_column_with_it(judged_world, instance_dir, tmp_path, monkeypatch, capsys):
    """`--model tiny-world` uses tiny-world's judge/ (here a copy's) for DINO, not the pipeline's image encoder."""
    from PIL import Image

    from lora_db.evaluation.metrics import DinoEmbedder, ImageEmbedder, _square
    from lora_db.images import find_images, load_image
    from lora_db.models.loading import load_pipeline

    monkeypatch.setattr("lora_db.models.loading.TINY_WORLD_DIR", judged_world)
    code, out, _ = run_cli(monkeypatch, capsys, *_world_eval(instance_dir, tmp_path / "eval", "--model", "tiny-world"))
    assert code == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["judge"] == {"name": "tiny-world judge", "path": str(judged_world / "judge"), "source": "model"}
    assert "DINO (tiny-world judge)" in out.splitlines()[0]
    samples = [Image.open(tmp_path / "eval" / "samples" / f"base_p00_seed{i}.png").convert("RGB") for i in range(2)]
    photos = _square([load_image(p) for p in find_images(instance_dir)], 64)
    judge, encoder = DinoEmbedder(str(judged_world / "judge")), ImageEmbedder(load_pipeline(str(judged_world)))
    scores = result["rows"][0]["prompts"][SUBJECT]
    assert scores["dino"] == pytest.approx(mean_cross_similarity(judge(samples), judge(photos)), abs=1e-5)
    assert scores["dino"] != pytest.approx(mean_cross_similarity(encoder(samples), encoder(photos)), abs=1e-3)
    assert result["standing"][SUBJECT]["ceiling"]["dino"] is not None
    # --dino tiny-world names the same judge explicitly.
    code, out, _ = run_cli(
        monkeypatch, capsys, *_world_eval(instance_dir, tmp_path / "named", "--model", "tiny", "--dino", "tiny-world")
    )
    assert code == 0 and "DINO (tiny-world judge)" in out.splitlines()[0]


def test_eval_refuses_the_pipelines_own_image_encoder_as_judge(
    judged_world, instance_dir, tmp_path, monkeypatch, capsys
):
    import shutil

    copy = tmp_path / "encoder-copy"  # the same weights in another folder, with a processor to load it
    shutil.copytree(judged_world / "image_encoder", copy)
    shutil.copy(judged_world / "clip_image_processor" / "preprocessor_config.json", copy)
    for dino, why in ((judged_world / "image_encoder", "own image encoder folder"), (copy, "image encoder's")):
        args = _world_eval(instance_dir, tmp_path / "eval", "--model", judged_world, "--dino", dino)
        code, _, err = run_cli(monkeypatch, capsys, *args)
        # The copy is found out once both are loaded, after the loaders' progress bars: the last line is the error.
        assert code == 1 and err[-1].startswith(f"error: --dino {dino}: "), err
        assert why in err[-1] and "must not be the model being judged" in err[-1]
        assert not (tmp_path / "eval").exists()


def test_a_broken_judge_folder_is_one_clear_error(judged_world, tmp_path):
    import shutil

    from lora_db.errors import LoraDBError
    from lora_db.evaluation.judge import load_judge, resolve_judge

    model = tmp_path / "model"
    shutil.copytree(judged_world, model, symlinks=True)
    next((model / "judge").glob("*.safetensors")).unlink()  # a judge/ with its config but no weights
    choice = resolve_judge(None, str(model))
    assert choice.source == "model" and choice.path == str(model / "judge")
    with pytest.raises(LoraDBError, match=r"the model's judge .*: cannot load it .*not a complete transformers model"):
        load_judge(choice, pipe=None)  # refused before the pipeline is looked at


def test_reference_rows_and_describe(instance_dir, tmp_path, monkeypatch, capsys):
    describe = "a photo of a red robot"
    args = _world_eval(instance_dir, tmp_path / "eval", "--model", "tiny", "--describe", describe)
    code, out, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    standing = result["standing"][SUBJECT]
    assert set(result["standing"]) == {SUBJECT} and standing["describe"]["description"] == describe
    for name in ("photos", "ceiling", "describe"):
        assert -1 <= standing[name]["clip_i"] <= 1 and 0 <= standing[name]["pixel"] <= 1, name
    assert standing["photos"]["clip_i"] == result["reference"]["clip_i"]
    assert standing["describe"]["clip_i"] != result["rows"][0]["prompts"][SUBJECT]["clip_i"]  # other samples
    assert len(list((tmp_path / "eval" / "samples").glob("describe_p00_seed*.png"))) == 2
    assert f'describe: the base model sampling "{describe}"' in out
    # Two descriptions for one subject prompt: which is which?
    args = _world_eval(instance_dir, tmp_path / "two", "--model", "tiny", "--describe", "a", "--describe", "b")
    assert_one_line_error(run_cli(monkeypatch, capsys, *args), "--describe given 2 times for 1 subject prompt")


def test_the_ceiling_of_tiny_world_is_above_its_untrained_base(tmp_path, one_thread):
    """The photos through tiny-world's VAE resemble the other photos more than the base's samples of the prompt."""
    from lora_db.config.evaluate import EvalConfig
    from lora_db.evaluation.evaluate import evaluate
    from lora_db.synthetic.demo import make_demo_images

    make_demo_images(tmp_path / "photos", count=5, size=64, seed=0)
    config = EvalConfig(
        out=tmp_path / "eval", instance_dir=tmp_path / "photos", model="tiny-world", prompts=[SUBJECT], num_images=2,
        num_inference_steps=15,
    )  # fmt: skip
    result = evaluate(config)
    ceiling, base = result.standing[SUBJECT]["ceiling"], result.rows[0]["prompts"][SUBJECT]
    # Measured on the first tiny-world: pixel 0.901 (ceiling) against 0.810 (base), photos among themselves 0.911.
    assert ceiling["pixel"] > base["pixel"] + 0.03, (ceiling, base)
    assert result.standing[SUBJECT]["photos"]["pixel"] >= ceiling["pixel"] - 0.05


def test_train_eval_steps_scores_the_subject_prompt_apart_and_with_the_models_judge(judged_world, tiny_config):
    from lora_db.training.loop import train

    config = tiny_config(
        model=str(judged_world),
        max_train_steps=1,
        eval_steps=1,
        num_eval_images=2,
        validation_inference_steps=2,
        validation_prompt=CONTROL,
    )
    train(config)
    (line,) = [json.loads(x) for x in (config.output_dir / "metrics.jsonl").read_text().splitlines() if "eval/" in x]
    assert {"eval/clip_i", "eval/dino", "eval/pixel", "eval/diversity"} <= set(line)  # the instance prompt
    assert {"eval/validation/clip_i", "eval/validation/dino", "eval/validation/pixel"} <= set(line)
    assert line["eval/clip_i"] != line["eval/validation/clip_i"]  # not one figure averaged over both prompts
