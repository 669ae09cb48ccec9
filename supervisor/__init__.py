"""workspace-supervisor: one confined, limited Eclipse Theia backend per user in a shared pod.

Layering: pure decision modules (``config``, ``paths`` validation, ``sessions``, ``idle``) hold no
I/O; effect modules (``cgroups``, ``launch``, ``control``, ``frontdoor``, ``registry``) wrap the
kernel, processes and sockets; ``daemon`` wires them into one trio nursery.

This module stays import-light: ``workspacectl`` imports it on every call.
"""

__version__ = "0.1.0"
