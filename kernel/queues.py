"""Named queues: which workers may run which jobs.

Every job carries the queue of its stage (``define_stage(..., queue="gpu")``, or the
workflow's ``queue=`` for a code workflow's steps and for pipeline stages that name
none). A worker serves a set of queues (``treadle worker --queue gpu``) and leases only
their jobs, so a GPU stage never lands on a machine without one. Everything that names
no queue is on ``DEFAULT_QUEUE``, which is what a worker serves unless told otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_QUEUE = "default"
"""The queue of a stage or workflow that names none, and the one a worker serves by default."""

REMOTE_QUEUE = "remote"
"""The queue of a remote stage (``define_stage(..., remote=True)``) that names none. Remote
workers lease its jobs over HTTP; in-process workers refuse a queue that holds remote stages."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def check_queue(name: object, where: str) -> str:
    """``name`` when it is a valid queue name (1-64 characters: letters, digits and
    ``_ . : -``, starting with a letter or digit), else ``ValueError`` naming ``where``.
    Queue names appear in CLI flags, metrics labels and URLs: keep them plain."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{where}: queue must be 1-64 letters, digits or '_.:-' starting with a letter "
            f"or digit, got {name!r}"
        )
    return name


def check_queues(names: Iterable[object], where: str) -> tuple[str, ...]:
    """The distinct valid names of ``names`` in order; at least one."""
    if isinstance(names, str):
        names = [names]
    checked: list[str] = []
    for name in names:
        valid = check_queue(name, where)
        if valid not in checked:
            checked.append(valid)
    if not checked:
        raise ValueError(f"{where}: name at least one queue")
    return tuple(checked)
