"""The admin status page (``GET /``): one HTML document from plain data, no I/O.

What someone debugging mTLS between components needs on one screen (the anchors:
Traefik's dashboard, HAProxy's stats page, Envoy's admin): listeners and protocols,
services with their upstreams and last upstream error, certificates with days left,
the last refused handshakes and requests with the reason in words, and reloads.
Plain HTML and CSS: no script, so it works with JavaScript off and in a terminal
browser; a ``meta refresh`` reloads it. Every value that comes from a config, a
certificate or a client goes through ``html.escape`` (a client picks its certificate
subject and SNI: the page must not run what it says).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape

__all__ = ["CertificateRow", "ServiceRow", "StatusView", "render_status_page", "REFRESH_SECONDS"]

REFRESH_SECONDS = 10


@dataclass(frozen=True)
class ServiceRow:
    name: str
    routes: str  # hosts and path prefix, as words
    upstreams: tuple[str, ...]
    client_auth: str  # the service's certificate policy, as words


@dataclass(frozen=True)
class CertificateRow:
    role: str  # "server" | "client CA"
    path: str
    subject: str
    sans: tuple[str, ...]
    not_after: dt.datetime


@dataclass(frozen=True)
class StatusView:
    now: dt.datetime
    version: str
    workers: int
    listeners: tuple[tuple[str, str], ...]  # (address, what it speaks)
    client_auth: str
    services: tuple[ServiceRow, ...]
    certificates: tuple[CertificateRow, ...]
    events: dict = field(default_factory=dict)  # proxy.ops.events.merge_events(...)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right}.bad{color:#a00;font-weight:bold}.warn{color:#a60}.ok{color:#070}
.muted{color:#777}code{font-size:.95em}
"""


def render_status_page(view: StatusView) -> bytes:
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        "<title>tlsproxy status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>tlsproxy status</h1>",
        f'<p class="muted">tlsproxy {_e(view.version)} · {view.workers} worker{"s" if view.workers != 1 else ""}'
        f" · {_e(_time(view.now))} · this page refreshes every {REFRESH_SECONDS} s</p>",
        "<h2>Listeners</h2>",
        _table(("address", "protocols"), [(f"<code>{_e(a)}</code>", _e(p)) for a, p in view.listeners]),
        f"<p>Client certificates (listener): {_e(view.client_auth)}</p>",
        "<h2>Services</h2>",
        _services(view),
        "<h2>Certificates</h2>",
        _certificates(view),
        f"<h2>Refused handshakes and requests (last {len(view.events.get('refusals', ()))}, newest first)</h2>",
        _refusals(view.events.get("refusals", ())),
        "<h2>Reloads</h2>",
        _reloads(view.events.get("reloads", ())),
        "</body></html>\n",
    ]
    return "".join(parts).encode("utf-8")


def _services(view: StatusView) -> str:
    errors = {error["service"]: error for error in view.events.get("upstream_errors", ())}
    rows = []
    for service in view.services:
        error = errors.get(service.name)
        last = (
            f'<span class="bad">{error["status"]}</span> {_e(error["reason"])} '
            f'<span class="muted">({_e(_time(_from_unix(error["time"])))})</span>'
            if error else '<span class="muted">none</span>'
        )
        rows.append((
            f"<b>{_e(service.name)}</b>", _e(service.routes),
            "<br>".join(f"<code>{_e(url)}</code>" for url in service.upstreams),
            _e(service.client_auth), last,
        ))
    return _table(("service", "routes", "upstreams", "client certificates", "last upstream error"), rows)


def _certificates(view: StatusView) -> str:
    rows = []
    for cert in view.certificates:
        days = (cert.not_after - view.now).total_seconds() / 86400
        css = "bad" if days < 0 else "warn" if days < 14 else "ok"
        left = f"expired {-days:.0f} days ago" if days < 0 else f"{days:.0f}"
        rows.append((
            _e(cert.role), f"<code>{_e(cert.path)}</code>", _e(cert.subject),
            _e(", ".join(cert.sans)) or '<span class="muted">none</span>',
            _e(_time(cert.not_after)), f'<span class="{css}">{_e(left)}</span>',
        ))
    return _table(("role", "file", "subject", "names (SANs)", "not after", "days left"), rows)


# A refused handshake's certificate was never accepted, so never read (Python's ssl does
# not expose an unverified peer certificate); a refused request had none verified.
_NO_SUBJECT = {
    "handshake": '<span class="muted">not read (see the reason)</span>',
    "request": '<span class="muted">no certificate</span>',
}


def _refusals(refusals: Sequence[dict]) -> str:
    rows = [
        (
            _e(_time(_from_unix(event["time"]))), _e(event["client"]),
            _e(event["subject"]) if event.get("subject") else _NO_SUBJECT[event["stage"]],
            _e(event["service"] or "—"),
            _e(event["stage"] + (f" ({event['status']})" if event.get("status") else "")),
            f'<span class="bad">{_e(event["reason"])}</span>',
            str(event["worker"]),
        )
        for event in refusals
    ]
    return _table(("time (UTC)", "client", "certificate subject", "service", "refused at", "reason", "worker"),
                  rows, empty="no client refused since start")


def _reloads(reloads: Sequence[dict]) -> str:
    rows = [
        (
            _e(_time(_from_unix(event["time"]))),
            '<span class="ok">ok</span>' if event["ok"] else '<span class="bad">failed</span>',
            _e(event["detail"]), str(event["worker"]),
        )
        for event in reloads
    ]
    return _table(("time (UTC)", "result", "detail", "worker"), rows, empty="no reload since start")


def _table(headings: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "none") -> str:
    """Cells are HTML already (escaped by the caller); headings are constants."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headings)}" class="muted">{_e(empty)}</td></tr>'
    head = "".join(f"<th>{heading}</th>" for heading in headings)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _from_unix(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def _time(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
