"""Adapters that report Celery, RQ, Dramatiq, arq, Huey and taskiq jobs to qdash_mp.

One module per library, each importing its library only when used (``import qdash_mp`` never
needs any of them); install one with ``pip install 'qdash_mp[celery]'`` and so on. Each
reports pushed / started / processed (with runtime) / failed (error, traceback, args) /
retried through a ``qdash_mp.Client``, and registers that client as the requeue route of the
queues its worker serves, so a retry from the dashboard goes back through the library's own
enqueue. How each one hooks in, and the process-model traps it handles: docs/integrations.md.
"""

from __future__ import annotations

__all__: list[str] = []
