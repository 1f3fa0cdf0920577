"""
The project's version, as installed (setup.cfg's C{version}), for
C{version} at the console, C{p2ppeer-ctl --version} and
C{twistd p2ppeer --version}.
"""

from importlib import metadata


def version():
    """
    The installed version of twisted-p2p, or C{"unknown"} when it runs from a
    checkout that was never installed.
    """
    try:
        return metadata.version("twisted-p2p")
    except metadata.PackageNotFoundError:
        return "unknown"
