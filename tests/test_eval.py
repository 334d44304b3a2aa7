"""`lora-db eval` on the tiny random model: the metrics' definitions, the outputs, run folders, determinism, errors.

Whether the metrics show learning is tested on the pretrained tiny-world (tests/test_tiny_world.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import assert_one_line_error, run_cli

from lora_db.evaluation.metrics import clip_t_text, mean_cross_similarity, mean_pairwise_distance, paired_similarity


def test_metric_definitions_on_known_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    assert mean_cross_similarity(a, b) == pytest.approx(2**-0.5)
    assert mean_pairwise_distance(a) == pytest.approx(1.0)  # orthogonal: distance 1
    assert mean_pairwise_distance(torch.cat([b, b, b])) == pytest.approx(0.0, abs=1e-6)
    assert paired_similarity(a, a.flip(0)) == pytest.approx(0.0)
    assert paired_similarity(a, a) == pytest.approx(1.0)
    assert clip_t_text("a photo of sks robot, sksx", "sks") == "a photo of a robot, sksx"
    assert clip_t_text("a photo of sks robot", None) == "a photo of sks robot"


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
    assert len(list((tmp_path / "eval" / "samples").glob("*.png"))) == 3 * 3 * 2
    assert "CLIP-I" in out and "robot-step4" in out and "CLIP-T: not measured" in out
    assert result["reference"]["images"] == 4


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
    assert evaluate(config).rows[0]["clip_i"] != first[0]["clip_i"]


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
        assert {"loss", "eval/diversity", "eval/prior_similarity", "eval/class_diversity"} <= set(line)
        assert 0 < line["eval/prior_similarity"] <= 1


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
