"""Shared fixtures: demo photos made offline, a tiny-model training config factory, the tiny pipeline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2`: one thread per worker (and per process a test starts), so two workers share two cores
    # instead of four threads spinning on them; the tiny models gain nothing from a second thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


# The modules that take longest, started first under `pytest -n 2 --dist loadfile`, so that neither worker is left
# with one of them at the end while the other has nothing to do (measured: tests/test_tiny_world.py alone takes
# about 5 minutes of one core).
LONGEST_FIRST = ("test_tiny_world.py", "test_docs.py", "test_cli.py", "test_ui.py", "test_robustness.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module stays in order


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """A test that sets a run up without train() (or fails half-way) leaves accelerate's process-wide state
    behind, and the next test's Accelerator would refuse other precision settings: clear it after every test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine spinning threads make each op crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    from lora_db.synthetic.demo import make_demo_images

    folder = tmp_path_factory.mktemp("photos")
    make_demo_images(folder, count=4, size=96)
    return folder


@pytest.fixture
def tiny_config(instance_dir, tmp_path):
    """TrainConfig for the tiny model; keyword arguments override the test defaults."""
    from lora_db.config.train import TrainConfig

    def make(**overrides):
        values = {
            "model": "tiny",
            "instance_dir": instance_dir,
            "instance_prompt": "a photo of sks robot",
            "output_dir": tmp_path / "out",
            "max_train_steps": 8,
            "learning_rate": 5e-3,
        }
        values.update(overrides)
        return TrainConfig(**values)

    return make


@pytest.fixture(scope="module")
def pristine():
    """The tiny random pipeline, built once per module; tests that change it work on a deepcopy."""
    from lora_db.logs import quiet_library_logs
    from lora_db.models.random import build_random_pipeline

    quiet_library_logs()
    return build_random_pipeline("tiny")


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory):
    """README.md's commands, run once as written (tests/doc_commands.py): its folder and each command's output."""
    from doc_commands import ROOT, run_page

    folder = tmp_path_factory.mktemp("readme")
    return folder, run_page(ROOT / "README.md", folder)
