#!/bin/bash
# Stop the postfix instance started by setup_postfix.sh (config /etc/postfix).
postfix -c /etc/postfix stop 2>&1 || true
