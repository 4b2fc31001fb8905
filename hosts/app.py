"""``load_workflows("module:attr")``: how every host and the CLI find an application.

``--app`` (or ``TREADLE_APP``) names an object the way uvicorn and Celery do:

- ``"myapp.flows:pipeline"``: one workflow definition;
- ``"myapp.flows:workflows"``: a list (or any iterable) of them;
- ``"myapp:app"``: an object with a ``workflows`` attribute (an app registry);
- ``"myapp.flows"``: a module, read through its ``workflows`` attribute.

The attribute part may be dotted (``"myapp:app.registry"``). The current directory
is importable, as it is for ``python -m``, so ``treadle worker --app myapp:workflows``
works from the project's root. Every problem is one line of ``AppLoadError``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import TreadleError

__all__ = ["AppLoadError", "load_workflows"]


class AppLoadError(TreadleError):
    """``--app`` names nothing usable: a bad spec, a failing import, a missing attribute,
    or an object that holds no workflow definitions."""


def load_workflows(app: str | None) -> list[WorkflowDefinition]:
    """The workflow definitions ``app`` names (see the module docstring); ``[]`` for
    ``None``. Raises ``AppLoadError`` with a one-line message naming the problem."""
    if app is None:
        return []
    given: object = app  # checked at runtime: the value comes from flags and env vars
    if not isinstance(given, str) or not app.strip():
        raise AppLoadError(f"--app must be 'module:attr', got {app!r}")
    spec = app.strip()
    module_name, sep, attr_path = spec.partition(":")
    if not module_name or (sep and not attr_path):
        raise AppLoadError(
            f"--app must be 'module:attr' (e.g. 'myapp.flows:workflows'), got {app!r}"
        )
    module = _import(module_name, spec)
    if not sep:
        if not hasattr(module, "workflows"):
            raise AppLoadError(
                f"module {module_name!r} has no 'workflows' attribute: "
                f"name the object, e.g. '{module_name}:pipeline'"
            )
        attr_path = "workflows"
    value: Any = module
    walked = module_name
    for part in attr_path.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise AppLoadError(
                f"{walked!r} has no attribute {part!r} (from --app {spec!r})"
            ) from None
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    return _definitions(value, spec)


def _import(module_name: str, spec: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise AppLoadError(
                f"cannot import module {module_name!r} (from --app {spec!r}): no such module"
            ) from None
        raise AppLoadError(
            f"importing {module_name!r} failed: ModuleNotFoundError: {exc}"
        ) from None
    except Exception as exc:
        raise AppLoadError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _definitions(value: Any, spec: str) -> list[WorkflowDefinition]:
    if not isinstance(value, WorkflowDefinition | Iterable) and hasattr(value, "workflows"):
        value = value.workflows  # an app object (or a module) holding its workflows
    if isinstance(value, WorkflowDefinition):
        return [value]
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise AppLoadError(
            f"--app {spec!r} names a {type(value).__name__}, not a workflow definition, "
            "a list of them, or an object with a 'workflows' attribute"
        )
    found: list[WorkflowDefinition] = []
    for index, item in enumerate(value):
        if not isinstance(item, WorkflowDefinition):
            raise AppLoadError(
                f"--app {spec!r}: item {index} is a {type(item).__name__}, not a workflow "
                "definition (WorkflowBuilder(...).build() or @workflow)"
            )
        if any(item is seen for seen in found):
            continue
        if any(item.id == seen.id for seen in found):
            raise AppLoadError(f"--app {spec!r} defines workflow id {item.id!r} twice")
        found.append(item)
    return found


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
