"""A real RTSP server for the tests and the benchmark: GStreamer's gst-rtsp-server (Debian:
gir1.2-gst-rtsp-server-1.0, python3-gi, gstreamer1.0-plugins-good/-ugly for x264enc and
rtph264pay), serving a live H.264 test picture at rtsp://127.0.0.1:PORT/test.

    python3 rtsp_server.py PORT [WIDTH HEIGHT FPS]

Prints "ready" once it listens; runs until killed. It needs an interpreter with Debian's
gi module (the project's environment has --system-site-packages; see
:func:`gi_python`)."""

import sys


def main() -> int:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    port = sys.argv[1]
    width, height, fps = (sys.argv[2:5] + ["320", "240", "30"][len(sys.argv[2:5]):])
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
        f"framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
        "! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory("/test", factory)
    if server.attach(None) == 0:
        print("cannot listen", flush=True)
        return 1
    print("ready", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
