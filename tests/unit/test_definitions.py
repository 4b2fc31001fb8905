"""Stage and workflow definitions: define_stage, WorkflowBuilder.build() validation, config."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from treadle import (
    Failed,
    Ready,
    RetryPolicy,
    WorkflowBuilder,
    define_batch_stage,
    define_stage,
)
from treadle.kernel import Registry
from treadle.kernel.errors import DefinitionError, InvalidConfigError, InvalidInputError


class In(BaseModel):
    url: str


class Text(BaseModel):
    text: str


class Score(BaseModel):
    score: float


class Cfg(BaseModel):
    max_length: int = 100


def _stage(id: str, input: object = In, output: object = Text, **kw: object):  # type: ignore[no-untyped-def]
    @define_stage(id=id, input=input, output=output, **kw)  # type: ignore[arg-type]
    async def body(ctx):  # type: ignore[no-untyped-def]
        return None

    return body


def test_define_stage_records_options() -> None:
    """define_stage keeps schemas, retry, a numeric timeout as timedelta and async-ness."""
    policy = RetryPolicy(max_attempts=5)

    @define_stage(id="s", input=In, output=Text, config=Cfg, retry=policy, timeout=2.5)
    def sync_body(ctx):  # type: ignore[no-untyped-def]
        return Text(text="x")

    assert sync_body.id == "s"
    assert sync_body.name == "s"
    assert sync_body.retry is policy
    assert sync_body.timeout == timedelta(seconds=2.5)
    assert sync_body.is_async is False
    assert sync_body.reads_input is True
    assert sync_body.is_batch is False


def test_define_stage_requires_id_and_output() -> None:
    """A stage without an id or output model is rejected at definition time."""
    with pytest.raises(DefinitionError, match="id"):
        define_stage(id="", input=In, output=Text)(lambda ctx: None)
    with pytest.raises(DefinitionError, match=r"'s'.*output"):
        define_stage(id="s", input=In, output=None)(lambda ctx: None)


def test_input_none_marks_stage_without_input() -> None:
    """input="none" stages read no input and skip the adjacent-schema check."""
    agg = _stage("agg", input="none", output=Score)
    assert agg.reads_input is False
    wf = WorkflowBuilder("wf", input=In).pipe(_stage("a", output=Score)).pipe(agg).build()
    assert wf.stage("agg") is agg


def test_build_rejects_duplicate_stage_ids() -> None:
    """Two stages with one id fail the build with a message naming the stage."""
    builder = WorkflowBuilder("wf", input=In).pipe(_stage("a")).pipe(_stage("a", input=Text))
    with pytest.raises(DefinitionError, match="duplicate stage id 'a'"):
        builder.build()


def test_build_rejects_requires_on_missing_stage() -> None:
    """requires= naming a stage that does not exist names both stages."""
    b = _stage("b", input=Text, requires=["ghost"])
    with pytest.raises(DefinitionError, match="'b' requires missing stage 'ghost'"):
        WorkflowBuilder("wf", input=In).pipe(_stage("a")).pipe(b).build()


def test_build_rejects_requires_on_later_or_same_group_stage() -> None:
    """requires= naming a stage of a later (or the same) group is rejected."""
    a = _stage("a", requires=["b"])
    b = _stage("b", input=Text)
    with pytest.raises(DefinitionError, match="'a' requires 'b'"):
        WorkflowBuilder("wf", input=In).pipe(a).pipe(b).build()
    c = _stage("c", requires=["d"])
    d = _stage("d")
    with pytest.raises(DefinitionError, match="'c' requires 'd'"):
        WorkflowBuilder("wf", input=In).parallel([c, d]).build()


def test_build_accepts_requires_on_earlier_stage() -> None:
    """requires= on an earlier group's stage builds fine."""
    wf = (
        WorkflowBuilder("wf", input=In)
        .pipe(_stage("a"))
        .pipe(_stage("b", input="none", output=Score, requires=["a"]))
        .build()
    )
    assert wf.group_of == {"a": 0, "b": 1}


def test_build_rejects_schema_mismatch_between_single_stages() -> None:
    """A stage needing fields the previous stage does not produce names both stages."""
    with pytest.raises(DefinitionError, match=r"'b' needs input field\(s\) \['url'\].*stage 'a'"):
        WorkflowBuilder("wf", input=In).pipe(_stage("a")).pipe(_stage("b", input=In)).build()


def test_build_rejects_schema_mismatch_with_workflow_input() -> None:
    """Group 0 must accept the workflow input model."""
    with pytest.raises(DefinitionError, match=r"'a'.*the workflow input"):
        WorkflowBuilder("wf", input=In).pipe(_stage("a", input=Text)).build()


