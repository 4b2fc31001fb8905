"""What a durable pydantic-ai agent run costs over the same agent run in memory, and over
a code workflow with as many plain steps (issue 17, item 3).

The agent (a ``FunctionModel``, no network) asks for ``lookup``, then ``charge``, then
answers: 3 model requests and 2 tool calls, i.e. 5 journaled steps and 3 recorded AI
calls per run. Three figures, each the mean over ``--runs`` runs after one warm-up:

* ``plain``: ``agent.run(...)`` with no Treadle at all;
* ``durable``: ``engine.start("shop-agent") -> handle.result()`` through
  ``TreadleAgent`` with an in-process worker (``concurrency=1``);
* ``steps``: the same start-to-result for a code workflow of 5 steps that do nothing,
  so ``durable - steps`` is what the agent layer adds over Treadle's own journaling.

    .venv/bin/python benchmarks/ai_agents.py [--runs 30] [--backend sqlite|postgres|memory]
        [--pg-url postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from _common import fresh_database
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from treadle import Engine, TreadleAgent, WorkflowContext, workflow


def plan(messages: list[Any], info: AgentInfo) -> ModelResponse:
    returns = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("lookup", {"sku": "A-1"})])
    if returns[0].tool_name == "lookup":
        return ModelResponse(parts=[ToolCallPart("charge", {"amount": returns[0].content})])
    return ModelResponse(parts=[TextPart(f"done: {returns[0].content}")])


agent: Agent[None, str] = Agent(FunctionModel(plan, model_name="gpt-4o-mini"), name="shop")


@agent.tool_plain
def lookup(sku: str) -> int:
    return 42


@agent.tool_plain
def charge(amount: int) -> str:
    return f"charged {amount}"


durable = TreadleAgent(agent)


class Ask(BaseModel):
    prompt: str


@workflow(id="shop-agent", input=Ask, output=str)
async def shop_agent(ctx: WorkflowContext, ask: Ask) -> str:
    return str((await durable.run(ctx, ask.prompt)).output)


async def nothing(x: int) -> int:
    return x + 1


@workflow(id="five-steps", input=Ask, output=int)
async def five_steps(ctx: WorkflowContext, ask: Ask) -> int:
    value = 0
    for i in range(5):
        value = await ctx.step(f"s{i}", nothing, value)
    return value


async def per_run(engine: Engine, workflow_id: str, runs: int) -> float:
    await (await engine.start(workflow_id, {"prompt": "warm-up"})).result(timeout=60)
    started = time.perf_counter()
    for i in range(runs):
        await (await engine.start(workflow_id, {"prompt": f"buy {i}"})).result(timeout=60)
    return (time.perf_counter() - started) / runs * 1000


async def main(url: str, runs: int) -> None:
    await agent.run("warm-up")
    started = time.perf_counter()
    for _ in range(runs):
        await agent.run("buy")
    plain = (time.perf_counter() - started) / runs * 1000
    opened = Engine.open(url, workflows=[shop_agent, five_steps], auto_migrate=True)
    async with await opened as engine:
        options = {"concurrency": 1, "orchestration_interval": 0.02, "job_poll_interval": 0.02}
        async with engine.worker(**options):
            durable_ms = await per_run(engine, "shop-agent", runs)
            steps_ms = await per_run(engine, "five-steps", runs)
    print(
        f"{url.split(':')[0]}: plain {plain:.1f} ms/run, durable agent {durable_ms:.1f} ms/run, "
        f"5 plain steps {steps_ms:.1f} ms/run (agent layer adds {durable_ms - steps_ms:.1f} ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "memory"], default="sqlite")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    if args.backend == "memory":
        asyncio.run(main("memory://", args.runs))
    else:
        with fresh_database(args.backend, args.pg_url) as db_url:
            asyncio.run(main(db_url, args.runs))
