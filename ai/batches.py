"""Provider batch APIs as batch stages: ``define_ai_batch_stage``.

A batch of prompts goes to the provider's batch API (OpenAI Batch: a JSONL file upload
then ``/v1/batches``; Anthropic Message Batches: ``/v1/messages/batches``) through the
official SDK. The stage then suspends with the batch id in its state (``Suspend``), so a
batch that takes hours holds no worker; ``check_completion`` asks the provider at each
poll and, once the batch ended, reads its results, puts them back in the order of the
prompts (by ``custom_id``), prices each item at the provider's batch price, records each
as an AI call (``call_type="batch-item"``), and completes the stage with an
``AIBatchOutput``.

Batch price: genai-prices carries the providers' batch rates as a price variant
(``price_context={"processing": "batch"}``: 50% of the standard rates for both OpenAI and
Anthropic, per their pricing pages). Where genai-prices has no batch variant for a model
the standard price is what it returns; ``cost`` is ``None`` for a model it does not know.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from treadle.kernel.ai import AICall
from treadle.kernel.definitions import (
    BatchStageDefinition,
    Failed,
    NotReady,
    Ready,
    Suspend,
    define_batch_stage,
)
from treadle.kernel.errors import AIRateLimitedError, DefinitionError, NonRetryableError
from treadle.kernel.retry import RetryPolicy

Provider = Literal["openai", "anthropic"]

PROVIDERS: tuple[str, ...] = ("openai", "anthropic")

MAX_REQUESTS: dict[str, int] = {"openai": 50_000, "anthropic": 100_000}
"""Requests one batch may hold (the providers' documented limits)."""

NO_RESULT = "no result"
"""The error of an item the provider returned nothing for (an OpenAI batch that expired
before reaching it)."""

SUBMITTED_ARTIFACT = "ai-batch.json"
"""The stage's artifact holding the submitted batch (provider, model, count, batch id)."""


class AIBatchItem(BaseModel):
    """One prompt's result, at the prompt's index."""

    model_config = ConfigDict(frozen=True)

    index: int
    custom_id: str
    text: str | None = None
    """The model's answer; ``None`` when the item failed."""
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal | None = None
    """At the batch price; ``None`` when genai-prices knows no price for the model."""


class AIBatchOutput(BaseModel):
    """A finished batch: one item per prompt, in the order of the prompts."""

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str
    batch_id: str
    items: list[AIBatchItem]
    total_cost: Decimal | None = None
    currency: str = "USD"

    @property
    def texts(self) -> list[str | None]:
        return [item.text for item in self.items]


class AIBatchPrompt(BaseModel):
    """A prompt with its own system prompt, for ``prompts`` returning more than text."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    system: str | None = None


PromptsFn = Callable[
    [Any], Sequence["str | AIBatchPrompt"] | Awaitable[Sequence["str | AIBatchPrompt"]]
]
ClientFactory = Callable[[], Any]


def parse_model(model: str) -> tuple[Provider, str]:
    """``"openai:gpt-4o-mini"`` -> ``("openai", "gpt-4o-mini")``."""
    provider, sep, name = model.partition(":")
    if not sep or not name or provider not in PROVIDERS:
        raise DefinitionError(
            f"define_ai_batch_stage: model must be 'openai:<model>' or 'anthropic:<model>', "
            f"got {model!r}"
        )
    return provider, name  # type: ignore[return-value]  # checked against PROVIDERS


def batch_price(provider: str, model: str, input_tokens: int, output_tokens: int) -> Decimal | None:
    """What one item cost at the provider's batch price (genai-prices' ``batch`` variant)."""
    from genai_prices import Usage, calc_price

    try:
        price = calc_price(
            Usage(input_tokens=input_tokens, output_tokens=output_tokens),
            model,
            provider_id=provider,
            price_context={"processing": "batch"},
        )
    except LookupError:
        return None
    return Decimal(str(price.total_price))


def _custom_id(index: int) -> str:
    return f"item-{index}"


def _index(custom_id: str) -> int | None:
    prefix, _, number = custom_id.partition("-")
    return int(number) if prefix == "item" and number.isdigit() else None


def _as_prompts(raw: Sequence[str | AIBatchPrompt], system: str | None) -> list[AIBatchPrompt]:
    prompts: list[AIBatchPrompt] = []
    for i, item in enumerate(raw):
        if isinstance(item, AIBatchPrompt):
            prompts.append(
                item
                if item.system is not None
                else AIBatchPrompt(prompt=item.prompt, system=system)
            )
        elif isinstance(item, str):
            prompts.append(AIBatchPrompt(prompt=item, system=system))
        else:
            raise NonRetryableError(
                f"prompts[{i}]: expected a string or an AIBatchPrompt, got {type(item).__name__}"
            )
    if not prompts:
        raise NonRetryableError("prompts: a batch needs at least one prompt")
    return prompts


# -- OpenAI ---------------------------------------------------------------------------------

_OPENAI_RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}


async def _openai_submit(
    client: Any, model: str, prompts: list[AIBatchPrompt], max_tokens: int, key: str
) -> dict[str, Any]:
    lines = []
    for i, p in enumerate(prompts):
        messages = [] if p.system is None else [{"role": "system", "content": p.system}]
        messages.append({"role": "user", "content": p.prompt})
        lines.append(
            json.dumps(
                {
                    "custom_id": _custom_id(i),
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": messages, "max_tokens": max_tokens},
                }
            )
        )
    data = ("\n".join(lines) + "\n").encode()
    uploaded = await client.files.create(file=("batch.jsonl", data), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"treadle_key": key[:512]},
    )
    return {"batch_id": batch.id, "input_file_id": uploaded.id}


async def _openai_check(
    client: Any, state: dict[str, Any]
) -> tuple[Literal["running", "failed", "done"], str | None, list[dict[str, Any]]]:
    batch = await client.batches.retrieve(state["batch_id"])
    status = batch.status
    if status in _OPENAI_RUNNING:
        return "running", None, []
    lines: list[dict[str, Any]] = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            content = await client.files.content(file_id)
            lines.extend(json.loads(line) for line in content.text.splitlines() if line.strip())
    items = _openai_items(lines)
    if status in ("completed", "expired"):  # expired: the prompts not reached have no result
        return "done", None, items
    errors = getattr(batch, "errors", None)
    detail = f": {errors.model_dump_json()}" if errors is not None else ""
    return "failed", f"OpenAI batch {batch.id} ended {status}{detail}", items


def _openai_items(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output and error files' lines as items (``custom_id``, text or error, usage)."""
    items = []
    for line in lines:
        response = line.get("response") or {}
        body = response.get("body") or {}
        usage = body.get("usage") or {}
        error = line.get("error")
        text = None
        if error is None and response.get("status_code") == 200:
            choices = body.get("choices") or []
            text = choices[0]["message"].get("content") if choices else None
        elif error is None:
            error = body.get("error") or {"status_code": response.get("status_code")}
        items.append(
            {
                "custom_id": line.get("custom_id", ""),
                "text": text,
                "error": None if error is None else json.dumps(error),
                "input_tokens": int(usage.get("prompt_tokens") or 0),
                "output_tokens": int(usage.get("completion_tokens") or 0),
                "response": body or None,
            }
        )
    return items


