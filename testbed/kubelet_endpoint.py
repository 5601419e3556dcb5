"""A TLS endpoint at a fake node's advertised kubelet address, answering GETs from a callback.

kwok serves no kubelet API, so tests and ``bench/bench_agent.py`` (its kwok nodes) that exercise the
agent's kubelet path put one of these where the Node says its kubelet is (``status.addresses``
InternalIP + ``daemonEndpoints`` port): the agent reaches it exactly as it reaches a real kubelet,
over TLS with a bearer token.
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# (path, Authorization header) -> (status, JSON body)
Answer = Callable[[str, str], tuple[int, str]]


class KubeletEndpoint:
    def __init__(self, address: str, port: int, certdir: Path, answer: Answer) -> None:
        certdir.mkdir(parents=True, exist_ok=True)
        self.cert, key = certdir / "kubelet.crt", certdir / "kubelet.key"  # cert: the agent's CA file
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-subj", "/CN=stand-in-kubelet", "-addext", f"subjectAltName=IP:{address}"),
                *("-keyout", str(key), "-out", str(self.cert)),
            ],
            check=True,
            capture_output=True,
        )

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = answer(self.path, self.headers.get("Authorization", ""))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((address, port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # free the node's kubelet address for the next test
