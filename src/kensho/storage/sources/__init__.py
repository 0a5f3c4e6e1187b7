"""Where repaired bytes come from: mirror folders, HTTP(S) servers, object stores,
peers, memory (tests).

Every source implements one call, :meth:`Source.fetch`: deliver exactly ``length``
bytes of ``path`` starting at ``offset`` to an async ``sink``, in order, or raise.
The manager hashes and writes what the sink receives, so a source never needs to be
trusted: it only moves bytes. Errors are split by what the manager should do next:

::

    SourceError                  this source cannot deliver this file: try the next one
    ├── SourceUnreachableError   cannot reach the source at all (offline, no such folder)
    └── DownloadError            the transfer broke, crawled or offered the wrong size

Exceptions raised by the sink (a hash mismatch, ``ENOSPC``) pass through untouched
and are never retried here: they are the manager's business.

A source that is not fit for now (it asked to be left alone, timed out, crawled
below the minimum rate, ran out of retries) is abandoned for the rest of the run:
later requests fail at once with an error of the same class saying why, and the
manager moves on to the next source (see :mod:`._health`).

Why the sink instead of an async iterator: the HTTP source retries in a loop that
resumes at the last delivered byte, and a ``yield`` inside a retry context would hand
the consumer's own exceptions to the retry machinery.

A source that publishes releases (its current ``manifest.json`` at its root) also
implements :meth:`ReleaseFeed.fetch_release` (:mod:`._channel`).

One module per source kind: :mod:`.mirror`, :mod:`.http`, :mod:`.object_store`
(``s3://``, ``gs://``, ``az://``), :mod:`.peer` (chunks by hash from another store),
:mod:`.memory`. A source that fetches by chunk hash is a :class:`ChunkAddressed`:
the manager tells it the manifest being built.
"""

from __future__ import annotations

from kensho.storage.sources._base import ChunkAddressed, Sink, Source, SourceUnreachableError
from kensho.storage.sources._channel import CHANNEL_FILE, ChannelAnswer, ChannelTag, ReleaseFeed
from kensho.storage.sources._factory import HttpOptions, http_options, source_from_string
from kensho.storage.sources._health import SYSTEM_CLOCK, MonotonicClock
from kensho.storage.sources.http import (
    DEFAULT_MIN_RATE,
    DEFAULT_RATE_WINDOW,
    MAX_RETRY_AFTER,
    HttpSource,
)
from kensho.storage.sources.memory import MemorySource
from kensho.storage.sources.mirror import MirrorSource
from kensho.storage.sources.object_store import ObjectStoreSource
from kensho.storage.sources.peer import CHUNK_ROUTE, PEER_API_KEY_ENV, PeerSource

__all__ = [
    "CHANNEL_FILE",
    "CHUNK_ROUTE",
    "DEFAULT_MIN_RATE",
    "DEFAULT_RATE_WINDOW",
    "MAX_RETRY_AFTER",
    "PEER_API_KEY_ENV",
    "SYSTEM_CLOCK",
    "ChannelAnswer",
    "ChannelTag",
    "ChunkAddressed",
    "HttpOptions",
    "HttpSource",
    "MemorySource",
    "MirrorSource",
    "MonotonicClock",
    "ObjectStoreSource",
    "PeerSource",
    "ReleaseFeed",
    "Sink",
    "Source",
    "SourceUnreachableError",
    "http_options",
    "source_from_string",
]