def test_build_checks_parallel_group_keys() -> None:
    """After a parallel group the next stage's input is a dict keyed by stage id."""

    class Both(BaseModel):
        x: Score
        y: Score

    class Wrong(BaseModel):
        x: Score
        z: Score

    par = [_stage("x", output=Score), _stage("y", output=Score)]
    ok = WorkflowBuilder("wf", input=In).parallel(par).pipe(_stage("j", input=Both)).build()
    assert len(ok.groups) == 2
    with pytest.raises(DefinitionError, match=r"'j'.*\['z'\].*parallel group 0"):
        WorkflowBuilder("wf", input=In).parallel(par).pipe(_stage("j", input=Wrong)).build()


class Plus(BaseModel):
    """Reads a parallel group of stages ``plus-one`` and ``times-ten`` by alias."""

    plus_one: Score = Field(alias="plus-one")
    times_ten: Score = Field(validation_alias=AliasChoices("times-ten", "x10"))


def _kebab_group() -> list[Any]:
    return [_stage("plus-one", output=Score), _stage("times-ten", output=Score)]


def test_build_matches_parallel_group_keys_by_alias() -> None:
    """A field read by alias (or one of its AliasChoices) matches the stage id it names."""
    wf = WorkflowBuilder("wf", input=In).parallel(_kebab_group()).pipe(_stage("j", input=Plus))
    assert wf.build().group_of["j"] == 1

    class Wrong(BaseModel):
        plus_one: Score = Field(alias="plus-1")

    with pytest.raises(DefinitionError, match=r"'j'.*\['plus-1'\].*parallel group 0"):
        WorkflowBuilder("wf", input=In).parallel(_kebab_group()).pipe(
            _stage("j", input=Wrong)
        ).build()


def test_build_reads_aliased_fields_by_name_only_with_populate_by_name() -> None:
    """An aliased field matches its field name only where the model validates by name."""

    class ByAlias(BaseModel):
        plus_one: Score = Field(alias="plus-one")

    class ByName(ByAlias):
        model_config = ConfigDict(populate_by_name=True)

    snake = [_stage("plus_one", output=Score), _stage("other", output=Score)]
    ok = WorkflowBuilder("wf", input=In).parallel(snake).pipe(_stage("j", input=ByName)).build()
    assert ok.group_of["j"] == 1
    with pytest.raises(DefinitionError, match=r"'j'.*\['plus-one'\].*parallel group 0"):
        WorkflowBuilder("wf", input=In).parallel(snake).pipe(_stage("j", input=ByAlias)).build()


def test_build_checks_aliases_between_single_stages() -> None:
    """After one stage the keys are its output's JSON keys (field names, or aliases with
    serialize_by_alias): a field read only by alias must find its alias there."""

    class Named(BaseModel):
        plus_one: int

    class Aliased(BaseModel):
        model_config = ConfigDict(serialize_by_alias=True)
        plus_one: int = Field(alias="plus-one")

    class ReadsAlias(BaseModel):
        plus_one: int = Field(alias="plus-one")

    class ReadsEither(ReadsAlias):
        model_config = ConfigDict(populate_by_name=True)

    def wf(produces: type[BaseModel], reads: type[BaseModel]) -> WorkflowBuilder:
        return (
            WorkflowBuilder("wf", input=In)
            .pipe(_stage("a", output=produces))
            .pipe(_stage("b", input=reads))
        )

    wf(Aliased, ReadsAlias).build()
    wf(Named, ReadsEither).build()
    wf(Aliased, ReadsEither).build()
    with pytest.raises(DefinitionError, match=r"'b'.*\['plus-one'\].*stage 'a'.*populate_by_name"):
        wf(Named, ReadsAlias).build()
    with pytest.raises(DefinitionError, match=r"'a'.*\['plus-one'\].*the workflow input"):
        WorkflowBuilder("wf", input=Named).pipe(_stage("a", input=ReadsAlias)).build()


def test_build_skips_schema_check_for_non_models() -> None:
    """Where a side is not a pydantic model (dict input) the check is skipped."""
    wf = WorkflowBuilder("wf", input=dict).pipe(_stage("a", input=In)).build()
    assert wf.stage("a") is not None


def test_builder_rejects_empty_and_non_stages() -> None:
    """No stages, an empty parallel group, a bare function or an empty id are errors."""
    with pytest.raises(DefinitionError, match="no stages"):
        WorkflowBuilder("wf", input=In).build()
    with pytest.raises(DefinitionError, match="at least one stage"):
        WorkflowBuilder("wf", input=In).parallel([])
    with pytest.raises(DefinitionError, match="not a stage"):
        WorkflowBuilder("wf", input=In).pipe(lambda ctx: None)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="non-empty"):
        WorkflowBuilder("", input=In).pipe(_stage("a")).build()


