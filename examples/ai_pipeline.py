"""Example app: an AI document pipeline whose every model call is recorded and costed.

summarise (``ctx.ai.generate_text``) -> classify (``ctx.ai.generate_object``, a schema)

Both stages take their model, temperature and answer length from a ``with_ai_config``
config (per run: ``config={"summarise": {"temperature": 0.2}}``). The model here is a
fake one: pydantic-ai's ``FunctionModel`` named ``gpt-4o-mini``, so genai-prices prices
its answers as that model (real prices of fake calls, no network, no API key). Name a
real model in the config (``"openai:gpt-4o-mini"``) and the same code calls it.

The fake model is rate limited once (an HTTP 429, as providers answer under load): the
stage's retry policy tries again after the backoff, and both attempts' calls are
recorded, the first marked as a failed attempt. ``treadle demo --ai`` runs it on SQLite;
``python examples/ai_pipeline.py`` on the in-memory test harness.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from treadle import RetryPolicy, StageContext, WorkflowBuilder, define_stage, with_ai_config

FAKE_MODEL = "fake:gpt-4o-mini"
"""The config's model name for the fake model (``model_for`` builds it)."""

DOCUMENTS = {
    "memo": "The quarterly numbers are in. Revenue grew nine percent and costs fell.",
    "complaint": "My order arrived broken. The box was crushed and nobody answers email.",
    "notice": "The office is closed on Monday. Deliveries resume on Tuesday morning.",
}
"""The demo's documents; the first request about ``memo`` is rate limited once."""

_RATE_LIMITED: set[str] = set()


def reset_fake_model() -> None:
    """Make the fake model rate limit the memo's first request again (each demo does)."""
    _RATE_LIMITED.clear()


class Document(BaseModel):
    name: str
    text: str


class Summary(BaseModel):
    name: str
    summary: str


class Label(BaseModel):
    topic: str
    urgent: bool


class Labelled(BaseModel):
    name: str
    summary: str
    topic: str
    urgent: bool


def _answer(messages: list[Any], info: Any) -> Any:
    """The fake model: the first sentence as a summary; a label from keywords."""
    from pydantic_ai.exceptions import ModelHTTPError
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart

    prompt = str(messages[-1].parts[-1].content)
    if prompt.startswith("Summarise") and "quarterly" in prompt and prompt not in _RATE_LIMITED:
        _RATE_LIMITED.add(prompt)
        raise ModelHTTPError(429, "gpt-4o-mini", "rate limit reached", retry_after=0.05)
    if info.output_tools:  # generate_object: answer through the schema's output tool
        lowered = prompt.lower()
        topic = (
            "finance" if "quarterly" in lowered else "support" if "order" in lowered else "office"
        )
        label = {"topic": topic, "urgent": "broken" in lowered}
        return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, label)])
    text = prompt.split(":", 1)[-1].strip()
    return ModelResponse(parts=[TextPart(text.split(". ")[0].rstrip(".") + ".")])


def model_for(name: str) -> Any:
    """The model a config names: the fake one, or any name pydantic-ai knows."""
    if name != FAKE_MODEL:
        return name
    from pydantic_ai.models.function import FunctionModel

    return FunctionModel(_answer, model_name="gpt-4o-mini")


SummariseConfig = with_ai_config(model=FAKE_MODEL, temperature=0.3, max_tokens=200)
ClassifyConfig = with_ai_config(model=FAKE_MODEL, temperature=0.0, max_tokens=50)
RETRY = RetryPolicy(max_attempts=3, initial_delay=0.05, backoff=2.0)


@define_stage(id="summarise", input=Document, output=Summary, config=SummariseConfig, retry=RETRY)
async def summarise(ctx: StageContext[Document, Any]) -> Summary:
    result = await ctx.ai.generate_text(
        model_for(ctx.config.model),
        f"Summarise in one sentence: {ctx.input.text}",
        temperature=ctx.config.temperature,
        max_tokens=ctx.config.max_tokens,
        topic="summary",
    )
    return Summary(name=ctx.input.name, summary=result.output)


@define_stage(id="classify", input=Summary, output=Labelled, config=ClassifyConfig, retry=RETRY)
async def classify(ctx: StageContext[Summary, Any]) -> Labelled:
    result = await ctx.ai.generate_object(
        model_for(ctx.config.model),
        f"Label this summary: {ctx.input.summary}",
        schema=Label,
        temperature=ctx.config.temperature,
        topic="label",
    )
    return Labelled(
        name=ctx.input.name,
        summary=ctx.input.summary,
        topic=result.output.topic,
        urgent=result.output.urgent,
    )


pipeline = WorkflowBuilder("ai-documents", input=Document).pipe(summarise).pipe(classify).build()


async def main() -> None:
    from treadle.testing import TestEngine

    te = TestEngine([pipeline])
    handles = [await te.start("ai-documents", {"name": n, "text": t}) for n, t in DOCUMENTS.items()]
    await te.advance_time(5)
    for handle in handles:
        run = await te.get_run(handle.run_id)
        print(run.output, f"cost ${run.total_cost}", f"{run.total_tokens} tokens")
        for call in await te.ai_calls(handle.run_id):
            mark = " (failed attempt)" if call.failed_attempt else ""
            print(f"  {call.stage_id} #{call.attempt} {call.model} ${call.cost}{mark}")


if __name__ == "__main__":
    asyncio.run(main())
