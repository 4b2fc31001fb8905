"""What of an AI call is stored: large prompts and responses offloaded to the blob store
past ``payload_max_bytes`` (read back whole), prompts dropped or redacted by the engine's
``ai_recording``, and prompts never written to the log."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from treadle import AICall, AIRecording, Engine, WorkflowBuilder, define_stage
from treadle.kernel.model import evolve
from treadle.tests.scenario.helpers import WAIT, worker

SECRET = "patient 4711 has " + "x" * 2000


def _answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart("diagnosis " + "y" * 2000)])


MODEL = FunctionModel(_answer, model_name="gpt-4o-mini")


class Doc(BaseModel):
    text: str


@define_stage(id="ask", input=Doc, output=Doc)
async def ask(ctx):  # type: ignore[no-untyped-def]
    ctx.log("info", "asking the model")
    await ctx.ai.generate_text(MODEL, SECRET)
    return Doc(text="done")


WORKFLOWS = [WorkflowBuilder("wf", input=Doc).pipe(ask).build()]


async def _run(engine: Engine) -> str:
    async with worker(engine):
        handle = await engine.start("wf", {"text": "x"})
        await handle.result(timeout=WAIT)
    return handle.run_id


async def test_large_prompts_are_offloaded_and_read_back(url: str, tmp_path: Path) -> None:
    """Past payload_max_bytes the prompt and response live in the blob store; the row
    keeps a reference, and Engine.ai_calls returns them whole."""
    async with await Engine.open(
        url, workflows=WORKFLOWS, payload_max_bytes=512, blob_root=tmp_path / "blobs"
    ) as engine:
        run_id = await _run(engine)
        [call] = await engine.ai_calls(run_id)
        assert call.prompt == SECRET
        assert str(call.response).startswith("diagnosis y")
        if url.startswith("memory"):
            return  # nothing is offloaded in memory
        assert engine.backend is not None
        async with engine.backend.persistence.transaction() as tx:
            row = (await tx.execute(sa.text("SELECT prompt, response FROM ai_calls"))).one()  # type: ignore[attr-defined]
        stored = [r if isinstance(r, dict) else json.loads(r) for r in row]
        assert all("__treadle_blob__" in value for value in stored)


async def test_recording_policy_drops_and_redacts(url: str) -> None:
    """record_prompts=False stores no prompt; a redact callable rewrites what is stored;
    tokens and cost are kept."""

    def redact(call: AICall) -> AICall:
        return evolve(call, {"response": "[redacted]"})

    policy = AIRecording(record_prompts=False, redact=redact)
    async with await Engine.open(url, workflows=WORKFLOWS, ai_recording=policy) as engine:
        run_id = await _run(engine)
        [call] = await engine.ai_calls(run_id)
    assert call.prompt is None
    assert call.response == "[redacted]"
    assert call.input_tokens > 0
    assert call.cost is not None


async def test_prompts_never_reach_the_log(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Running a stage that calls a model logs its lines, never the prompt or response,
    at any level (Treadle's loggers; a database driver's own debug log is not ours)."""
    caplog.set_level(logging.DEBUG)
    async with await Engine.open(url, workflows=WORKFLOWS) as engine:
        await _run(engine)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("treadle"))
    assert "asking the model" in text
    assert "patient 4711" not in text
    assert "diagnosis" not in text
