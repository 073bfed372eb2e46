"""What backends run: the canonical weight layouts and the codecs' lowering to them
(``lowering``), and the generic decode-rows path for codecs that do not lower (``generic``)."""

from .lowering import HadamardTransform, Lowered, lower, nearest_codes

__all__ = ["HadamardTransform", "Lowered", "lower", "nearest_codes"]
