"""A stand-in Kubernetes API server for the ops CLI's tests (there is no cluster here).

It serves, over plain HTTP on 127.0.0.1, the few reads the CLI makes (a namespace, Services and
pods by label selector, RayServices) from objects the test gives it, answering like the real
API (lists, 404/403 Status objects), and pod port-forwards over the real protocol: a WebSocket
with the v4.channel.k8s.io subprotocol, two channels per port (data, error), each opened by a
frame carrying the port number. Each forwarded stream is relayed to a local TCP port, where the
test runs a real gRPC server.

    with FakeApiServer(objects, forwards={("demo-head", 9000): grpc_port}) as api:
        api.kubeconfig(tmp_path / "config")       # a kubeconfig whose context points here
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CHANNEL_PROTOCOL = "v4.channel.k8s.io"
LISTS = {
    ("", "services"): ("v1", "ServiceList", "Service"),
    ("", "pods"): ("v1", "PodList", "Pod"),
    ("ray.io", "rayservices"): ("ray.io/v1", "RayServiceList", "RayService"),
}


def _selected(obj: dict[str, Any], selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeApiServer:
    def __init__(self, objects: list[dict[str, Any]], namespaces: tuple[str, ...] = ("serving",),
                 forwards: dict[tuple[str, int], int] | None = None):
        self.objects = objects  # each with metadata.namespace
        self.namespaces = set(namespaces)
        self.forwards = forwards or {}  # (pod, container port) -> local TCP port to relay to
        self.forbidden: set[str] = set()  # resources that answer 403, e.g. {"services"}
        self.requests: list[str] = []  # "GET /api/v1/..." in order
        self.forwarded = 0
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    def kubeconfig(self, path: Path, *, namespace: str | None = None, extra_contexts: tuple[str, ...] = ()) -> Path:
        context = {"cluster": "fake", "user": "tester", **({"namespace": namespace} if namespace else {})}
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "fake", "context": context}]
                        + [{"name": n, "context": {"cluster": "fake", "user": "tester"}} for n in extra_contexts],
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # ---- HTTP ------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                api.requests.append(f"GET {self.path}")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward", url.path)
                if m and self.headers.get("Upgrade", "").lower() == "websocket":
                    api._port_forward(self, m.group(1), m.group(2), int(query["ports"]))
                    return
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)", url.path)
                if m:
                    if m.group(1) in api.namespaces:
                        return self._send(200, {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": m.group(1)}})
                    return self._status(404, f'namespaces "{m.group(1)}" not found')
                m = (re.fullmatch(r"/api/v1/namespaces/([^/]+)/(services|pods)", url.path)
                     or re.fullmatch(r"/apis/(?:ray\.io)/v1/namespaces/([^/]+)/(rayservices)", url.path))
                if m:
                    namespace, resource = m.groups()
                    if resource in api.forbidden:
                        return self._status(403, f'{resource} is forbidden: User "tester" cannot list resource '
                                                 f'"{resource}" in the namespace "{namespace}"')
                    group = "ray.io" if resource == "rayservices" else ""
                    api_version, list_kind, kind = LISTS[(group, resource)]
                    items = [o for o in api.objects if o["kind"] == kind and o["metadata"].get("namespace") == namespace
                             and _selected(o, query.get("labelSelector", ""))]
                    return self._send(200, {"apiVersion": api_version, "kind": list_kind,
                                            "metadata": {"resourceVersion": "1"}, "items": items})
                self._status(404, f"the server could not find the requested resource ({url.path})")

            def _status(self, code: int, message: str) -> None:
                self._send(code, {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message,
                                  "reason": {403: "Forbidden", 404: "NotFound"}.get(code, "Unknown"), "code": code})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    # ---- port-forward over a WebSocket -------------------------------------------------------

    def _port_forward(self, handler: BaseHTTPRequestHandler, namespace: str, pod: str, port: int) -> None:
        target = self.forwards.get((pod, port)) if namespace in self.namespaces else None
        offered = [p.strip() for p in handler.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if target is None or CHANNEL_PROTOCOL not in offered:
            handler.send_response(404 if target is None else 400)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        accept = base64.b64encode(hashlib.sha1((handler.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
        handler.send_response(101)
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", accept.decode())
        handler.send_header("Sec-WebSocket-Protocol", CHANNEL_PROTOCOL)
        handler.end_headers()
        handler.wfile.flush()
        ws = handler.connection
        send_lock = threading.Lock()

        def send(payload: bytes, opcode: int = 2) -> None:
            with send_lock:
                ws.sendall(_frame(payload, opcode))

        port_bytes = struct.pack("<H", port)
        send(b"\x00" + port_bytes)  # data channel of the first port
        send(b"\x01" + port_bytes)  # its error channel
        upstream = socket.create_connection(("127.0.0.1", target))
        self.forwarded += 1

        def downstream() -> None:
            try:
                while data := upstream.recv(65536):
                    send(b"\x00" + data)
                send(b"", opcode=8)
            except OSError:
                pass

        back = threading.Thread(target=downstream, daemon=True)
        back.start()
        reader = ws.makefile("rb")
        try:
            while True:
                opcode, payload = _read_frame(reader)
                if opcode == 8:
                    break
                if opcode == 2 and payload[:1] == b"\x00" and len(payload) > 1:
                    upstream.sendall(payload[1:])
        except (OSError, EOFError):
            pass
        finally:
            upstream.close()
            back.join(timeout=5)
        handler.close_connection = True


def _frame(payload: bytes, opcode: int) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


def _read_frame(reader: Any) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = reader.read(n)
        if len(data) < n:
            raise EOFError
        return data

    b0, b1 = exactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", exactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", exactly(8))
    mask = exactly(4) if b1 & 0x80 else b"\x00\x00\x00\x00"
    payload = bytes(c ^ mask[i % 4] for i, c in enumerate(exactly(n)))
    return b0 & 0x0F, payload
