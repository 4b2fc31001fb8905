"""In-memory Persistence: plain dictionaries behind one lock, with a real rollback.

``store.py`` holds the state (``InMemoryPersistence``) and the unit of work
(``InMemoryTransaction``: the undo log); each concern of the ``Transaction`` port is a
module of its own (``runs``, ``stages``, ``outbox``, ``idempotency``, ``annotations``,
``logs``, ``journal``, ``inbox``, ``timers``) whose store the transaction exposes as an
attribute (``tx.runs``), all writing through the one undo log.
"""

from typing import TYPE_CHECKING

from treadle.adapters.memory.persistence.shared import _MISSING
from treadle.adapters.memory.persistence.store import InMemoryPersistence, InMemoryTransaction

__all__ = ["_MISSING", "InMemoryPersistence", "InMemoryTransaction"]

if TYPE_CHECKING:  # mypy proves the transaction (and each of its stores) fits the port
    from treadle.ports.persistence import Transaction

    def _conforms(tx: InMemoryTransaction) -> Transaction:
        return tx
