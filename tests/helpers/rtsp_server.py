"""A real RTSP server for tests: GStreamer's gst-rtsp-server serving a live test pattern as RTP/JPEG.

Run by tests/helpers/rtsp.py under Debian's /usr/bin/python3 (python3-gi and gir1.2-gst-rtsp-server-1.0
come from Debian's packages, not from pip): ``python3 rtsp_server.py PORT`` serves rtsp://127.0.0.1:PORT/cam
and prints ``ready`` once it listens.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width=320,height=240,"
            "framerate=15/1 ! jpegenc ! rtpjpegpay name=pay0 pt=26 )")


def main() -> None:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(sys.argv[1])
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{sys.argv[1]}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
