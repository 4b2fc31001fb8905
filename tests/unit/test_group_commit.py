"""``GroupCommit``: how concurrent submissions become groups, and that every submitter
gets its own outcome whatever happens to the others."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from treadle.kernel.errors import TransientStorageError
from treadle.kernel.group_commit import GroupCommit


class Recorder:
    """A ``commit_group`` that records each group and can be held at its start."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.fail_items: set[str] = set()
        self.on_return: Callable[[], object] | None = None

    async def __call__(self, items: Sequence[str]) -> list[str | BaseException]:
        self.groups.append(list(items))
        self.entered.set()
        if self.gate is not None:
            gate, self.gate = self.gate, None
            await gate.wait()
        if self.on_return is not None:
            self.on_return()
            self.on_return = None
        return [
            ValueError(f"bad {item}") if item in self.fail_items else f"done {item}"
            for item in items
        ]


async def _submit_while_held(
    commits: GroupCommit[str, str], recorder: Recorder, first: str, others: list[str]
) -> tuple[asyncio.Task[str], list[asyncio.Task[str]], asyncio.Event]:
    """Start ``first``'s commit and hold it; queue ``others`` behind it."""
    gate = recorder.gate = asyncio.Event()
    leader = asyncio.create_task(commits.submit(first, recorder))
    await recorder.entered.wait()
    followers = [asyncio.create_task(commits.submit(item, recorder)) for item in others]
    await asyncio.sleep(0)  # each follower queues on its first step, all before we resume
    assert len(commits) == len(others)
    return leader, followers, gate


async def test_a_lone_submission_commits_at_once_as_a_group_of_one() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    assert await commits.submit("a", recorder) == "done a"
    assert await commits.submit("b", recorder) == "done b"
    assert recorder.groups == [["a"], ["b"]]
    assert (commits.groups, commits.items) == (2, 2)


async def test_submissions_made_during_a_commit_form_the_next_group() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    leader, followers, gate = await _submit_while_held(commits, recorder, "a", ["b", "c", "d"])
    gate.set()
    assert await leader == "done a"
    assert [await f for f in followers] == ["done b", "done c", "done d"]
    assert recorder.groups == [["a"], ["b", "c", "d"]]
    assert len(commits) == 0


async def test_each_submitter_gets_its_own_error() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    recorder.fail_items = {"c"}
    leader, followers, gate = await _submit_while_held(commits, recorder, "a", ["b", "c", "d"])
    gate.set()
    await leader
    b, c, d = followers
    assert await b == "done b"
    with pytest.raises(ValueError, match="bad c"):
        await c
    assert await d == "done d"


async def test_a_group_holds_at_most_limit_items() -> None:
    commits: GroupCommit[str, str] = GroupCommit(limit=2)
    recorder = Recorder()
    leader, followers, gate = await _submit_while_held(commits, recorder, "a", ["b", "c", "d"])
    gate.set()
    await asyncio.gather(leader, *followers)
    assert recorder.groups == [["a"], ["b", "c"], ["d"]]


async def test_a_follower_cancelled_before_its_group_is_not_committed() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    leader, (b, c), gate = await _submit_while_held(commits, recorder, "a", ["b", "c"])
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    gate.set()
    assert await leader == "done a"
    assert await c == "done c"
    assert recorder.groups == [["a"], ["c"]]


async def test_a_cancelled_leader_fails_its_group_and_gives_up_the_lead() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    recorder.gate = asyncio.Event()  # never set: "a" is cancelled mid-commit
    leader = asyncio.create_task(commits.submit("a", recorder))
    await recorder.entered.wait()
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    # Nothing is left waiting for a lead that no one holds: the next submission commits.
    assert await commits.submit("b", recorder) == "done b"
    assert recorder.groups == [["a"], ["b"]]


async def test_the_others_in_an_interrupted_group_get_a_retryable_error() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    first, (a, b), gate = await _submit_while_held(commits, recorder, "x", ["a", "b"])
    recorder.entered.clear()
    recorder.gate = asyncio.Event()  # never set: the group [a, b] is interrupted
    gate.set()
    assert await first == "done x"
    await recorder.entered.wait()  # "a" took the lead and is committing [a, b]
    assert recorder.groups[-1] == ["a", "b"]
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    with pytest.raises(TransientStorageError, match="interrupted"):
        await b
    assert await commits.submit("c", recorder) == "done c"


