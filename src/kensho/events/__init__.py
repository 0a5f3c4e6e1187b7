"""Status events shared by all components.

Events are data: frozen dataclasses with a ``kind`` and a JSON-serialisable
``to_dict()``. Components yield them; the CLI renders them as progress bars or
tables, the logger writes them as JSON lines, the HTTP server streams them as
server-sent events. No component formats user text for another, except the one-line
``message`` every event carries for humans.

One module per producer, so a new component's events are one new file:
``_base`` (:class:`Event`), ``storage`` (verify, repair, update), ``runtime``
(breakers, failover, admission), ``server`` (status snapshot, shutdown), ``release``
(over-the-air releases) and ``_decode`` (the one typed decoder of the status
stream). Everything is re-exported here: import from :mod:`kensho.events`.
"""

from __future__ import annotations

from kensho.events._base import (
    Event,
)
from kensho.events._decode import (
    UnknownEvent,
    decode_event,
    event_types,
)
from kensho.events.release import (
    ReleaseApplied,
    ReleaseApplyFailed,
    ReleaseChecked,
    ReleasePrefetchProgress,
    ReleasePrefetchStopped,
    ReleaseRefused,
    ReleaseSnapshot,
    ReleaseStaged,
)
from kensho.events.runtime import (
    BreakerStateChanged,
    FallbackActivated,
    PrimaryProbeFailed,
    PrimaryProbing,
    PrimaryRestored,
    QueueCapacityChanged,
    RequestRerouted,
    RuntimeAvailable,
    RuntimeOverloaded,
    RuntimeRecovered,
    RuntimeUnavailable,
)
from kensho.events.server import (
    BreakerChange,
    BreakerSnapshot,
    IntegritySnapshot,
    QueueSnapshot,
    ServerShutdown,
    StatusSnapshot,
    TrafficSnapshot,
)
from kensho.events.storage import (
    StorageChunkRejected,
    StorageDownloadProgress,
    StorageFileChecked,
    StorageFileRepaired,
    StorageFileUpdated,
    StorageHashProgress,
    StorageLockWaiting,
    StorageReady,
    StorageRepairFailed,
    StorageRepairStarted,
    StorageSourceFailed,
    StorageUpdateFilePlanned,
    StorageUpdateFinished,
    StorageUpdatePlanned,
    StorageVerifyFinished,
    StorageVerifyStarted,
)

__all__ = [
    "BreakerChange",
    "BreakerSnapshot",
    "BreakerStateChanged",
    "Event",
    "FallbackActivated",
    "IntegritySnapshot",
    "PrimaryProbeFailed",
    "PrimaryProbing",
    "PrimaryRestored",
    "QueueCapacityChanged",
    "QueueSnapshot",
    "ReleaseApplied",
    "ReleaseApplyFailed",
    "ReleaseChecked",
    "ReleasePrefetchProgress",
    "ReleasePrefetchStopped",
    "ReleaseRefused",
    "ReleaseSnapshot",
    "ReleaseStaged",
    "RequestRerouted",
    "RuntimeAvailable",
    "RuntimeOverloaded",
    "RuntimeRecovered",
    "RuntimeUnavailable",
    "ServerShutdown",
    "StatusSnapshot",
    "StorageChunkRejected",
    "StorageDownloadProgress",
    "StorageFileChecked",
    "StorageFileRepaired",
    "StorageFileUpdated",
    "StorageHashProgress",
    "StorageLockWaiting",
    "StorageReady",
    "StorageRepairFailed",
    "StorageRepairStarted",
    "StorageSourceFailed",
    "StorageUpdateFilePlanned",
    "StorageUpdateFinished",
    "StorageUpdatePlanned",
    "StorageVerifyFinished",
    "StorageVerifyStarted",
    "TrafficSnapshot",
    "UnknownEvent",
    "decode_event",
    "event_types",
]
