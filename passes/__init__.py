"""The built-in graph rewrites, one file each; importing this package registers them."""

from passes.adyt import ADyT
from passes.aion import AION
from passes.hyper import HyperConnections

__all__ = ["ADyT", "AION", "HyperConnections"]
