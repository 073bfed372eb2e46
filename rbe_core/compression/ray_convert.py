"""Conversion work as Ray tasks: each tensor's encoding, and each matrix's calibrated (GPTQ)
rounding given its Gram matrix, run on the cluster's workers; weights and Grams travel through
the Ray object store, results come back to the driver, which writes the file once, atomically.

What stays on the driver: reading the source, the forward passes that collect each stage's Gram
(layer-sequential: stage k+1 needs stage k's compressed weights) and the bit allocation's damage
probes. A worker runs exactly the code a local conversion runs, so the output file is
bit-identical to a local conversion (tests/rbe_core/compression/test_ray_convert.py checks it). A task whose worker
dies is retried (``max_retries``); Ctrl-C on the driver cancels the tasks and leaves no file.
"""

from __future__ import annotations

from ..models.spec import ModelError
from ..registry import get_codec
from .calibration import encode_calibrated

#: Times a task is retried when its worker dies.
RETRIES = 4


def _ray():
    try:
        import ray
    except ImportError:
        raise ModelError("Ray is not installed: pip install 'rbe[ray]'") from None
    return ray


#: What a client needs to join a cluster that checks tokens (Ray's default from 2.59 on): only
#: ``ray.init("auto")`` on the head's own machine finds the token without being told.
TOKEN_HELP = ("set RAY_AUTH_MODE=token and give this process the cluster's token: RAY_AUTH_TOKEN, "
              "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")


def _connect(ray, address: str) -> None:
    """``ray.init`` at ``address``; a refused token becomes a ``ModelError`` saying what to set."""
    try:
        ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, address=address)
    except ConnectionError as exc:
        cause = exc.__cause__ or exc.__context__
        if "InvalidAuthToken" not in f"{exc} {cause}":
            raise
        raise ModelError(f"the Ray cluster at {address} refused this client's token: {TOKEN_HELP}") from None


class RayCluster:
    """A connection to a Ray cluster: ``address`` None or "local" starts one in this process
    (all local cores), "auto" joins the one ``ray start`` runs here, anything else is its address."""

    def __init__(self, address: str | None = None):
        ray = _ray()
        self.ray = ray
        if not ray.is_initialized():
            _connect(ray, "local" if address in (None, "local") else address)
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
    return encode_calibrated(get_codec(config), weight, gram, name)