# -- Anthropic ------------------------------------------------------------------------------


async def _anthropic_submit(
    client: Any, model: str, prompts: list[AIBatchPrompt], max_tokens: int, key: str
) -> dict[str, Any]:
    requests = []
    for i, p in enumerate(prompts):
        params: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": p.prompt}],
        }
        if p.system is not None:
            params["system"] = p.system
        requests.append({"custom_id": _custom_id(i), "params": params})
    batch = await client.messages.batches.create(requests=requests)
    return {"batch_id": batch.id}


async def _anthropic_check(
    client: Any, state: dict[str, Any]
) -> tuple[Literal["running", "failed", "done"], str | None, list[dict[str, Any]]]:
    batch = await client.messages.batches.retrieve(state["batch_id"])
    if batch.processing_status != "ended":
        return "running", None, []
    items = []
    async for entry in await client.messages.batches.results(state["batch_id"]):
        result = entry.result
        text = None
        error = None
        usage: dict[str, Any] = {}
        message = None
        if result.type == "succeeded":
            message = result.message.model_dump(mode="json")
            usage = message.get("usage") or {}
            text = "".join(
                block.get("text", "")
                for block in message.get("content") or []
                if block.get("type") == "text"
            )
        elif result.type == "errored":
            error = result.error.model_dump_json()
        else:  # canceled, expired
            error = json.dumps({"type": result.type})
        items.append(
            {
                "custom_id": entry.custom_id,
                "text": text,
                "error": error,
                "input_tokens": int(usage.get("input_tokens") or 0),
                "output_tokens": int(usage.get("output_tokens") or 0),
                "response": message,
            }
        )
    return "done", None, items


