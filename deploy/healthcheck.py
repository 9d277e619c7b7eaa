"""Container health check: exit 0 when the local server reports SERVING.

Asks the standard grpc.health.v1 service, so it works the same for Docker's
HEALTHCHECK, compose and anything else that can run a command. Usage:
``python healthcheck.py [HOST:PORT] [--service NAME] [--timeout SECONDS]``; the
address defaults to 127.0.0.1 on the port of $PHENOLENS_LISTEN, else 50051.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 5.0) -> bool:
    """True when ``target`` answers SERVING for ``service`` ("" is the whole server)."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"unhealthy: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
    return serving


def default_target(env: dict[str, str] | None = None) -> str:
    """127.0.0.1 on the port the server listens on (PHENOLENS_LISTEN, else 50051)."""
    listen = (os.environ if env is None else env).get("PHENOLENS_LISTEN", "")
    port = listen.rsplit(":", 1)[-1] if ":" in listen else "50051"
    return f"127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default=default_target())
    parser.add_argument("--service", default="")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    return 0 if check(args.target, args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
