"""``rbe serve --ray``: the server as a Ray Serve application, replicas behind Ray's HTTP proxy."""

from __future__ import annotations

import logging
import signal
import threading

import attrs

from ..compression.ray_convert import RayCluster
from ..models.spec import ModelError
from .app import create_app

log = logging.getLogger("rbe.serve")


def serve_replicas(settings, address: str | None, replicas: int, host: str, port: int) -> None:
    """``rbe serve`` as a Ray Serve application: ``replicas`` copies of the server (each builds
    the same FastAPI app on its replica and loads the models itself) behind Ray Serve's HTTP proxy
    on ``host:port``, the same routes. Blocks until SIGINT/SIGTERM, then shuts the application down."""
    cluster = RayCluster(address)
    try:
        from ray import serve
    except ImportError:
        raise ModelError("rbe serve --ray needs Ray Serve: pip install 'rbe[ray]'") from None

    replica_settings = attrs.evolve(settings, load_first=True)

    def build():  # run on each replica (a function, so Ray Serve calls it instead of serving it)
        return create_app(replica_settings)

    serve.start(http_options={"host": host, "port": port})
    replica = serve.ingress(build)(type("RbeReplica", (), {}))
    deployment = serve.deployment(name="rbe", num_replicas=replicas, ray_actor_options={"num_cpus": 1},
                                  max_ongoing_requests=settings.max_queue + settings.slots,
                                  health_check_period_s=5)(replica)
    stop = threading.Event()  # handlers first: a signal while the replicas start still shuts down cleanly
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.run(deployment.bind(), name="rbe", route_prefix="/", blocking=False)
    log.info("rbe serve: %d replicas on Ray (%d CPUs) at http://%s:%d/", replicas, cluster.cpus, host, port)
    stop.wait()
    serve.shutdown()
