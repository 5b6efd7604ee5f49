#!/bin/sh
# Kestrel first boot on a Jetson: create the service user, install the edge daemon from the
# offline wheelhouse shipped in the image (no network needed), set the device id, enable the unit.
set -eu
WHEELS=/opt/kestrel/wheelhouse
VENV=/opt/kestrel/venv
PY=$(command -v python3.8 || command -v python3)
id kestrel >/dev/null 2>&1 || useradd --system --home /var/lib/kestrel --groups video kestrel
install -d -o kestrel -g kestrel -m 0750 /var/lib/kestrel
if [ ! -x "$VENV/bin/kestrel-edge" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install --no-index --find-links "$WHEELS" "kestrel[edge,tflite-runtime]"
fi
# Device id: the hostname unless one is configured.
if grep -q '^id = ""' /etc/kestrel/edge.toml; then
  sed -i "s/^id = \"\"/id = \"$(hostname)\"/" /etc/kestrel/edge.toml
fi
"$VENV/bin/kestrel-edge" run --config /etc/kestrel/edge.toml --check-config
touch /var/lib/kestrel/.firstboot-done
systemctl enable kestrel-edge.service
