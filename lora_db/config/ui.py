"""What `lora-db ui` takes: the workspace the page works in, and where it listens. Free of torch and gradio.

lora_db.ui serves the page; the CLI builds `lora-db ui`'s options from these fields like every other command's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_db.config.fields import check_numbers, check_text, option
from lora_db.errors import LoraDBError


@dataclass
class UiConfig:
    workspace: Path = option(
        Path("."),
        "Folder the page works in: photos, runs, evaluations and samples go here, and every path typed in the page "
        "must stay inside it.",
    )
    port: int = option(7860, "Port of the local web page.", minimum=1, maximum=65535)
    host: str = option(
        "127.0.0.1",
        "Address to listen on; the default is this machine only. 0.0.0.0 opens the page to your network, with no "
        "password: anyone who reaches it can train and read the workspace.",
    )

    def __post_init__(self) -> None:
        check_text(self)
        check_numbers(self)
        self.workspace = Path(self.workspace)
        if not self.workspace.expanduser().is_dir():  # said before gradio and torch take seconds to import
            raise LoraDBError(
                f"--workspace {self.workspace}: no such folder; create it (mkdir -p {self.workspace}) or choose another"
            )
        if not self.host.strip() or any(ch.isspace() for ch in self.host):
            raise LoraDBError(f"--host {self.host!r}: give an address such as 127.0.0.1 or 0.0.0.0")
