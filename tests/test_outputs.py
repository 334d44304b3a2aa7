"""Trackers (tensorboard event files and wandb offline runs, read back), the model card, and --push-to-hub's errors."""

import base64
import glob
import gzip
import importlib.util
import json
import os
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from processes import run

from lora_db.errors import LoraDBError

pytestmark = pytest.mark.usefixtures("one_thread")
NEEDS_WANDB = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install 'lora-db[wandb]')"
)

VALIDATION = {
    "validation_prompt": "sks robot on a beach",
    "validation_steps": 1,
    "validation_inference_steps": 2,
    "num_validation_images": 2,
}


needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (pip install -e '.[dev]')"
)


def tensorboard_events(folder) -> dict[str, list]:
    """Every summary value in the event files under `folder`, by tag: (step, value proto)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found: dict[str, list] = {}
    for path in glob.glob(f"{folder}/**/events.out.tfevents.*", recursive=True):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value))
    return found


@needs_tensorboard
def test_tensorboard_gets_metrics_hyperparameters_and_images_and_a_model_card_is_written(tiny_config):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    from lora_db.training.loop import train

    config = tiny_config(max_train_steps=2, report_to="tensorboard", use_dora=True, rank=2, **VALIDATION)
    result = train(config)
    events = tensorboard_events(config.output_dir / "logs")
    assert [step for step, _ in events["loss"]] == [1, 2]
    images = events["validation"]
    assert [step for step, _ in images] == [1, 2]
    width, height, png = images[0][1].tensor.string_val  # tensorboard's image blob: the two images side by side
    assert (int(width), int(height)) == (2 * 64, 64) and png.startswith(b"\x89PNG")
    (start,) = [v for _, v in events["_hparams_/session_start_info"]]
    hparams = HParamsPluginData.FromString(start.metadata.plugin_data.content).session_start_info.hparams
    assert hparams["rank"].number_value == 2
    assert hparams["use_dora"].number_value == 1
    assert hparams["target_modules"].string_value == "to_q,to_k,to_v,to_out.0"

    card = (config.output_dir / "README.md").read_text()
    assert card.startswith('---\nbase_model: "tiny"\ninstance_prompt: "a photo of sks robot"\n')
    assert "- dora" in card and "# DoRA DreamBooth of UniDiffuser: a photo of sks robot" in card
    assert "![validation images](validation/step-000002.png)" in card
    assert (result.output_dir / "validation" / "step-000002.png").is_file()
    assert 'lora-db sample --model tiny --adapter adapter.safetensors --prompt "sks robot on a beach"' in card
    assert "lora-db merge --model tiny --adapter adapter.safetensors --out merged" in card
    assert "| `--use-dora` | `True` |" in card and "| `--rank` | `2` |" in card


def test_a_readme_lora_db_did_not_write_is_kept(tiny_config, caplog):
    from lora_db.training.model_card import write_model_card

    config = tiny_config()
    config.output_dir.mkdir(parents=True)
    (config.output_dir / "README.md").write_text("my notes\n")
    summary = {"steps": 1, "final_loss": 0.5, "trainable_parameters": 10}
    assert write_model_card(config, summary, config.output_dir / "adapter.safetensors") is None
    assert (config.output_dir / "README.md").read_text() == "my notes\n"
    assert "not written by lora-db" in caplog.text


def wandb_records(run_file) -> list:
    """The protobuf records of a wandb offline run file (LevelDB log blocks of 32 KiB after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(run_file, "rb") as f:
        raw, block = f.read(), 32768
    position, pending, records = 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
@NEEDS_WANDB
def test_wandb_offline_run_holds_config_metrics_and_images(instance_dir, tmp_path):
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in VALIDATION.items()]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    result = run(
        [sys.executable, "-m", "lora_db.cli", "train", "--model", "tiny", "--instance-dir", str(instance_dir),
         "--instance-prompt", "a photo of sks robot", "--output-dir", str(out), "--max-train-steps", "2",
         "--report-to", "wandb", "--rank", "2", *flags],
        timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (run_file,) = glob.glob(f"{out}/logs/wandb/offline-run-*/run-*.wandb")
    config, history, images = {}, [], {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update}
            images.update({k: v for k, v in items.items() if k.startswith("validation.")})
    assert config["rank"] == 2 and config["model"] == "tiny"
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert images["validation.captions"] == ["sks robot on a beach (seed 0)", "sks robot on a beach (seed 1)"]
    for name in images["validation.filenames"]:
        assert (run_file.rsplit("/", 1)[0] + "/files/" + name).endswith(".png")
        assert os.path.isfile(run_file.rsplit("/", 1)[0] + "/files/" + name)


def push_to_hub(instance_dir, tmp_path, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), **env_changes)
    command = [
        sys.executable, "-m", "lora_db.cli", "train", "--model", "tiny", "--instance-dir", str(instance_dir),
        "--instance-prompt", "p", "--output-dir", str(tmp_path / "out"), "--push-to-hub", "someone/sks-lora",
    ]  # fmt: skip
    result = run(command, timeout=120, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --push-to-hub someone/sks-lora: "), lines
    assert not (tmp_path / "out").exists()  # refused before any model loads or anything is written
    return lines[0]


class FakeHub:
    """The few hub endpoints huggingface_hub calls to create a repo and commit small files, on 127.0.0.1."""

    def __init__(self):
        self.requests, self.files, self.created = [], {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n)
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                return data

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if self.path.startswith("/api/whoami-v2"):
                    return self._send({"type": "user", "name": "someone", "auth": {"accessToken": {"role": "write"}}})
                self._send({"error": "not found"}, 404)

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self._body()
                if self.path == "/api/repos/create":
                    hub.created.append(json.loads(body))
                    return self._send({"url": f"http://{self.headers['Host']}/someone/sks-lora"})
                if self.path.startswith("/api/validate-yaml"):
                    return self._send({"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._send(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._send(
                        {"commitUrl": f"{hub.url}/someone/sks-lora/commit/{40 * '0'}", "commitOid": 40 * "0"}
                    )
                self._send({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@needs_tensorboard
@pytest.mark.slow
def test_push_to_hub_uploads_the_run_folder_but_not_checkpoints_or_logs(instance_dir, tmp_path):
    hub = FakeHub()
    out = tmp_path / "run"
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
    command = [
        sys.executable, "-m", "lora_db.cli", "train", "--model", "tiny", "--instance-dir", str(instance_dir),
        "--instance-prompt", "a photo of sks robot", "--output-dir", str(out), "--max-train-steps", "2",
        "--checkpointing-steps", "1", "--report-to", "tensorboard",
        "--push-to-hub", "someone/sks-lora", "--hub-private",
    ]  # fmt: skip
    result = run(command, timeout=300, env=env)
    hub.server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    (created,) = hub.created
    assert (created["organization"], created["name"], created["visibility"]) == ("someone", "sks-lora", "private")
    assert sorted(hub.files) == ["README.md", "adapter.safetensors", "config.json", "metrics.jsonl", "summary.json"]
    assert hub.files["adapter.safetensors"] == (out / "adapter.safetensors").read_bytes()
    assert (out / "checkpoint-2").is_dir() and (out / "logs").is_dir()  # kept local


def test_push_to_hub_without_a_token(instance_dir, tmp_path):
    line = push_to_hub(instance_dir, tmp_path)
    assert "no Hugging Face token is set; run `hf auth login` or set HF_TOKEN" in line


@pytest.mark.slow
def test_push_to_hub_with_the_hub_out_of_reach(instance_dir, tmp_path):
    line = push_to_hub(instance_dir, tmp_path, HF_TOKEN="hf_test", HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert "cannot reach the Hugging Face hub" in line and "upload the run later with `hf upload`" in line
    line = push_to_hub(instance_dir, tmp_path, HF_TOKEN="hf_test", HF_HUB_OFFLINE="1")
    assert "HF_HUB_OFFLINE is set" in line


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"hub_private": True}, "--hub-private goes with --push-to-hub"),
        ({"push_to_hub": "a/b/c"}, "give a repository id such as"),
    ],
)
def test_bad_hub_options(options, fragment, tiny_config):
    with pytest.raises(LoraDBError, match=fragment):
        tiny_config(**options)


@needs_tensorboard
def test_report_to_resolution():
    from lora_db.training.tracking import resolve_tracker

    assert resolve_tracker("none") is None
    assert resolve_tracker(None) == ("tensorboard" if importlib.util.find_spec("tensorboard") else None)
    assert resolve_tracker("tensorboard") == "tensorboard"


@NEEDS_WANDB
def test_wandb_online_without_an_api_key_is_refused_before_loading(tmp_path, monkeypatch):
    from lora_db.training.tracking import resolve_tracker

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(LoraDBError, match="no W&B API key; run `wandb login`"):
        resolve_tracker("wandb")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_tracker("wandb") == "wandb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / ".netrc").unlink()
    assert resolve_tracker("wandb") == "wandb"


@needs_tensorboard
def test_a_tracker_that_cannot_write_stops_itself_not_the_run(tiny_config, caplog):
    from lora_db.training.loop import train

    config = tiny_config(max_train_steps=2, report_to="tensorboard")
    config.output_dir.mkdir(parents=True)
    (config.output_dir / "logs").write_text("a file where the tensorboard folder would go\n")
    result = train(config)
    assert result.steps == 2 and len((config.output_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert "tracker output stopped" in caplog.text
