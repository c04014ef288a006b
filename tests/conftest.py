"""Shared fixtures: the ones in ``qdash_testing.fixtures`` (collector processes, short dirs,
clients, an in-process collector), the journal tests' ``root`` / ``jdir``, ``qdash_collector``
from ``qdash_mp.testing``, and for the web tests a real dashboard app served by pytest-aiohttp
plus a CSRF token getter."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import settings
from qdash_testing.fixtures import (  # noqa: F401  (registers them for every test module)
    client_factory,
    collector_proc,
    collector_settings,
    collector_settings_kw,
    data_dir,
    inprocess_collector,
    live_collector,
    running_collector,
)
from qdash_testing.http import csrf_token_in
from qdash_testing.journal import jdir, root  # noqa: F401  (the journal tests' temp dirs)
from qdash_testing.redis_server import redis_server  # noqa: F401  (the hub tests' Redis)

from qdash_mp import Inspector, create_app
from qdash_mp.testing import qdash_collector  # noqa: F401  (registers the shipped fixture)

# Timing belongs in benchmarks/: a loaded machine must not fail a property test on speed
# (hypothesis' default 200 ms deadline per example did, under CI load).
settings.register_profile("qdash", deadline=None)
settings.load_profile("qdash")

DashboardClient = TestClient[web.Request, web.Application]
MakeDashboard = Callable[..., Awaitable[DashboardClient]]
PageToken = Callable[[DashboardClient, str], Awaitable[str]]


@pytest.fixture
def dashboard_client(aiohttp_client: Any) -> MakeDashboard:
    """``await dashboard_client(inspector, prefix=None, **create_app_kwargs)`` → a TestClient.

    With ``prefix`` (e.g. ``"/ops"``) the dashboard is mounted as a sub-app of a bare root
    app, the way an embedding application would do it.
    """

    async def make(
        inspector: Inspector, *, prefix: str | None = None, **kwargs: Any
    ) -> DashboardClient:
        app = create_app(inspector, **kwargs)
        if prefix is not None:
            root = web.Application()
            root.add_subapp(prefix, app)
            app = root
        client: DashboardClient = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
def page_token() -> PageToken:
    """``await page_token(client, path)``: GET a dashboard page and return its form token.

    The page also leaves the matching CSRF cookie in the client's cookie jar.
    """

    async def get(client: DashboardClient, path: str) -> str:
        resp = await client.get(path)
        assert resp.status == 200, await resp.text()
        return csrf_token_in(await resp.text())

    return get
