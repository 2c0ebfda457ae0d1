"""mailguard: a small-office mail host that can never be abused as an open relay."""

__version__ = "0.1.0"
