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


def test_renamed_storage_names_keep_their_old_import_paths() -> None:
    from kensho.storage import Hasher, IOPool
    from kensho.storage._assemble import BuildOutcome
    from kensho.storage._repair import RepairOutcome
    from kensho.storage.report import VerifyReport
    from kensho.storage.status import VerifyReport as OldVerifyReport

    assert Hasher is IOPool
    assert RepairOutcome is BuildOutcome
    assert OldVerifyReport is VerifyReport
