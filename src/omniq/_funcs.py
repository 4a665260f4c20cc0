"""Naming functions by import path, and finding them again in a worker.

A task stores ``"package.module:qualname"``, never code. A function defined in
the user's script (module ``__main__``) is stored as ``"script.py:qualname"``
(relative to the working directory when the script lives under it). A worker
resolves such a name by loading only the script's imports, function and class
definitions and constant assignments: none of its other top-level statements
run, so a script without an ``if __name__ == "__main__":`` guard does not
enqueue its tasks again when a worker loads it. Scripts are only loaded from
under the worker's working directory, so a queue writer cannot point a worker
at an arbitrary file.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._errors import ConfigurationError

_SCRIPT_SUFFIX = ".py"
_resolved: dict[str, Callable[..., Any]] = {}


_paths: weakref.WeakKeyDictionary[Callable[..., Any], str] = weakref.WeakKeyDictionary()


def func_path(func: Callable[..., Any] | str) -> str:
    """The import path a worker will use to find ``func`` (cached: enqueue is a hot path)."""
    if isinstance(func, str):
        if ":" not in func:
            raise ConfigurationError(
                f"{func!r} is not an import path; write it as 'package.module:function'"
            )
        return func
    try:
        return _paths[func]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable, not cached
        pass
    path = _func_path_uncached(func)
    try:
        _paths[func] = path
    except TypeError:
        pass
    return path


def _func_path_uncached(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname:
        raise ConfigurationError(f"{func!r} has no module or name; pass a module-level function")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ConfigurationError(
            f"{qualname} is a lambda or a nested function, which a worker cannot import; "
            "define it at the top level of a module"
        )
    if module == "__main__":
        return f"{_main_script_name()}:{qualname}"
    return f"{module}:{qualname}"


def _main_script_name() -> str:
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        raise ConfigurationError(
            "this function was defined in an interactive session, which a worker cannot "
            "import; put it in a module (e.g. tasks.py) and import it from there"
        )
    path = Path(main_file).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def resolve(path: str) -> Callable[..., Any]:
    """Find the function named by ``path``; raises ``ImportError`` with the reason."""
    func = _resolved.get(path)
    if func is None:
        func = _resolve_uncached(path)
        _resolved[path] = func
    return func


def _resolve_uncached(path: str) -> Callable[..., Any]:
    module_name, _, qualname = path.rpartition(":")
    if not module_name or not qualname:
        raise ImportError(f"{path!r} is not an import path of the form 'module:function'")
    if module_name.endswith(_SCRIPT_SUFFIX):
        module = _load_script(module_name)
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"{module_name} has no attribute {qualname!r}") from None
    if not callable(obj):
        raise ImportError(f"{path} is not callable")
    return obj  # type: ignore[no-any-return]


_scripts: dict[Path, types.ModuleType] = {}


def _load_script(name: str) -> types.ModuleType:
    path = Path(name)
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main is not None and main_file and Path(main_file).resolve() == path:
        return main  # the script itself is running this worker: use its live functions
    if path in _scripts:
        return _scripts[path]
    cwd = Path.cwd().resolve()
    if not path.is_relative_to(cwd):
        raise ImportError(
            f"task function lives in script {path}, outside this worker's directory {cwd}; "
            "start the worker in the script's directory, or move the function into a module "
            "and pass --import MODULE"
        )
    if not path.is_file():
        raise ImportError(
            f"task function lives in script {name}, which is not in {cwd}; start the worker "
            "in the script's directory, or move the function into a module"
        )
    module = _exec_definitions(path)
    _scripts[path] = module
    return module


def _exec_definitions(path: Path) -> types.ModuleType:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    tree.body = [node for node in tree.body if _is_definition(node)]
    module_name = f"__omniq_script__.{path.stem}"
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    sys.modules[module_name] = module  # dataclasses and pickle look classes up here
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)  # the script's sibling modules import as they did for it
    exec(compile(tree, str(path), "exec"), module.__dict__)
    return module


_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _is_definition(node: ast.stmt) -> bool:
    """True for statements that only define names: no calls that could enqueue or do I/O."""
    if isinstance(node, _DEFINITIONS):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        value = node.value
        return value is not None and not any(isinstance(n, ast.Call) for n in ast.walk(value))
    if isinstance(node, ast.Try):
        parts = [*node.body, *node.orelse, *node.finalbody]
        parts += [stmt for handler in node.handlers for stmt in handler.body]
        return all(isinstance(s, ast.Pass) or _is_definition(s) for s in parts)
    return False


def import_modules(names: list[str]) -> None:
    """Import ``--import`` modules, with the working directory importable like ``python -m``."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in names:
        importlib.import_module(name)
