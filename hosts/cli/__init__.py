"""The ``treadle`` command line (Typer + Rich; the ``cli`` extra).

``main`` is the console script; ``build_app()`` returns the Typer application for
tests (``typer.testing.CliRunner().invoke(build_app(), [...])``).
"""

from treadle.hosts.cli.app import build_app, main

__all__ = ["build_app", "main"]
