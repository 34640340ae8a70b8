"""The console's web server (aiohttp, which Faust already brings): the page, its JSON API, and
the gate in front of both.

Access: a token per user (`console.users`; none configured: one random token for "admin",
printed at start, as Jupyter does). `GET /login?token=…` sets an HttpOnly, SameSite=Strict
cookie; the API also takes `Authorization: Bearer …`. A wrong or missing token gets 401 and
nothing else. Every change (threshold, label) is published with the user's name and logged.
Comments are hostile input: the page writes them with `textContent` only, and a strict
Content-Security-Policy forbids inline scripts, so a `<script>` in a comment stays text.
"""

from __future__ import annotations

import hmac
import math
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web

from moderation_worker.control_records import ControlRecordError
from moderation_worker.settings import Settings
from moderation_worker.tools.console.feed import ConsoleFeed
from moderation_worker.tools.console.state import ConsoleState

STATIC = Path(__file__).parent / "static"
COOKIE = "mw_console"
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:"
USER = web.AppKey("user_of", dict)
FEED = web.AppKey("feed", ConsoleFeed)
CONFIG = web.AppKey("settings", Settings)
USER_KEY = web.RequestKey("user", str)


def tokens(settings: Settings) -> dict[str, str]:
    """token -> user; with no users configured, a fresh random one for "admin"."""
    users = {t.get_secret_value(): name for name, t in settings.console.users.items()}
    return users or {secrets.token_urlsafe(24): "admin"}


def _user(request: web.Request) -> str | None:
    given = request.cookies.get(COOKIE) or ""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        given = header.removeprefix("Bearer ").strip()
    for token, name in request.app[USER].items():
        if given and hmac.compare_digest(given.encode(), token.encode()):
            return name
    return None


@web.middleware
async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
    """Security headers on everything; a valid token for everything but /login and /static."""
    public = request.path == "/login" or request.path.startswith("/static/")
    if not public:
        user = _user(request)
        if user is None:
            if request.path.startswith("/api/"):
                response: web.StreamResponse = web.json_response(
                    {"error": "missing or wrong token"}, status=401
                )
            else:
                response = web.FileResponse(STATIC / "login.html", status=401)
            _secure(response)
            return response
        request[USER_KEY] = user
    response = await handler(request)
    _secure(response)
    return response


def _secure(response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"


async def login(request: web.Request) -> web.StreamResponse:
    token = request.query.get("token", "")
    known = any(hmac.compare_digest(token.encode(), t.encode()) for t in request.app[USER])
    if not token or not known:
        return web.FileResponse(STATIC / "login.html", status=401)
    response = web.HTTPFound("/")
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
    raise response


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


def _classifier(request: web.Request) -> str:
    name = request.query.get("classifier", "")
    if name not in _classifiers(request):
        raise web.HTTPBadRequest(
            text=f'{{"error": "unknown classifier {name[:64]!r}"}}', content_type="application/json"
        )
    return name


def _classifiers(request: web.Request) -> list[str]:
    feed = request.app[FEED]
    return sorted(set(feed.policy().classifiers) | set(feed.state.classifiers()))


async def overview(request: web.Request) -> web.Response:
    feed = request.app[FEED]
    state = feed.state
    return web.json_response(
        {
            "user": request[USER_KEY],
            "classifiers": _classifiers(request),
            "policy": feed.policy().to_dict(),
            "rates": state.rates(),
            "dead_letters": dict(state.dead_letters),
            "verdicts_seen": state.verdicts_seen,
            "partitions": {str(k): v for k, v in sorted(state.partitions.items())},
            "feed_errors": feed.errors,
        }
    )


async def recent(request: web.Request) -> web.Response:
    n = min(500, max(1, int(request.query.get("n", "50"))))
    rows = request.app[FEED].state.recent(_classifier(request), n)
    return web.json_response({"rows": rows})


def _in_force(request: web.Request, classifier: str) -> tuple[float, str]:
    policy = request.app[FEED].policy()
    if classifier in policy.classifiers:
        t = policy.threshold(classifier)
        return float(t.value), t.source
    seen = request.app[FEED].state.recent(classifier, 1)
    return (seen[0]["threshold"], seen[0]["threshold_source"]) if seen else (0.5, "default")


async def curve(request: web.Request) -> web.Response:
    name = _classifier(request)
    threshold, source = _in_force(request, name)
    body = request.app[FEED].state.curve(name)
    return web.json_response({**body, "threshold": threshold, "threshold_source": source})


def _threshold(value: Any) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise web.HTTPBadRequest(text='{"error": "threshold must be a number"}',
                                 content_type="application/json") from None  # fmt: skip
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise web.HTTPBadRequest(text='{"error": "threshold must be in [0, 1]"}',
                                 content_type="application/json")  # fmt: skip
    return t


async def operating_point(request: web.Request) -> web.Response:
    name = _classifier(request)
    t = _threshold(request.query.get("threshold"))
    return web.json_response(request.app[FEED].state.operating_point(name, t))


async def applied(request: web.Request) -> web.Response:
    version = int(request.query.get("version", "0"))
    return web.json_response(request.app[FEED].state.applied(version))


async def queue(request: web.Request) -> web.Response:
    name = _classifier(request)
    n = min(100, max(1, int(request.query.get("n", "20"))))
    threshold, _ = _in_force(request, name)
    share = request.app[CONFIG].console.queue_random_share
    items = request.app[FEED].state.queue(name, threshold, n, share)
    return web.json_response({"items": items})


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text='{"error": "send JSON"}',
                                           content_type="application/json")  # fmt: skip
    try:
        data = await request.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text='{"error": "the body must be a JSON object"}',
                                 content_type="application/json")  # fmt: skip
    return data


