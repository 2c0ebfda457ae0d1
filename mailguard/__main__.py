"""``python -m mailguard`` is the admin CLI."""

import sys

from mailguard.app.cli import main

sys.exit(main())
