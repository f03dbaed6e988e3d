"""Layer 6: the ``sdtune`` command line (typer). Each command is a few lines over the layers below."""
