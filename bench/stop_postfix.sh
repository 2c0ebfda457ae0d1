#!/bin/bash
# Stop the postfix instance started by setup_postfix.sh (config /etc/postfix).
# With --restore, also put back the /etc/postfix/main.cf and master.cf that
# setup_postfix.sh saved under $SAVE (default /var/tmp/mailguard-bench/postfix-orig).
postfix -c /etc/postfix stop 2>&1 || true
if [ "${1:-}" = "--restore" ]; then
  SAVE=${SAVE:-/var/tmp/mailguard-bench/postfix-orig}
  [ -f "$SAVE/master.cf" ] && cp "$SAVE/master.cf" /etc/postfix/master.cf
  if [ -f "$SAVE/main.cf.absent" ]; then rm -f /etc/postfix/main.cf
  elif [ -f "$SAVE/main.cf" ]; then cp "$SAVE/main.cf" /etc/postfix/main.cf; fi
  echo "restored /etc/postfix from $SAVE"
fi
