"""Issue 20, item 5: API keys reach Ray replicas hashed, never in plaintext init arguments (Ray
stores those and shows them through its state API and dashboard); the replicas still accept
the same keys, as the same projects and roles."""

from __future__ import annotations

import dataclasses

import cloudpickle
import pytest

from genserve.api.app import edge_state
from genserve.api.auth import env_principal, hash_key
from genserve.config import SecurityConfig, ServerConfig
from genserve.ray.deploy import RayOptions, build_app, hashed_keys

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use

MEMBER, ADMIN = "sk-member-plaintext-0123456789", "sk-admin-plaintext-9876543210"


def with_keys() -> ServerConfig:
    security = SecurityConfig(api_keys=(MEMBER,), admin_keys=(ADMIN,))
    return dataclasses.replace(ServerConfig(), security=security)


def init_args(app) -> list:  # noqa: ANN001 - a Serve Application
    """Every deployment's init arguments, as Ray will serialize them."""
    bound = app._bound_deployment
    found = [bound.init_args, bound.init_kwargs]
    for arg in bound.init_args:
        if hasattr(arg, "_bound_deployment"):
            found += init_args(arg)
    return found


def test_no_deployment_carries_a_plaintext_key() -> None:
    blob = cloudpickle.dumps(init_args(build_app(with_keys(), RayOptions(replicas=2))))
    assert MEMBER.encode() not in blob and ADMIN.encode() not in blob
    assert hash_key(MEMBER).encode() in blob  # what travels instead


def test_a_replica_accepts_the_keys_it_got_hashed() -> None:
    keys = edge_state(hashed_keys(with_keys())).keys
    assert keys.verify(f"Bearer {MEMBER}").principal == env_principal(MEMBER, "member")
    assert keys.verify(f"Bearer {ADMIN}").principal == env_principal(ADMIN, "admin")
    with pytest.raises(Exception):  # noqa: B017 - the API's 401, whatever its class
        keys.verify(f"Bearer {hash_key(MEMBER)}")  # the hash itself is no key


def test_a_malformed_hash_is_refused() -> None:
    with pytest.raises(ValueError):
        SecurityConfig(api_key_hashes=("not-a-digest",))
