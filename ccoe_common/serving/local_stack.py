"""The local stack: a local Ray (its own token auth on), a Redis it starts itself (unless one
is configured), and the app deployed behind Ray Serve's gRPC proxy and its HTTP proxy (the
OpenAI-compatible API at `stack.http_base_url`).

    with LocalStack(config) as stack:                 # config.auth = {mode: token}
        stub = InferenceStub(stack.inference_channel())
        with stack.registry_client() as registry: ...

With `auth: {mode: token}` the stack mints two tokens for its run — one with role admin, one
with role inference — into a session tokens file beside the configured one, and forgets them
when it stops.

The Redis it starts keeps an append-only file (`appendonly yes`, `appendfsync everysec`) in a
data dir that lives as long as the stack (with its artifact store). A watchdog thread checks the
redis-server process every `REDIS_WATCHDOG_S`; if it died, it is started again on the same port
and dir, replays its AOF, and the registry, routers and replicas reconnect to the same state.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from ccoe_common.auth.client import authorized_channel
from ccoe_common.auth.config import NO_AUTH_SECTION
from ccoe_common.auth.tokens import TokenEntry, mint_token, token_hash
from ccoe_common.ports import free_port
from ccoe_common.registry.client import RegistryClient
from ccoe_common.registry.redis_server import RedisServer
from ccoe_common.serving.config import AppConfig, ConfigError
from ccoe_common.serving.grpc_servicers import GRPC_SERVICERS
from ccoe_common.serving.ray_auth import enable_ray_token_auth

log = logging.getLogger(__name__)
APP_NAME = "ccoe"
METRICS_INTERVAL_MS = 2000  # how often Ray's processes report metrics to the node's exporter
# The app builder, by import path as a RayService names it: ccoe_common sits below services/
# and never imports it, so the stack resolves the builder only when it starts an app.
APP_BUILDER = "services.app:build_app"
REDIS_WATCHDOG_S = 0.2  # how often the stack checks that its redis-server still runs


def import_attr(path: str) -> Callable[..., Any]:
    """"package.module:attr" -> the attribute, e.g. import_attr("services.app:build_app")."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:attribute'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {path!r}: {e}") from e


