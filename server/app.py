"""Assemble and run the gRPC server: servicers, interceptor, health, reflection, TLS, shutdown.

``start(config)`` returns a running ``Server`` (bound port known, health SERVING);
``serve(config)`` runs it in the foreground until SIGTERM/SIGINT and then drains:
health turns NOT_SERVING, new calls are refused, in-flight calls get
``shutdown_grace_s`` to finish.

Health answers on its own thread pool and is never admission-limited. Besides the
whole server ("") and each service, it reports two probe services:
``liveness`` (SERVING while the process can answer at all) and ``readiness``
(NOT_SERVING while draining, or while admission is saturated: heavy-work queue
full or memory at its limit), for Kubernetes' liveness and readiness probes.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from phenolens._proto import gallery_pb2, gallery_pb2_grpc, phenolens_pb2, phenolens_pb2_grpc

from server.auth import TokenAuth
from server.backend import Backend
from server.config import ServiceConfig
from server.interceptor import ServiceInterceptor
from server.limits import HeavyWorkLimiter
from server.logs import SERVER_LOGGER, log_event
from server.replica import SnapshotFollower
from server.servicer import GalleryAdminServicer, PhenoLensServicer

log = logging.getLogger(SERVER_LOGGER)

LIVENESS = "liveness"
READINESS = "readiness"
OPEN_POOL_THREADS = 4


class ProbeHealth(health.HealthServicer):
    """grpc.health.v1 whose ``readiness`` is computed on each Check from admission."""

    def __init__(self, limiter: HeavyWorkLimiter) -> None:
        super().__init__(experimental_non_blocking=True)
        self.limiter = limiter
        self.draining = False

    def ready(self) -> bool:
        return not self.draining and not self.limiter.state().saturated

    def Check(self, request, context):  # noqa: N802 - gRPC method name
        if request.service == READINESS:
            serving = health_pb2.HealthCheckResponse.SERVING
            return health_pb2.HealthCheckResponse(
                status=serving if self.ready() else health_pb2.HealthCheckResponse.NOT_SERVING)
        return super().Check(request, context)

    def enter_graceful_shutdown(self) -> None:
        self.draining = True
        super().enter_graceful_shutdown()

SERVICE_NAMES = (
    phenolens_pb2.DESCRIPTOR.services_by_name["PhenoLens"].full_name,
    gallery_pb2.DESCRIPTOR.services_by_name["GalleryAdmin"].full_name,
)


def server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    tls = config.tls
    if not tls.enabled:
        return None
    key = tls.key.read_bytes()
    cert = tls.cert.read_bytes()
    if tls.client_ca is None:
        return grpc.ssl_server_credentials([(key, cert)])
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=tls.client_ca.read_bytes(),
        require_client_auth=tls.require_client_cert)


@dataclass
class Server:
    """A running server. ``port`` is the bound port (useful with ``listen: host:0``)."""

    grpc_server: grpc.Server
    backend: Backend
    limiter: HeavyWorkLimiter
    health: ProbeHealth
    port: int
    address: str
    lens: PhenoLensServicer
    owns_backend: bool = True
    interceptor: ServiceInterceptor | None = None
    follower: SnapshotFollower | None = None

    def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new calls, let in-flight ones finish."""
        grace = self.backend.config.shutdown_grace_s if grace_s is None else grace_s
        log_event(log, "shutting down", grace_s=grace, in_flight_heavy=self.limiter.busy)
        self.health.enter_graceful_shutdown()
        if self.follower is not None:
            self.follower.stop()
        self.grpc_server.stop(grace).wait()
        if self.owns_backend:
            self.backend.close()
        log_event(log, "stopped")

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def _syndrome_service():
    try:
        from server import syndrome_servicer
    except ModuleNotFoundError as exc:
        if exc.name != "server.syndrome_servicer":
            raise
        return None
    return syndrome_servicer


def start(config: ServiceConfig, backend: Backend | None = None) -> Server:
    """Build the backend (unless given: then the caller closes it), bind ``config.listen``
    and start serving."""
    owns_backend = backend is None
    if backend is None:
        backend = Backend.from_config(config)
        backend.warm_up()
    follower = None
    if config.gallery.follow_snapshots is not None:
        follower = SnapshotFollower(backend, config.gallery.follow_snapshots,
                                    config.gallery.follow_interval_s)
        follower.poll()  # serve the current snapshot from the first call
        follower.start()
    limits = config.limits
    auth = TokenAuth(config.auth.tokens)
    if not auth.enabled:
        log_event(log, "authentication is OFF: no tokens configured; every caller may read, "
                  "and gallery writes are refused", logging.WARNING)
    if len(backend.gallery) == 0:
        log_event(log, "the gallery is empty: Match and Explain return no faces until faces "
                  "are imported (phenolens gallery import DIR --server ADDRESS --token ADMIN; "
                  "make serve fills data/galleries/default.sqlite with the demo's synthetic "
                  "syndromes)", logging.WARNING, gallery=str(backend.gallery.path))
    limiter = HeavyWorkLimiter(limits.max_concurrent, limits.queue_timeout_s,
                               max_queued=limits.max_queued, max_rss_bytes=limits.max_rss_bytes)
    pool = futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="rpc")
    interceptor = ServiceInterceptor(
        auth, max_in_flight=limits.max_pending_rpcs, pool=pool,
        open_pool=futures.ThreadPoolExecutor(max_workers=OPEN_POOL_THREADS,
                                             thread_name_prefix="health"))
    server = grpc.server(
        pool,
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    lens = PhenoLensServicer(backend, limiter, config)
    phenolens_pb2_grpc.add_PhenoLensServicer_to_server(lens, server)
    gallery_pb2_grpc.add_GalleryAdminServicer_to_server(GalleryAdminServicer(backend, limiter, config), server)
    services = list(SERVICE_NAMES)
    syndrome = _syndrome_service()
    if syndrome is not None:  # issue 8's SyndromeService, when its module is present
        syndrome.add_syndrome_service(server, backend, limiter, config)
        services.append(syndrome.SERVICE_NAME)
        lens.features = (*lens.features, syndrome.FEATURE)
    health_servicer = ProbeHealth(limiter)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    creds = server_credentials(config)
    port = (server.add_secure_port(config.listen, creds) if creds
            else server.add_insecure_port(config.listen))
    if port == 0:
        raise OSError(f"could not bind {config.listen}")
    server.start()
    for name in ("", LIVENESS, READINESS, *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = config.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    log_event(log, "serving", address=address, tls=config.tls.enabled,
              mutual_tls=config.tls.client_ca is not None, auth=auth.enabled,
              encoder_id=backend.encoder_id, view_scheme=backend.view_scheme,
              gallery_version=backend.gallery.version, max_concurrent=limits.max_concurrent,
              max_queued=limits.max_queued, max_rss_bytes=limiter.max_rss_bytes)
    return Server(server, backend, limiter, health_servicer, port, address, lens, owns_backend,
                  interceptor, follower)


def serve(config: ServiceConfig) -> int:
    """Run in the foreground until SIGTERM or SIGINT, then shut down gracefully."""
    running = start(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log_event(log, "signal received", signal=signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        running.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
