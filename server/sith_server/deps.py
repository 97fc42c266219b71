"""Everything the servicers share, built once by the app (no globals, so tests can run servers side by side)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import redis

from sith_server.config import ServerConfig
from sith_server.downloads import DownloadEndpoint
from sith_server.metrics import Metrics
from sith_server.runtime import ModelRuntime
from sith_server.vocabulary import Vocabulary
from sith_workers.edits import EditStore
from sith_workers.queue import JobQueue


@dataclass
class Deps:
    config: ServerConfig
    redis: redis.Redis
    runtime: ModelRuntime
    queue: JobQueue
    edits: EditStore                  # the one record per edit (server creates, worker finishes)
    vocabulary: Vocabulary
    metrics: Metrics
    stopping: threading.Event = field(default_factory=threading.Event)
    downloads: DownloadEndpoint | None = None   # signed-URL HTTP downloads, when SITH_DOWNLOAD_PORT is set
