"""``phenolens serve [--config FILE]`` and ``phenolens info``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the gRPC server in the foreground",
        description="Run the PhenoLens gRPC server until SIGTERM/SIGINT (then drain). "
                    "Configuration: --config FILE (YAML or TOML) plus PHENOLENS_* "
                    "environment overrides; see server/config.py.")
    serve.add_argument("--config", type=Path, help="YAML or TOML configuration file")
    serve.add_argument("--listen", help="HOST:PORT to bind (overrides the configuration)")
    serve.add_argument("--gallery", type=Path, help="gallery path (overrides the configuration)")
    serve.set_defaults(func=run_serve)

    info = subparsers.add_parser(
        "info", help="what a server (or this installation) runs",
        description="With --server: ask a running server (ServerInfo). Without: print the "
                    "effective configuration of this installation.")
    info.add_argument("--config", type=Path, help="configuration file (local mode)")
    info.add_argument("--json", action="store_true")
    from server.remote import add_remote_arguments

    add_remote_arguments(info)
    info.set_defaults(func=run_info)

    token = subparsers.add_parser(
        "hash-token", help="print the sha256 under which a token is stored in the config")
    token.add_argument("token", nargs="?", help="the token (default: read from stdin)")
    token.set_defaults(func=run_hash_token)


def _config(args: argparse.Namespace):
    from server.config import load_config

    overrides: dict = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "gallery", None):
        overrides["gallery"] = {"path": str(args.gallery)}
    return load_config(args.config, **overrides)


def run_serve(args: argparse.Namespace) -> int:
    from server.app import serve
    from server.logs import setup_logging

    config = _config(args)
    setup_logging(config.log.level, json_lines=config.log.json)
    return serve(config)


def run_info(args: argparse.Namespace) -> int:
    if args.server:
        from server.remote import client_from_args

        with client_from_args(args) as client:
            info = client.server_info()
        doc = {
            "server_version": info.server_version, "api_version": info.api_version,
            "encoder_id": info.encoder_id, "view_scheme": info.view_scheme,
            "gallery_version": info.gallery_version, "gallery_size": info.gallery_size,
            "encoders": [e.__dict__ for e in info.encoders], "limits": info.limits,
            "explain_methods": list(info.explain_methods),
            "default_explain_methods": list(info.default_explain_methods),
            "features": list(info.features),
        }
    else:
        import dataclasses

        config = _config(args)
        doc = json.loads(json.dumps(dataclasses.asdict(config), default=str))
        for token in doc["auth"]["tokens"]:
            token.pop("token", None)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for key, value in doc.items():
            print(f"{key}: {value}")
    return 0


def run_hash_token(args: argparse.Namespace) -> int:
    from server.auth import hash_token

    token = args.token if args.token else sys.stdin.readline().strip()
    print(hash_token(token))
    return 0
