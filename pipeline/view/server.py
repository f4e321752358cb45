"""`salient view`: a local web app over a finished run (and optionally a second run to compare).

Server-rendered pages, no scripts: every filter, sort and page is a link or a GET form, so a
page is a URL that can be shared, and each request runs one or two SQL queries (run_index.py)
with server-side paging. Overlays are drawn on demand from one heatmap row and the source image
and cached. Bound to 127.0.0.1 by default; on any other host every request needs the token
(given with --token or generated and printed), taken from `?token=` once and then a cookie.
"""

from __future__ import annotations

import hmac
import html
import io
import secrets
import threading
from collections import OrderedDict
from functools import partial
from http import cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np

from ..analysis.spray import read_spray
from ..models.preprocess import Preprocess
from ..report.html import source_overlay
from ..report.overlay import heatmap_png
from ..storage import Storage
from .changes import map_changes
from .run_index import PAGE, GridQuery, RunIndex

THUMB = 160
LOOPBACK = ("127.0.0.1", "localhost", "::1")

CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
nav a{margin-right:1em} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left} th a{color:inherit}
.grid{display:flex;flex-wrap:wrap;gap:10px} .cell{width:170px;font-size:12px}
.cell img{width:160px;height:160px;display:block} .muted{color:#777} form{margin:.5em 0}
small{color:#666}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _f(v) -> str:
    if v is None:
        return "&ndash;"
    return f"{v:.3f}" if isinstance(v, float) else _e(v)


class Browser:
    """The pages of one run (and an optional second run): HTML strings and overlay PNGs."""

    def __init__(self, root: str, storage: Storage, against: str | None = None):
        self.run = RunIndex(root, storage)
        self.other = RunIndex(against, storage) if against else None
        self.storage = storage
        self._changes = None
        self._changes_lock = threading.Lock()
        self._png: OrderedDict[tuple, bytes] = OrderedDict()
        self._png_lock = threading.Lock()
        self._spray: dict | None = None  # explainer -> its clusters table, read once

    # -- shared layout ------------------------------------------------------------------------
    def page(self, title: str, body: str) -> str:
        nav = [("/", "summary"), ("/classes", "classes"), ("/grid", "images"),
               ("/errors", "errors")]  # fmt: skip
        if self.other is not None:
            nav.append(("/compare", "compare runs"))
        if self.spray_explainers():
            nav.append(("/spray", "SpRAy"))
        links = "".join(f"<a href='{u}'>{t}</a>" for u, t in nav)
        return (
            f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><nav>{links}</nav><h1>{_e(title)}</h1>"
            f"{body}</body></html>"
        )

    def _overlay_url(self, r: dict, run: int = 0) -> str:
        q = {"run": run, "image": r["image_id"], "explainer": r["explainer"], "target": r["target"]}
        return "/overlay.png?" + urlencode(q)

    # -- pages --------------------------------------------------------------------------------
    def summary(self) -> str:
        s = self.run.summary
        metrics = self.run.metric_names()
        head = "".join(f"<th>{_e(m)}</th>" for m in metrics)
        rows = []
        for key, e in s["explainers"].items():
            cells = []
            for m in metrics:
                ci = e.get("metric_intervals", {}).get(m)
                n = e.get("metric_counts", {}).get(m)
                spread = f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else ""
                cells.append(f"<td>{_f(e['metrics'].get(m))}<small>{spread} n={_f(n)}</small></td>")
            rows.append(f"<tr><td>{_e(key)}</td><td>{e['images']}</td>{''.join(cells)}</tr>")
        body = (
            f"<p>run <b>{_e(s['run_id'])}</b> &middot; inputs {s['inputs']} = images "
            f"{s['images_ok']} + errors {s['errors']} (lost {s['lost']})</p>"
            f"<table><tr><th>explainer</th><th>images</th>{head}</tr>{''.join(rows)}</table>"
            "<p class=muted>means with their 95% interval (Wilson for 0/1 metrics) and n</p>"
        )
        return self.page(f"Run {s['run_id']}", body)

    def classes(self, sort: str = "images", descending: bool = True) -> str:
        rows = self.run.classes()
        cols = ["name", "images", "accuracy"] + [
            f"{x}.{m}" for x in self.run.explainers() for m in self.run.metric_names()
        ]
        if sort not in cols:
            sort = "images"
        rows.sort(key=lambda r: (r.get(sort) is None, r.get(sort)), reverse=False)
        if descending:  # missing values last either way
            present = [r for r in rows if r.get(sort) is not None][::-1]
            rows = present + [r for r in rows if r.get(sort) is None]

        def header(c: str) -> str:  # a click sorts by the column; again flips the order
            flip = {"sort": c, "desc": int(not (c == sort and descending))}
            mark = (" ▼" if descending else " ▲") if c == sort else ""
            return f"<th><a href='/classes?{urlencode(flip)}'>{_e(c)}{mark}</a></th>"

        head = "".join(header(c) for c in cols)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td><a href='/grid?{urlencode({'cls': r['cls']})}'>{_e(r['name'])}</a></td>"
                if c == "name"
                else f"<td>{_f(r.get(c))}</td>"
                for c in cols
            )
            + "</tr>"
            for r in rows
        )
        return self.page(
            "Classes",
            f"<p class=muted>{len(rows)} classes (an image's label where the source gives one, "
            "else its explained target); accuracy over labelled images</p>"
            f"<table id=classes><tr>{head}</tr>{body}</table>",
        )

    def grid(self, q: GridQuery) -> str:
        total, rows = self.run.grid(q)
        explainers = "".join(
            f"<option{' selected' if x == q.explainer else ''}>{_e(x)}</option>"
            for x in ["", *self.run.explainers()]
        )
        metrics = "".join(
            f"<option{' selected' if m == q.metric else ''}>{_e(m)}</option>"
            for m in ["", *self.run.metric_names()]
        )
        outcomes = "".join(
            f"<option value='{o}'{' selected' if o == q.outcome else ''}>{o or 'any'}</option>"
            for o in ("", "correct", "wrong")
        )
        sorts = "".join(
            f"<option{' selected' if s == q.sort else ''}>{s}</option>"
            for s in ("score", "metric", "image_id")
        )
        form = (
            "<form action=/grid method=get>"
            f"class <input name=cls size=5 value='{_e(q.cls)}'> "
            f"explainer <select name=explainer>{explainers}</select> "
            f"outcome <select name=outcome>{outcomes}</select> "
            f"metric <select name=metric>{metrics}</select> "
            f"from <input name=low size=5 value='{_f(q.low) if q.low is not None else ''}'> "
            f"to <input name=high size=5 value='{_f(q.high) if q.high is not None else ''}'> "
            f"sort <select name=sort>{sorts}</select> "
            f"<label><input type=checkbox name=desc value=1{' checked' if q.descending else ''}>"
            " descending</label> <button>show</button></form>"
        )
        cells = "".join(
            f"<div class=cell><a href='/image?{urlencode({'id': r['image_id']})}'>"
            f"<img alt='{_e(r['image_id'])}' src='{self._overlay_url(r)}'></a>"
            f"<span class=id>{_e(r['image_id'])}</span><br>{_e(r['explainer'])} &middot; "
            f"{_e(r['target_name'])} {_f(r['score'])}"
            + (f"<br>{_e(q.metric)} <span class=value>{_f(r['value'])}</span>" if q.metric else "")
            + "</div>"
            for r in rows
        )
        pages = self._pager("/grid", q.__dict__, q.page, total)
        return self.page(
            "Images",
            f"{form}<p class=muted><span id=total>{total}</span> heatmap rows</p>"
            f"<div class=grid id=grid>{cells}</div>{pages}",
        )

    def _pager(self, path: str, params: dict, page: int, total: int) -> str:
        last = max(0, (total - 1) // PAGE)
        keep = {k: ("1" if v is True else v) for k, v in params.items()
                if v not in ("", None, False) and k != "page"}  # fmt: skip
        keep = {("desc" if k == "descending" else k): v for k, v in keep.items()}
        links = []
        if page > 0:
            links.append(f"<a href='{path}?{urlencode({**keep, 'page': page - 1})}'>previous</a>")
        links.append(f"page {page + 1} of {last + 1}")
        if page < last:
            links.append(f"<a href='{path}?{urlencode({**keep, 'page': page + 1})}'>next</a>")
        return "<p>" + " &middot; ".join(links) + "</p>"

    def image(self, image_id: str) -> str:
        rows = self.run.image(image_id)
        if not rows:
            return self.page("Not found", f"<p>no heatmaps for image {_e(image_id)}</p>")
        cells = "".join(
            f"<div class=cell><img alt='{_e(r['explainer'])}' src='{self._overlay_url(r)}'>"
            f"<b>{_e(r['explainer'])}</b><br>target {_e(r['target_name'])} &middot; score "
            f"{_f(r['score'])}<br>"
            + "<br>".join(f"{_e(k)} {_f(v)}" for k, v in sorted(r["metrics"].items()))
            + "</div>"
            for r in rows
        )
        first = rows[0]
        return self.page(
            f"Image {image_id}",
            f"<p>predicted {_e(first['predicted_name'])}, label "
            f"{_e(first['label'] if first['label'] is not None else '–')}</p>"
            f"<div class=grid>{cells}</div>",
        )

    def errors(self, page: int = 0) -> str:
        total, rows = self.run.errors(page)
        cols = ["image_id", "stage", "error_type", "message", "fatal"]
        body = "".join(
            "<tr>" + "".join(f"<td>{_e(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows
        )
        head = "".join(f"<th>{c}</th>" for c in cols)
        return self.page(
            "Errors",
            f"<p>{total} error rows</p><table><tr>{head}</tr>{body}</table>"
            + self._pager("/errors", {}, page, total),
        )

    def changes(self):
        with self._changes_lock:
            if self._changes is None:
                table = map_changes(self.run.root, self.other.root, self.storage)
                self.run.register_table("changes", table)
                self._changes = table.num_rows
            return self._changes

    def compare(self, explainer: str = "", page: int = 0) -> str:
        if self.other is None:
            return self.page("Compare", "<p>start the browser with --against RUN to compare</p>")
        self.changes()
        where, params = ("WHERE explainer = ?", [explainer]) if explainer else ("", [])
        total = self.run.query(f"SELECT count(*) AS n FROM changes {where}", params)[0]["n"]
        rows = self.run.query(
            f"SELECT * FROM changes {where} ORDER BY distance DESC, image_id LIMIT ? OFFSET ?",
            [*params, PAGE, page * PAGE],
        )
        cells = "".join(
            "<div class=cell style='width:340px'>"
            f"<a href='/image?{urlencode({'id': r['image_id']})}'>"
            f"<img style='display:inline' alt='this run' src='{self._overlay_url(r, 0)}'>"
            f"<img style='display:inline' alt='other run' src='{self._overlay_url(r, 1)}'></a>"
            f"<span class=id>{_e(r['image_id'])}</span> &middot; {_e(r['explainer'])} &middot; "
            f"change <span class=value>{_f(r['distance'])}</span></div>"
            for r in rows
        )
        options = "".join(
            f"<option{' selected' if x == explainer else ''}>{_e(x)}</option>"
            for x in ["", *self.run.explainers()]
        )
        return self.page(
            f"{self.run.summary['run_id']} against {self.other.summary['run_id']}",
            f"<form action=/compare>explainer <select name=explainer>{options}</select> "
            "<button>show</button></form>"
            f"<p class=muted><span id=total>{total}</span> maps in both runs, most changed first"
            " (change = 1 - Pearson r of 8x8 fingerprints; left this run, right the other)</p>"
            f"<div class=grid id=grid>{cells}</div>"
            + self._pager("/compare", {"explainer": explainer}, page, total),
        )

    # -- SpRAy (pipeline/analysis/spray.py, written by `salient spray`) ---------------------------
    def spray_explainers(self) -> list[str]:
        if self._spray is None:
            found = {}
            for x in self.run.explainers():
                try:
                    found[x] = read_spray(self.run.root, x, self.storage)[1]
                except FileNotFoundError:
                    continue
            self._spray = found
        return list(self._spray)

    def spray(self, explainer: str = "", cls: str = "") -> str:
        names = self.spray_explainers()
        if not names:
            return self.page("SpRAy", "<p>no SpRAy results: run <code>salient spray RUN "
                             "--explainer KEY</code></p>")  # fmt: skip
        explainer = explainer if explainer in names else names[0]
        clusters = self._spray[explainer].to_pylist()
        classes = sorted({(c["target"], c["target_name"]) for c in clusters})
        if cls:
            clusters = [c for c in clusters if str(c["target"]) == cls]
        pick = "".join(
            f"<a href='/spray?{urlencode({'explainer': x})}'>{_e(x)}</a> " for x in names
        )
        out = [f"<p>explainer: {pick}</p><p class=muted>per class, clusters of similar maps, "
               "the most outlying first (farthest from the class's mean map, or most relevance "
               "outside the boxes): candidate spurious strategies</p>"]  # fmt: skip
        for target, name in classes:
            rows = sorted(
                (c for c in clusters if c["target"] == target), key=lambda c: c["cluster_rank"]
            )
            if not rows:
                continue
            out.append(f"<h2 class=class>{_e(name or target)}</h2><table class=spray>"
                       "<tr><th>rank</th><th>mean map</th><th>images</th><th>share</th>"
                       "<th>score</th><th>outside</th><th>examples</th></tr>")  # fmt: skip
            for c in rows:
                mean = "/spray_mean.png?" + urlencode(
                    {"explainer": explainer, "target": target, "cluster": c["cluster"]}
                )
                examples = "".join(
                    f"<a href='/image?{urlencode({'id': i})}'><img width=80 height=80 "
                    f"alt='{_e(i)}' class=example data-id='{_e(i)}' src='{self._overlay_url(key)}'>"
                    "</a>"
                    for i in c["examples"][:6]
                    if (key := {"image_id": i, "explainer": explainer, "target": target})
                )
                out.append(
                    f"<tr class=cluster data-cluster='{c['cluster']}'><td>{c['cluster_rank']}</td>"
                    f"<td><img width=80 height=80 alt='mean map' src='{mean}'></td>"
                    f"<td>{c['n_images']}</td><td>{_f(c['share'])}</td><td>{_f(c['score'])}</td>"
                    f"<td>{_f(c['outside_energy'])}</td><td>{examples}</td></tr>"
                )
            out.append("</table>")
        return self.page(f"SpRAy: {explainer}", "".join(out))

    def spray_mean_png(self, explainer: str, target: int, cluster: int) -> bytes:
        self.spray_explainers()
        for c in self._spray[explainer].to_pylist():
            if c["target"] == target and c["cluster"] == cluster:
                size = c["map_size"]
                return heatmap_png(np.asarray(c["mean_map"], np.float32).reshape(size, size))
        raise FileNotFoundError(f"no SpRAy cluster {cluster} of class {target} ({explainer})")

    def overlay_png(self, run: int, image_id: str, explainer: str, target: int) -> bytes:
        key = (run, image_id, explainer, target)
        with self._png_lock:
            if key in self._png:
                self._png.move_to_end(key)
                return self._png[key]
        index = self.run if run == 0 or self.other is None else self.other
        heat, source = index.heatmap(image_id, explainer, target)
        pre = Preprocess(**index.summary["preprocess"]) if "preprocess" in index.summary else None
        picture = source_overlay(source, heat, pre, self.storage, THUMB)
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        data = buf.getvalue()
        with self._png_lock:
            self._png[key] = data
            while len(self._png) > 4096:  # ~100 MB of thumbnails at most
                self._png.popitem(last=False)
        return data


def _grid_query(p: dict) -> GridQuery:
    def number(name):
        v = p.get(name, "")
        if v == "":
            return None
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{name}: {v!r} is not a number") from None

    cls = p.get("cls", "")
    if cls and not cls.lstrip("-").isdigit():
        raise ValueError(f"class: {cls!r} is not a class id (a number; see the classes page)")
    return GridQuery(
        cls=cls,
        explainer=p.get("explainer", ""),
        outcome=p.get("outcome", "") if p.get("outcome") in ("", "correct", "wrong") else "",
        metric=p.get("metric", ""),
        low=number("low"),
        high=number("high"),
        sort=p.get("sort", "score"),
        descending=p.get("desc", "1" if "sort" not in p else "") == "1",
        page=int(p.get("page", 0) or 0),
    )


class Handler(BaseHTTPRequestHandler):
    browser: Browser
    token: str | None = None

    def log_message(self, *args):  # quiet; the CLI prints the address
        pass

    def _authorised(self, params: dict) -> tuple[bool, bool]:
        """(allowed, set the cookie)."""
        if self.token is None:
            return True, False
        given = params.get("token")
        if given and hmac.compare_digest(given, self.token):
            return True, True
        jar = cookies.SimpleCookie(self.headers.get("Cookie", ""))
        cookie = jar.get("salient_token")
        return bool(cookie and hmac.compare_digest(cookie.value, self.token)), False

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        allowed, set_cookie = self._authorised(params)
        if not allowed:
            return self._send(403, "text/plain", b"forbidden: this browser needs its token")
        b = self.browser
        try:
            if url.path == "/":
                out = b.summary()
            elif url.path == "/classes":
                out = b.classes(params.get("sort", "images"), params.get("desc", "1") == "1")
            elif url.path == "/grid":
                out = b.grid(_grid_query(params))
            elif url.path == "/image":
                out = b.image(params.get("id", ""))
            elif url.path == "/errors":
                out = b.errors(int(params.get("page", 0) or 0))
            elif url.path == "/compare":
                out = b.compare(params.get("explainer", ""), int(params.get("page", 0) or 0))
            elif url.path == "/spray":
                out = b.spray(params.get("explainer", ""), params.get("cls", ""))
            elif url.path == "/spray_mean.png":
                png = b.spray_mean_png(
                    params["explainer"], int(params["target"]), int(params["cluster"])
                )
                return self._send(200, "image/png", png, set_cookie)
            elif url.path == "/overlay.png":
                png = b.overlay_png(
                    int(params.get("run", 0)), params["image"], params["explainer"],
                    int(params["target"]),
                )  # fmt: skip
                return self._send(200, "image/png", png, set_cookie)
            elif url.path == "/favicon.ico":
                return self._send(204, "image/x-icon", b"")
            else:
                return self._send(404, "text/plain", b"not found")
        except (ValueError, KeyError) as e:
            return self._send(
                400, "text/html; charset=utf-8", b.page("Bad request", f"<p>{_e(e)}</p>").encode()
            )
        except FileNotFoundError as e:
            return self._send(404, "text/plain; charset=utf-8", str(e).encode())
        except Exception as e:  # a failed query or read: say what, keep serving
            message = f"<p>{_e(type(e).__name__)}: {_e(e)}</p>"
            return self._send(500, "text/html; charset=utf-8", b.page("Error", message).encode())
        self._send(200, "text/html; charset=utf-8", out.encode(), set_cookie)

    def _send(self, code: int, kind: str, body: bytes, set_cookie: bool = False):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store" if kind.startswith("text") else "max-age=3600")
        if set_cookie:
            self.send_header(
                "Set-Cookie", f"salient_token={self.token}; HttpOnly; SameSite=Strict; Path=/"
            )
        self.end_headers()
        self.wfile.write(body)


def make_server(
    root: str, storage: Storage, *, against: str | None = None, host: str = "127.0.0.1",
    port: int = 8765, token: str | None = None,
) -> tuple[ThreadingHTTPServer, str]:  # fmt: skip
    """The server (not yet serving) and the URL to open. Any host but loopback needs a token:
    the given one, else a fresh random one (part of the returned URL)."""
    if host not in LOOPBACK and not token:
        token = secrets.token_urlsafe(18)
    browser = Browser(root, storage, against)
    handler = type("BoundHandler", (Handler,), {"browser": browser, "token": token})
    server = ThreadingHTTPServer((host, port), partial(handler))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{server.server_address[1]}/"
    return server, url + (f"?token={token}" if token else "")
