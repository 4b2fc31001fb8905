"""Stage and workflow definitions: ``define_stage``, ``define_batch_stage``, ``WorkflowBuilder``.

A definition is an immutable recipe. ``WorkflowBuilder.build()`` checks it once
(unique ids, declared dependencies, schema fit between adjacent groups) so that
mistakes surface at import time with the stage named, not hours into a run.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, TypeAdapter, field_validator
from pydantic import ValidationError as PydanticValidationError

from treadle.kernel.ai import budget
from treadle.kernel.errors import DefinitionError, InvalidConfigError, InvalidInputError
from treadle.kernel.flow_control import RateLimit, check_limits
from treadle.kernel.limits import Duration, dump_json, precheck, to_duration, to_json
from treadle.kernel.model import JsonValue
from treadle.kernel.queues import DEFAULT_QUEUE, REMOTE_QUEUE, check_queue
from treadle.kernel.retry import DEFAULT_RETRY, RetryPolicy
from treadle.kernel.schedules import ScheduleDefinition, define_schedule
from treadle.kernel.text import safe_text

if TYPE_CHECKING:
    from treadle.kernel.context import StageContext


class Suspend(BaseModel):
    """Returned by a batch stage body: park the stage and poll ``check_completion`` later."""

    model_config = ConfigDict(frozen=True)

    state: JsonValue = None
    poll_interval: Duration = timedelta(seconds=30)
    max_wait: Duration = timedelta(hours=24)

    @field_validator("state")
    @classmethod
    def _storable_state(cls, state: Any) -> JsonValue:
        """Stored with the stage: its JSON form, refused (``TreadleValidationError``, which
        fails the stage) when no backend could store it."""
        return to_json(state, "state", what="Suspend")


class Ready(BaseModel):
    """The awaited work is done. With ``output`` the stage completes with it; without,
    the body runs again and reads ``ctx.resume_state``. ``Ready(output)`` or
    ``Ready(output=...)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output: Any = None

    @overload
    def __init__(self, output: Any, /) -> None: ...
    @overload
    def __init__(self, *, output: Any = None) -> None: ...
    def __init__(self, *args: Any, **data: Any) -> None:
        super().__init__(**_positional("Ready", "output", args, data))


class NotReady(BaseModel):
    """Not done yet; poll again after the stage's poll interval."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    poll_interval: Duration | None = None


class Failed(BaseModel):
    """The awaited work failed for good. ``Failed(message)`` or ``Failed(message=...)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    message: str

    @overload
    def __init__(self, message: str, /) -> None: ...
    @overload
    def __init__(self, *, message: str) -> None: ...
    def __init__(self, *args: Any, **data: Any) -> None:
        super().__init__(**_positional("Failed", "message", args, data))

    @field_validator("message")
    @classmethod
    def _storable_message(cls, message: str) -> str:
        """It becomes the stage's error, which must store on every backend."""
        return safe_text(message)


def _positional(
    model: str, name: str, args: tuple[Any, ...], data: dict[str, Any]
) -> dict[str, Any]:
    """The keyword arguments with field ``name``, if given positionally, folded in."""
    if not args:
        return data
    if len(args) > 1:
        raise TypeError(
            f"{model}() takes 1 positional argument ({name}) but {len(args)} were given"
        )
    if name in data:
        raise TypeError(f"{model}() got {name!r} both positionally and by keyword")
    return {name: args[0], **data}


CheckResult = Ready | NotReady | Failed
StageFn = Callable[["StageContext[Any, Any]"], Any]
CheckFn = Callable[[Any, "StageContext[Any, Any]"], Awaitable[CheckResult] | CheckResult]

_NO_INPUT = "none"

DEFAULT_MAX_CHECK_FAILURES = 5
"""Completion checks in a row that may raise before the batch stage fails."""


