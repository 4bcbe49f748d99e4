/*
 * frameshm V4L2 capture: open a camera, negotiate format/size/rate, mmap streaming, and
 * deliver frames either as zero-copy views of the dequeued driver buffers or converted /
 * copied once straight into a destination (a frameshm stream slot).
 *
 * Device I/O goes through an injectable backend (open/close/ioctl/mmap/munmap/poll). The
 * default is libv4l2 (v4l2_open/v4l2_ioctl/...), which also brings libv4l's plugins;
 * format conversion (RGB24/BGR24 from YUYV, MJPEG, ...) uses libv4lconvert, libv4l2's
 * conversion engine, called directly so that it writes into the caller's destination with
 * no intermediate copy. GRAY8 is extracted by frameshm itself (libv4lconvert has no grey
 * output). Built without libv4l2 (no FSHM_HAVE_LIBV4L2), every call that would need the
 * default backend fails with FSHM_E_V4L2_NOLIB.
 *
 * Errors: negative errno values (-ENOENT no such device, -EACCES permission denied,
 * -EBUSY device busy, -ENODEV device gone - also when a started queue stops by itself,
 * which is how PipeWire's emulation reports a vanished node - -ETIMEDOUT no frame in
 * time, -ENOTTY not a V4L2 device) or the codes below; fshm_last_error() has the message.
 *
 * Not thread-safe per camera, except fshm_v4l2_requeue(), which may run on another thread
 * while one thread waits in a dequeue/capture call.
 */
#ifndef FSHM_V4L2_H
#define FSHM_V4L2_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>

#include <frameshm/frameshm.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FSHM_E_V4L2_NOLIB (-1101)        /* built without libv4l2 */
#define FSHM_E_V4L2_UNSUPPORTED (-1102)  /* format, size or conversion not offered */
#define FSHM_E_V4L2_NOBUFS (-1103)       /* every buffer is held by the application */

#define FSHM_V4L2_MAX_BUFFERS 32
#define FSHM_V4L2_DEFAULT_BUFFERS 4

/* V4L2 fourcc built from four characters (same value as the kernel's v4l2_fourcc()). */
#define FSHM_FOURCC(a, b, c, d)                                                                  \
    ((uint32_t)(uint8_t)(a) | ((uint32_t)(uint8_t)(b) << 8) | ((uint32_t)(uint8_t)(c) << 16) |   \
     ((uint32_t)(uint8_t)(d) << 24))

/* ---- injectable I/O backend ---- */

/* Same contracts as the system calls: -1 (MAP_FAILED for mmap) with errno set on error. */
typedef struct fshm_v4l2_backend {
    const char *name;
    void *ctx;   /* passed back as the first argument */
    int (*open)(void *ctx, const char *path, int flags);
    int (*close)(void *ctx, int fd);
    int (*ioctl)(void *ctx, int fd, unsigned long request, void *arg);
    void *(*mmap)(void *ctx, void *addr, size_t length, int prot, int flags, int fd, int64_t offset);
    int (*munmap)(void *ctx, void *addr, size_t length);
    int (*poll)(void *ctx, struct pollfd *fds, nfds_t nfds, int timeout_ms);
} fshm_v4l2_backend;

/* libv4l2's v4l2_* functions (and poll()); NULL when built without libv4l2. */
const fshm_v4l2_backend *fshm_v4l2_libv4l2_backend(void);
/* 1 if this build has libv4l2 (default backend and libv4lconvert conversions). */
int fshm_v4l2_have_libv4l2(void);

/* Test-only hook: when $FRAMESHM_V4L2_BACKEND names a shared library, cameras opened
 * without an explicit backend use the backend returned by that library's
 * `const fshm_v4l2_backend *fshm_v4l2_test_backend(void)` (tests/c/fake_v4l2.c builds
 * one). Resolves the backend a NULL config backend stands for. */
int fshm_v4l2_resolve_backend(const fshm_v4l2_backend *requested, const fshm_v4l2_backend **out);

/* ---- camera ---- */

typedef struct fshm_v4l2_cam fshm_v4l2_cam;

typedef struct fshm_v4l2_info {
    char driver[16];
    char card[32];
    char bus_info[32];
    uint32_t version;
    uint32_t capabilities;   /* device caps (V4L2_CAP_*) */
    const char *backend;     /* backend name */
} fshm_v4l2_info;

/* Opens the device (O_RDWR | O_NONBLOCK) and checks it can capture with streaming I/O.
 * backend NULL: $FRAMESHM_V4L2_BACKEND if set, else libv4l2. */
