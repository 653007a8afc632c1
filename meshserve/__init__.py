"""meshserve: a typed, streaming, gRPC-first inference mesh."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meshserve")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
