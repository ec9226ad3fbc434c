"""The forwarding step of the tests' registry proxies: a request passed on, its answer sent back."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler

#: headers of one connection, not of the resource: not passed back
HOP_HEADERS = ("connection", "transfer-encoding", "content-encoding", "content-length")


def relay(handler: BaseHTTPRequestHandler, upstream: str) -> bytes:
    """Send *handler*'s request (GET or HEAD) to *upstream* and answer with the status and headers
    it got; returns the body for the caller to write (empty for HEAD), as it likes (held, paced)."""
    import requests

    # a header sent on several lines (Apptainer's Accept) is one list to requests
    headers = {k: ", ".join(handler.headers.get_all(k) or []) for k in handler.headers if k.lower() != "host"}
    resp = requests.request(handler.command, upstream + handler.path, headers=headers, allow_redirects=False)
    handler.send_response(resp.status_code)
    for k, v in resp.headers.items():
        if k.lower() not in HOP_HEADERS:
            handler.send_header(k, v)
    handler.send_header("Content-Length", resp.headers.get("Content-Length", str(len(resp.content))))
    handler.end_headers()
    return resp.content if handler.command == "GET" else b""
