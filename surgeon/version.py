"""The version of surgeon, in a leaf module that every wing may import (the package root is a
face, which lower wings never import)."""

__version__ = "0.1.0"
