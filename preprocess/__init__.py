"""Stage one: a folder of NIfTI chest CT scans -> one HDF5 cache (see `preprocess.cache`)."""
from importlib import metadata

try:
    __version__ = metadata.version("mosmed3d")
except metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
