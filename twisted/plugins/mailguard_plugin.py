"""twistd plugin: ``twistd -n mailguard --config etc/mailguard.toml``."""

from twisted.application.service import ServiceMaker

mailguard = ServiceMaker(
    "mailguard",
    "mailguard.app.tap",
    "A small-office mail host (SMTP, submission, POP3) that never relays openly",
    "mailguard",
)
