/* A deterministic fake V4L2 device behind frameshm's injectable backend
 * (fshm_v4l2_backend), for what PipeWire's emulation cannot show: frame-rate control,
 * a device vanishing mid-stream (ENODEV) and coming back, EBUSY, padded bytesperline,
 * fewer buffers granted than asked, errored buffers, permission denied.
 *
 * Linked into the cmocka suite (tests/c/test_v4l2.c) and built as a shared library for
 * the Python tests: with FRAMESHM_V4L2_BACKEND=<path>/libfshm_fakev4l2.so, frameshm uses
 * it for every camera opened without an explicit backend (see docs/v4l2.md). Devices come
 * from fake_v4l2_configure() or, on first use, from $FSHM_FAKE_V4L2.
 *
 * Spec (one device; several separated by '|'), space or ';' separated key=value:
 *   path=/dev/video0          device path (default /dev/video0)
 *   formats=YUYV:640x480@30,GREY:320x240@60   fourcc:WxH@fps entries (packed formats
 *                             YUYV UYVY GREY RGB3 BGR3, and NV12)
 *   pad=N                     bytesperline = width*bpp + N
 *   min_buffers=N max_buffers=N   REQBUFS grants clamp(count, min, max) (default 2, 32)
 *   timeperframe=0|1          VIDIOC_S_PARM supported (default 1)
 *   sparm_busy=0|1            S_PARM while streaming fails with EBUSY (default 0)
 *   gone_after=N              after N frames were dequeued the device disappears:
 *                             DQBUF/QBUF/... fail with ENODEV, poll gives POLLERR|POLLHUP,
 *                             open() fails with ENOENT (once: the device that comes
                             back stays)
 *   gone_ms=N                 ... and comes back N ms later (0: until fake_v4l2_replug)
 *   eacces=0|1                open() fails with EACCES
 *   error_every=N             every Nth frame carries V4L2_BUF_FLAG_ERROR
 *
 * Frame content (frame counter n = driver sequence number): row y, byte x of a row's
 * width*bpp bytes = (x + y + 4n) & 0xff; padding bytes = 0xEE; bytes 0..3 = n (LE u32).
 * Timestamps: CLOCK_MONOTONIC of the frame's capture instant, frame k of a stream at
 * STREAMON + k * interval (frames finding no queued buffer are dropped, as drivers do).
 */
#ifndef FAKE_V4L2_H
#define FAKE_V4L2_H

#include <stdint.h>

#include "fshm_v4l2.h"

typedef struct fake_v4l2_stats {
    int exists;
    int open_fds;
    int mapped;              /* live mmaps of this device's buffers */
    int queued;              /* buffers owned by the fake driver */
    int streaming;
    int gone;
    uint32_t nbuffers;       /* granted */
    uint32_t requested;      /* count asked in the last REQBUFS */
    uint32_t fps_num, fps_den;
    uint32_t bytesperline;
    uint64_t frames_made;
    uint64_t frames_dropped; /* no queued buffer at capture time */
    uint64_t dqbufs;
    uint64_t s_parm_calls;
    uint64_t streamons;
} fake_v4l2_stats;

/* Adds (or replaces) a device. 0 or -EINVAL for a bad spec. */
int fake_v4l2_configure(const char *spec);
/* Removes every device (fds still open then fail with ENODEV). */
void fake_v4l2_reset(void);
void fake_v4l2_unplug(const char *path);
void fake_v4l2_replug(const char *path);
void fake_v4l2_get_stats(const char *path, fake_v4l2_stats *out);
/* Live buffer mappings of every device, including those of removed devices. */
int fake_v4l2_live_mappings(void);

const fshm_v4l2_backend *fshm_v4l2_test_backend(void);

#endif