int fshm_v4l2_open(const char *path, const fshm_v4l2_backend *backend, fshm_v4l2_cam **out);
void fshm_v4l2_get_info(const fshm_v4l2_cam *c, fshm_v4l2_info *out);

/* ---- enumeration ---- */

#define FSHM_V4L2_FMT_COMPRESSED 0x1u   /* variable-size frames (MJPEG, ...) */
#define FSHM_V4L2_FMT_CONVERTED 0x2u    /* not native: produced by conversion */

typedef struct fshm_v4l2_fmtdesc {
    uint32_t fourcc;
    uint32_t flags;          /* FSHM_V4L2_FMT_* */
    uint32_t source_fourcc;  /* converted formats: the native format it is made from */
    char description[32];
} fshm_v4l2_fmtdesc;

/* Native formats first, then the converted formats this build can produce
 * (RGB24/BGR24 with libv4l2, GRAY8). Returns the number of entries (may exceed max:
 * only max are written). */
int fshm_v4l2_enum_formats(fshm_v4l2_cam *c, fshm_v4l2_fmtdesc *out, int max);

typedef struct fshm_v4l2_frmsize {
    uint32_t discrete;       /* 1: width x height; 0: a stepwise/continuous range */
    uint32_t width, height;
    uint32_t min_width, max_width, step_width;
    uint32_t min_height, max_height, step_height;
} fshm_v4l2_frmsize;

/* Sizes the device offers for a native fourcc (converted formats: for their source). */
int fshm_v4l2_enum_sizes(fshm_v4l2_cam *c, uint32_t fourcc, fshm_v4l2_frmsize *out, int max);

typedef struct fshm_v4l2_frmival {
    uint32_t discrete;       /* 1: num/den seconds per frame; 0: a range (min..max, step) */
    uint32_t num, den;
    uint32_t max_num, max_den, step_num, step_den;
} fshm_v4l2_frmival;

/* Frame intervals for fourcc at width x height; 0 entries when the device cannot say
 * (ENUM_FRAMEINTERVALS unsupported). */
int fshm_v4l2_enum_intervals(fshm_v4l2_cam *c, uint32_t fourcc, uint32_t width, uint32_t height,
                             fshm_v4l2_frmival *out, int max);

/* ---- negotiation ---- */

typedef struct fshm_v4l2_request {
    uint32_t fourcc;         /* delivered format; 0 = the device's current one. Native
                              * formats are used as they are; RGB3/BGR3 (RGB24/BGR24),
                              * GREY (GRAY8), YU12/YV12 otherwise are converted */
    uint32_t width, height;  /* 0 = the device's current size; otherwise exact or an error */
    uint32_t fps_num, fps_den; /* frames per second = num/den; 0 = leave the device's rate */
    uint32_t nbuffers;       /* driver buffers to request; 0 = FSHM_V4L2_DEFAULT_BUFFERS */
} fshm_v4l2_request;

typedef struct fshm_v4l2_format {
    uint32_t fourcc;           /* delivered format */
    uint32_t native_fourcc;    /* what the device sends */
    uint32_t width, height;
    uint32_t bytesperline;     /* rows of zero-copy frames (driver's, or packed if converted) */
    uint32_t native_bytesperline; /* the driver's, corrected when it contradicts the buffers */
    uint32_t frame_bytes;      /* packed size of a delivered frame (max for compressed) */
    uint32_t converted;        /* 1: converted from native_fourcc */
    uint32_t compressed;       /* variable-size frames */
    uint32_t device_fps_num, device_fps_den; /* rate the device reports (0: unknown) */
    uint32_t rate_limit_num, rate_limit_den; /* software rate limit in force (0: none) */
    uint32_t nbuffers;         /* buffers the driver granted */
    fshm_tensor tensor;        /* packed uint8/uint16 layout of a delivered frame */
} fshm_v4l2_format;

/* Sets format, size and rate, requests and maps the buffers and starts streaming.
 * Sizes must match exactly when given (the error lists what the device offers).
 * -EBUSY when another process streams from the device. */
int fshm_v4l2_start(fshm_v4l2_cam *c, const fshm_v4l2_request *req);
void fshm_v4l2_get_format(const fshm_v4l2_cam *c, fshm_v4l2_format *out);

/* Asks for fps_num/fps_den frames per second (0/x: back to the rate asked at start, or the
 * device's). Returns 1 when the device paces frames itself at that rate, 0 when the
 * device kept a faster rate and frameshm drops frames by driver timestamp to meet it
 * (PipeWire's emulation accepts VIDIOC_S_PARM but ignores it). */
