"""One exception tree: every error class lives in ``kensho.errors`` and is exported."""

from __future__ import annotations

import inspect

import kensho
from kensho import errors


def _error_classes() -> dict[str, type[BaseException]]:
    return {
        name: obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }


def test_every_error_class_is_in_the_tree_and_exported_by_the_package() -> None:
    classes = _error_classes()
    assert {"UnsafePathError", "SourceUnreachableError", "InvalidRequestError"} <= set(classes)
    for name, cls in classes.items():
        assert issubclass(cls, errors.KenshoError), name
        assert name in errors.__all__, name
        assert getattr(kensho, name) is cls, name
        assert name in kensho.__all__, name
        assert name in (errors.__doc__ or ""), f"{name} is missing from the tree drawing"


def test_old_import_paths_are_the_same_classes() -> None:
    from kensho.storage import SourceUnreachableError, UnsafePathError
    from kensho.storage._fs import UnsafePathError as FsUnsafePathError
    from kensho.storage.sources import SourceUnreachableError as SourcesUnreachable
    from kensho.storage.sources._health import TransferTooSlowError

    assert UnsafePathError is FsUnsafePathError is errors.UnsafePathError
    assert SourceUnreachableError is SourcesUnreachable is errors.SourceUnreachableError
    assert TransferTooSlowError is errors.TransferTooSlowError
    assert issubclass(errors.SourceUnreachableError, errors.SourceError)