def _is_async(fn: Any) -> bool:
    """A coroutine function, or a callable object whose ``__call__`` is one (mocks)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _adapter(model: Any) -> TypeAdapter[Any] | None:
    if model is None or model == _NO_INPUT:
        return None
    return TypeAdapter(model)


@dataclass(frozen=True, eq=False)
class StageDefinition:
    """One stage: its function, schemas, retry policy and timeout."""

    id: str
    fn: StageFn
    input_model: Any
    output_model: Any
    config_model: type[BaseModel] | None = None
    name: str | None = None
    retry: RetryPolicy = DEFAULT_RETRY
    timeout: timedelta | None = None
    requires: tuple[str, ...] = ()
    queue: str | None = None
    """The queue its jobs go to; ``None``: the workflow's queue (``WorkflowBuilder(queue=)``),
    else ``DEFAULT_QUEUE``. Only workers serving that queue run it."""
    remote: bool = False
    """Executed only by remote workers over HTTP (``docs/remote-workers.md``), never by an
    in-process worker; its function is not called. Its queue defaults to ``REMOTE_QUEUE``."""
    is_async: bool = True
    input_adapter: TypeAdapter[Any] | None = field(default=None, repr=False)
    output_adapter: TypeAdapter[Any] = field(default=TypeAdapter(Any), repr=False)

    @property
    def is_batch(self) -> bool:
        return False

    @cached_property
    def unstorable_output(self) -> str:
        """The start of the error for an output that cannot be stored (``kernel.limits``):
        made once per definition, not on every stage's path."""
        return f"stage {self.id!r} returned output that cannot be stored"

    @property
    def reads_input(self) -> bool:
        return self.input_adapter is not None

    def validate_config(self, raw: Mapping[str, Any] | None) -> BaseModel | None:
        if self.config_model is None:
            if raw:
                raise InvalidConfigError(
                    f"config.{self.id}: stage {self.id!r} takes no config",
                    [(f"config.{self.id}", "stage takes no config")],
                )
            return None
        try:
            return self.config_model.model_validate(dict(raw or {}))
        except PydanticValidationError as exc:
            raise InvalidConfigError.from_pydantic(
                f"invalid config for stage {self.id!r}", exc, prefix=f"config.{self.id}"
            ) from None

    def with_fn(self, fn: StageFn) -> StageDefinition:
        """A copy running ``fn`` instead (used by ``TestEngine.mock_stage``); a remote
        stage's copy runs in-process, so a test can stand in for the remote worker."""
        return dataclasses.replace(self, fn=fn, is_async=_is_async(fn), remote=False)


@dataclass(frozen=True, eq=False)
class BatchStageDefinition(StageDefinition):
    """A stage whose body may return ``Suspend``; ``check_completion`` polls it.
    ``max_check_failures`` checks in a row that raise fail the stage."""

    checks: list[CheckFn] = field(default_factory=list, repr=False)
    max_check_failures: int = DEFAULT_MAX_CHECK_FAILURES

    @property
    def is_batch(self) -> bool:
        return True

    @property
    def check_fn(self) -> CheckFn | None:
        return self.checks[0] if self.checks else None

    def check_completion(self, fn: CheckFn) -> CheckFn:
        """Decorator registering ``async def check(state, ctx) -> Ready | NotReady | Failed``."""
        self.checks[:] = [fn]
        return fn

    def with_fn(self, fn: StageFn) -> StageDefinition:
        return dataclasses.replace(
            self, fn=fn, is_async=_is_async(fn), checks=self.checks, remote=False
        )


F = TypeVar("F", bound=Callable[..., Any])


def _check_stage_queue(stage_id: str, queue: str | None) -> None:
    if queue is not None:
        try:
            check_queue(queue, f"stage {stage_id!r}")
        except ValueError as exc:
            raise DefinitionError(str(exc)) from None


def _stage_kwargs(
    fn: Callable[..., Any],
    id: str,
    input: Any,
    output: Any,
    config: type[BaseModel] | None,
    name: str | None,
    retry: RetryPolicy | None,
    timeout: timedelta | float | None,
    requires: Iterable[str],
    queue: str | None = None,
) -> dict[str, Any]:
    if not id or not isinstance(id, str):
        raise DefinitionError("define_stage: id must be a non-empty string")
    _check_stage_queue(id, queue)
    if output is None:
        raise DefinitionError(f"stage {id!r}: output model is required")
    if timeout is not None:
        try:
            timeout = to_duration(timeout, "timeout")
        except ValueError as exc:
            raise DefinitionError(f"stage {id!r}: {exc}") from None
    return {
        "id": id,
        "fn": fn,
        "input_model": input,
        "output_model": output,
        "config_model": config,
        "name": name or id,
        "retry": retry or DEFAULT_RETRY,
        "timeout": timeout,
        "requires": tuple(requires),
        "queue": queue,
        "is_async": _is_async(fn),
        "input_adapter": _adapter(input),
        "output_adapter": TypeAdapter(output),
    }


