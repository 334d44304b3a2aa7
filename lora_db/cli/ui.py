"""`lora-db ui`: a thin typer command over lora_db.ui, the DreamBooth workflow in a local web page.

    pip install -e ".[ui]"
    lora-db ui --workspace ~/dreambooth            # http://127.0.0.1:7860

Options come from UiConfig (lora_db.config.ui) through the one option generator; gradio and torch are imported only
when the command runs.
"""

from __future__ import annotations

from typing import Any

import typer

from lora_db.cli.options import build_config, with_config_options
from lora_db.config.ui import UiConfig
from lora_db.errors import LoraDBError

app = typer.Typer()


@app.command("ui")
@with_config_options(UiConfig)
def ui_command(**values: Any) -> None:
    """Open the whole DreamBooth workflow in a local web page: photos, training, evaluation, sampling, merge.

    Training, eval, merge and export run as `lora-db` commands of their own, which outlive the page; a reloaded page
    finds them in the workspace. Example: lora-db ui --workspace ~/dreambooth --port 7860
    """
    config = build_config(UiConfig, values)
    try:
        from lora_db.ui.app import serve
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in ("gradio", "pandas"):
            raise
        raise LoraDBError(
            f'lora-db ui needs {err.name}, which the "ui" extra installs: pip install "lora-db[ui]" '
            '(in a checkout: pip install -e ".[ui]")'
        ) from None
    serve(config)