_BUSY_STATUSES = frozenset({429, 503, 529})


def _rate_limited(exc: Exception) -> AIRateLimitedError | None:
    """The SDK's 429 / overloaded answer as ``AIRateLimitedError``: the stage's retry waits
    at least the provider's ``Retry-After``."""
    status = getattr(exc, "status_code", None)
    if status not in _BUSY_STATUSES:
        return None
    response = getattr(exc, "response", None)
    header = response.headers.get("retry-after") if response is not None else None
    try:
        retry_after = float(header) if header is not None else None
    except ValueError:
        retry_after = None
    return AIRateLimitedError(f"{type(exc).__name__}: {exc}", retry_after=retry_after)


def _default_client(provider: Provider) -> Any:
    if provider == "openai":
        from openai import AsyncOpenAI

        return AsyncOpenAI()
    from anthropic import AsyncAnthropic

    return AsyncAnthropic()


def define_ai_batch_stage(
    *,
    id: str,
    input: Any,
    model: str,
    prompts: PromptsFn,
    system: str | None = None,
    max_tokens: int = 1024,
    topic: str | None = None,
    client: ClientFactory | None = None,
    poll_interval: timedelta = timedelta(minutes=5),
    max_wait: timedelta = timedelta(hours=24),
    name: str | None = None,
    retry: RetryPolicy | None = None,
    requires: Sequence[str] = (),
    queue: str | None = None,
) -> BatchStageDefinition:
    """A batch stage that sends ``prompts(ctx)`` (strings or ``AIBatchPrompt``s) to
    ``model`` (``"openai:<model>"`` or ``"anthropic:<model>"``) through the provider's
    batch API, suspends until the batch ends (polling every ``poll_interval``, failing
    after ``max_wait``), and completes with an ``AIBatchOutput``: the answers in the order
    of the prompts, each priced at the batch rate and recorded as an AI call.
    ``prompts`` may be async. ``client``: a factory for the SDK's async client
    (``AsyncOpenAI`` / ``AsyncAnthropic``; default: built from the environment's API
    key); each submission and each poll makes one and closes it. ``topic``: the
    AI calls' topic (default: the stage id)."""
    provider, model_name = parse_model(model)
    if max_tokens < 1:
        raise DefinitionError(f"stage {id!r}: max_tokens must be at least 1")
    make_client = client or (lambda: _default_client(provider))
    submit = _openai_submit if provider == "openai" else _anthropic_submit
    check = _openai_check if provider == "openai" else _anthropic_check

    @define_batch_stage(
        id=id,
        input=input,
        output=AIBatchOutput,
        name=name,
        retry=retry,
        requires=requires,
        queue=queue,
    )
    async def stage(ctx: Any) -> Suspend:
        # The batch id goes to an artifact (a blob, written at once) before the stage
        # suspends: an attempt that dies between the provider's answer and the suspension's
        # commit is retried, and the retry polls that batch instead of paying for another.
        # The artifact also keeps the prompts, for the AI calls recorded at completion (the
        # suspension's state stays small: it is stored with the stage).
        if await ctx.artifacts.has(SUBMITTED_ARTIFACT):
            state = json.loads(await ctx.artifacts.get(SUBMITTED_ARTIFACT))
            state.pop("prompts", None)
        else:
            raw_prompts = prompts(ctx)
            if inspect.isawaitable(raw_prompts):
                raw_prompts = await raw_prompts
            asked = _as_prompts(raw_prompts, system)
            if len(asked) > MAX_REQUESTS[provider]:
                raise NonRetryableError(
                    f"prompts: {len(asked)} prompts, but one {provider} batch takes at most "
                    f"{MAX_REQUESTS[provider]}; split them over several stages"
                )
            await ctx.ai.check_budget()  # a run already past its max_cost submits nothing
            try:
                async with make_client() as sdk:
                    submitted = await submit(
                        sdk, model_name, asked, max_tokens, ctx.idempotency_key
                    )
            except Exception as exc:
                limited = _rate_limited(exc)
                if limited is not None:
                    raise limited from exc
                raise
            state = {"provider": provider, "model": model_name, "count": len(asked), **submitted}
            kept = {**state, "prompts": [p.model_dump(mode="json") for p in asked]}
            await ctx.artifacts.put(SUBMITTED_ARTIFACT, json.dumps(kept))
        return Suspend(state=state, poll_interval=poll_interval, max_wait=max_wait)

    @stage.check_completion
    async def completion(state: dict[str, Any], ctx: Any) -> Ready | NotReady | Failed:
        async with make_client() as sdk:
            status, message, raw = await check(sdk, state)
        if status == "running":
            return NotReady()
        items = _in_order(raw, int(state["count"]), provider, model_name)
        # Every prompt the provider answered (or refused) is an AI call, also when the
        # batch failed: a cancelled batch's answered prompts were paid for.
        answered = [i for i in items if i.error != NO_RESULT]
        await _record(ctx, answered, raw, provider, model_name, topic or id)
        if status == "failed":
            return Failed(message or "batch failed")
        costs = [i.cost for i in answered if i.cost is not None]
        total = sum(costs, Decimal(0)) if len(costs) == len(answered) else None
        return Ready(
            AIBatchOutput(
                provider=provider,
                model=model_name,
                batch_id=str(state["batch_id"]),
                items=items,
                total_cost=total,
            )
        )

    return stage


