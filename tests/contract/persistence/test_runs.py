"""Persistence contract, runs (``tx.runs``): insert, read, optimistic update, the set-
oriented forms, filters (search attributes), counts, claims.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
)
from treadle.kernel.model import (
    Run,
    RunFilter,
    RunStatus,
    evolve,
)
from treadle.tests.contract.persistence.helpers import assert_utc, at, make_run, make_stage, seed


async def test_inserted_run_reads_back_equal(backend: Any) -> None:
    """Every run field, JSON payloads and microsecond UTC timestamps included, round-trips."""
    run = make_run(
        "r1",
        workflow_version="7",
        status=RunStatus.RUNNING,
        input={"url": "https://x", "n": [1, 2.5, None, True], "nested": {"é": "ü"}},
        config={"extract": {"max_length": 10}},
        output=["a", {"b": 1}],
        error="boom",
        priority=9,
        idempotency_key="key-1",
        parent_run_id="parent",
        search_attributes={"customer": "acme", "tier": 2},
        created_at=at(0),
        started_at=at(1.000001),
        completed_at=at(2.999999),
        updated_at=at(3),
        worker_id="w1",
        current_group=2,
        version=4,
    )
    await seed(backend, run)
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
    assert got == run
    for moment in (got.created_at, got.started_at, got.completed_at, got.updated_at):
        assert_utc(moment)


async def test_timestamps_keep_their_instant_across_zones_and_extremes(backend: Any) -> None:
    """A time given in another zone, or at the ends of the datetime range, reads back as the
    same instant, and filters and sorts by instant, not by wall-clock text."""
    plus_two = datetime(2026, 1, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))  # 10:00Z
    times = {
        "zoned": plus_two,
        "utc-later": datetime(2026, 1, 1, 11, tzinfo=UTC),
        "ancient": datetime(1, 1, 2, tzinfo=UTC),
        "far": datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
    }
    await seed(backend, *(make_run(k, created_at=v) for k, v in times.items()))
    async with backend.persistence.transaction() as tx:
        for run_id, moment in times.items():
            got = await tx.runs.get(run_id)
            assert got is not None
            assert got.created_at == moment
        ordered = [r.id for r in await tx.runs.query(RunFilter())]
        after = [r.id for r in await tx.runs.query(RunFilter(created_after=plus_two))]
        before = [r.id for r in await tx.runs.query(RunFilter(created_before=plus_two))]
    assert ordered == ["far", "utc-later", "zoned", "ancient"]
    assert after == ["far", "utc-later", "zoned"]
    assert before == ["ancient"]


async def test_get_run_returns_the_run_without_stages(backend: Any) -> None:
    """Stages live in their own table: a run read back has an empty ``stages`` list."""
    await seed(backend, make_run("r1"), stages=(make_stage("r1", "a"),))
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
        locked = await tx.runs.get("r1", for_update=True)
    assert got is not None
    assert got.stages == []
    assert locked == got


async def test_missing_run_reads_as_none(backend: Any) -> None:
    """Reading an unknown run id or idempotency key gives ``None``, not an error."""
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("nope") is None
        assert await tx.runs.get("nope", for_update=True) is None
        assert await tx.runs.find_by_key("wf", "nope") is None


async def test_duplicate_run_id_raises_duplicate_error(backend: Any) -> None:
    """A second insert with the same run id raises ``DuplicateError`` and stores nothing."""
    await seed(backend, make_run("r1", priority=1))
    with pytest.raises(DuplicateError, match="r1"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.insert(make_run("r1", priority=2))
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
    assert got is not None
    assert got.priority == 1


async def test_duplicate_idempotency_key_raises_duplicate_error(backend: Any) -> None:
    """(workflow, idempotency key) is unique: a second run with both raises ``DuplicateError``."""
    await seed(backend, make_run("r1", idempotency_key="k"))
    with pytest.raises(DuplicateError, match="'k'"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.insert(make_run("r2", idempotency_key="k"))
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("r2") is None
        found = await tx.runs.find_by_key("wf", "k")
    assert found is not None
    assert found.id == "r1"


async def test_idempotency_keys_are_scoped_per_workflow_and_none_never_collides(
    backend: Any,
) -> None:
    """The same key on another workflow, and any number of runs without a key, are fine."""
    await seed(
        backend,
        make_run("r1", idempotency_key="k"),
        make_run("r2", workflow_id="other", idempotency_key="k"),
        make_run("r3"),
        make_run("r4"),
    )
    async with backend.persistence.transaction() as tx:
        one = await tx.runs.find_by_key("wf", "k")
        other = await tx.runs.find_by_key("other", "k")
    assert one is not None
    assert one.id == "r1"
    assert other is not None
    assert other.id == "r2"


async def test_a_caught_duplicate_leaves_the_transaction_usable(backend: Any) -> None:
    """Catching ``DuplicateError`` mid-transaction lets the rest of it commit."""
    await seed(backend, make_run("r1"))
    async with backend.persistence.transaction() as tx:
        with pytest.raises(DuplicateError):
            await tx.runs.insert(make_run("r1"))
        await tx.runs.insert(make_run("r2"))
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("r2") is not None


async def test_insert_runs_stores_each_and_finds_them_by_key(backend: Any) -> None:
    """``insert_runs`` writes every run as ``insert_run`` would; ``find_runs_by_keys``
    returns the runs of the (workflow, key) pairs it finds, in one call."""
    runs = [
        make_run(
            f"r{i}",
            workflow_id="wf" if i % 2 else "other",
            idempotency_key=None if i == 3 else f"k{i // 2}",
            input={"i": i, "nested": {"é": [i, None]}},
            config={"s": {"n": i}},
            priority=i,
            search_attributes={"tier": i},
            created_at=at(i + 0.000001),
        )
        for i in range(6)
    ]
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert_many(runs)
        # Seen inside the transaction already, as later statements of run.createMany need.
        inside = await tx.runs.find_by_keys([("wf", "k0")])
    assert inside == {("wf", "k0"): runs[1]}
    async with backend.persistence.transaction() as tx:
        got = [await tx.runs.get(run.id) for run in runs]
        found = await tx.runs.find_by_keys(
            [("other", "k0"), ("wf", "k2"), ("wf", "k1"), ("other", "k1"), ("nope", "k0")]
        )
        assert await tx.runs.find_by_keys([]) == {}
        assert [r.id for r in await tx.runs.claim_pending(10)] == [
            f"r{i}" for i in range(5, -1, -1)
        ]
    assert got == runs
    # ("wf", "k1") belongs to r3, which has no key: not found.
    assert found == {("other", "k0"): runs[0], ("wf", "k2"): runs[5], ("other", "k1"): runs[2]}


@pytest.mark.parametrize(
    "clash",
    [
        pytest.param(make_run("r1", idempotency_key="fresh"), id="stored-id"),
        pytest.param(make_run("r9", idempotency_key="k"), id="stored-key"),
        pytest.param(make_run("r2", idempotency_key="other"), id="repeated-id"),
        pytest.param(make_run("r8", idempotency_key="k2"), id="repeated-key"),
    ],
)
async def test_insert_runs_with_a_duplicate_raises_naming_it_and_rolls_back(
    backend: Any, clash: Run
) -> None:
    """An id or a (workflow, key) that is stored already or repeats within the call raises
    ``DuplicateError`` naming the run; the transaction then writes nothing of the call."""
    await seed(backend, make_run("r1", idempotency_key="k"))
    batch = [make_run("r2", idempotency_key="k2", priority=7), make_run("r3"), clash]
    with pytest.raises(DuplicateError, match=repr(clash.id)):
        async with backend.persistence.transaction() as tx:
            await tx.runs.insert_many(batch)
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("r2") is None
        assert await tx.runs.get("r3") is None
        assert await tx.runs.find_by_keys([("wf", "k2"), ("wf", "fresh")]) == {}
        stored = await tx.runs.get("r1")
        assert [r.id for r in await tx.runs.claim_pending(10)] == ["r1"]
    assert stored is not None
    assert stored.idempotency_key == "k"


async def test_stages_of_runs_inserted_in_the_same_transaction(backend: Any) -> None:
    """Stages added to runs the same transaction inserted (as ``run.create`` does) keep
    their order across calls, and a repeated stage id is still a duplicate."""
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert_many([make_run("r1"), make_run("r2")])
        await tx.runs.insert(make_run("r3"))
        await tx.stages.insert_many(
            [make_stage("r1", "b", 1), make_stage("r2", "a"), make_stage("r1", "a")]
        )
        await tx.stages.insert_many([make_stage("r1", "c", 1), make_stage("r3", "a")])
        with pytest.raises(DuplicateError, match="'b'"):
            await tx.stages.insert_many([make_stage("r1", "b", 2)])
    async with backend.persistence.transaction() as tx:
        assert await tx.stages.for_run("r1") == [
            make_stage("r1", "a"),
            make_stage("r1", "b", 1),
            make_stage("r1", "c", 1),
        ]
        assert [s.stage_id for s in await tx.stages.for_run("r2")] == ["a"]
        assert [s.stage_id for s in await tx.stages.for_run("r3")] == ["a"]
        await tx.stages.insert_many([make_stage("r1", "d", 1)])
    async with backend.persistence.transaction() as tx:
        assert [s.stage_id for s in await tx.stages.for_run("r1")] == ["a", "b", "c", "d"]


async def test_update_run_bumps_the_version(backend: Any) -> None:
    """``update_run`` stores the change and returns the run with ``version + 1``."""
    await seed(backend, make_run("r1"))
    async with backend.persistence.transaction() as tx:
        run = await tx.runs.get("r1", for_update=True)
        assert run is not None
        new = await tx.runs.update(
            evolve(run, {"status": RunStatus.RUNNING, "started_at": at(5), "updated_at": at(5)})
        )
    assert new.version == run.version + 1
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
    assert got == new
    assert got.status is RunStatus.RUNNING


async def test_update_run_with_a_stale_version_raises_concurrency_error(backend: Any) -> None:
    """A writer holding an old version loses: ``ConcurrencyError``, and the winner's data stays."""
    await seed(backend, make_run("r1"))
    async with backend.persistence.transaction() as tx:
        stale = await tx.runs.get("r1")
        assert stale is not None
        await tx.runs.update(evolve(stale, {"priority": 8}))
    with pytest.raises(ConcurrencyError, match="r1"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.update(evolve(stale, {"priority": 1}))
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
    assert got is not None
    assert (got.priority, got.version) == (8, 1)


async def test_update_of_a_missing_run_raises_concurrency_error(backend: Any) -> None:
    """Updating a run that does not exist is a ``ConcurrencyError`` (it was deleted)."""
    with pytest.raises(ConcurrencyError, match="ghost"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.update(make_run("ghost"))


async def _list_ids(backend: Any, **filter_fields: Any) -> list[str]:
    async with backend.persistence.transaction() as tx:
        return [r.id for r in await tx.runs.query(RunFilter(**filter_fields))]


async def test_list_runs_filters_and_orders_newest_first(backend: Any) -> None:
    """Every ``RunFilter`` field narrows the result; order is newest first, ties by id desc."""
    await seed(
        backend,
        make_run("a", created_at=at(0), status=RunStatus.COMPLETED),
        make_run("b", created_at=at(10), workflow_id="other"),
        make_run("c", created_at=at(10), parent_run_id="a", search_attributes={"k": "x"}),
        make_run("d", created_at=at(20), status=RunStatus.COMPLETED, search_attributes={"k": "y"}),
        make_run("e", created_at=at(30), search_attributes={"k": "x", "n": 2}),
    )
    assert await _list_ids(backend) == ["e", "d", "c", "b", "a"]
    assert await _list_ids(backend, status=RunStatus.COMPLETED) == ["d", "a"]
    any_of = frozenset({RunStatus.COMPLETED, RunStatus.PENDING})
    assert await _list_ids(backend, statuses=any_of) == ["e", "d", "c", "b", "a"]
    assert await _list_ids(backend, statuses=frozenset({RunStatus.FAILED})) == []
    assert await _list_ids(backend, statuses=any_of, workflow_id="other") == ["b"]
    assert await _list_ids(backend, workflow_id="other") == ["b"]
    assert await _list_ids(backend, created_after=at(10)) == ["e", "d", "c", "b"]
    assert await _list_ids(backend, created_before=at(20)) == ["c", "b", "a"]
    assert await _list_ids(backend, created_after=at(10), created_before=at(30)) == ["d", "c", "b"]
    assert await _list_ids(backend, parent_run_id="a") == ["c"]
    assert await _list_ids(backend, attributes={"k": "x"}) == ["e", "c"]
    assert await _list_ids(backend, attributes={"k": "x", "n": 2}) == ["e"]
    assert await _list_ids(backend, attributes={"missing": None}) == []
    assert await _list_ids(backend, status=RunStatus.PENDING, workflow_id="wf") == ["e", "c"]


async def test_list_runs_attribute_filters_compare_json_values_exactly(backend: Any) -> None:
    """Attribute filters match JSON values by type: ``1`` is not ``True``, ``"1"`` is not ``1``,
    ``None`` matches only a stored null, and objects compare by content."""
    await seed(
        backend,
        make_run("int", search_attributes={"v": 1}),
        make_run("bool", search_attributes={"v": True}),
        make_run("str", search_attributes={"v": "1"}),
        make_run("null", search_attributes={"v": None}),
        make_run("obj", search_attributes={"v": {"a": 1, "b": [1, 2]}}),
        make_run("none"),
    )
    assert await _list_ids(backend, attributes={"v": 1}) == ["int"]
    assert await _list_ids(backend, attributes={"v": True}) == ["bool"]
    assert await _list_ids(backend, attributes={"v": "1"}) == ["str"]
    assert await _list_ids(backend, attributes={"v": None}) == ["null"]
    assert await _list_ids(backend, attributes={"v": {"b": [1, 2], "a": 1}}) == ["obj"]
    assert await _list_ids(backend, attributes={"v": {"a": 1}}) == []
    assert await _list_ids(backend, attributes={"v": {"a": True, "b": [1, 2]}}) == []
    assert await _list_ids(backend, attributes={"v": {"a": 1, "b": [2, 1]}}) == []
    assert await _list_ids(backend, attributes={"v": 1.0}) == ["int"]


async def test_list_runs_attribute_filters_combine_keys_and_odd_names(backend: Any) -> None:
    """Several keys filter together (scalars and objects mixed, as PostgreSQL's containment
    test plus exact comparison does it), stored floats match integral filters, and key
    names with dots, spaces and non-ASCII letters are plain keys on every adapter (keys
    with a double quote are refused before they reach persistence)."""
    await seed(
        backend,
        make_run("a", search_attributes={"k.x": "1", "qé t": 2.0, "sp ace": {"a": [1]}}),
        make_run("b", search_attributes={"k.x": "1", "qé t": 2, "sp ace": {"a": [1, 1]}}),
        make_run("c", search_attributes={"k": {"x": "1"}, "qé t": 3}),
    )
    assert await _list_ids(backend, attributes={"k.x": "1"}) == ["b", "a"]
    assert await _list_ids(backend, attributes={"qé t": 2}) == ["b", "a"]
    assert await _list_ids(backend, attributes={"k.x": "1", "sp ace": {"a": [1]}}) == ["a"]
    assert await _list_ids(backend, attributes={"qé t": 2, "sp ace": {"a": [1, 1]}}) == ["b"]
    assert await _list_ids(backend, attributes={"k": {"x": "1"}, "qé t": 2}) == []
    assert await _list_ids(backend, attributes={"k": {"x": "1"}}) == ["c"]
    async with backend.persistence.transaction() as tx:
        counts = await tx.runs.count("status", RunFilter(attributes={"k.x": "1", "qé t": 2.0}))
    assert counts == {"PENDING": 2}


async def test_list_runs_paginates_with_limit_and_offset(backend: Any) -> None:
    """``limit``/``offset`` walk the newest-first list in pages without overlap or gaps."""
    await seed(backend, *(make_run(f"r{i}", created_at=at(i)) for i in range(7)))
    pages = [await _list_ids(backend, limit=3, offset=o) for o in (0, 3, 6, 9)]
    assert pages == [["r6", "r5", "r4"], ["r3", "r2", "r1"], ["r0"], []]


async def test_count_runs_groups_by_status_or_workflow(backend: Any) -> None:
    """``count_runs`` counts the filtered runs per status or per workflow id."""
    await seed(
        backend,
        make_run("a", status=RunStatus.COMPLETED),
        make_run("b", status=RunStatus.COMPLETED, workflow_id="other"),
        make_run("c", status=RunStatus.FAILED, created_at=at(10)),
        make_run("d", created_at=at(10)),
    )
    async with backend.persistence.transaction() as tx:
        by_status = await tx.runs.count("status", RunFilter())
        by_workflow = await tx.runs.count("workflow_id", RunFilter())
        recent = await tx.runs.count("status", RunFilter(created_after=at(10)))
        empty = await tx.runs.count("status", RunFilter(workflow_id="none"))
        settled = await tx.runs.count(
            "status", RunFilter(statuses=frozenset({RunStatus.COMPLETED, RunStatus.FAILED}))
        )
        with pytest.raises(ValueError, match="priority"):
            await tx.runs.count("priority", RunFilter())
    assert by_status == {"COMPLETED": 2, "FAILED": 1, "PENDING": 1}
    assert by_workflow == {"wf": 3, "other": 1}
    assert recent == {"FAILED": 1, "PENDING": 1}
    assert settled == {"COMPLETED": 2, "FAILED": 1}
    assert empty == {}


async def test_claim_pending_runs_orders_by_priority_then_fifo(backend: Any) -> None:
    """Only PENDING runs are claimed, highest priority first, then oldest first, up to limit."""
    await seed(
        backend,
        make_run("low", priority=1, created_at=at(0)),
        make_run("high-late", priority=9, created_at=at(20)),
        make_run("mid", priority=5, created_at=at(5)),
        make_run("high-early", priority=9, created_at=at(10)),
        make_run("running", priority=10, status=RunStatus.RUNNING),
        make_run("done", priority=10, status=RunStatus.COMPLETED),
    )
    async with backend.persistence.transaction() as tx:
        claimed = [r.id for r in await tx.runs.claim_pending(10)]
        first_two = [r.id for r in await tx.runs.claim_pending(2)]
    assert claimed == ["high-early", "high-late", "mid", "low"]
    assert first_two == ["high-early", "high-late"]


async def test_runs_inactive_since_selects_by_status_and_updated_at(backend: Any) -> None:
    """Runs in the status not updated since the cutoff (exclusive) come back oldest first."""
    await seed(
        backend,
        make_run("old", status=RunStatus.RUNNING, updated_at=at(10)),
        make_run("older", status=RunStatus.RUNNING, updated_at=at(5)),
        make_run("at-cutoff", status=RunStatus.RUNNING, updated_at=at(30)),
        make_run("fresh", status=RunStatus.RUNNING, updated_at=at(40)),
        make_run("other-status", status=RunStatus.SUSPENDED, updated_at=at(0)),
    )
    async with backend.persistence.transaction() as tx:
        stuck = [r.id for r in await tx.runs.inactive_since(RunStatus.RUNNING, at(30), 10)]
        one = [r.id for r in await tx.runs.inactive_since(RunStatus.RUNNING, at(30), 1)]
    assert stuck == ["older", "old"]
    assert one == ["older"]


async def test_get_runs_returns_the_found_runs_by_id(backend: Any) -> None:
    """Missing ids are absent, repeated ids harmless; each run equals ``get_run``'s, locked
    or not."""
    await seed(backend, make_run("r1", priority=3), make_run("r2", input={"n": [1, 2]}))
    async with backend.persistence.transaction() as tx:
        single = {run_id: await tx.runs.get(run_id) for run_id in ("r1", "r2")}
        found = await tx.runs.get_many(["r2", "missing", "r1", "r2"])
        locked = await tx.runs.get_many(["r1", "r2"], for_update=True)
        assert await tx.runs.get_many([]) == {}
        assert await tx.runs.get_many(["missing"], for_update=True) == {}
    assert found == single
    assert locked == single
    assert all(run.stages == [] for run in found.values())


async def test_get_runs_for_update_serialises_read_modify_write(backend: Any) -> None:
    """Concurrent transactions that lock overlapping sets of runs (named in either order)
    before updating them never see a stale version and never deadlock."""
    await seed(backend, make_run("a", priority=0), make_run("b", priority=0))

    async def bump(order: list[str]) -> None:
        async with backend.persistence.transaction() as tx:
            runs = await tx.runs.get_many(order, for_update=True)
            await tx.runs.update_many(
                [evolve(runs[i], {"priority": runs[i].priority + 1}) for i in order]
            )

    await asyncio.gather(*(bump(["a", "b"] if n % 2 else ["b", "a"]) for n in range(6)))
    async with backend.persistence.transaction() as tx:
        final = await tx.runs.get_many(["a", "b"])
    assert [(r.priority, r.version) for r in (final["a"], final["b"])] == [(6, 6), (6, 6)]


async def test_update_runs_stores_each_and_bumps_versions_in_order(backend: Any) -> None:
    await seed(backend, make_run("r1"), make_run("r2"))
    async with backend.persistence.transaction() as tx:
        runs = await tx.runs.get_many(["r1", "r2"])
        changed = [
            evolve(runs["r2"], {"status": RunStatus.RUNNING, "updated_at": at(2)}),
            evolve(runs["r1"], {"output": {"done": [1, None]}, "current_group": 3}),
        ]
        new = await tx.runs.update_many(changed)
        assert await tx.runs.update_many([]) == []
    assert new == [evolve(r, {"version": 1, "stages": []}) for r in changed]
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get_many(["r1", "r2"]) == {"r1": new[1], "r2": new[0]}


async def test_update_runs_with_a_stale_or_missing_run_applies_nothing(backend: Any) -> None:
    """One stale (or missing) run fails the call with a ``ConcurrencyError`` naming it, and
    after the rollback none of the call's runs is changed; a run twice is a ``ValueError``."""
    await seed(backend, make_run("r1"), make_run("r2"))
    async with backend.persistence.transaction() as tx:
        old = await tx.runs.get_many(["r1", "r2"])
        winner = await tx.runs.update(evolve(old["r2"], {"priority": 9, "updated_at": at(1)}))
    fresh = old["r1"]
    # The run the call could write carries every kind of value, so telling it apart from
    # the stale one holds on every column type.
    change = {
        "status": RunStatus.RUNNING,
        "output": {"n": [1, 2.5, None, True], "s": "é"},
        "started_at": at(1.000001),
        "updated_at": at(2),
    }
    attempts = [
        ([evolve(fresh, change), evolve(old["r2"], {"priority": 1})], "'r2'"),
        ([make_run("ghost"), evolve(fresh, change)], "'ghost'"),
    ]
    for runs, named in attempts:
        with pytest.raises(ConcurrencyError, match=named) as raised:
            async with backend.persistence.transaction() as tx:
                await tx.runs.update_many(runs)
        assert "'r1'" not in str(raised.value)
    with pytest.raises(ValueError, match="r1"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.update_many([fresh, evolve(fresh, {"priority": 2})])
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get_many(["r1", "r2", "ghost"]) == {"r1": fresh, "r2": winner}


async def test_list_runs_keyset_pages_updated_ranges_and_summaries(backend: Any) -> None:
    """``after`` returns the runs strictly after ``(created_at, id)`` in the newest-first
    order (ties broken by id); ``updated_after``/``updated_before`` bound ``updated_at``;
    ``payloads=False`` leaves input and output out and keeps every other field."""
    await seed(
        backend,
        make_run("a", created_at=at(0), updated_at=at(50), input={"big": "x" * 10}),
        make_run("b", created_at=at(10), updated_at=at(40)),
        make_run("c", created_at=at(10), updated_at=at(30), output=[1, 2]),
        make_run("d", created_at=at(20), updated_at=at(20)),
    )
    assert await _list_ids(backend, after=(at(10), "c")) == ["b", "a"]
    assert await _list_ids(backend, after=(at(10), "b")) == ["a"]
    assert await _list_ids(backend, after=(at(20), "d"), limit=1) == ["c"]
    assert await _list_ids(backend, updated_after=at(30)) == ["c", "b", "a"]
    assert await _list_ids(backend, updated_before=at(30)) == ["d"]
    async with backend.persistence.transaction() as tx:
        full = await tx.runs.query(RunFilter())
        light = await tx.runs.query(RunFilter(payloads=False))
    assert [r.input for r in light] == [None] * 4
    assert [r.output for r in light] == [None] * 4
    assert [r.model_copy(update={"input": None, "output": None}) for r in full] == light
