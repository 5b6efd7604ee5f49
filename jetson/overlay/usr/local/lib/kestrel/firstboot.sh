#!/bin/sh
# Kestrel's first boot on a Jetson (kestrel-firstboot.service), offline and idempotent:
#   1. the daemon's virtualenv from the wheelhouse in the image: `python -m venv --without-pip`, pip from
#      its own wheel, then `pip install --no-index --find-links` (no network is ever needed);
#   2. the initial signed model (if the image has one) through `kestrel-edge install`: verified against
#      /etc/kestrel/trust, staged and self-tested like any update, as the kestrel user;
#   3. kestrel-edge.service enabled and started; then the marker, so later boots skip all of this.
# A failed step logs ONE line to the journal (details in /var/log/kestrel-firstboot.log), leaves no marker,
# and the next boot tries again from a clean venv. A second run after success changes nothing.
#
# KESTREL_ROOT (tests: a scratch root used as a prefix), KESTREL_SYSTEMCTL, KESTREL_USER and the
# variables of /opt/kestrel/firstboot.env (written by `make flash-image`) may be overridden.
set -u
ROOT=${KESTREL_ROOT:-}
[ -r "$ROOT/opt/kestrel/firstboot.env" ] && . "$ROOT/opt/kestrel/firstboot.env"
STATE=$ROOT/var/lib/kestrel
MARK=$STATE/.firstboot-done
WHEELS=$ROOT/opt/kestrel/wheelhouse
VENV=$ROOT/opt/kestrel/venv
CONF=$ROOT/etc/kestrel/edge.toml
LOG=${KESTREL_FIRSTBOOT_LOG:-$ROOT/var/log/kestrel-firstboot.log}
SYSTEMCTL=${KESTREL_SYSTEMCTL:-systemctl}
SERVICE_USER=${KESTREL_USER:-kestrel}
PY=$ROOT${KESTREL_PYTHON:-/usr/bin/python3}
REQ=${KESTREL_REQUIREMENT:-kestrel[edge]}
PIPREQ=${KESTREL_PIP:-pip}
BUNDLE=${KESTREL_INITIAL_BUNDLE:-}
[ -n "$BUNDLE" ] && BUNDLE=$ROOT$BUNDLE

if [ -e "$MARK" ]; then
    echo "kestrel-firstboot: already done ($MARK); nothing to do"
    exit 0
fi
mkdir -p "$(dirname "$LOG")"
step() {  # step WHAT CMD...: run CMD with its output in the log; on failure one line and exit 1
    what=$1; shift
    echo "== $(date -u +%FT%TZ) $what: $*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        echo "kestrel-firstboot: FAILED to $what; nothing is started, the next boot tries again (details: $LOG)" >&2
        exit 1
    fi
}
as_service_user() {
    if [ "$(id -un)" = "$SERVICE_USER" ]; then "$@"; else runuser -u "$SERVICE_USER" -- "$@"; fi
}

export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
if [ ! -e "$VENV/.kestrel-complete" ]; then
    rm -rf "$VENV"  # a venv left half-made by a failed boot is made again
    step "create the virtualenv with $PY" "$PY" -m venv --without-pip "$VENV"
    PIPWHL=$(ls "$WHEELS"/pip-*.whl 2>/dev/null | head -n 1)
    [ -n "$PIPWHL" ] || step "find pip's wheel in $WHEELS" false
    step "install pip from the wheelhouse" "$VENV/bin/python" "$PIPWHL/pip" install --no-index \
        --find-links "$WHEELS" "$PIPREQ"
    CONSTRAINTS=""
    [ -f "$WHEELS/constraints.txt" ] && CONSTRAINTS="--constraint $WHEELS/constraints.txt"
    # shellcheck disable=SC2086  # CONSTRAINTS is two words or none
    step "install $REQ from the wheelhouse" "$VENV/bin/python" -m pip install --no-index --find-links "$WHEELS" \
        $CONSTRAINTS "$REQ"
    touch "$VENV/.kestrel-complete"
fi

step "create $STATE for $SERVICE_USER" install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE"
if [ -n "$BUNDLE" ]; then
    step "install the initial model $BUNDLE" as_service_user "$VENV/bin/kestrel-edge" install --config "$CONF" \
        "$BUNDLE"
fi
step "enable kestrel-edge.service" "$SYSTEMCTL" enable kestrel-edge.service
touch "$MARK"
# --no-block: the daemon is ordered after this unit, so a blocking start would wait for us
step "start kestrel-edge.service" "$SYSTEMCTL" start --no-block kestrel-edge.service
echo "kestrel-firstboot: done: $REQ installed in $VENV, kestrel-edge.service enabled and started"
