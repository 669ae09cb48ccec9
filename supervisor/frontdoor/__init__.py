"""The front door: authenticates browsers (JWT, then a signed session cookie) and carries their
HTTP and WebSocket traffic to their own IDE, starting it on demand.

Layers, each usable alone (tests and benchmarks drive them directly):

- :mod:`.auth` - token verification (PyJWT) and the session cookie; pure apart from reading keys;
- :mod:`.signin` - which requests may sign in, switch confirmation, origins and hosts; pure;
- :mod:`.admission` - live browser sessions per user (409) and cold starts in flight (429); pure;
- :mod:`.answers` - the front door's own responses (JSON reasons, redirect, starting page); pure;
- :mod:`.proxy` - h11 on both sides, streamed bodies, WebSocket splicing; trio;
- :mod:`.server` - the listener, one task per connection, cold starts, the daemon's service.
- :mod:`.devtoken` - ``python -m supervisor.frontdoor.devtoken USER``: a development sign-in URL.
"""

from supervisor.frontdoor.auth import Authenticator, AuthError, CookieSigner, Identity, TokenVerifier
from supervisor.frontdoor.server import FrontDoor, FrontDoorHandle, IdeInfo, Ides, ManagerIdes, run_frontdoor

__all__ = [
    "AuthError",
    "Authenticator",
    "CookieSigner",
    "FrontDoor",
    "FrontDoorHandle",
    "IdeInfo",
    "Ides",
    "Identity",
    "ManagerIdes",
    "TokenVerifier",
    "run_frontdoor",
]
