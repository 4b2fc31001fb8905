"""docs/cli.md documents every command the CLI has, and docs/deployment.md covers the
deployments the issue names."""

from __future__ import annotations

from pathlib import Path

import typer

from treadle.hosts.cli import build_app

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _commands(app: typer.Typer, prefix: str = "") -> list[str]:
    names = [
        f"{prefix}{c.name or c.callback.__name__}" for c in app.registered_commands if c.callback
    ]
    for group in app.registered_groups:
        assert group.typer_instance is not None
        names += _commands(group.typer_instance, f"{prefix}{group.name} ")
    return names


def test_cli_reference_has_a_section_per_command() -> None:
    """Each command (and `runs` subcommand) has a `### treadle <name>` heading."""
    text = (DOCS / "cli.md").read_text()
    commands = _commands(build_app())
    assert {"tick", "demo", "doctor", "runs list", "runs show"} <= set(commands)
    for name in commands:
        assert f"### `treadle {name}" in text, name


def test_deployment_guide_covers_systemd_kubernetes_lambda_and_sizing() -> None:
    """The deployment guide has a systemd unit, a Deployment and a tick CronJob, Lambda
    with SQS and a schedule, and sizing."""
    text = (DOCS / "deployment.md").read_text()
    for needle in (
        "[Service]", "ExecStart=", "kind: Deployment", "kind: CronJob",
        '["treadle", "tick"', "ReportBatchItemFailures", "rate(1 minute)", "## Sizing",
    ):  # fmt: skip
        assert needle in text, needle
