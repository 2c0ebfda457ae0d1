#!/bin/bash
# A private Dovecot POP3 instance for bench/ (own config file, /etc/dovecot untouched).
#   POP3 on 127.0.0.1:PORT, plaintext login allowed (loopback, no TLS), passwd-file users
#   pop5k and pop20k (password "secret-pass", the one bench/pop3_compare.py uses) whose homes
#   are $ROOT/home/<user> with maildirs in <home>/Maildir, owned by the unix user mguser.
#   Adapted from the shared perf notes.
# Usage: setup_dovecot.sh ROOT PORT        (prints the master pid)
set -euo pipefail
ROOT=${1:?root folder}; PORT=${2:?port}
D=$ROOT/dovecot
mkdir -p "$D" "$ROOT/run" "$ROOT/home"
id mguser >/dev/null 2>&1 || useradd -m -s /bin/bash mguser
U=$(id -u mguser); G=$(id -g mguser)
cat > "$D/users" <<USERS
pop5k:{PLAIN}secret-pass:$U:$G::$ROOT/home/pop5k::
pop20k:{PLAIN}secret-pass:$U:$G::$ROOT/home/pop20k::
USERS
chmod 640 "$D/users"; chgrp dovecot "$D/users"
cat > "$D/dovecot.conf" <<CONF
protocols = pop3
listen = 127.0.0.1
base_dir = $ROOT/run/dovecot
instance_name = mgbench
log_path = $ROOT/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
first_valid_uid = 1000
pop3_uidl_format = %08Xu%08Xv
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $D/users
}
userdb {
  driver = passwd-file
  args = username_format=%u $D/users
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $PORT
  }
}
CONF
chmod 755 "$ROOT"
dovecot -c "$D/dovecot.conf" </dev/null >/dev/null 2>&1
for _ in $(seq 50); do [ -s "$ROOT/run/dovecot/master.pid" ] && break; sleep 0.1; done
cat "$ROOT/run/dovecot/master.pid"
