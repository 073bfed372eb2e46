"""Conversion work as Ray tasks: each tensor's encoding, and each matrix's calibrated (GPTQ)
rounding given its Gram matrix, run on the cluster's workers; weights and Grams travel through
the Ray object store, results come back to the driver, which writes the file once, atomically.

What stays on the driver: reading the source, the forward passes that collect each stage's Gram
(layer-sequential: stage k+1 needs stage k's compressed weights) and the bit allocation's damage
probes. A worker runs exactly the code a local conversion runs, so the output file is
bit-identical to a local conversion (tests/rbe_core/distributed checks it). A task whose worker
dies is retried (``max_retries``); Ctrl-C on the driver cancels the tasks and leaves no file.
"""

from __future__ import annotations

import logging

from ..models.common import ModelError

log = logging.getLogger("rbe.distributed")

#: Times a task is retried when its worker dies.
RETRIES = 4


def _ray():
    try:
        import ray
    except ImportError:
        raise ModelError("distributed conversion needs Ray: pip install 'rbe[ray]'") from None
    return ray


class RayCluster:
    """A connection to a Ray cluster: ``address`` None or "local" starts one in this process
    (all local cores), "auto" joins the one ``ray start`` runs here, anything else is its address."""

    def __init__(self, address: str | None = None):
        ray = _ray()
        self.ray = ray
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     address="local" if address in (None, "local") else address)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._encode = ray.remote(max_retries=RETRIES, retry_exceptions=False)(_encode_task)

    def encode_with(self, codec, weight, gram, name: str):
        """``codec``'s encoding of ``weight`` (calibrated on ``gram`` when given), on a worker: the
        ``encode`` callable of ``compress_model`` and ``calibration.sequential_encode``."""
        ray = self.ray
        ref = self._encode.remote(codec.get_config(), ray.put(weight), name, gram)
        try:
            return ray.get(ref)
        except BaseException:
            ray.cancel(ref, force=True)
            raise


def _encode_task(config: dict, weight, name: str, gram):
    """On a worker: the same encoding a local conversion runs."""
    from ..compression.calibration import encode_calibrated
    from ..registry import get_codec

    return encode_calibrated(get_codec(config), weight, gram, name)


def serve_replicas(settings, address: str | None, replicas: int, host: str, port: int) -> None:
    """``rbe serve`` as a Ray Serve application: ``replicas`` copies of the server (each builds
    the same FastAPI app on its replica and loads the models itself) behind Ray Serve's HTTP proxy
    on ``host:port``, the same routes. Blocks until SIGINT/SIGTERM, then shuts the application down."""
    import signal
    import threading

    import attrs

    cluster = RayCluster(address)
    try:
        from ray import serve
    except ImportError:
        raise ModelError("rbe serve --ray needs Ray Serve: pip install 'rbe[ray]'") from None
    from ..serve.app import create_app

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
