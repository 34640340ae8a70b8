"""`moderation-worker console`: serve the page until stopped, printing where to open it."""

from __future__ import annotations

import argparse
import logging.config

from moderation_worker.tools.commands import _settings


def cmd_console(args: argparse.Namespace) -> int:
    from aiohttp import web

    from adapters.jsonlog import logging_config
    from moderation_worker.tools.console.app import make_console

    settings = _settings(args)
    logging.config.dictConfig(logging_config(settings.log_level))
    host = args.host or settings.console.host
    port = settings.console.port if args.port is None else args.port
    app, users = make_console(settings)
    if not settings.console.users:
        token = next(iter(users))
        print("console: no [console] users configured; a token for 'admin' for this run:")
        print(f"  open http://{host}:{port}/login?token={token}", flush=True)
    else:
        print(f"console: open http://{host}:{port}/ and sign in with your token", flush=True)
    web.run_app(app, host=host, port=port, print=None)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("console", help="web page: live stream, operating point, review queue")
    p.add_argument("--config", default=None, help="TOML settings file")
    p.add_argument("--host", default=None, help="default: console.host (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: console.port (8090)")
    p.set_defaults(func=cmd_console)
