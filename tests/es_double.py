"""A protocol-level double of Elasticsearch for the import tests (no Elasticsearch server can
run on this machine): a real HTTP server answering the exact requests the official client
sends -- open a point in time, ``_search`` with ``pit``/``sort``/``search_after``/``query``,
close it -- over documents held in memory, with Elasticsearch's headers, error bodies and
``search_after`` semantics (hits after the given sort values, the PIT's ``_shard_doc``
tiebreaker as the second sort value). ``fail`` injects answers (429s, a 500 on a page).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

HEADERS = {"X-Elastic-Product": "Elasticsearch", "Content-Type": "application/json"}


class EsDouble:
    def __init__(self, index: str, docs: list[tuple[str, dict[str, Any]]]):
        self.index = index
        self.docs = docs  # (_id, _source) in shard order
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, body)
        # (path suffix, status, n): the (n+1)-th request to a path with that suffix gets the
        # status, once; entries are checked in order
        self.fail: list[tuple[str, int, int]] = []
        self.open_pits: set[str] = set()
        self._pits = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> EsDouble:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the answers -----------------------------------------------------------------------
    def answer(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        self.requests.append((method, path, body))
        for i, (suffix, status, skip) in enumerate(self.fail):
            if not path.endswith(suffix):
                continue
            if skip:
                self.fail[i] = (suffix, status, skip - 1)
                break
            del self.fail[i]
            kind = "es_rejected_execution_exception" if status == 429 else "exception"
            return status, {"error": {"type": kind, "reason": "injected"}, "status": status}
        if method == "POST" and path == f"/{self.index}/_pit":
            assert query.get("keep_alive"), "a PIT needs keep_alive"
            self._pits += 1
            pit = f"pit-{self._pits}"
            self.open_pits.add(pit)
            return 200, {"id": pit}
        if method == "POST" and path.endswith("/_pit"):
            name = path.split("/")[1]
            error = {"type": "index_not_found_exception", "reason": f"no such index [{name}]"}
            return 404, {"error": error, "status": 404}
        if method == "DELETE" and path == "/_pit":
            self.open_pits.discard(body["id"])
            return 200, {"succeeded": True, "num_freed": 1}
        if method == "POST" and path == "/_search":
            return 200, self._search(body)
        return 400, {"error": {"type": "illegal_argument_exception", "reason": path}}

    def _search(self, body: dict) -> dict:
        assert body["pit"]["id"] in self.open_pits, "search on a closed PIT"
        assert "from" not in body, "deep paging with from"
        hits = [
            {"_index": self.index, "_id": doc_id, "_source": src,
             "sort": [src.get("timestamp", 2**63 - 1), shard_doc]}
            for shard_doc, (doc_id, src) in enumerate(self.docs)
            if _matches(src, body.get("query") or {"match_all": {}})
        ]  # fmt: skip
        hits.sort(key=lambda h: h["sort"])
        if body.get("search_after"):
            hits = [h for h in hits if h["sort"] > list(body["search_after"])]
        answer: dict[str, Any] = {"pit_id": body["pit"]["id"], "timed_out": False}
        page = hits[: body.get("size", 10)]
        answer["hits"] = {"hits": page, "total": {"value": len(hits), "relation": "eq"}}
        return answer

    def _handler(self):
        double = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                url = urlparse(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else {}
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                status, payload = double.answer(self.command, url.path, query, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in HEADERS.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_HEAD = _serve

            def log_message(self, *args):  # quiet
                pass

        return Handler


def _matches(src: dict, query: dict) -> bool:
    if "match_all" in query:
        return True
    for clause in query["bool"]["filter"]:
        if "term" in clause:
            ((field, value),) = clause["term"].items()
            if src.get(field) != value:
                return False
        elif "range" in clause:
            ((field, bounds),) = clause["range"].items()
            if not src.get(field, 2**63 - 1) >= bounds["gte"]:
                return False
    return True