int fshm_v4l2_set_rate(fshm_v4l2_cam *c, uint32_t fps_num, uint32_t fps_den);

/* ---- frames ---- */

typedef struct fshm_v4l2_buf {
    uint32_t index;          /* buffer index: pass to fshm_v4l2_requeue */
    const void *data;        /* delivered frame: driver memory, or the converted copy */
    size_t bytesused;        /* bytes of the delivered frame */
    uint32_t bytesperline;
    uint64_t timestamp_ns;   /* capture time, CLOCK_MONOTONIC (driver's when it gives one) */
    uint64_t dequeue_ns;     /* when frameshm took it from the driver */
    uint32_t sequence;       /* driver frame counter (gaps = frames the driver dropped) */
    uint32_t flags;          /* V4L2_BUF_FLAG_* */
    int driver_timestamp;    /* 1: timestamp_ns is the driver's; 0: dequeue time */
} fshm_v4l2_buf;

/* Zero-copy: waits up to timeout_ns (<0: forever) for the next frame and hands the buffer
 * to the caller, who must fshm_v4l2_requeue() it when done with the memory. Converted
 * formats are converted once into a per-buffer area owned by the camera.
 * -ETIMEDOUT, -ENODEV (device gone), -EINTR (signal), FSHM_E_V4L2_NOBUFS (the
 * application holds every buffer). */
int fshm_v4l2_dequeue(fshm_v4l2_cam *c, int64_t timeout_ns, fshm_v4l2_buf *out);
/* Gives a dequeued buffer back to the driver. Thread-safe against a concurrent wait. */
int fshm_v4l2_requeue(fshm_v4l2_cam *c, uint32_t index);
/* Buffers currently held by the application. */
unsigned fshm_v4l2_held(const fshm_v4l2_cam *c);

/* Waits up to timeout_ns for the next acceptable frame without delivering it, and returns
 * its size in bytes (what the next dequeue/read_into/capture delivers at once): callers
 * that loan a destination (a stream slot) only after a frame is there. */
int fshm_v4l2_wait(fshm_v4l2_cam *c, int64_t timeout_ns);

/* One copy: waits for the next frame, converts/copies it into dst (packed rows,
 * fshm_v4l2_format.frame_bytes bytes; compressed frames: bytesused) and requeues the
 * buffer at once. info (may be NULL) describes the frame (data = dst). */
int fshm_v4l2_read_into(fshm_v4l2_cam *c, int64_t timeout_ns, void *dst, size_t capacity,
                        fshm_v4l2_buf *info);

/* Capture straight into a stream: loan a slot of w, convert/copy the frame into it once,
 * requeue the driver buffer, commit with the capture timestamp. t NULL = the format's
 * packed tensor. seq_out (may be NULL) receives the committed seq. */
int fshm_v4l2_capture(fshm_v4l2_cam *c, fshm_writer *w, int64_t timeout_ns, const fshm_tensor *t,
                      uint64_t *seq_out, fshm_v4l2_buf *info);

/* Discards frames already captured more than max_age_ns ago (by driver timestamp); newer
 * ones stay queued for delivery. Returns how many were discarded. */
int fshm_v4l2_flush(fshm_v4l2_cam *c, uint64_t max_age_ns);

typedef struct fshm_v4l2_stats {
    uint64_t delivered;      /* frames handed out (any path) */
    uint64_t flushed;        /* discarded by fshm_v4l2_flush */
    uint64_t rate_dropped;   /* dropped by the software rate limit */
    uint64_t errors;         /* buffers the driver flagged as errored / short / unconvertible */
    uint64_t driver_gaps;    /* frames the driver skipped (sequence gaps) */
} fshm_v4l2_stats;
void fshm_v4l2_get_stats(const fshm_v4l2_cam *c, fshm_v4l2_stats *out);

/* Stops streaming (buffers held by the application stay mapped and valid). */
int fshm_v4l2_stop(fshm_v4l2_cam *c);
/* 1 once the device reported it is gone (ENODEV): only close() is useful then. */
int fshm_v4l2_gone(const fshm_v4l2_cam *c);
/* Stops streaming, unmaps and closes. No buffer may still be in use. */
void fshm_v4l2_close(fshm_v4l2_cam *c);

/* "YUYV" for a fourcc (per-thread storage, valid for the next 3 calls). */
const char *fshm_v4l2_fourcc_str(uint32_t fourcc);

#ifdef __cplusplus
}
#endif
#endif
