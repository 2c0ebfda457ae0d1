"""DKIM signing of the office's own mail (RFC 6376, RFC 8463) and the keys behind it."""