async def set_threshold(request: web.Request) -> web.Response:
    data = await _body(request)
    community = data.get("community") or None
    reason = data.get("reason") or None
    try:
        result = await request.app[FEED].publish_threshold(
            request[USER_KEY], str(data.get("classifier", "")), _threshold(data.get("threshold")),
            community if isinstance(community, str) else None,
            reason[:2000] if isinstance(reason, str) else None,
        )  # fmt: skip
    except (ControlRecordError, ValueError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(result)


async def give_label(request: web.Request) -> web.Response:
    data = await _body(request)
    label = data.get("label")
    if label not in (0, 1) or isinstance(label, float):
        return web.json_response({"error": "label must be 0 or 1"}, status=400)
    classifier, comment_id = str(data.get("classifier", "")), data.get("id")
    if classifier not in _classifiers(request) or not isinstance(comment_id, str):
        return web.json_response({"error": "unknown classifier or bad id"}, status=400)
    try:
        result = await request.app[FEED].publish_label(
            request[USER_KEY], classifier, comment_id, int(label)
        )
    except LookupError as exc:
        return web.json_response({"error": str(exc)}, status=404)
    return web.json_response(result)


def build_app(settings: Settings, feed: ConsoleFeed, users: dict[str, str]) -> web.Application:
    app = web.Application(middlewares=[gate], client_max_size=64 * 1024)
    app[USER], app[FEED], app[CONFIG] = users, feed, settings
    app.router.add_get("/", index)
    app.router.add_get("/login", login)
    app.router.add_static("/static/", STATIC, show_index=False)
    app.router.add_get("/api/overview", overview)
    app.router.add_get("/api/recent", recent)
    app.router.add_get("/api/curve", curve)
    app.router.add_get("/api/operating-point", operating_point)
    app.router.add_get("/api/applied", applied)
    app.router.add_get("/api/queue", queue)
    app.router.add_post("/api/threshold", set_threshold)
    app.router.add_post("/api/label", give_label)

    async def lifecycle(app: web.Application):
        await feed.start()
        yield
        await feed.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


def make_console(settings: Settings) -> tuple[web.Application, dict[str, str]]:
    """The app on `settings`, and its token -> user map (to print a generated token)."""
    state = ConsoleState(recent=settings.console.recent, window_s=settings.console.window_s)
    for classifier, path in settings.console.calibration.items():
        state.add_calibration(classifier, read_calibration(path))
    users = tokens(settings)
    return build_app(settings, ConsoleFeed(settings, state), users), users


def read_calibration(path: Path) -> list[tuple[float, int]]:
    """JSONL rows with `p` and `label` (0/1): e.g. a classifier's scores on validation rows."""
    import orjson

    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = orjson.loads(line)
            p, y = float(row["p"]), int(row["label"])
            if not (0.0 <= p <= 1.0 and y in (0, 1)):
                raise ValueError(f"{path}:{n}: p must be in [0, 1] and label 0 or 1")
            rows.append((p, y))
    return rows