def define_stage(
    *,
    id: str,
    input: Any,
    output: Any,
    config: type[BaseModel] | None = None,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: timedelta | float | None = None,
    requires: Iterable[str] = (),
    queue: str | None = None,
    remote: bool = False,
) -> Callable[[StageFn], StageDefinition]:
    """Decorate a sync or async ``fn(ctx)`` as a stage. ``input="none"`` reads only
    earlier outputs through ``ctx.require``. ``queue``: only workers serving that queue
    run it (see ``kernel/queues.py``). ``remote=True``: only remote workers run it, over
    HTTP (``docs/remote-workers.md``); the function is never called, and the queue
    defaults to ``REMOTE_QUEUE``, which in-process workers refuse to serve."""
    _check_stage_queue(id, queue)
    if not isinstance(remote, bool):
        raise DefinitionError(f"stage {id!r}: remote must be True or False, got {remote!r}")
    if remote and queue is None:
        queue = REMOTE_QUEUE

    def wrap(fn: StageFn) -> StageDefinition:
        return StageDefinition(
            **_stage_kwargs(fn, id, input, output, config, name, retry, timeout, requires, queue),
            remote=remote,
        )

    return wrap


def define_batch_stage(
    *,
    id: str,
    input: Any,
    output: Any,
    config: type[BaseModel] | None = None,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: timedelta | float | None = None,
    requires: Iterable[str] = (),
    max_check_failures: int = DEFAULT_MAX_CHECK_FAILURES,
    queue: str | None = None,
) -> Callable[[StageFn], BatchStageDefinition]:
    """Like ``define_stage``; the body may return ``Suspend(...)`` and the stage's
    ``.check_completion`` decorator registers the poll function. A check that raises is
    tried again at the next poll; after ``max_check_failures`` such checks in a row (a
    ``NotReady`` resets the count) the stage fails with the last error."""
    _check_stage_queue(id, queue)
    if isinstance(max_check_failures, bool) or not isinstance(max_check_failures, int):
        raise DefinitionError(f"stage {id!r}: max_check_failures must be an integer")
    if max_check_failures < 1:
        raise DefinitionError(f"stage {id!r}: max_check_failures must be at least 1")

    def wrap(fn: StageFn) -> BatchStageDefinition:
        return BatchStageDefinition(
            **_stage_kwargs(fn, id, input, output, config, name, retry, timeout, requires, queue),
            max_check_failures=max_check_failures,
        )

    return wrap


