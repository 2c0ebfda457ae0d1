#!/bin/bash
# Configure the Debian postfix package as a loopback-only reference server for bench/, then
# (re)start it.  Idempotent.  Adapted from the project's shared perf notes.
#
#   PORT (default 2526) on 127.0.0.1: smtpd, final destination for @bench.example,
#   delivering with local(8) to /home/mguser/Maildir/ (file fsynced before the rename).
#   Relay restrictions WITHOUT permit_mynetworks: loopback clients may not relay, so a
#   RCPT to a remote domain is refused (554 5.7.1), as mailguard refuses it (550 5.7.1).
#   Outbound transports are discard: and DNS is off: nothing leaves loopback.
#
# The files of /etc/postfix it changes are saved once under $SAVE (default
# /var/tmp/mailguard-bench/postfix-orig).  Usage: setup_postfix.sh [PORT]
set -euo pipefail
PORT=${1:-2526}
SAVE=${SAVE:-/var/tmp/mailguard-bench/postfix-orig}
mkdir -p "$SAVE"
[ -f "$SAVE/master.cf" ] || cp /etc/postfix/master.cf "$SAVE/"
[ -f "$SAVE/main.cf" ] || { [ -f /etc/postfix/main.cf ] && cp /etc/postfix/main.cf "$SAVE/" || touch "$SAVE/main.cf.absent"; }
[ -f /etc/postfix/main.cf ] || touch /etc/postfix/main.cf

id mguser >/dev/null 2>&1 || useradd -m -s /bin/bash mguser
install -d -o mguser -g mguser -m 700 /home/mguser/Maildir /home/mguser/Maildir/{new,cur,tmp}

postconf -e \
  "compatibility_level = 3.6" \
  "local_destination_concurrency_limit = 20" \
  "myhostname = postfix.bench.example" \
  "mydomain = bench.example" \
  "myorigin = bench.example" \
  "mydestination = bench.example, localhost" \
  "inet_interfaces = loopback-only" \
  "inet_protocols = ipv4" \
  "mynetworks = 127.0.0.0/8" \
  "home_mailbox = Maildir/" \
  "smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination" \
  "default_transport = discard:outbound mail disabled on this test box" \
  "relay_transport = discard:outbound mail disabled on this test box" \
  "smtp_dns_support_level = disabled" \
  "smtpd_peername_lookup = no" \
  "maillog_file = /var/log/postfix.log" \
  "alias_maps =" \
  "alias_database =" \
  "biff = no"

# master.cf: drop the port-25 listener, add ours, no chroot (no copies of /etc files needed)
postconf -MX smtp/inet 2>/dev/null || true
for svc in $(postconf -M | awk '$2=="inet" && $1 ~ /^127\.0\.0\.1:/ {print $1}'); do postconf -MX "$svc/inet"; done
postconf -M "127.0.0.1:$PORT/inet=127.0.0.1:$PORT inet n - n - - smtpd"
postconf -F '*/*/chroot = n'

postfix check
if postfix status >/dev/null 2>&1; then postfix stop >/dev/null 2>&1 || true; sleep 1; fi
postfix start >/dev/null 2>&1
for _ in $(seq 50); do [ -s /var/spool/postfix/pid/master.pid ] && break; sleep 0.1; done
echo "postfix master pid: $(tr -d ' ' < /var/spool/postfix/pid/master.pid)"
