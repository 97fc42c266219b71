"""Prometheus metrics of one worker process (no side effects beyond registering three metrics).

Workers serve no HTTP endpoint of their own: cluster-wide numbers (cache hits/misses, queue depth,
live workers) live in Redis and the server exports them (``sith_server.metrics``). These in-process
metrics are for embedding a Worker in a process that does expose ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CACHE_REQUESTS = Counter("sith_worker_cache_requests", "Artifact cache lookups in this process", ["result"])
JOBS = Counter("sith_worker_jobs", "Jobs finished by this process", ["kind", "state"])
JOB_SECONDS = Histogram("sith_worker_job_seconds", "Wall time of a job run in this process", ["kind"],
                        buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
