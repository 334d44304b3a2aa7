"""The `lora-db` command line: the outer layer, thin typer commands that build a config and call one library function.

- application.py: the typer application, `main()` (the console script), one-line errors, `--debug` / `--quiet`
- options.py: the one option generator (config dataclass fields -> typer options) and `--config` files
- help.py: `--help` laid out for 80 columns (main options first, the rest by `--help-all`), short usage errors
- aliases.py: diffusers' and kohya's flag names accepted by `train` and `estimate`
- train.py: `demo`, `train`, `estimate`, `demo-images`; adapters.py: `sample`, `merge`, `info`, `export`;
  evaluate.py: `eval`

Nothing below this package imports typer. Each command imports the library inside its function, so that
`--help` and usage errors answer without importing torch.
"""

from lora_db.cli.application import app, main

__all__ = ["app", "main"]
