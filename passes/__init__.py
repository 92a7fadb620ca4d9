"""The built-in graph rewrites, one file each; importing this package registers them."""

from passes.adyt import ADyT
from passes.aion import AION

__all__ = ["ADyT", "AION"]
