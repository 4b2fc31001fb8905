"""The durable pydantic-ai agent the agent crash test runs in real worker processes
(``--app agent_crash_app:workflows``; needs the ``ai`` extra).

The agent's model is a ``FunctionModel`` planning ``lookup`` then ``charge`` then an
answer. Every model invocation and tool execution appends ``<pid> <what>`` to
``calls.log`` in ``$TREADLE_CRASH_DIR``. The first execution of ``charge`` creates
``entered-charge`` and blocks until its process is killed; a later one returns at once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from treadle import WorkflowContext, workflow
from treadle.ai.agents import TreadleAgent


def _log(what: str) -> list[str]:
    """Append this execution to ``calls.log``; returns the log's lines before it."""
    log = Path(os.environ["TREADLE_CRASH_DIR"]) / "calls.log"
    before = log.read_text().splitlines() if log.exists() else []
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {what}\n")
    return before


def plan(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    _log("model")
    returns = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("lookup", {"sku": "A-1"})])
    if returns[0].tool_name == "lookup":
        return ModelResponse(parts=[ToolCallPart("charge", {"amount": returns[0].content})])
    return ModelResponse(parts=[TextPart(f"done: {returns[0].content}")])


agent: Agent[None, str] = Agent(FunctionModel(plan), name="shop")


@agent.tool_plain
def lookup(sku: str) -> int:
    _log("lookup")
    return 42


@agent.tool_plain
async def charge(amount: int) -> str:
    before = _log("charge")
    crash_dir = Path(os.environ["TREADLE_CRASH_DIR"])
    if not any(line.split()[1] == "charge" for line in before):
        (crash_dir / "entered-charge").touch()
        while not (crash_dir / "go").exists():  # noqa: ASYNC110 - another process's file
            await asyncio.sleep(0.02)
    return f"charged {amount}"


class Ask(BaseModel):
    prompt: str


durable = TreadleAgent(agent)


@workflow(id="shop-agent", input=Ask, output=str)
async def shop_agent(ctx: WorkflowContext, ask: Ask) -> str:
    result = await durable.run(ctx, ask.prompt)
    return str(result.output)


workflows = [shop_agent]