@dataclass(frozen=True, eq=False)
class WorkflowDefinition:
    """A built, validated workflow: ordered execution groups of stages."""

    id: str
    version: str
    input_model: Any
    groups: tuple[tuple[StageDefinition, ...], ...]
    description: str | None = None
    kind: Literal["pipeline", "code"] = "pipeline"
    input_adapter: TypeAdapter[Any] = field(default=TypeAdapter(Any), repr=False)
    stages: dict[str, StageDefinition] = field(default_factory=dict, repr=False)
    group_of: dict[str, int] = field(default_factory=dict, repr=False)
    queue: str = DEFAULT_QUEUE
    """The queue of the stages that name none (``WorkflowBuilder(queue=)``,
    ``@workflow(queue=)``)."""
    concurrency: int | None = None
    """At most this many runs of the workflow hold a slot at once (``kernel/flow_control.py``)."""
    concurrency_per_key: int | None = None
    """At most this many runs sharing a ``concurrency_key`` hold a slot at once."""
    rate_limit: RateLimit | None = None
    """At most ``starts`` runs started per ``per`` (per workflow, or per key)."""
    schedules: tuple[ScheduleDefinition, ...] = ()
    """Cron schedules declared with the workflow (``schedule="*/5 * * * *"``): an engine
    opening with it creates them (``kernel/schedules.py``)."""
    retention: timedelta | None = None
    """How long this workflow's terminal runs are kept before the maintenance tick purges
    them (``run.purge``); ``None``: the engine's default (``KernelSettings``)."""
    max_cost: Decimal | None = None
    """Each run's AI budget, unless its start gives one (``kernel/ai.py``): once the run's
    AI calls cost this much, the next call fails the run with ``BudgetExceededError``."""

    def stage(self, stage_id: str) -> StageDefinition | None:
        return self.stages.get(stage_id)

    def queue_of(self, stage_id: str) -> str:
        """The queue of ``stage_id``'s jobs: its own, else the workflow's."""
        stage = self.stages.get(stage_id)
        return (stage.queue if stage is not None else None) or self.queue

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue this workflow's jobs go to, in stage order, without repeats."""
        return tuple(dict.fromkeys(self.queue_of(stage_id) for stage_id in self.stages))

    @property
    def remote_queues(self) -> tuple[str, ...]:
        """The queues of this workflow's remote stages (``define_stage(remote=True)``),
        which only remote workers serve."""
        return tuple(
            dict.fromkeys(self.queue_of(sid) for sid, st in self.stages.items() if st.remote)
        )

    def validate_input(self, data: Any) -> JsonValue:
        """Validate run input; returns its JSON form, storable on every backend
        (``kernel.limits``). Raises ``InvalidInputError`` naming the field."""
        what = f"invalid input for workflow {self.id!r}"
        precheck(data, "input", InvalidInputError, what=what)
        try:
            value = self.input_adapter.validate_python(data)
        except PydanticValidationError as exc:
            raise InvalidInputError.from_pydantic(what, exc, prefix="input") from None
        serializer = self.input_adapter.serializer
        return dump_json(serializer, value, "input", InvalidInputError, what=what)

    def validate_config(self, config: Mapping[str, Any] | None) -> dict[str, JsonValue]:
        """Validate each stage's config, fill defaults; returns the JSON form per stage."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(self.stages))
        if unknown:
            raise InvalidConfigError(
                f"config names unknown stage(s) {unknown} of workflow {self.id!r}",
                [(f"config.{name}", "no such stage") for name in unknown],
            )
        out: dict[str, JsonValue] = {}
        what = f"invalid config for workflow {self.id!r}"
        for stage_id, stage in self.stages.items():
            raw = config.get(stage_id)
            precheck(raw, f"config.{stage_id}", InvalidConfigError, what=what)
            model = stage.validate_config(raw)
            if model is not None:
                out[stage_id] = dump_json(
                    model.__pydantic_serializer__,
                    model,
                    f"config.{stage_id}",
                    InvalidConfigError,
                    what=what,
                )
        return out

    def group_output(self, group: int, outputs: Mapping[str, JsonValue]) -> JsonValue:
        """A group's output as the next group sees it: the single stage's output, or a
        dict keyed by stage id for a parallel group."""
        stages = self.groups[group]
        if len(stages) == 1:
            return outputs.get(stages[0].id)
        return {s.id: outputs.get(s.id) for s in stages}


def _alias_keys(alias: Any) -> list[str]:
    """The top-level keys a validation alias reads: a plain alias, each choice of an
    ``AliasChoices``, the first step of an ``AliasPath``."""
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasPath):
        first = alias.path[0] if alias.path else None
        return [first] if isinstance(first, str) else []
    if isinstance(alias, AliasChoices):
        return [key for choice in alias.choices for key in _alias_keys(choice)]
    return []


def _required_keys(model: Any) -> dict[str, list[str]] | None:
    """For each required field of a pydantic model, the top-level keys its validation
    accepts, preferred first: its validation alias or alias, then its name where the
    model validates by name (a field without alias, or ``populate_by_name`` /
    ``validate_by_name`` set). ``None`` for anything else (not checked)."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    config = model.model_config
    by_name = bool(config.get("populate_by_name") or config.get("validate_by_name"))
    by_alias = config.get("validate_by_alias", True)
    required: dict[str, list[str]] = {}
    for name, info in model.model_fields.items():
        if not info.is_required():
            continue
        alias = info.validation_alias if info.validation_alias is not None else info.alias
        keys = _alias_keys(alias) if by_alias else []
        if not keys or by_name:
            keys.append(name)
        required[name] = list(dict.fromkeys(keys))
    return required