async def test_the_lead_passes_on_when_its_receiver_is_cancelled() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    first, (a, b), gate = await _submit_while_held(commits, recorder, "x", ["a", "b"])
    # Cancel "a" after "x" has handed it the lead but before "a" runs again.
    recorder.on_return = lambda: asyncio.get_running_loop().call_soon(a.cancel)
    gate.set()
    assert await first == "done x"
    with pytest.raises(asyncio.CancelledError):
        await a
    assert await b == "done b"
    assert recorder.groups == [["x"], ["b"]]


async def test_a_follower_cancelled_before_the_lead_reaches_it_is_skipped() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    first, (a, b), gate = await _submit_while_held(commits, recorder, "x", ["a", "b"])
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    gate.set()
    assert await first == "done x"
    assert await b == "done b"
    assert recorder.groups == [["x"], ["b"]]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(limit=0)


async def test_a_group_that_releases_the_lead_lets_the_next_one_start() -> None:
    """``release`` (called by the group once its rows are read and locked) hands the
    lead on while the group is still finishing: the next submission commits at once,
    before the first group is done."""
    commits: GroupCommit[str, str] = GroupCommit()
    done: list[str] = []
    finish_a = asyncio.Event()

    async def commit_group(items: Sequence[str]) -> list[str | BaseException]:
        if items == ["a"]:
            commits.release()
            commits.release()  # a second call changes nothing
            await finish_a.wait()
        done.append(",".join(items))
        return [f"done {item}" for item in items]

    a = asyncio.create_task(commits.submit("a", commit_group))
    await asyncio.sleep(0)  # "a" leads, releases and waits
    # Not queued behind "a" (a wait_for, so a lead that never passes fails, not hangs).
    assert await asyncio.wait_for(commits.submit("b", commit_group), 5) == "done b"
    assert done == ["b"]
    finish_a.set()
    assert await a == "done a"
    assert done == ["b", "a"]
    # The lead was passed once: a later submission still commits straight away.
    assert await commits.submit("c", commit_group) == "done c"


async def test_release_hands_the_lead_to_the_oldest_waiting_submission() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    first, (b, c), gate = await _submit_while_held(commits, recorder, "x", ["b", "c"])
    commits.release()  # outside the leader's task: a no-op
    assert len(commits) == 2
    gate.set()
    assert (await first, await b, await c) == ("done x", "done b", "done c")
    assert recorder.groups == [["x"], ["b", "c"]]


async def test_a_group_that_fails_after_releasing_passes_the_lead_only_once() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    fail = asyncio.Event()
    groups: list[list[str]] = []

    async def commit_group(items: Sequence[str]) -> list[str | BaseException]:
        groups.append(list(items))
        if items == ["a"]:
            commits.release()
            await fail.wait()
            raise RuntimeError("storage went away")
        return [f"done {item}" for item in items]

    a = asyncio.create_task(commits.submit("a", commit_group))
    await asyncio.sleep(0)
    b = await asyncio.wait_for(commits.submit("b", commit_group), 5)
    fail.set()
    with pytest.raises(RuntimeError, match="went away"):
        await a
    assert b == "done b"
    assert await commits.submit("c", commit_group) == "done c"
    assert groups == [["a"], ["b"], ["c"]]


async def test_a_lone_submission_with_commit_one_commits_it_alone() -> None:
    """``commit_one`` is the group of one without the lists: it gets the item, its
    result or its error is the submitter's, and the counters count it as a group."""
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    alone: list[str] = []

    async def commit_one(item: str) -> str:
        alone.append(item)
        if item == "bad":
            raise ValueError("bad item")
        return f"alone {item}"

    assert await commits.submit("a", recorder, commit_one) == "alone a"
    with pytest.raises(ValueError, match="bad item"):
        await commits.submit("bad", recorder, commit_one)
    assert alone == ["a", "bad"]
    assert recorder.groups == []
    assert (commits.groups, commits.items) == (2, 2)
    assert await commits.submit("b", recorder, commit_one) == "alone b"  # lead was given up


