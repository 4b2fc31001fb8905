"""The logger shape the kernel writes to. The kernel imports no logging library:
hosts pass a structlog logger (``structlog.get_logger("treadle")``); the default
forwards to the standard library's ``logging`` and configures nothing."""

from __future__ import annotations

import logging
from typing import Any, Protocol


class KernelLogger(Protocol):
    def bind(self, **fields: Any) -> KernelLogger: ...

    def debug(self, event: str, **fields: Any) -> Any: ...

    def info(self, event: str, **fields: Any) -> Any: ...

    def warning(self, event: str, **fields: Any) -> Any: ...

    def error(self, event: str, **fields: Any) -> Any: ...


class StdlibLogger:
    """Adapts ``logging.Logger`` to ``KernelLogger``; bound fields go in ``extra``."""

    def __init__(self, name: str = "treadle", fields: dict[str, Any] | None = None) -> None:
        self._logger = logging.getLogger(name)
        self._fields = fields or {}

    def bind(self, **fields: Any) -> StdlibLogger:
        return StdlibLogger(self._logger.name, {**self._fields, **fields})

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            merged = {**self._fields, **fields}
            detail = " ".join(f"{k}={v}" for k, v in merged.items())
            self._logger.log(level, "%s %s", event, detail)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)