def test_validate_input_names_the_field() -> None:
    """Bad run input raises InvalidInputError naming input.<field>."""
    wf = WorkflowBuilder("wf", input=In).pipe(_stage("a")).build()
    assert wf.validate_input({"url": "u"}) == {"url": "u"}
    with pytest.raises(InvalidInputError) as info:
        wf.validate_input({"nope": 1})
    assert info.value.errors[0][0] == "input.url"
    assert "input.url" in str(info.value)


def test_validate_config_fills_defaults_and_names_fields() -> None:
    """Config defaults are filled; bad values, unknown stages and config for a
    config-less stage raise InvalidConfigError naming the field."""
    a = _stage("a", config=Cfg)
    b = _stage("b", input=Text)
    wf = WorkflowBuilder("wf", input=In).pipe(a).pipe(b).build()
    assert wf.validate_config(None) == {"a": {"max_length": 100}}
    assert wf.validate_config({"a": {"max_length": 7}}) == {"a": {"max_length": 7}}
    with pytest.raises(InvalidConfigError) as info:
        wf.validate_config({"a": {"max_length": "lots"}})
    assert info.value.errors[0][0] == "config.a.max_length"
    with pytest.raises(InvalidConfigError, match="unknown stage"):
        wf.validate_config({"zzz": {}})
    with pytest.raises(InvalidConfigError, match=r"config\.b.*takes no config"):
        wf.validate_config({"b": {"x": 1}})


def test_group_output_single_and_parallel() -> None:
    """A single-stage group outputs its stage's output; a parallel group a dict by id."""
    wf = (
        WorkflowBuilder("wf", input=In)
        .pipe(_stage("a"))
        .parallel([_stage("b", input=Text), _stage("c", input=Text)])
        .build()
    )
    outputs = {"a": {"text": "t"}, "b": 1, "c": 2}
    assert wf.group_output(0, outputs) == {"text": "t"}
    assert wf.group_output(1, outputs) == {"b": 1, "c": 2}


def test_batch_stage_check_completion_registration() -> None:
    """define_batch_stage yields a batch stage whose decorator registers the check."""

    @define_batch_stage(id="batch", input=In, output=Text)
    async def batch(ctx):  # type: ignore[no-untyped-def]
        return None

    assert batch.is_batch is True
    assert batch.check_fn is None

    @batch.check_completion
    async def check(state, ctx):  # type: ignore[no-untyped-def]
        return None

    assert batch.check_fn is check
    swapped = batch.with_fn(lambda ctx: None)
    assert swapped.is_batch
    assert swapped.check_fn is check
    assert swapped.is_async is False


def test_ready_and_failed_take_their_field_positionally_or_by_keyword() -> None:
    """Ready(output) and Failed(message) as DESIGN §3.1 writes them; keyword forms stay,
    the field given twice or a misspelt keyword is an error, not a silent default."""
    assert Ready({"total": 1}) == Ready(output={"total": 1})
    assert Ready().output is None
    assert Ready(None) == Ready()
    assert Failed("rejected") == Failed(message="rejected")
    assert Ready.model_validate({"output": 2}) == Ready(2)
    with pytest.raises(TypeError, match="both positionally and by keyword"):
        Ready(1, output=2)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="both positionally and by keyword"):
        Failed("a", message="b")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="takes 1 positional argument"):
        Ready(1, 2)  # type: ignore[call-overload]
    with pytest.raises(ValidationError):
        Ready(outptu=1)  # type: ignore[call-overload]
    with pytest.raises(ValidationError):
        Failed()  # type: ignore[call-overload]


def test_define_batch_stage_bounds_check_failures() -> None:
    """max_check_failures defaults to 5 and must be a positive integer."""
    assert _batch().max_check_failures == 5
    assert _batch(max_check_failures=2).max_check_failures == 2
    assert _batch(max_check_failures=2).with_fn(lambda ctx: None).max_check_failures == 2  # type: ignore[attr-defined]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DefinitionError, match="'batch': max_check_failures"):
            _batch(max_check_failures=bad)


def _batch(**options: Any) -> Any:
    @define_batch_stage(id="batch", input=In, output=Text, **options)
    async def batch(ctx):  # type: ignore[no-untyped-def]
        return None

    return batch


def test_registry_rejects_duplicates_and_non_definitions() -> None:
    """The registry refuses two workflows with one id and things that are not built."""
    wf1 = WorkflowBuilder("wf", input=In).pipe(_stage("a")).build()
    wf2 = WorkflowBuilder("wf", input=In).pipe(_stage("a")).build()
    reg = Registry([wf1])
    reg.register(wf1)  # the same object again is fine
    with pytest.raises(DefinitionError, match="registered twice"):
        reg.register(wf2)
    with pytest.raises(DefinitionError, match="not a built workflow"):
        reg.register("wf")  # type: ignore[arg-type]
    assert reg.ids() == ["wf"]
    assert list(reg) == [wf1]
    assert reg.get_workflow("missing") is None
