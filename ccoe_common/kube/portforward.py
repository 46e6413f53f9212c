"""A local TCP port whose connections are relayed to streams opened on demand; with the
Kubernetes API's pod port-forward as the stream, it is `kubectl port-forward` inside the ops
CLI, so a gRPC client can dial 127.0.0.1.

    with TcpForwarder(lambda: socket.create_connection(("10.0.0.7", 9000))) as fwd:
        RegistryClient(fwd.address).list()
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
ACCEPT_POLL_S = 0.1  # how soon close() is noticed by the accepting thread

Stream = Any  # a connected socket, or anything with recv/sendall/shutdown/close (a port-forward stream)


class TcpForwarder:
    """Listens on 127.0.0.1 (a free port); each accepted connection gets a stream of its own
    from `connect()` and the bytes are copied both ways until either side closes.

    A failed `connect()` closes that one client connection (a gRPC client sees UNAVAILABLE)
    and is kept in `errors` and logged; the forwarder goes on accepting.
    """

    def __init__(self, connect: Callable[[], Stream], host: str = "127.0.0.1"):
        self._connect = connect
        self._listener = socket.create_server((host, 0))
        self.host, self.port = host, self._listener.getsockname()[1]
        self.errors: list[str] = []
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self._accepter = threading.Thread(target=self._accept_loop, name=f"forward-{self.port}", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> TcpForwarder:
        self._accepter.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._accepter.is_alive():
            self._accepter.join()
        self._listener.close()
        with self._lock:
            ends, self._open = list(self._open), set()
        for end in ends:
            _close(end)

    def __enter__(self) -> TcpForwarder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self._listener], [], [], ACCEPT_POLL_S)
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), name=f"forward-{self.port}-conn",
                             daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            remote = self._connect()
        except Exception as e:  # noqa: BLE001 - reported here: this thread is the only one that sees it
            self.errors.append(str(e))
            log.warning("port-forward to %s: cannot open a stream: %s", self.address, e)
            _close(client)
            return
        with self._lock:
            if self._closed.is_set():
                _close(client)
                _close(remote)
                return
            self._open.update((client, remote))
        back = threading.Thread(target=_pump, args=(remote, client), daemon=True)
        back.start()
        _pump(client, remote)
        back.join()
        with self._lock:
            self._open.discard(client)
            self._open.discard(remote)
        _close(client)
        _close(remote)


def _pump(source: Stream, sink: Stream) -> None:
    """Copy until the source ends, then end the sink's writing half (gRPC sees the close)."""
    try:
        while data := source.recv(CHUNK):
            sink.sendall(data)
    except OSError:
        pass  # either end went away; the other pump ends with it
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _close(end: Stream) -> None:
    try:
        end.close()
    except OSError:
        pass
