"""A slow ``--requeue module:function`` target for the bulk-action tests.

``slow_append(job)`` sleeps ``$QDASH_TEST_REQUEUE_DELAY`` seconds (default 0.005), then writes
the job id to ``$QDASH_TEST_REQUEUE_FILE`` and fsyncs it: a bulk retry of a few hundred jobs
then runs long enough to be watched and killed half-way.
"""

from __future__ import annotations

import os
import time

from qdash_mp import Job


def slow_append(job: Job) -> None:
    time.sleep(float(os.environ.get("QDASH_TEST_REQUEUE_DELAY", "0.005")))
    with open(os.environ["QDASH_TEST_REQUEUE_FILE"], "a") as f:
        f.write(job.id + "\n")
        f.flush()
        os.fsync(f.fileno())