def _dumped_keys(model: Any) -> set[str] | None:
    """The top-level keys of a pydantic model's JSON form as the kernel stores it (by
    alias only where the model serializes by alias); ``None`` for anything else."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    by_alias = bool(model.model_config.get("serialize_by_alias"))
    keys = {
        (info.serialization_alias or info.alias or name) if by_alias else name
        for name, info in model.model_fields.items()
        if not info.exclude
    }
    for name, computed in model.model_computed_fields.items():
        keys.add((computed.alias or name) if by_alias else name)
    return keys


def declared_schedule(workflow_id: str, cron: str | None) -> tuple[ScheduleDefinition, ...]:
    """The schedule ``schedule="<cron>"`` declares: id = the workflow's, UTC, no input
    (``define_schedule`` says more: timezone, input, policies)."""
    if cron is None:
        return ()
    if not isinstance(cron, str):
        raise DefinitionError(
            f"workflow {workflow_id!r}: schedule must be a cron expression string, got {cron!r}"
        )
    return (define_schedule(workflow_id, cron=cron),)


def retention_of(workflow_id: str, value: timedelta | float | None) -> timedelta | None:
    """A workflow's ``retention``: a positive duration (a number means seconds) or ``None``;
    ``DefinitionError`` naming the workflow otherwise."""
    if value is None:
        return None
    try:
        return to_duration(value, "retention")
    except ValueError as exc:
        raise DefinitionError(f"workflow {workflow_id!r}: {exc}") from None


def max_cost_of(workflow_id: str, value: Decimal | float | str | None) -> Decimal | None:
    """A workflow's ``max_cost``: a non-negative amount (``Decimal``, number or numeric
    text) or ``None``; ``DefinitionError`` naming the workflow otherwise."""
    if value is None:
        return None
    try:
        return budget(value, "max_cost")
    except ValueError as exc:
        raise DefinitionError(f"workflow {workflow_id!r}: {exc}") from None


class WorkflowBuilder:
    """Fluent builder: ``WorkflowBuilder(id, input=Model).pipe(a).parallel([b, c]).build()``."""

    def __init__(
        self,
        id: str,
        *,
        input: Any,
        description: str | None = None,
        version: str = "1",
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        concurrency_per_key: int | None = None,
        rate_limit: RateLimit | None = None,
        schedule: str | None = None,
        retention: timedelta | float | None = None,
        max_cost: Decimal | float | str | None = None,
    ) -> None:
        try:
            check_queue(queue, f"workflow {id!r}")
            check_limits(f"workflow {id!r}", concurrency, concurrency_per_key, rate_limit)
        except ValueError as exc:
            raise DefinitionError(str(exc)) from None
        self._concurrency = concurrency
        self._concurrency_per_key = concurrency_per_key
        self._rate_limit = rate_limit
        self._id = id
        self._retention = retention_of(id, retention)
        self._max_cost = max_cost_of(id, max_cost)
        self._input = input
        self._description = description
        self._version = str(version)
        self._queue = queue
        self._schedule = schedule
        self._groups: list[tuple[StageDefinition, ...]] = []

    def pipe(self, stage: StageDefinition) -> WorkflowBuilder:
        """Append a group of one stage."""
        self._check_stage(stage)
        self._groups.append((stage,))
        return self

    def parallel(self, stages: Sequence[StageDefinition]) -> WorkflowBuilder:
        """Append a group whose stages run concurrently; the next group gets a dict."""
        if not stages:
            raise DefinitionError(f"workflow {self._id!r}: parallel() needs at least one stage")
        for stage in stages:
            self._check_stage(stage)
        self._groups.append(tuple(stages))
        return self

    def _check_stage(self, stage: Any) -> None:
        if not isinstance(stage, StageDefinition):
            raise DefinitionError(
                f"workflow {self._id!r}: {stage!r} is not a stage; decorate it with define_stage"
            )

    def build(self) -> WorkflowDefinition:
        if not self._id:
            raise DefinitionError("workflow id must be a non-empty string")
        if not self._groups:
            raise DefinitionError(f"workflow {self._id!r} has no stages")
        stages: dict[str, StageDefinition] = {}
        group_of: dict[str, int] = {}
        for index, group in enumerate(self._groups):
            for stage in group:
                if stage.id in stages:
                    raise DefinitionError(f"workflow {self._id!r}: duplicate stage id {stage.id!r}")
                stages[stage.id] = stage
                group_of[stage.id] = index
        for stage_id, stage in stages.items():
            for dep in stage.requires:
                if dep not in stages:
                    raise DefinitionError(
                        f"workflow {self._id!r}: stage {stage_id!r} requires missing stage {dep!r}"
                    )
                if group_of[dep] >= group_of[stage_id]:
                    raise DefinitionError(
                        f"workflow {self._id!r}: stage {stage_id!r} requires {dep!r}, which runs "
                        f"in group {group_of[dep]}, not before group {group_of[stage_id]}"
                    )
        self._check_schemas()
        self._check_remote_queues(stages)
        return WorkflowDefinition(
            id=self._id,
            version=self._version,
            input_model=self._input,
            groups=tuple(self._groups),
            description=self._description,
            input_adapter=TypeAdapter(self._input),
            stages=stages,
            group_of=group_of,
            queue=self._queue,
            concurrency=self._concurrency,
            concurrency_per_key=self._concurrency_per_key,
            rate_limit=self._rate_limit,
            schedules=declared_schedule(self._id, self._schedule),
            retention=self._retention,
            max_cost=self._max_cost,
        )

    def _check_remote_queues(self, stages: Mapping[str, StageDefinition]) -> None:
        """A queue holds remote stages only or local stages only: an in-process worker
        serving it would otherwise lease remote jobs, and a remote worker local ones."""
        kinds: dict[str, dict[bool, str]] = {}
        for stage_id, stage in stages.items():
            queue = stage.queue or self._queue
            kinds.setdefault(queue, {}).setdefault(stage.remote, stage_id)
        for queue, by_kind in kinds.items():
            if len(by_kind) > 1:
                raise DefinitionError(
                    f"workflow {self._id!r}: queue {queue!r} holds remote stage "
                    f"{by_kind[True]!r} and in-process stage {by_kind[False]!r}; "
                    "give the remote stage a queue of its own"
                )

    def _check_schemas(self) -> None:
        """Where both sides are pydantic models, each required input field of the next
        stage must be readable from what the previous group produces: its JSON keys, or
        the stage ids of a parallel group. A field matches by the keys its validation
        accepts (alias, ``AliasChoices``, name with ``populate_by_name``), as at run time."""
        for index, group in enumerate(self._groups):
            if index == 0:
                provided = _dumped_keys(self._input)
                source = "the workflow input"
            elif len(self._groups[index - 1]) == 1:
                prev = self._groups[index - 1][0]
                provided = _dumped_keys(prev.output_model)
                source = f"stage {prev.id!r}"
            else:
                provided = {s.id for s in self._groups[index - 1]}
                source = f"parallel group {index - 1}"
            keyed_by_stage = index > 0 and len(self._groups[index - 1]) > 1
            if provided is None:
                continue
            for stage in group:
                if not stage.reads_input:
                    continue
                required = _required_keys(stage.input_model) or {}
                unmet = {n: keys for n, keys in required.items() if not provided & set(keys)}
                if unmet:
                    missing = sorted(keys[0] for keys in unmet.values())
                    hint = ""
                    if not keyed_by_stage and provided & set(
                        unmet
                    ):  # written by name, read by alias
                        hint = (
                            "; the producer writes field names: set populate_by_name=True "
                            f"on {stage.id!r}'s input model, or serialize_by_alias=True on "
                            "the producing model"
                        )
                    raise DefinitionError(
                        f"workflow {self._id!r}: stage {stage.id!r} needs input field(s) "
                        f"{missing} that {source} does not produce{hint}"
                    )


def stage_ids(workflow: WorkflowDefinition) -> type[enum.StrEnum]:
    """The stage ids of a built pipeline as a ``StrEnum`` (the seed's ``createStageIds``):
    ``Ids = stage_ids(pipeline)``, then ``ctx.require(Ids.EXTRACT_TEXT)``. Member names
    are the ids upper-cased with every other character than a letter or digit made
    ``_`` (``extract-text`` is ``EXTRACT_TEXT``); values are the ids, so a member is the
    id wherever a string is expected. ``DefinitionError`` if two ids make one name."""
    if not isinstance(workflow, WorkflowDefinition):
        raise DefinitionError(f"stage_ids takes a built workflow, got {workflow!r}")
    members: dict[str, str] = {}
    for stage_id in workflow.stages:
        name = re.sub(r"[^0-9A-Za-z]", "_", stage_id).upper()
        if not name or name[0].isdigit() or name.startswith("_"):
            name = f"STAGE_{name}"
        if name in members:
            raise DefinitionError(
                f"workflow {workflow.id!r}: stage ids {members[name]!r} and {stage_id!r} "
                f"both make the enum member {name}"
            )
        members[name] = stage_id
    title = "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", workflow.id))
    return enum.StrEnum(f"{title or 'Workflow'}StageIds", members)  # type: ignore[return-value]
