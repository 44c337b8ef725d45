"""Every public error class jtrail defines derives from one root, `jtrail.JtrailError`, so a caller
can catch everything jtrail raises on purpose with one `except` (the CLI does)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import jtrail
from jtrail import JtrailError

# Generated gRPC stubs define no errors of ours; importing them needs nothing special, but they are not
# jtrail's code.
_SKIP = ("jtrail.serving.frontdoor.proto",)


# The folders are mapped into one namespace (pyproject's package-dir), so walking `jtrail`'s own folder
# does not reach the others: walk each.
_PACKAGES = ("jtrail", "jtrail.kernels", "jtrail.models", "jtrail.serving")


def _modules():
    for pkg in _PACKAGES:
        yield from pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + ".")


def _public_errors() -> list[type[BaseException]]:
    found = []
    for info in _modules():
        if info.name.startswith(_SKIP) or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
                    and not name.startswith("_")):
                found.append(obj)
    return found


def test_every_public_error_derives_from_the_root():
    errors = _public_errors()
    # the walk must reach every layer, or the check below proves nothing
    layers = {e.__module__.split(".")[1] for e in errors}
    assert {"models", "serving", "datasets", "preflight"} <= layers, layers
    stray = sorted(f"{e.__module__}.{e.__qualname__}" for e in errors if not issubclass(e, JtrailError))
    assert stray == []


def test_root_is_exported_and_typed_errors_keep_valueerror():
    from jtrail.models.errors import UnknownModelError
    from jtrail.serving.sequence import InvalidRequestError

    assert jtrail.JtrailError is JtrailError
    # existing callers catch ValueError; the root must not take that away
    assert issubclass(UnknownModelError, ValueError) and issubclass(InvalidRequestError, ValueError)
