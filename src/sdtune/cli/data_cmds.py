"""``sdtune data ...``: check, prepare, tag and caption training datasets.

The commands live in one module per concern, each with a ``register(app)`` function, so they can grow
independently; torch and the heavy libraries are imported inside the commands.
"""

from __future__ import annotations

import typer

from sdtune.cli import data_caption_cmd, data_check_cmd, data_prep_cmds

data_app = typer.Typer(help="Datasets: check, prepare, tags and captions.", no_args_is_help=True)
data_check_cmd.register(data_app)
data_prep_cmds.register(data_app)
data_caption_cmd.register(data_app)
