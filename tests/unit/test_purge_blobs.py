"""``run.purge`` deletes a purged run's artifacts through any BlobStore: in one call where
the store offers ``delete_prefixes``, else listed and deleted key by key."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.adapters.memory import InMemoryBlobStore
from treadle.kernel.errors import RunNotFoundError
from treadle.testing import TestEngine


class N(BaseModel):
    n: int


@define_stage(id="keep", input=N, output=N)
async def keep(ctx):  # type: ignore[no-untyped-def]
    await ctx.artifacts.put("a.txt", "one")
    await ctx.artifacts.put("b.txt", "two")
    return ctx.input


WF = WorkflowBuilder("wf", input=N, retention=timedelta(hours=1)).pipe(keep).build()


class PlainStore:
    """Only the BlobStore port: put, get, has, delete, list."""

    def __init__(self) -> None:
        self.inner = InMemoryBlobStore()
        self.put = self.inner.put
        self.get = self.inner.get
        self.has = self.inner.has
        self.delete = self.inner.delete
        self.list = self.inner.list


async def test_a_store_without_bulk_delete_loses_the_purged_runs_artifacts() -> None:
    """With only the port's methods, the artifacts of the purged run go, others stay."""
    te = TestEngine([WF])
    store = PlainStore()
    te.kernel.deps.blob_store = store
    old = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=30))
    new = await te.start("wf", {"n": 2})
    await te.run_until_idle()
    assert len(await store.list("runs/")) == 4
    await te.advance_time(timedelta(minutes=45))  # old is 75 minutes old, new 45
    assert await store.list("runs/") == [
        f"runs/{new.run_id}/stages/keep/artifacts/a.txt",
        f"runs/{new.run_id}/stages/keep/artifacts/b.txt",
    ]
    with pytest.raises(RunNotFoundError):
        await te.get_run(old.run_id)
    assert (await te.get_run(new.run_id)).output == {"n": 2}
