"""The AI workflow the AI crash test runs in real worker processes
(``--app ai_crash_app:workflows``).

Its model is a pydantic-ai ``FunctionModel`` priced as gpt-4o-mini. Each request appends
``<pid> <prompt>`` to ``requests.log`` in ``$TREADLE_CRASH_DIR``; the first request for
``two`` then creates ``entered-two`` and blocks until its process is killed, as a
provider call in flight when a worker dies. A later request answers at once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from treadle import WorkflowContext, workflow


def _dir() -> Path:
    return Path(os.environ["TREADLE_CRASH_DIR"])


async def _answer(messages: list[Any], info: Any) -> Any:
    from pydantic_ai.messages import ModelResponse, TextPart

    prompt = str(messages[-1].parts[-1].content)
    log = _dir() / "requests.log"
    before = log.read_text().splitlines() if log.exists() else []
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {prompt}\n")
    if prompt == "two" and not any(line.split()[1] == "two" for line in before):
        (_dir() / "entered-two").touch()
        while not (_dir() / "go").exists():  # noqa: ASYNC110 - the signal is another process's file
            await asyncio.sleep(0.02)
    return ModelResponse(parts=[TextPart(f"answer to {prompt}")])


def _model() -> Any:
    from pydantic_ai.models.function import FunctionModel

    return FunctionModel(_answer, model_name="gpt-4o-mini")


class Job(BaseModel):
    n: int


@workflow(id="ai-three", input=Job, output=list[str])
async def ai_three(ctx: WorkflowContext, job: Job) -> list[str]:
    model = _model()
    return [
        (await ctx.ai.generate_text(model, prompt, name=prompt)).output
        for prompt in ("one", "two", "three")
    ]


workflows = [ai_three]
