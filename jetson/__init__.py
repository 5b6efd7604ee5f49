"""Turning a Jetson into a Kestrel fleet device: the image tools that run on the operator's host.

``python -m jetson overlay|flash|wheelhouse`` (``make jetson-overlay`` / ``make flash-image``):
``boards`` (what each supported board needs), ``identity`` (the device identity bundle of ``kestrel-hub
devices add`` and the device's edge.toml), ``wheelhouse`` (the offline wheels, resolved with pip's
platform options), ``overlay`` (every file the image gets, with its mode and owner), ``flash`` (the
wrapper around NVIDIA's L4T tools). The device side is ``overlay/`` (systemd units, first boot).
"""
