"""The service's worker side: Redis Streams job queue, worker pool, Redis artifact cache.

The server submits jobs through :class:`JobQueue`; ``sith worker`` processes (one device each) run
the engine on them. Everything shared lives in one Redis, so workers on other machines join by
pointing at the same URL.
"""

from sith_workers.connection import RedisUnavailable, connect
from sith_workers.queue import JobQueue, JobRecord, ProgressEvent

__all__ = ["JobQueue", "JobRecord", "ProgressEvent", "RedisUnavailable", "connect"]