async def _record(
    ctx: Any,
    items: list[AIBatchItem],
    raw: list[dict[str, Any]],
    provider: str,
    model: str,
    topic: str,
) -> None:
    """Each item as an AI call of this completion check (``call_type="batch-item"``),
    committed with the stage's completion: prompt (from the submission artifact),
    response, tokens and batch-price cost. Latency is not known per item (zero)."""
    asked: list[Any] = []
    if await ctx.artifacts.has(SUBMITTED_ARTIFACT):
        asked = json.loads(await ctx.artifacts.get(SUBMITTED_ARTIFACT)).get("prompts") or []
    responses = {str(r["custom_id"]): r.get("response") for r in raw}
    for item in items:
        ctx.ai.record(
            AICall(
                topic=topic,
                call_type="batch-item",
                provider=provider,
                model=model,
                prompt=asked[item.index] if item.index < len(asked) else None,
                response=responses.get(item.custom_id),
                input_tokens=item.input_tokens,
                output_tokens=item.output_tokens,
                cost=item.cost,
                error=item.error,
            )
        )


def _in_order(
    raw: list[dict[str, Any]], count: int, provider: str, model: str
) -> list[AIBatchItem]:
    """The results at their prompts' indexes; an index the provider returned nothing for
    is an item with an error."""
    by_index: dict[int, dict[str, Any]] = {}
    for item in raw:
        index = _index(str(item["custom_id"]))
        if index is not None and 0 <= index < count:
            by_index[index] = item
    items = []
    for i in range(count):
        got = by_index.get(i)
        if got is None:
            items.append(AIBatchItem(index=i, custom_id=_custom_id(i), error=NO_RESULT))
            continue
        items.append(
            AIBatchItem(
                index=i,
                custom_id=_custom_id(i),
                text=got["text"],
                error=got["error"],
                input_tokens=got["input_tokens"],
                output_tokens=got["output_tokens"],
                cost=batch_price(provider, model, got["input_tokens"], got["output_tokens"]),
            )
        )
    return items
