"""Who may use a route, declared on its view where the route is declared: ``@needs(REVIEWER)``.

The gateway reads the declaration from the view (``role_of``), as Flask reads a view's ``methods``:
one place per route, no table to keep in step. A view with no declaration needs ``admin``; ``PUBLIC``
ones (liveness probes, the review page's shell) need no token at all.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar

from inference.users import ADMIN

#: The role of routes served without the bearer token.
PUBLIC = "public"

View = TypeVar("View", bound=Callable[..., Any])
Networks = tuple[IPv4Network | IPv6Network, ...]


def needs(role: str, *, token_free_networks: Networks = ()) -> Callable[[View], View]:
    """Declare the role ``role`` a view needs, and the networks whose requests reach it without a token."""
    def declare(view: View) -> View:
        view.required_role = role  # type: ignore[attr-defined]
        view.token_free_networks = token_free_networks  # type: ignore[attr-defined]
        return view
    return declare


def role_of(view: Callable[..., Any] | None) -> str:
    """The role ``view`` declares; ``admin`` when it declares none."""
    return getattr(view, "required_role", ADMIN)


def declared_role(view: Callable[..., Any]) -> str | None:
    """The role ``view`` declares, None when it declares none."""
    return getattr(view, "required_role", None)


def token_free_networks_of(view: Callable[..., Any] | None) -> Networks:
    """The networks ``view`` lets in without a token (none unless declared)."""
    return getattr(view, "token_free_networks", ())
