"""`--push-to-hub REPO`: upload the finished run folder to the Hugging Face hub with huggingface_hub.

The token and the hub are checked before any model loads, so a run never trains for hours to fail at the upload;
an upload that fails anyway leaves the complete run folder and says how to upload it later (`hf upload`).
Checkpoints and logs stay local: the repository gets the adapter, model card, metrics, config and validation images.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError

logger = logging.getLogger("lora_db")

LOCAL_ONLY = ["checkpoint-*", "checkpoint-*/**", "logs/**", ".*", "**/.*"]


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _explain(repo: str, err: BaseException, later: str) -> LoraDBError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return LoraDBError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, so the hub cannot be reached; {later}")
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        return LoraDBError(
            f"--push-to-hub {repo}: the hub refused the token (HTTP {status}); log in again with `hf auth login` "
            f"(a token with write access), or {later}"
        )
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return LoraDBError(f"--push-to-hub {repo}: cannot reach the Hugging Face hub ({first_line}); {later}")


def check_hub_access(repo: str) -> None:
    """A token is set and the hub answers to it (before any model loads)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if get_token() is None:
        raise LoraDBError(
            f"--push-to-hub {repo}: no Hugging Face token is set; run `hf auth login` or set HF_TOKEN, "
            "or drop --push-to-hub"
        )
    try:
        HfApi().whoami()
    except (HfHubHTTPError, *_network_errors()) as err:
        raise _explain(repo, err, "drop --push-to-hub and upload the run later with `hf upload`") from None


def push_run(config: TrainConfig, steps: int) -> str:
    """Create the repository if needed and upload the run folder; returns the repository's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo, folder = config.push_to_hub, Path(config.output_dir)
    api = HfApi()
    try:
        url = api.create_repo(repo, private=config.hub_private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            ignore_patterns=LOCAL_ONLY,
            commit_message=f"lora-db: {steps} steps on {config.concepts()[0].instance_prompt or 'captioned photos'!r}",
        )
    except (HfHubHTTPError, *_network_errors()) as err:
        later = f"the run in {folder} is complete; upload it later with `hf upload {repo} {folder}`"
        raise _explain(repo, err, later) from None
    logger.info("uploaded %s to %s", folder, url)
    return str(url)
