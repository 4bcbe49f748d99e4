"""Choice lists that a module and the pipeline configuration (config.py) both check a
setting against: defined once here, with no imports, so config.py can use them without
loading their owning module (frameshm.bridge needs _core, numpy and, to run, Zenoh).
The owning modules re-export them (``frameshm.bridge.MODES`` is the tuple below)."""

# frameshm.bridge, [bridge] mode: Zenoh's session modes.
BRIDGE_MODES = ("peer", "client", "router")

# frameshm.bridge, [bridge] jpeg_subsampling: chroma subsampling of the 'jpeg' encoding.
# 4:2:0 (what cameras and browsers use) halves libjpeg-turbo's work against 4:4:4 at 1080p
# (encode 15 -> 9 ms, decode 15 -> 9 ms here) for ~1 dB of PSNR, which is what lets 1080p at
# 30 fps fit two cores' worth of sender + receiver.
JPEG_SUBSAMPLING = ("420", "422", "444")

# frameshm.bridge, [bridge] exports 'NAME:ENCODING': how a frame crosses the link. The order is
# on the wire: an encoding is sent as its index here, so new ones go at the end.
BRIDGE_ENCODINGS = ("raw", "jpeg", "zstd")