async def test_submissions_made_while_one_commits_alone_still_group() -> None:
    """A submitter committing alone holds the lead: what is submitted meanwhile queues
    and commits as one group after it, through ``commit_group``."""
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    entered, gate = asyncio.Event(), asyncio.Event()

    async def commit_one(item: str) -> str:
        entered.set()
        await gate.wait()
        return f"alone {item}"

    leader = asyncio.create_task(commits.submit("a", recorder, commit_one))
    await entered.wait()
    followers = [asyncio.create_task(commits.submit(i, recorder, commit_one)) for i in "bc"]
    await asyncio.sleep(0)  # each follower queues on its first step
    assert len(commits) == 2
    gate.set()
    assert await leader == "alone a"
    assert [await f for f in followers] == ["done b", "done c"]
    assert recorder.groups == [["b", "c"]]


async def test_release_inside_commit_one_keeps_the_lead_to_the_end() -> None:
    """``release`` is for groups: called while committing alone it hands nothing on, so
    what queued meanwhile still waits for the lone commit to finish."""
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    entered, gate = asyncio.Event(), asyncio.Event()

    async def commit_one(item: str) -> str:
        entered.set()
        await gate.wait()
        commits.release()
        await asyncio.sleep(0)  # a released lead would let the follower commit here
        assert recorder.groups == []
        return f"alone {item}"

    leader = asyncio.create_task(commits.submit("a", recorder, commit_one))
    await entered.wait()
    follower = asyncio.create_task(commits.submit("b", recorder, commit_one))
    await asyncio.sleep(0)  # the follower queues on its first step
    gate.set()
    assert await leader == "alone a"
    assert await follower == "done b"
    assert recorder.groups == [["b"]]


async def test_submissions_made_in_the_same_turn_form_one_group() -> None:
    """Stages that finish in the same turn of the event loop (a previous group's results
    resuming its items, whose next bodies do not wait) join the first one's group: its
    leader waits that one turn before taking the queue, so a busy worker's groups are
    one per round of its slots, not a lone commit followed by the rest."""
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    tasks = [asyncio.create_task(commits.submit(item, recorder)) for item in "abcd"]
    assert await asyncio.gather(*tasks) == ["done a", "done b", "done c", "done d"]
    assert recorder.groups == [["a", "b", "c", "d"]]


async def test_the_next_leader_gathers_the_items_resumed_by_the_last_group() -> None:
    """When the lead passes on, the new leader also waits a turn: the items the last
    group's results resumed, submitting again at once, join its group."""
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()

    async def twice(item: str) -> list[str]:
        first = await commits.submit(item, recorder)
        return [first, await commits.submit(item + "2", recorder)]

    leader, followers, gate = await _submit_while_held(commits, recorder, "a", ["b"])
    again = asyncio.create_task(twice("c"))  # queues behind the held group
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(leader, *followers, again)
    assert recorder.groups == [["a"], ["b", "c"], ["c2"]]
    resumed = [asyncio.create_task(twice(item)) for item in ("x", "y")]
    await asyncio.gather(*resumed)
    assert recorder.groups[3:] == [["x", "y"], ["x2", "y2"]]


async def test_a_leader_cancelled_while_gathering_hands_the_lead_on() -> None:
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    first = asyncio.create_task(commits.submit("a", recorder))
    await asyncio.sleep(0)  # "a" leads and waits its turn
    second = asyncio.create_task(commits.submit("b", recorder))
    first.cancel()
    assert await second == "done b"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert recorder.groups == [["b"]]
    assert await commits.submit("c", recorder) == "done c"


async def test_without_gather_a_lone_leader_commits_at_once() -> None:
    """``gather=False`` (the in-memory store, whose commits never wait): each submission
    of the turn leads and commits at once, alone (here the commit itself never waits,
    so nobody queues behind it), where ``gather`` would have made them one group."""
    commits: GroupCommit[str, str] = GroupCommit()
    recorder = Recorder()
    tasks = [asyncio.create_task(commits.submit(item, recorder, gather=False)) for item in "abc"]
    assert await asyncio.gather(*tasks) == ["done a", "done b", "done c"]
    assert recorder.groups == [["a"], ["b"], ["c"]]
