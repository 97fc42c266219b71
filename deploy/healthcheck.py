#!/usr/bin/env python3
"""Container health check for the sith server and workers (used by the Dockerfiles' HEALTHCHECK).

    healthcheck.py grpc  [--address HOST:PORT] [--service NAME] [--timeout S]
        Calls grpc.health.v1.Health/Check; exit 0 only for SERVING.
        The address defaults to the port of $SITH_GRPC_ADDRESS on 127.0.0.1 (50051).
        TLS is used when $SITH_TLS_CERT is set: the root certificate is $SITH_HEALTHCHECK_CA when
        that file exists, else $SITH_TLS_CERT itself (right for a self-signed certificate); the
        name checked against the certificate is $SITH_HEALTHCHECK_SERVER_NAME (default: localhost).

    healthcheck.py redis [--url URL] [--timeout S]
        PING the worker's Redis ($SITH_REDIS_URL); exit 0 on PONG. A worker without its Redis
        cannot take jobs, so this is the worker container's liveness signal.

Exit status: 0 healthy, 1 unhealthy (the reason on stderr). Standard library + grpcio,
grpcio-health-checking and redis only; they are the project's own pinned dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_GRPC_ADDRESS = "0.0.0.0:50051"


def _local_target(listen: str) -> str:
    """The address to dial for a listen address: same port, on loopback."""
    port = listen.rsplit(":", 1)[-1] if ":" in listen else listen
    return f"127.0.0.1:{port}"


def check_grpc(address: str | None, service: str, timeout: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = address or _local_target(os.environ.get("SITH_GRPC_ADDRESS", DEFAULT_GRPC_ADDRESS))
    cert = os.environ.get("SITH_TLS_CERT")
    if cert:
        ca_path = os.environ.get("SITH_HEALTHCHECK_CA", "")
        if not (ca_path and os.path.isfile(ca_path)):
            ca_path = cert
        with open(ca_path, "rb") as fh:
            creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
        name = os.environ.get("SITH_HEALTHCHECK_SERVER_NAME", "localhost")
        channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{target}: {exc.code().name}: {exc.details()}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} {service or '<server>'}: {status}"


def check_redis(url: str | None, timeout: float) -> tuple[bool, str]:
    import redis

    url = url or os.environ.get("SITH_REDIS_URL")
    if not url:
        return False, "no Redis URL (set SITH_REDIS_URL or pass --url)"
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        client.ping()
    except Exception as exc:  # any failure is "unhealthy"; say why
        return False, f"redis: {type(exc).__name__}: {exc}"
    return True, "redis: PONG"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grpc")
    g.add_argument("--address")
    g.add_argument("--service", default="")
    g.add_argument("--timeout", type=float, default=3.0)
    r = sub.add_parser("redis")
    r.add_argument("--url")
    r.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.what == "grpc":
        ok, message = check_grpc(args.address, args.service, args.timeout)
    else:
        ok, message = check_redis(args.url, args.timeout)
    print(message, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
