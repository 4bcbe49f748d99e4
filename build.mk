# How frameshm's C code is compiled: the one definition, read by the Makefile (C users,
# C tests, benchmarks) and by setup.py (the Python package). Plain `NAME := value` lines
# (with `\` continuations) so that setup.py can read them without make.

# libframeshm's version is the header's (lib/include/frameshm/frameshm.h: FSHM_VERSION_*);
# the SONAME carries the major version.
FSHM_SOVERSION := 0

FSHM_CSTD := -std=c11 -D_GNU_SOURCE
FSHM_WARN := -Wall -Wextra -Wno-format-truncation -Wno-missing-field-initializers \
	-Wno-unused-parameter
FSHM_OPT := -O2

# libframeshm: the transport only (regions, seqlock, descriptors, control region, lease
# client, provisioning). Hidden visibility: only FSHM_API symbols are exported.
FSHM_LIB_SOURCES := lib/src/fshm_admin.c lib/src/fshm_control.c lib/src/fshm_error.c \
	lib/src/fshm_fill.c lib/src/fshm_lease.c lib/src/fshm_lease_requests.c lib/src/fshm_liveness.c \
	lib/src/fshm_path.c lib/src/fshm_proc.c lib/src/fshm_provision.c lib/src/fshm_queue.c \
	lib/src/fshm_reader.c lib/src/fshm_reader_wait.c lib/src/fshm_foreign.c \
	lib/src/fshm_region.c lib/src/fshm_sealed.c lib/src/fshm_writer.c
FSHM_LIB_CFLAGS := -fPIC -fvisibility=hidden -DFSHM_BUILDING_LIB -Ilib/include -Ilib/src
FSHM_LIB_LIBS := -lrt -pthread
FSHM_PUBLIC_HEADERS := lib/include/frameshm/frameshm.h

# Device code: clients of the public API, each built with its optional library when
# pkg-config finds it and built out (saying how to get it) when not.
FSHM_FEATURES := v4l2 aravis pipewire
FSHM_FEATURE_v4l2_PKG := libv4l2 libv4lconvert
FSHM_FEATURE_v4l2_MACRO := FSHM_HAVE_LIBV4L2
FSHM_FEATURE_v4l2_APT := libv4l-dev
FSHM_FEATURE_v4l2_WHAT := V4L2 cameras (frameshm.Camera, v4l2: sources)
FSHM_FEATURE_aravis_PKG := aravis-0.8
FSHM_FEATURE_aravis_MACRO := FSHM_HAVE_ARAVIS
FSHM_FEATURE_aravis_APT := libaravis-dev libusb-1.0-0-dev
FSHM_FEATURE_aravis_WHAT := GigE Vision cameras (frameshm.GigECamera, gige: sources)
FSHM_FEATURE_pipewire_PKG := libpipewire-0.3
FSHM_FEATURE_pipewire_MACRO := FSHM_HAVE_PIPEWIRE
FSHM_FEATURE_pipewire_APT := libpipewire-0.3-dev
FSHM_FEATURE_pipewire_WHAT := the PipeWire virtual camera (frameshm virtualcam)

FSHM_DEVICE_CFLAGS := -fPIC -fvisibility=hidden -Ilib/include -Idevices

# Python extension modules: sources and the feature each one needs. _core is the transport
# binding plus V4L2 (libv4l2 is small and pulls nothing else); GigE (Aravis, GLib) and the
# virtual camera (PipeWire) are their own modules, loaded only when used.
FSHM_BINDING_COMMON := binding/common.c
FSHM_EXT__core_SOURCES := binding/module.c binding/errors.c binding/mapping_type.c \
	binding/writer_type.c binding/reader_type.c binding/frame_type.c binding/frame_buffer.c binding/dlpack.c \
	binding/driver_funcs.c binding/camera_type.c binding/capture_common.c devices/fshm_v4l2.c \
	devices/fshm_v4l2_format.c devices/fshm_v4l2_frames.c
FSHM_EXT__core_FEATURES := v4l2
FSHM_EXT__gige_SOURCES := binding/gige_module.c binding/gige_type.c binding/capture_common.c \
	devices/fshm_gige.c
FSHM_EXT__gige_FEATURES := aravis
FSHM_EXT__virtualcam_SOURCES := binding/virtualcam_module.c binding/virtualcam_type.c \
	devices/fshm_pwcam.c devices/fshm_pwcam_layout.c devices/fshm_pwcam_serve.c
FSHM_EXT__virtualcam_FEATURES := pipewire
