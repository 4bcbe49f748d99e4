/* The V4L2 capture's private header: the camera's state and the helpers its three files
 * share (see fshm_v4l2.c for the buffer life cycle and the locking). */
#ifndef FSHM_V4L2_IMPL_H
#define FSHM_V4L2_IMPL_H

#include <frameshm/frameshm.h>
#include "fshm_v4l2.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <linux/videodev2.h>

#ifdef FSHM_HAVE_LIBV4L2
#include <libv4l-plugin.h>
#include <libv4l2.h>
#include <libv4lconvert.h>
#endif

#define NOLIB_MSG "frameshm was built without libv4l2: apt-get install libv4l-dev and reinstall frameshm"
#define MAX_FMTS 64

enum { BUF_QUEUED = 1, BUF_HELD, BUF_READY, BUF_IDLE };

/* How a delivered frame is made from the driver's buffer. */
enum conv_kind {
    CONV_COPY,          /* same format: copy (compacting padded rows) */
    CONV_GREY_PACKED,   /* luma of packed 4:2:2 (every 2nd byte) */
    CONV_GREY_PLANAR,   /* luma plane of NV12/NV21/YU12/YV12 */
    CONV_GREY_RGB,      /* luma computed from RGB24 / BGR24 */
    CONV_LIBV4L,        /* libv4lconvert straight into the destination */
    CONV_LIBV4L_GREY,   /* libv4lconvert to YU12 in a scratch buffer, then its luma plane */
};

enum fmt_kind { FK_OPAQUE = 0, FK_PACKED, FK_NV, FK_YUV420, FK_COMPRESSED };

typedef struct fmt_info {
    uint32_t fourcc;
    uint8_t kind;
    uint8_t bpp;        /* packed: bytes per pixel */
    uint8_t channels;   /* packed: last dimension of the array (1: 2-D frame) */
    uint8_t luma;       /* 0xff: no luma; packed 4:2:2: byte offset of Y; RGB: 0x10|R-index */
    int16_t dtype;
} fmt_info;

#define FCC_GREY FSHM_FOURCC('G', 'R', 'E', 'Y')
#define FCC_YU12 FSHM_FOURCC('Y', 'U', '1', '2')

typedef struct cam_buf {
    void *start;
    size_t length;
    uint8_t *conv;              /* converted copy for zero-copy delivery (converted formats) */
    int state;
    struct v4l2_buffer vb;      /* as last dequeued */
    uint64_t ts_ns;             /* capture time of the frame it holds */
    int driver_ts;
    int rate_ok;                /* passed the rate limit (fshm_v4l2_wait kept it) */
} cam_buf;

struct fshm_v4l2_cam {
    const fshm_v4l2_backend *be;
    int fd;
    char path[256];
    fshm_v4l2_info info;
    pthread_mutex_t lock;
    int gone, streaming, started;
    cam_buf bufs[FSHM_V4L2_MAX_BUFFERS];
    uint32_t nbufs;
    unsigned held;
    uint32_t ready[FSHM_V4L2_MAX_BUFFERS];   /* FIFO of READY buffer indexes */
    unsigned ready_head, ready_count;
    struct v4l2_format native;               /* device format, bytesperline corrected */
    const fmt_info *nfi;                     /* native format */
    fshm_v4l2_format fmt;
    enum conv_kind conv;
    uint8_t luma_off;
    uint8_t *conv_area;                      /* nbufs * frame_bytes, converted formats */
    size_t conv_area_len;
    uint8_t *scratch;                        /* CONV_LIBV4L_GREY intermediate */
    size_t scratch_len;
#ifdef FSHM_HAVE_LIBV4L2
    struct v4lconvert_data *cv;
    struct libv4l_dev_ops cv_ops;
    struct v4l2_format cv_src, cv_dst;
#endif
    uint32_t start_fps_num, start_fps_den;   /* rate asked at start (set_rate(0) goes back) */
    uint32_t timeperframe;                   /* device supports S_PARM timeperframe */
    uint64_t min_interval_ns, next_due_ns;   /* software rate limit */
    uint32_t last_sequence;
    int have_sequence;
    unsigned bad_in_a_row;
    fshm_v4l2_stats stats;
};

/* Shared by fshm_v4l2.c (device, buffers, streaming), fshm_v4l2_format.c (format table,
 * enumeration, negotiation, layouts) and fshm_v4l2_frames.c (dequeue, conversion, delivery).
 * Hidden: the device code is built with -fvisibility=hidden. */

/* fshm_v4l2.c */
int cam_ioctl(fshm_v4l2_cam *c, unsigned long req, void *arg);
int cam_ioctl_error(fshm_v4l2_cam *c, int rc, const char *what);
int cam_dqbuf_error(fshm_v4l2_cam *c, int rc);
int cam_gone_error(fshm_v4l2_cam *c);
int cam_queue_locked(fshm_v4l2_cam *c, uint32_t i);

/* fshm_v4l2_format.c */
extern const uint32_t cam_grey_sources[];   /* GRAY8 without libv4lconvert, best first */
extern const size_t cam_n_grey_sources;
extern const uint32_t cam_converted[];      /* formats a conversion can deliver */
extern const size_t cam_n_converted;
const fmt_info *cam_fmt_lookup(uint32_t fourcc);
uint32_t cam_grey_source(const struct v4l2_fmtdesc *nat, int n);   /* 0: none of nat */
int cam_native_formats(fshm_v4l2_cam *c, struct v4l2_fmtdesc *out, int max);
int cam_is_native(const struct v4l2_fmtdesc *nat, int n, uint32_t fourcc);
void cam_sizes_text(fshm_v4l2_cam *c, uint32_t fourcc, char *out, size_t cap);
void cam_formats_text(fshm_v4l2_cam *c, char *out, size_t cap);
int cam_set_native_format(fshm_v4l2_cam *c, uint32_t fourcc, uint32_t w, uint32_t h, int exact_size,
                          uint32_t want_fourcc);
int cam_layout(fshm_v4l2_cam *c, size_t min_len);
int cam_out_tensor(fshm_v4l2_cam *c, uint32_t fourcc, size_t min_len);

#endif
