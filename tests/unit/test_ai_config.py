"""``with_ai_config`` and ``stage_ids``: AI config fields with defaults validated at
``run.create``, and a typed enum of a built pipeline's stage ids."""

from __future__ import annotations

import enum

import pytest
from pydantic import BaseModel

from treadle import (
    AIConfig,
    DefinitionError,
    InvalidConfigError,
    WorkflowBuilder,
    define_stage,
    stage_ids,
    with_ai_config,
)
from treadle.testing import TestEngine


class Doc(BaseModel):
    text: str


class SummaryConfig(BaseModel):
    style: str = "short"


Config = with_ai_config(SummaryConfig, model="openai:gpt-4o", temperature=0.2)
SEEN: list[AIConfig] = []


@define_stage(id="extract-text", input=Doc, output=Doc)
async def extract(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


@define_stage(id="summarise", input=Doc, output=Doc, config=Config)
async def summarise(ctx):  # type: ignore[no-untyped-def]
    SEEN.append(ctx.config)
    return ctx.input


PIPELINE = WorkflowBuilder("doc-pipeline", input=Doc).pipe(extract).pipe(summarise).build()


def test_with_ai_config_adds_the_fields_with_defaults() -> None:
    """The config keeps its own fields and gains model, temperature and max_tokens with
    the defaults given."""
    config = Config()
    assert isinstance(config, SummaryConfig)
    assert isinstance(config, AIConfig)
    assert (config.style, config.model, config.temperature, config.max_tokens) == (
        "short",
        "openai:gpt-4o",
        0.2,
        1024,
    )
    assert with_ai_config().model_fields.keys() == {"model", "temperature", "max_tokens"}


def test_with_ai_config_refuses_clashes_and_bad_defaults() -> None:
    """A config that already has one of the fields, or an out-of-range default, is a
    DefinitionError naming it."""

    class Clash(BaseModel):
        temperature: int = 1

    with pytest.raises(DefinitionError, match="temperature"):
        with_ai_config(Clash)
    with pytest.raises(DefinitionError, match="temperature"):
        with_ai_config(temperature=3.0)


async def test_run_config_is_validated_at_create() -> None:
    """A run's AI config is validated at run.create: a bad temperature names the field and
    writes nothing; a good one reaches the stage with the other defaults filled in."""
    SEEN.clear()
    te = TestEngine([PIPELINE])
    with pytest.raises(InvalidConfigError, match=r"summarise\.temperature"):
        await te.start("doc-pipeline", {"text": "x"}, config={"summarise": {"temperature": 5}})
    assert await te.kernel.list_runs() == []
    handle = await te.start(
        "doc-pipeline", {"text": "x"}, config={"summarise": {"model": "anthropic:claude"}}
    )
    await handle.result()
    [config] = SEEN
    assert (config.model, config.temperature, config.max_tokens) == ("anthropic:claude", 0.2, 1024)


def test_stage_ids_is_a_str_enum_of_the_pipelines_stages() -> None:
    """stage_ids gives a StrEnum whose members are the stage ids, named in upper case."""
    ids = stage_ids(PIPELINE)
    assert issubclass(ids, enum.StrEnum)
    assert ids.__name__ == "DocPipelineStageIds"
    assert [(m.name, m.value) for m in ids] == [
        ("EXTRACT_TEXT", "extract-text"),
        ("SUMMARISE", "summarise"),
    ]
    assert ids["EXTRACT_TEXT"] == "extract-text"
    with pytest.raises(DefinitionError):
        stage_ids("not a workflow")  # type: ignore[arg-type]


def test_the_ai_libraries_load_only_on_a_call() -> None:
    """``import treadle``, opening an engine, the test harness, the CLI app and the
    pydantic-ai client adapter import neither pydantic-ai nor genai-prices: a plain
    install (no ``ai`` extra) runs everything else."""
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "import treadle, treadle.testing, treadle.adapters.ai, treadle.examples.ai_pipeline\n"
        "from treadle.hosts.cli import build_app; build_app()\n"
        "async def main():\n"
        "    async with await treadle.Engine.open('memory://') as engine:\n"
        "        treadle.testing.TestEngine([])\n"
        "asyncio.run(main())\n"
        "ai = ('pydantic_ai', 'genai_prices')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ai)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_start_many_gets_the_workflow_budget() -> None:
    """Runs created by start_many carry their workflow's max_cost, as start's do."""
    from decimal import Decimal

    wf = WorkflowBuilder("budgeted", input=Doc, max_cost="0.5").pipe(extract).build()
    te = TestEngine([wf])
    handle = await te.start("budgeted", {"text": "x"})
    from treadle.kernel import commands as c

    many = await te.kernel.dispatch(
        c.RunCreateMany(items=[c.RunCreateItem(workflow_id="budgeted", input={"text": "y"})])
    )
    for run_id in (handle.run_id, many.runs[0].workflow_run_id):
        assert (await te.get_run(run_id)).max_cost == Decimal("0.5")
