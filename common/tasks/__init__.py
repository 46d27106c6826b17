"""Finding a task: a built-in name such as "mnist", or any importable `package.module`."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import cast

from fedlink.common.errors import TaskError
from fedlink.common.tasks.base import TaskModule

BUILTIN_TASKS = {
    "digits": "fedlink.common.tasks.digits",
    "mnist": "fedlink.common.tasks.mnist",
    "fashion-mnist": "fedlink.common.tasks.fashion_mnist",
    "diabetes": "fedlink.common.tasks.diabetes",
    "cifar10": "fedlink.common.tasks.cifar10",
    "cifar10-resnet18": "fedlink.common.tasks.cifar10_resnet18",
    "causal-lm": "fedlink.common.tasks.causal_lm",
    "digits-transfer": "fedlink.common.tasks.digits_transfer",
}

REQUIRED_FUNCTIONS = ("build_model", "load_data", "load_test_data", "train", "evaluate")


def load_task(name: str) -> TaskModule:
    """Import the task `name` (built-in or dotted module path) and check it is complete."""
    module_name = BUILTIN_TASKS.get(name, name)
    module = _import(name, module_name)
    missing = [fn for fn in REQUIRED_FUNCTIONS if not callable(getattr(module, fn, None))]
    if missing:
        raise TaskError(
            f"task module {module_name!r} does not define {', '.join(missing)}; a task must "
            f"provide {', '.join(REQUIRED_FUNCTIONS)} (see docs/tasks.md)"
        )
    return cast(TaskModule, module)


def _import(name: str, module_name: str) -> ModuleType:
    not_found = (
        f"no task {name!r}: it is neither a built-in ({', '.join(BUILTIN_TASKS)}) nor an "
        "importable module; pass a module path such as mypackage.mytask that is on PYTHONPATH "
        "(see docs/tasks.md)"
    )
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only "the task itself is missing" is a bad name; a missing dependency of the task
        # is the task's problem and the message must say which one.
        if error.name is not None and (module_name + ".").startswith(error.name + "."):
            raise TaskError(not_found) from error
        raise TaskError(f"task module {module_name!r} failed to import: {error}") from error
    except (ValueError, TypeError) as error:  # empty or relative names
        raise TaskError(not_found) from error
    except Exception as error:
        raise TaskError(
            f"task module {module_name!r} failed to import: {type(error).__name__}: {error}"
        ) from error
