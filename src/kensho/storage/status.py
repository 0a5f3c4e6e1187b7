"""The former name of :mod:`kensho.storage.report` (a verify report, not the database
of :mod:`kensho.storage.state`), kept so existing imports keep working."""

from __future__ import annotations

from kensho.storage.report import FileReport, FileStatus, IntegrityStatus, VerifyReport

__all__ = ["FileReport", "FileStatus", "IntegrityStatus", "VerifyReport"]
