"""``python -m mailguard`` is the admin CLI."""

import sys

from mailguard.cli import main

sys.exit(main())
