"""A fake cloud metadata server on 127.0.0.1 for one "node": AWS IMDSv2 (a session token, then
``spot/instance-action`` and ``events/recommendations/rebalance``, 404 until announced) and GCP
(``instance/preempted``, FALSE until announced). Point a node's processes at it with
``AWS_EC2_METADATA_SERVICE_ENDPOINT=server.url`` or ``GCE_METADATA_HOST=server.host``."""

from __future__ import annotations

import http.server
import json
import secrets
import threading


class FakeMetadata:
    def __init__(self):
        self.token = secrets.token_hex(8)
        self.announced: str | None = None  # "terminate" or "rebalance"
        self.requests: list[tuple[str, str]] = []  # (method, path)
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                fake.requests.append(("PUT", self.path))
                if self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    return self._send(200, fake.token)
                self._send(400)

            def do_GET(self):
                fake.requests.append(("GET", self.path))
                if self.path.startswith("/latest/meta-data/"):
                    if self.headers.get("X-aws-ec2-metadata-token") != fake.token:
                        return self._send(401)
                    what = self.path.removeprefix("/latest/meta-data/")
                    if what == "spot/instance-action" and fake.announced == "terminate":
                        return self._send(
                            200, json.dumps({"action": "terminate", "time": "2026-11-30T10:00:00Z"})
                        )
                    if what == "events/recommendations/rebalance" and fake.announced == "rebalance":
                        return self._send(200, json.dumps({"noticeTime": "2026-11-30T10:00:00Z"}))
                    return self._send(404)
                if self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    return self._send(200, "TRUE" if fake.announced else "FALSE")
                self._send(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