class LocalStack:
    def __init__(self, config: AppConfig, *, grpc_port: int | None = None, http_port: int | None = None,
                 num_cpus: int | None = None, builder: str = APP_BUILDER):
        self.config = config
        self.builder = builder
        self.grpc_port = grpc_port or config.grpc_port
        self.http_port = http_port or config.http_port
        self.num_cpus = num_cpus or max(2, os.cpu_count() or 2)
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url
        self.metrics_port = free_port()
        self.ray_token_auth = False
        self._artifacts: tempfile.TemporaryDirectory | None = None
        self._session: tempfile.TemporaryDirectory | None = None
        self._redis_data: tempfile.TemporaryDirectory | None = None
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self.redis_restarts = 0  # times the watchdog found redis-server dead and started it again
        self.admin_token: str | None = None  # role admin, for this run only (None with auth mode none)
        self.inference_token: str | None = None  # role inference, for this run only

    def inference_channel(self) -> grpc.Channel:
        """A channel to the app whose calls carry this run's inference token."""
        return authorized_channel(self.address, self.inference_token)

    def registry_client(self, **kwargs: Any) -> RegistryClient:
        """A registry client carrying this run's admin token."""
        return RegistryClient(self.address, token=self.admin_token, **kwargs)

    def _mint_session_tokens(self, config: AppConfig) -> AppConfig:
        assert config.auth is not None, "session tokens are minted for auth mode token only"
        self._session = tempfile.TemporaryDirectory(prefix="ccoe-session-")
        self.admin_token, self.inference_token = mint_token(), mint_token()
        path = os.path.join(self._session.name, "tokens.yaml")
        entries = [TokenEntry(name="local-admin", sha256=token_hash(self.admin_token), roles=("admin",)),
                   TokenEntry(name="local-app", sha256=token_hash(self.inference_token), roles=("inference",))]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(e.line() + "\n" for e in entries))
        auth = config.auth.model_copy(update={"session_tokens_file": path})
        return config.model_copy(update={"auth": auth})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base_url(self) -> str:
        """The OpenAI-compatible API's base URL, as the openai SDKs take it (`base_url=`)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def metrics_url(self) -> str:
        """Prometheus text of every Ray process on this node (ray_ccoe_* are ours)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> LocalStack:
        # Ray's own servers listen on every interface (Ray has no option to bind them to
        # loopback); its token auth keeps other users of the host out of this cluster.
        self.ray_token_auth = enable_ray_token_auth()  # before anything here imports ray
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions

        build_app = import_attr(self.builder)  # a wrong path fails before anything starts
        if self.config.auth is None:
            raise ConfigError(NO_AUTH_SECTION)
        if self.config.auth.mode == "none":
            log.warning("auth.mode is none: anyone who reaches port %d may call every method, registry writes "
                        "included; Ray Serve's gRPC proxy listens on every interface ([::]:%d)",
                        self.grpc_port, self.grpc_port)
        started = time.monotonic()
        if self.redis_url is None:
            self._stopping.clear()
            self._redis_data = tempfile.TemporaryDirectory(prefix="ccoe-redis-")
            self.redis = RedisServer(data_dir=self._redis_data.name, persist=True).start()
            self.redis_url = self.redis.url
            self._watchdog = threading.Thread(target=self._watch_redis, name="ccoe-redis-watchdog", daemon=True)
            self._watchdog.start()
            log.info("started redis-server at %s (append-only file in %s)", self.redis_url, self._redis_data.name)
        if not ray.is_initialized():
            self._start_ray()
        serve.start(
            http_options={"host": "127.0.0.1", "port": self.http_port},
            grpc_options=gRPCOptions(port=self.grpc_port, grpc_servicer_functions=list(GRPC_SERVICERS)),
        )
        config = self.config.model_copy(update={"redis_url": self.redis_url})
        if config.auth is not None and config.auth.mode == "token":
            config = self._mint_session_tokens(config)
        if self.redis is not None and "artifact_store" not in config.registry.model_fields_set:
            # A Redis of our own starts empty; so does the artifact store that goes with it.
            self._artifacts = tempfile.TemporaryDirectory(prefix="ccoe-artifacts-")
            registry = config.registry.model_copy(update={"artifact_store": self._artifacts.name})
            config = config.model_copy(update={"registry": registry})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        log.info("stack up in %.1fs; gRPC at %s, HTTP at %s", time.monotonic() - started, self.address,
                 self.http_base_url)
        return self

    def _watch_redis(self) -> None:
        """Start the stack's redis-server again, on the same port and data dir, if it died."""
        while not self._stopping.wait(REDIS_WATCHDOG_S):
            server = self.redis
            if server is None or server.running:
                continue
            log.error("redis-server at %s exited (code %s); restarting it on the same port from its "
                      "append-only file", server.url, server.proc.returncode if server.proc else None)
            try:
                server.restart()
                self.redis_restarts += 1
                log.warning("redis-server at %s is back (restart %d)", server.url, self.redis_restarts)
            except Exception:  # the port may be held a moment longer: try again
                log.exception("restarting redis-server at %s failed; retrying", server.url)

    def _start_ray(self, attempts: int = 3) -> None:
        import ray

        for attempt in range(1, attempts + 1):
            try:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, namespace=APP_NAME,
                         logging_level=logging.WARNING, log_to_driver=False,
                         _metrics_export_port=self.metrics_port,
                         # Ray nices its worker processes to 15; here they are the job (replicas,
                         # proxy, router), so they must not lose the cores to Ray's own daemons.
                         _system_config={"metrics_report_interval_ms": METRICS_INTERVAL_MS, "worker_niceness": 0})
                return
            except Exception as e:  # Ray raises a bare Exception for this one case
                # Ray gives its raylet a fixed 30 s to register; on a saturated host that can pass
                # while nothing is wrong, and a fresh start usually succeeds.
                if "timed out during startup" not in str(e) or attempt == attempts:
                    raise
                log.warning("Ray's node did not start within its 30 s (attempt %d of %d); starting it again",
                            attempt, attempts)
                ray.shutdown()

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                # Deleting the app first lets its replicas finish their graceful shutdown while
                # the controller still runs; shutting Serve down directly kills it mid-way.
                try:
                    serve.delete(APP_NAME)
                except Exception:  # the app may never have deployed
                    log.debug("no app to delete", exc_info=True)
                serve.shutdown()
                ray.shutdown()
        finally:
            self._stopping.set()
            if self._watchdog is not None:
                self._watchdog.join()
                self._watchdog = None
            if self.redis is not None:
                self.redis.stop()
                self.redis = None
            if self._redis_data is not None:
                self._redis_data.cleanup()
                self._redis_data = None
            if self._artifacts is not None:
                self._artifacts.cleanup()
                self._artifacts = None
            if self._session is not None:
                self._session.cleanup()
                self._session = None
                self.admin_token = self.inference_token = None

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
