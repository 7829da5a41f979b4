"""The ``hotspots`` code location (``workspace.yaml`` loads this module).

The config file is ``$HOTSPOTS_CONFIG``, else ``./hotspots.yaml``, else the
repository's own ``hotspots.yaml``.
"""

from .location import build_definitions

defs = build_definitions()
