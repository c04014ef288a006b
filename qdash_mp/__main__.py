"""``python -m qdash_mp`` runs the ``qdash-mp`` command line."""

import sys

from qdash_mp.cli import main

sys.exit(main())
