"""The hub tests' shared Redis: one server per module, a client on an empty database."""

from qdash_testing.redis_server import module_redis, r  # noqa: F401  (registers them here)
