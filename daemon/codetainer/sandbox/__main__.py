"""``python -m codetainer.sandbox`` (``./dev sandbox``)."""

import sys

from codetainer.sandbox.main import main

sys.exit(main())
