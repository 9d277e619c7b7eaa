#!/usr/bin/env python3
"""Container health check: exit 0 when the local server reports SERVING.

Asks the standard grpc.health.v1 service, so it works the same for Docker's
HEALTHCHECK, compose and anything else that can run a command. Usage:
``python healthcheck.py [HOST:PORT] [--service NAME] [--timeout SECONDS]
[--ca PEM [--cert PEM --key PEM] [--server-name NAME]]``; the address defaults to
127.0.0.1 on the port of $PHENOLENS_LISTEN, else 50051. ``--ca`` switches to TLS
(``--cert``/``--key`` for a server that requires client certificates).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(target: str, ca: Path | None, cert: Path | None, key: Path | None,
             server_name: str | None) -> grpc.Channel:
    if ca is None:
        return grpc.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, creds, options=options)


def check(target: str, service: str = "", timeout: float = 5.0, *, ca: Path | None = None,
          cert: Path | None = None, key: Path | None = None,
          server_name: str | None = None) -> bool:
    """True when ``target`` answers SERVING for ``service`` ("" is the whole server)."""
    with _channel(target, ca, cert, key, server_name) as channel:
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
    parser.add_argument("--ca", type=Path, help="CA certificate (PEM): use TLS")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key", type=Path, help="client key (PEM) for mutual TLS")
    parser.add_argument("--server-name", help="expected name in the server certificate")
    args = parser.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    ok = check(args.target, args.service, args.timeout, ca=args.ca, cert=args.cert,
               key=args.key, server_name=args.server_name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
