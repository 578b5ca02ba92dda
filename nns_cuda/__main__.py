"""``python -m nns_cuda`` — the same as the ``nns`` command (see :mod:`nns_cuda.app.cli`)."""
import sys

from nns_cuda.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
