"""A ``--requeue module:function`` target for tests: records what it was asked to requeue.

``append(job)`` writes the job id to the file named by ``$QDASH_TEST_REQUEUE_FILE``; a job
whose id contains ``"refuse"`` is refused with an exception, as a full broker would.
"""

from __future__ import annotations

import os

from qdash_mp import Job


def append(job: Job) -> None:
    if "refuse" in job.id:
        raise ConnectionError(f"broker refused {job.id}")
    with open(os.environ["QDASH_TEST_REQUEUE_FILE"], "a") as f:
        f.write(job.id + "\n")
