/* V4L2 capture (see fshm_v4l2.h): negotiation, mmap streaming, zero-copy and one-copy
 * delivery, flush, rate control, and the libv4l2 / test backends.
 *
 * Buffer life cycle: QUEUED (owned by the driver) -> dequeued -> one of
 *   HELD   handed to the application (zero-copy); back to QUEUED on fshm_v4l2_requeue,
 *   READY  kept by fshm_v4l2_flush for the next delivery (it was young enough),
 *   or requeued at once (one-copy paths, dropped frames).
 * The per-camera mutex guards buffer states and QBUF/DQBUF so that a frame released on
 * another thread can be requeued while this thread sleeps in poll(). */
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

static const fmt_info FORMATS[] = {
    {FSHM_FOURCC('Y', 'U', 'Y', 'V'), FK_PACKED, 2, 2, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('Y', 'V', 'Y', 'U'), FK_PACKED, 2, 2, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('U', 'Y', 'V', 'Y'), FK_PACKED, 2, 2, 1, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('V', 'Y', 'U', 'Y'), FK_PACKED, 2, 2, 1, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('R', 'G', 'B', '3'), FK_PACKED, 3, 3, 0x10, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('B', 'G', 'R', '3'), FK_PACKED, 3, 3, 0x12, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('R', 'G', 'B', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('B', 'G', 'R', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('A', 'R', '2', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('X', 'R', '2', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('A', 'B', '2', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('X', 'B', '2', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('R', 'G', 'B', 'P'), FK_PACKED, 2, 2, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('G', 'R', 'E', 'Y'), FK_PACKED, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('Y', '1', '6', ' '), FK_PACKED, 2, 1, 0xff, FSHM_DTYPE_UINT16},
    {FSHM_FOURCC('N', 'V', '1', '2'), FK_NV, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('N', 'V', '2', '1'), FK_NV, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('Y', 'U', '1', '2'), FK_YUV420, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('Y', 'V', '1', '2'), FK_YUV420, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('M', 'J', 'P', 'G'), FK_COMPRESSED, 0, 0, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('J', 'P', 'E', 'G'), FK_COMPRESSED, 0, 0, 0xff, FSHM_DTYPE_UINT8},
};

#define FCC_GREY FSHM_FOURCC('G', 'R', 'E', 'Y')
#define FCC_YU12 FSHM_FOURCC('Y', 'U', '1', '2')

static const fmt_info *fmt_lookup(uint32_t fourcc)
{
    static const fmt_info opaque = {0, FK_OPAQUE, 0, 0, 0xff, FSHM_DTYPE_UINT8};
    for (size_t i = 0; i < sizeof FORMATS / sizeof FORMATS[0]; i++)
        if (FORMATS[i].fourcc == fourcc)
            return &FORMATS[i];
    return &opaque;
}

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

/* ---- helpers ---- */

const char *fshm_v4l2_fourcc_str(uint32_t f)
{
    /* A few rotating buffers: one message may name two or three formats. */
    static _Thread_local char bufs[4][5];
    static _Thread_local unsigned next;
    char *s = bufs[next++ % 4];
    for (int i = 0; i < 4; i++) {
        char ch = (char)((f >> (8 * i)) & 0xff);
        s[i] = ch >= 32 && ch < 127 ? ch : '?';
    }
    s[4] = 0;
    return s;
}

static int xioctl(fshm_v4l2_cam *c, unsigned long req, void *arg)
{
    int r;
    do {
        r = c->be->ioctl(c->be->ctx, c->fd, req, arg);
    } while (r == -1 && errno == EINTR);
    return r < 0 ? -errno : r;
}

static int err_gone(fshm_v4l2_cam *c, const char *what)
{
    c->gone = 1;
    return fshm_set_error(-ENODEV,
                          "camera %s disappeared (%s: ENODEV): unplugged or its driver reset; "
                          "close it and open it again once it is back",
                          c->path, what);
}

/* Maps a failed ioctl to a code with a message; ENODEV/ENXIO mark the camera gone. */
static int ioctl_error(fshm_v4l2_cam *c, int rc, const char *what)
{
    if (rc == -ENODEV || rc == -ENXIO)
        return err_gone(c, what);
    if (rc == -EBUSY)
        return fshm_set_error(-EBUSY,
                              "camera %s is busy (%s: EBUSY): another process is capturing from "
                              "it (fuser -v %s shows which)",
                              c->path, what, c->path);
    return fshm_set_error(rc, "%s on %s failed: %s", what, c->path, strerror(-rc));
}

/* DQBUF failing with EINVAL on a queue we started means the stream was torn down under
 * us (PipeWire's emulation does this when the camera node goes away; it never says
 * ENODEV): as good as gone, so that callers reconnect. */
static int dqbuf_error(fshm_v4l2_cam *c, int rc)
{
    if (rc == -EINVAL && c->started) {
        c->gone = 1;
        return fshm_set_error(-ENODEV,
                              "camera %s stopped streaming by itself (VIDIOC_DQBUF: EINVAL): the device "
                              "or its PipeWire node went away; close it and open it again once it is back",
                              c->path);
    }
    return ioctl_error(c, rc, "VIDIOC_DQBUF");
}

static int gone_error(fshm_v4l2_cam *c)
{
    return fshm_set_error(-ENODEV, "camera %s is gone (ENODEV earlier): close it and open it again",
                          c->path);
}

static uint64_t tv_ns(const struct timeval *tv)
{
    return (uint64_t)tv->tv_sec * 1000000000ull + (uint64_t)tv->tv_usec * 1000ull;
}

/* ---- backends ---- */

#ifdef FSHM_HAVE_LIBV4L2
static int lv_open(void *ctx, const char *path, int flags)
{
    (void)ctx;
    /* Plain open + v4l2_fd_open with conversion disabled: frameshm calls libv4lconvert
     * itself so that the conversion writes into the destination (no libv4l2 bounce
     * buffer), and native formats stay zero-copy. */
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0)
        return -1;
    struct v4l2_capability cap;
    memset(&cap, 0, sizeof cap);
    /* QUERYCAP first: libv4l2 prints to stderr when handed a non-V4L2 fd. */
    if (ioctl(fd, VIDIOC_QUERYCAP, &cap) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    if (v4l2_fd_open(fd, V4L2_DISABLE_CONVERSION) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}
static int lv_close(void *ctx, int fd) { (void)ctx; return v4l2_close(fd); }
static int lv_ioctl(void *ctx, int fd, unsigned long req, void *arg)
{
    (void)ctx;
    return v4l2_ioctl(fd, req, arg);
}
static void *lv_mmap(void *ctx, void *addr, size_t len, int prot, int flags, int fd, int64_t off)
{
    (void)ctx;
    return v4l2_mmap(addr, len, prot, flags, fd, (off_t)off);
}
static int lv_munmap(void *ctx, void *addr, size_t len) { (void)ctx; return v4l2_munmap(addr, len); }
static int lv_poll(void *ctx, struct pollfd *fds, nfds_t n, int timeout_ms)
{
    (void)ctx;
    return poll(fds, n, timeout_ms);
}
static const fshm_v4l2_backend libv4l2_backend = {
    "libv4l2", NULL, lv_open, lv_close, lv_ioctl, lv_mmap, lv_munmap, lv_poll,
};
const fshm_v4l2_backend *fshm_v4l2_libv4l2_backend(void) { return &libv4l2_backend; }
int fshm_v4l2_have_libv4l2(void) { return 1; }

/* libv4lconvert reaches the device through these, so that it sees the same backend. */
static int cv_ioctl(void *priv, int fd, unsigned long req, void *arg)
{
    fshm_v4l2_cam *c = priv;
    return c->be->ioctl(c->be->ctx, fd, req, arg);
}
static ssize_t cv_read(void *priv, int fd, void *buf, size_t n)
{
    (void)priv, (void)fd, (void)buf, (void)n;
    errno = ENOSYS;
    return -1;
}
static ssize_t cv_write(void *priv, int fd, const void *buf, size_t n)
{
    (void)priv, (void)fd, (void)buf, (void)n;
    errno = ENOSYS;
    return -1;
}
#else
const fshm_v4l2_backend *fshm_v4l2_libv4l2_backend(void) { return NULL; }
int fshm_v4l2_have_libv4l2(void) { return 0; }
#endif

int fshm_v4l2_resolve_backend(const fshm_v4l2_backend *requested, const fshm_v4l2_backend **out)
{
    if (requested) {
        *out = requested;
        return 0;
    }
#ifdef FSHM_TEST_HOOKS
    const char *lib = getenv("FRAMESHM_V4L2_BACKEND");
    if (lib && *lib) {
        /* Test builds only (FRAMESHM_TEST_BUILD=1): never unloaded, dlopen returns the same handle on later calls. */
        void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
        if (!h)
            return fshm_set_error(-ENOENT, "FRAMESHM_V4L2_BACKEND=%s cannot be loaded: %s", lib, dlerror());
        const fshm_v4l2_backend *(*get)(void);
        *(void **)&get = dlsym(h, "fshm_v4l2_test_backend");
        if (!get)
            return fshm_set_error(-EINVAL, "FRAMESHM_V4L2_BACKEND=%s has no fshm_v4l2_test_backend()", lib);
        *out = get();
        return *out ? 0 : fshm_set_error(-EINVAL, "FRAMESHM_V4L2_BACKEND=%s returned no backend", lib);
    }
#endif
    *out = fshm_v4l2_libv4l2_backend();
    return *out ? 0 : fshm_set_error(FSHM_E_V4L2_NOLIB, NOLIB_MSG);
}

/* ---- open ---- */

int fshm_v4l2_open(const char *path, const fshm_v4l2_backend *backend, fshm_v4l2_cam **out)
{
    const fshm_v4l2_backend *be;
    *out = NULL;
    if (!path || !*path)
        return fshm_set_error(-EINVAL, "no camera device path given");
    if (strlen(path) >= sizeof(((fshm_v4l2_cam *)0)->path))
        return fshm_set_error(-ENAMETOOLONG, "camera path too long: %s", path);
    int rc = fshm_v4l2_resolve_backend(backend, &be);
    if (rc)
        return rc;
    int fd = be->open(be->ctx, path, O_RDWR | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        switch (e) {
        case ENOENT:
            return fshm_set_error(-ENOENT, "no camera at %s (no such device; is it plugged in? ls /dev/video*)", path);
        case EACCES: case EPERM:
            return fshm_set_error(-EACCES,
                                  "permission denied opening %s: add the user to the 'video' group "
                                  "(sudo usermod -aG video $USER, then log in again) or fix the udev rule",
                                  path);
        case EBUSY:
            return fshm_set_error(-EBUSY, "camera %s is busy: another process is using it", path);
        case ENODEV: case ENXIO:
            return fshm_set_error(-ENODEV, "no device behind %s (unplugged?)", path);
        case ENOTTY: case EINVAL:
            return fshm_set_error(-ENOTTY, "%s is not a V4L2 device", path);
        default:
            return fshm_set_error(-e, "opening camera %s failed: %s", path, strerror(e));
        }
    }
    fshm_v4l2_cam *c = calloc(1, sizeof *c);
    if (!c) {
        be->close(be->ctx, fd);
        return fshm_set_error(-ENOMEM, "out of memory");
    }
    c->be = be;
    c->fd = fd;
    snprintf(c->path, sizeof c->path, "%s", path);
    pthread_mutex_init(&c->lock, NULL);

    struct v4l2_capability cap;
    memset(&cap, 0, sizeof cap);
    rc = xioctl(c, VIDIOC_QUERYCAP, &cap);
    if (rc) {
        if (rc == -ENOTTY || rc == -EINVAL)
            rc = fshm_set_error(-ENOTTY, "%s is not a V4L2 device (VIDIOC_QUERYCAP: %s)", path, strerror(-rc));
        else
            rc = ioctl_error(c, rc, "VIDIOC_QUERYCAP");
        goto fail;
    }
    uint32_t caps = (cap.capabilities & V4L2_CAP_DEVICE_CAPS) ? cap.device_caps : cap.capabilities;
    memcpy(c->info.driver, cap.driver, sizeof c->info.driver - 1);
    memcpy(c->info.card, cap.card, sizeof c->info.card - 1);
    memcpy(c->info.bus_info, cap.bus_info, sizeof c->info.bus_info - 1);
    c->info.version = cap.version;
    c->info.capabilities = caps;
    c->info.backend = be->name;
    if (!(caps & V4L2_CAP_VIDEO_CAPTURE)) {
        rc = fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s (%s) is not a single-planar video capture device%s",
                            path, c->info.card,
                            (caps & V4L2_CAP_VIDEO_CAPTURE_MPLANE) ? " (multi-planar capture is not supported)" : "");
        goto fail;
    }
    if (!(caps & V4L2_CAP_STREAMING)) {
        rc = fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s (%s) has no streaming (mmap) I/O", path, c->info.card);
        goto fail;
    }
#ifdef FSHM_HAVE_LIBV4L2
    c->cv_ops.ioctl = cv_ioctl;
    c->cv_ops.read = cv_read;
    c->cv_ops.write = cv_write;
    c->cv = v4lconvert_create_with_dev_ops(fd, c, &c->cv_ops);
    if (!c->cv) {
        rc = fshm_set_error(-ENOMEM, "libv4lconvert could not be set up for %s", path);
        goto fail;
    }
#endif
    *out = c;
    return 0;
fail:
    be->close(be->ctx, fd);
    pthread_mutex_destroy(&c->lock);
    free(c);
    return rc;
}

void fshm_v4l2_get_info(const fshm_v4l2_cam *c, fshm_v4l2_info *out) { *out = c->info; }

/* ---- enumeration ---- */

/* Native formats; returns the count (0 on error). */
static int native_formats(fshm_v4l2_cam *c, struct v4l2_fmtdesc *out, int max)
{
    int n = 0;
    for (uint32_t i = 0; i < MAX_FMTS && n < max; i++) {
        struct v4l2_fmtdesc d;
        memset(&d, 0, sizeof d);
        d.index = i;
        d.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        if (xioctl(c, VIDIOC_ENUM_FMT, &d))
            break;
        out[n++] = d;
    }
    return n;
}

static int is_native(const struct v4l2_fmtdesc *nat, int n, uint32_t fourcc)
{
    for (int i = 0; i < n; i++)
        if (nat[i].pixelformat == fourcc)
            return 1;
    return 0;
}

/* Native formats frameshm can take GRAY8 from without libv4lconvert, best first. */
static const uint32_t GREY_SOURCES[] = {
    FSHM_FOURCC('Y', 'U', 'Y', 'V'), FSHM_FOURCC('U', 'Y', 'V', 'Y'), FSHM_FOURCC('Y', 'V', 'Y', 'U'),
    FSHM_FOURCC('V', 'Y', 'U', 'Y'), FSHM_FOURCC('N', 'V', '1', '2'), FSHM_FOURCC('N', 'V', '2', '1'),
    FSHM_FOURCC('Y', 'U', '1', '2'), FSHM_FOURCC('Y', 'V', '1', '2'), FSHM_FOURCC('R', 'G', 'B', '3'),
    FSHM_FOURCC('B', 'G', 'R', '3'),
};
#define N_GREY_SOURCES (sizeof GREY_SOURCES / sizeof GREY_SOURCES[0])

static uint32_t grey_source(const struct v4l2_fmtdesc *nat, int n)
{
    for (size_t k = 0; k < N_GREY_SOURCES; k++)
        if (is_native(nat, n, GREY_SOURCES[k]))
            return GREY_SOURCES[k];
    return 0;
}

#ifdef FSHM_HAVE_LIBV4L2
/* The native format libv4lconvert would convert from to get `fourcc` (0: none). */
static uint32_t libv4l_source(fshm_v4l2_cam *c, uint32_t fourcc, uint32_t w, uint32_t h)
{
    struct v4l2_format dst, src;
    memset(&dst, 0, sizeof dst);
    memset(&src, 0, sizeof src);
    dst.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    dst.fmt.pix.pixelformat = fourcc;
    dst.fmt.pix.width = w ? w : 640;
    dst.fmt.pix.height = h ? h : 480;
    dst.fmt.pix.field = V4L2_FIELD_ANY;
    if (v4lconvert_try_format(c->cv, &dst, &src) || dst.fmt.pix.pixelformat != fourcc)
        return 0;
    return src.fmt.pix.pixelformat;
}
#endif

static const uint32_t CONVERTED[] = {
    FSHM_FOURCC('R', 'G', 'B', '3'), FSHM_FOURCC('B', 'G', 'R', '3'), FCC_GREY,
    FSHM_FOURCC('Y', 'U', '1', '2'), FSHM_FOURCC('Y', 'V', '1', '2'),
};

/* Source a converted format would be made from (0: cannot be produced). */
static uint32_t converted_source(fshm_v4l2_cam *c, const struct v4l2_fmtdesc *nat, int n, uint32_t fourcc,
                                 uint32_t w, uint32_t h)
{
    if (fourcc == FCC_GREY) {
        uint32_t s = grey_source(nat, n);
        if (s)
            return s;
    }
#ifdef FSHM_HAVE_LIBV4L2
    return libv4l_source(c, fourcc == FCC_GREY ? FCC_YU12 : fourcc, w, h);
#else
    (void)c, (void)w, (void)h;
    return 0;
#endif
}

int fshm_v4l2_enum_formats(fshm_v4l2_cam *c, fshm_v4l2_fmtdesc *out, int max)
{
    if (c->gone)
        return gone_error(c);
    struct v4l2_fmtdesc nat[MAX_FMTS];
    int n = native_formats(c, nat, MAX_FMTS), total = 0;
    for (int i = 0; i < n; i++, total++) {
        if (total >= max)
            continue;
        fshm_v4l2_fmtdesc *d = &out[total];
        memset(d, 0, sizeof *d);
        d->fourcc = nat[i].pixelformat;
        d->flags = (nat[i].flags & V4L2_FMT_FLAG_COMPRESSED) || fmt_lookup(d->fourcc)->kind == FK_COMPRESSED
                       ? FSHM_V4L2_FMT_COMPRESSED : 0;
        memcpy(d->description, nat[i].description, sizeof d->description - 1);
    }
    for (size_t k = 0; k < sizeof CONVERTED / sizeof CONVERTED[0]; k++) {
        uint32_t f = CONVERTED[k];
        if (is_native(nat, n, f))
            continue;
        uint32_t src = converted_source(c, nat, n, f, 0, 0);
        if (!src)
            continue;
        if (total < max) {
            fshm_v4l2_fmtdesc *d = &out[total];
            memset(d, 0, sizeof *d);
            d->fourcc = f;
            d->flags = FSHM_V4L2_FMT_CONVERTED;
            d->source_fourcc = src;
            snprintf(d->description, sizeof d->description, "%s (from %s)", fshm_v4l2_fourcc_str(f),
                     fshm_v4l2_fourcc_str(src));
        }
        total++;
    }
    return total;
}

int fshm_v4l2_enum_sizes(fshm_v4l2_cam *c, uint32_t fourcc, fshm_v4l2_frmsize *out, int max)
{
    if (c->gone)
        return gone_error(c);
    struct v4l2_fmtdesc nat[MAX_FMTS];
    int n = native_formats(c, nat, MAX_FMTS), total = 0;
    if (!is_native(nat, n, fourcc)) {
        uint32_t src = converted_source(c, nat, n, fourcc, 0, 0);
        if (!src)
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s cannot deliver %s", c->path,
                                  fshm_v4l2_fourcc_str(fourcc));
        fourcc = src;
    }
    for (uint32_t i = 0; i < 256; i++) {
        struct v4l2_frmsizeenum s;
        memset(&s, 0, sizeof s);
        s.index = i;
        s.pixel_format = fourcc;
        if (xioctl(c, VIDIOC_ENUM_FRAMESIZES, &s))
            break;
        if (total < max) {
            fshm_v4l2_frmsize *o = &out[total];
            memset(o, 0, sizeof *o);
            if (s.type == V4L2_FRMSIZE_TYPE_DISCRETE) {
                o->discrete = 1;
                o->width = s.discrete.width;
                o->height = s.discrete.height;
            } else {
                o->min_width = s.stepwise.min_width;
                o->max_width = s.stepwise.max_width;
                o->step_width = s.type == V4L2_FRMSIZE_TYPE_CONTINUOUS ? 1 : s.stepwise.step_width;
                o->min_height = s.stepwise.min_height;
                o->max_height = s.stepwise.max_height;
                o->step_height = s.type == V4L2_FRMSIZE_TYPE_CONTINUOUS ? 1 : s.stepwise.step_height;
            }
        }
        total++;
        if (s.type != V4L2_FRMSIZE_TYPE_DISCRETE)
            break;   /* a range is the only entry */
    }
    return total;
}

int fshm_v4l2_enum_intervals(fshm_v4l2_cam *c, uint32_t fourcc, uint32_t width, uint32_t height,
                             fshm_v4l2_frmival *out, int max)
{
    if (c->gone)
        return gone_error(c);
    struct v4l2_fmtdesc nat[MAX_FMTS];
    int n = native_formats(c, nat, MAX_FMTS), total = 0;
    if (!is_native(nat, n, fourcc)) {
        uint32_t src = converted_source(c, nat, n, fourcc, width, height);
        if (!src)
            return 0;
        fourcc = src;
    }
    for (uint32_t i = 0; i < 256; i++) {
        struct v4l2_frmivalenum v;
        memset(&v, 0, sizeof v);
        v.index = i;
        v.pixel_format = fourcc;
        v.width = width;
        v.height = height;
        if (xioctl(c, VIDIOC_ENUM_FRAMEINTERVALS, &v))
            break;   /* ENOTTY on devices that cannot say (PipeWire's emulation) */
        if (total < max) {
            fshm_v4l2_frmival *o = &out[total];
            memset(o, 0, sizeof *o);
            if (v.type == V4L2_FRMIVAL_TYPE_DISCRETE) {
                o->discrete = 1;
                o->num = v.discrete.numerator;
                o->den = v.discrete.denominator;
            } else {
                o->num = v.stepwise.min.numerator;
                o->den = v.stepwise.min.denominator;
                o->max_num = v.stepwise.max.numerator;
                o->max_den = v.stepwise.max.denominator;
                o->step_num = v.stepwise.step.numerator;
                o->step_den = v.stepwise.step.denominator;
            }
        }
        total++;
        if (v.type != V4L2_FRMIVAL_TYPE_DISCRETE)
            break;
    }
    return total;
}

/* "640x480, 320x240" of what the device offers for fourcc (for error messages). */
static void sizes_text(fshm_v4l2_cam *c, uint32_t fourcc, char *out, size_t cap)
{
    fshm_v4l2_frmsize s[16];
    int n = fshm_v4l2_enum_sizes(c, fourcc, s, 16);
    size_t len = 0;
    out[0] = 0;
    for (int i = 0; i < n && i < 16 && len < cap; i++) {
        if (s[i].discrete)
            len += snprintf(out + len, cap - len, "%s%ux%u", i ? ", " : "", s[i].width, s[i].height);
        else
            len += snprintf(out + len, cap - len, "%s%u..%ux%u..%u", i ? ", " : "", s[i].min_width,
                            s[i].max_width, s[i].min_height, s[i].max_height);
    }
    if (n <= 0)
        snprintf(out, cap, "(the device does not list sizes)");
}

static void formats_text(fshm_v4l2_cam *c, char *out, size_t cap)
{
    fshm_v4l2_fmtdesc f[32];
    int n = fshm_v4l2_enum_formats(c, f, 32);
    size_t len = 0;
    out[0] = 0;
    for (int i = 0; i < n && i < 32 && len < cap; i++)
        len += snprintf(out + len, cap - len, "%s%s%s", i ? ", " : "", fshm_v4l2_fourcc_str(f[i].fourcc),
                        (f[i].flags & FSHM_V4L2_FMT_CONVERTED) ? " (converted)" : "");
}

/* ---- negotiation ---- */

static int set_native_format(fshm_v4l2_cam *c, uint32_t fourcc, uint32_t w, uint32_t h, int exact_size,
                             uint32_t want_fourcc)
{
    struct v4l2_format f;
    memset(&f, 0, sizeof f);
    f.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    f.fmt.pix.pixelformat = fourcc;
    f.fmt.pix.width = w;
    f.fmt.pix.height = h;
    f.fmt.pix.field = V4L2_FIELD_ANY;
    int rc = xioctl(c, VIDIOC_S_FMT, &f);
    if (rc)
        return ioctl_error(c, rc, "VIDIOC_S_FMT");
    char sizes[256];
    if (f.fmt.pix.pixelformat != fourcc)
        return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s does not deliver %s (the driver chose %s)", c->path,
                              fshm_v4l2_fourcc_str(fourcc), fshm_v4l2_fourcc_str(f.fmt.pix.pixelformat));
    if (exact_size && (f.fmt.pix.width != w || f.fmt.pix.height != h)) {
        sizes_text(c, fourcc, sizes, sizeof sizes);
        return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED,
                              "%s cannot deliver %s at %ux%u (the driver offered %ux%u); sizes for %s: %s",
                              c->path, fshm_v4l2_fourcc_str(want_fourcc), w, h, f.fmt.pix.width, f.fmt.pix.height,
                              fshm_v4l2_fourcc_str(fourcc), sizes);
    }
    if (f.fmt.pix.width == 0 || f.fmt.pix.height == 0)
        return fshm_set_error(-EINVAL, "%s reported a %ux%u format", c->path, f.fmt.pix.width, f.fmt.pix.height);
    c->native = f;
    return 0;
}

static int get_parm(fshm_v4l2_cam *c, struct v4l2_streamparm *p)
{
    memset(p, 0, sizeof *p);
    p->type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    return xioctl(c, VIDIOC_G_PARM, p);
}

static void read_device_rate(fshm_v4l2_cam *c)
{
    struct v4l2_streamparm p;
    c->fmt.device_fps_num = c->fmt.device_fps_den = 0;
    if (get_parm(c, &p) == 0) {
        c->timeperframe = !!(p.parm.capture.capability & V4L2_CAP_TIMEPERFRAME);
        /* timeperframe is seconds per frame: fps = den / num */
        if (p.parm.capture.timeperframe.numerator && p.parm.capture.timeperframe.denominator) {
            c->fmt.device_fps_num = p.parm.capture.timeperframe.denominator;
            c->fmt.device_fps_den = p.parm.capture.timeperframe.numerator;
        }
    }
}

static int streamoff_locked(fshm_v4l2_cam *c);
static int queue_locked(fshm_v4l2_cam *c, uint32_t i);

/* VIDIOC_S_PARM while streaming is refused (EBUSY) by many drivers (uvcvideo): stop,
 * set, requeue what the driver owned, restart. Held buffers stay with the application. */
static int s_parm(fshm_v4l2_cam *c, struct v4l2_streamparm *p)
{
    int rc = xioctl(c, VIDIOC_S_PARM, p);
    if (rc != -EBUSY || !c->streaming)
        return rc;
    pthread_mutex_lock(&c->lock);
    rc = streamoff_locked(c);
    if (!rc)
        rc = xioctl(c, VIDIOC_S_PARM, p);
    int rc2 = 0;
    for (uint32_t i = 0; i < c->nbufs && !rc2; i++)
        if (c->bufs[i].state == BUF_IDLE || c->bufs[i].state == BUF_READY)
            rc2 = queue_locked(c, i);
    c->ready_count = 0;
    if (!rc2) {
        int t = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        rc2 = xioctl(c, VIDIOC_STREAMON, &t);
        if (!rc2)
            c->streaming = 1;
    }
    pthread_mutex_unlock(&c->lock);
    if (rc2)
        return ioctl_error(c, rc2, "restarting the stream after VIDIOC_S_PARM");
    return rc;
}

/* Device rate first; frames above the asked rate are then dropped by timestamp. */
static int apply_rate(fshm_v4l2_cam *c, uint32_t num, uint32_t den)
{
    c->min_interval_ns = 0;
    c->next_due_ns = 0;
    c->fmt.rate_limit_num = c->fmt.rate_limit_den = 0;
    read_device_rate(c);
    if (!num || !den)
        return 1;
    if (c->timeperframe) {
        struct v4l2_streamparm p;
        memset(&p, 0, sizeof p);
        p.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        p.parm.capture.timeperframe.numerator = den;
        p.parm.capture.timeperframe.denominator = num;
        int rc = s_parm(c, &p);
        if (rc == -ENODEV || rc == -ENXIO)
            return err_gone(c, "VIDIOC_S_PARM");
        /* Other failures leave the device's rate: the software limit below covers it. */
        read_device_rate(c);
    }
    /* Device faster than asked (or unknown)? 5% slack for drivers that round 30 to 30.03. */
    uint64_t want_ns = (uint64_t)den * 1000000000ull / num;
    int paced = c->fmt.device_fps_num && c->fmt.device_fps_den &&
                (uint64_t)c->fmt.device_fps_den * 1000000000ull / c->fmt.device_fps_num * 105 / 100 >= want_ns;
    if (!paced) {
        c->min_interval_ns = want_ns;
        c->fmt.rate_limit_num = num;
        c->fmt.rate_limit_den = den;
    }
    return paced;
}

/* Corrects bytesperline that contradicts the mapped buffers (PipeWire's emulation reports
 * 4 bytes per pixel for RGB24) and computes the packed layout. */
static int layout(fshm_v4l2_cam *c, size_t min_len)
{
    const fmt_info *fi = c->nfi;
    uint32_t w = c->native.fmt.pix.width, h = c->native.fmt.pix.height;
    uint32_t bpl = c->native.fmt.pix.bytesperline;
    uint64_t need;
    switch (fi->kind) {
    case FK_PACKED: {
        uint32_t row = w * fi->bpp;
        if (bpl < row)
            bpl = row;
        need = (uint64_t)bpl * (h - 1) + row;
        if (need > min_len) {
            if ((uint64_t)row * h > min_len)
                return fshm_set_error(-EINVAL, "%s: %u-byte buffers cannot hold %ux%u %s frames", c->path,
                                      (unsigned)min_len, w, h, fshm_v4l2_fourcc_str(fi->fourcc));
            bpl = row;
        }
        break;
    }
    case FK_NV: case FK_YUV420:
        if ((w | h) & 1)
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s: odd 4:2:0 size %ux%u", c->path, w, h);
        if (bpl < w)
            bpl = w;
        if ((uint64_t)bpl * h * 3 / 2 > min_len) {
            if ((uint64_t)w * h * 3 / 2 > min_len)
                return fshm_set_error(-EINVAL, "%s: buffers too small for %ux%u %s", c->path, w, h,
                                      fshm_v4l2_fourcc_str(fi->fourcc));
            bpl = w;
        }
        break;
    default:
        bpl = 0;
        break;
    }
    c->native.fmt.pix.bytesperline = bpl;
    c->fmt.native_bytesperline = bpl;
    return 0;
}

/* Output layout (packed) of the delivered format. */
static int out_tensor(fshm_v4l2_cam *c, uint32_t fourcc, size_t min_len)
{
    const fmt_info *fi = fmt_lookup(fourcc);
    uint32_t w = c->fmt.width, h = c->fmt.height;
    fshm_tensor *t = &c->fmt.tensor;
    memset(t, 0, sizeof *t);
    t->dtype = fi->dtype;
    t->major_order = FSHM_ORDER_ROW;
    uint64_t bytes;
    switch (fi->kind) {
    case FK_PACKED:
        t->dims[0] = (int32_t)h;
        t->dims[1] = (int32_t)w;
        t->ndims = 2;
        if (fi->channels > 1) {
            t->dims[2] = fi->channels;
            t->ndims = 3;
        }
        bytes = (uint64_t)w * h * fi->bpp;
        c->fmt.bytesperline = w * fi->bpp;
        break;
    case FK_NV: case FK_YUV420:
        t->dims[0] = (int32_t)(h * 3 / 2);
        t->dims[1] = (int32_t)w;
        t->ndims = 2;
        bytes = (uint64_t)w * h * 3 / 2;
        c->fmt.bytesperline = w;
        break;
    default: {
        /* Compressed / unknown: variable-size 1-D bytes, at most the driver's sizeimage. */
        uint64_t si = c->native.fmt.pix.sizeimage;
        bytes = si && si <= min_len ? si : min_len;
        t->dims[0] = (int32_t)bytes;
        t->ndims = 1;
        c->fmt.bytesperline = 0;
        c->fmt.compressed = 1;
        break;
    }
    }
    if (bytes > 0x7fffffffull)
        return fshm_set_error(-EINVAL, "%ux%u frames are too large", w, h);
    c->fmt.frame_bytes = (uint32_t)bytes;
    return 0;
}

static void unmap_all(fshm_v4l2_cam *c)
{
    for (uint32_t i = 0; i < c->nbufs; i++) {
        if (c->bufs[i].start && c->bufs[i].start != MAP_FAILED)
            c->be->munmap(c->be->ctx, c->bufs[i].start, c->bufs[i].length);
        c->bufs[i].start = NULL;
        c->bufs[i].state = 0;
    }
    c->nbufs = 0;
    if (c->conv_area)
        munmap(c->conv_area, c->conv_area_len);
    c->conv_area = NULL;
    free(c->scratch);
    c->scratch = NULL;
}

static void release_buffers(fshm_v4l2_cam *c)
{
    unmap_all(c);
    if (!c->gone) {
        struct v4l2_requestbuffers rb;
        memset(&rb, 0, sizeof rb);
        rb.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        rb.memory = V4L2_MEMORY_MMAP;
        xioctl(c, VIDIOC_REQBUFS, &rb);   /* best effort: frees the driver's buffers */
    }
}

static int queue_locked(fshm_v4l2_cam *c, uint32_t i)
{
    struct v4l2_buffer b;
    memset(&b, 0, sizeof b);
    b.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    b.memory = V4L2_MEMORY_MMAP;
    b.index = i;
    int rc = xioctl(c, VIDIOC_QBUF, &b);
    if (rc)
        return rc;
    c->bufs[i].state = BUF_QUEUED;
    return 0;
}

int fshm_v4l2_start(fshm_v4l2_cam *c, const fshm_v4l2_request *req)
{
    if (c->gone)
        return gone_error(c);
    if (c->started)
        return fshm_set_error(-EINVAL, "camera %s is already started", c->path);
    char text[512];
    struct v4l2_format cur;
    memset(&cur, 0, sizeof cur);
    cur.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    int rc = xioctl(c, VIDIOC_G_FMT, &cur);
    if (rc)
        return ioctl_error(c, rc, "VIDIOC_G_FMT");
    uint32_t want = req->fourcc ? req->fourcc : cur.fmt.pix.pixelformat;
    int exact = req->width && req->height;
    if ((req->width && !req->height) || (!req->width && req->height))
        return fshm_set_error(-EINVAL, "give both width and height, or neither");
    uint32_t w = exact ? req->width : cur.fmt.pix.width, h = exact ? req->height : cur.fmt.pix.height;
    if (req->fps_num && !req->fps_den)
        return fshm_set_error(-EINVAL, "frame rate %u/0", req->fps_num);
    uint32_t nreq = req->nbuffers ? req->nbuffers : FSHM_V4L2_DEFAULT_BUFFERS;
    if (nreq > FSHM_V4L2_MAX_BUFFERS)
        return fshm_set_error(-EINVAL, "%u buffers asked; at most %d", nreq, FSHM_V4L2_MAX_BUFFERS);

    struct v4l2_fmtdesc nat[MAX_FMTS];
    int nn = native_formats(c, nat, MAX_FMTS);
    memset(&c->fmt, 0, sizeof c->fmt);
    c->conv = CONV_COPY;
    if (is_native(nat, nn, want) || (nn == 0 && !req->fourcc)) {
        rc = set_native_format(c, want, w, h, exact, want);
        if (rc)
            return rc;
    } else if (want == FCC_GREY && grey_source(nat, nn)) {
        /* GRAY8 from the first luma-carrying native format that offers the size. */
        rc = FSHM_E_V4L2_UNSUPPORTED;
        for (size_t k = 0; k < N_GREY_SOURCES && rc; k++) {
            if (!is_native(nat, nn, GREY_SOURCES[k]))
                continue;
            rc = set_native_format(c, GREY_SOURCES[k], w, h, exact, want);
            if (rc == -ENODEV || rc == -EBUSY)
                return rc;
        }
        if (rc)
            return rc;
        const fmt_info *src = fmt_lookup(c->native.fmt.pix.pixelformat);
        if (src->kind == FK_PACKED && src->bpp == 2) {
            c->conv = CONV_GREY_PACKED;
            c->luma_off = src->luma;
        } else if (src->kind == FK_PACKED) {
            c->conv = CONV_GREY_RGB;
            c->luma_off = src->luma & 0x0f;   /* index of R within the pixel */
        } else {
            c->conv = CONV_GREY_PLANAR;
        }
    } else {
#ifdef FSHM_HAVE_LIBV4L2
        /* libv4lconvert picks the source format (and size) it converts best from. */
        int grey = want == FCC_GREY;
        struct v4l2_format dst, src;
        memset(&dst, 0, sizeof dst);
        memset(&src, 0, sizeof src);
        dst.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        dst.fmt.pix.pixelformat = grey ? FCC_YU12 : want;
        dst.fmt.pix.width = w;
        dst.fmt.pix.height = h;
        dst.fmt.pix.field = V4L2_FIELD_ANY;
        if (!v4lconvert_supported_dst_format(dst.fmt.pix.pixelformat) ||
            v4lconvert_try_format(c->cv, &dst, &src) || dst.fmt.pix.pixelformat != (grey ? FCC_YU12 : want) ||
            !src.fmt.pix.pixelformat) {
            formats_text(c, text, sizeof text);
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s cannot deliver %s; it offers: %s", c->path,
                                  fshm_v4l2_fourcc_str(want), text);
        }
        if (exact && (dst.fmt.pix.width != w || dst.fmt.pix.height != h)) {
            sizes_text(c, want, text, sizeof text);
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s cannot deliver %s at %ux%u; sizes: %s", c->path,
                                  fshm_v4l2_fourcc_str(want), w, h, text);
        }
        rc = set_native_format(c, src.fmt.pix.pixelformat, src.fmt.pix.width, src.fmt.pix.height, 1, want);
        if (rc)
            return rc;
        c->cv_dst = dst;
        c->conv = grey ? CONV_LIBV4L_GREY : CONV_LIBV4L;
        w = dst.fmt.pix.width;
        h = dst.fmt.pix.height;
#else
        formats_text(c, text, sizeof text);
        int convertible = 0;
        for (size_t k = 0; k < sizeof CONVERTED / sizeof CONVERTED[0]; k++)
            convertible |= CONVERTED[k] == want;
        if (convertible)
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s: converting to %s needs libv4l2; %s. The device offers: %s",
                                  c->path, fshm_v4l2_fourcc_str(want), NOLIB_MSG, text);
        return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s cannot deliver %s; it offers: %s", c->path,
                              fshm_v4l2_fourcc_str(want), text);
#endif
    }
    c->nfi = fmt_lookup(c->native.fmt.pix.pixelformat);
    c->fmt.fourcc = want;
    c->fmt.native_fourcc = c->native.fmt.pix.pixelformat;
    c->fmt.converted = c->conv != CONV_COPY;
    c->fmt.width = c->conv == CONV_COPY ? c->native.fmt.pix.width : w;
    c->fmt.height = c->conv == CONV_COPY ? c->native.fmt.pix.height : h;

    /* Rate after the format (drivers may reset it on S_FMT), before buffers. */
    c->start_fps_num = req->fps_num;
    c->start_fps_den = req->fps_den;
    rc = apply_rate(c, req->fps_num, req->fps_den);
    if (rc < 0)
        return rc;

    struct v4l2_requestbuffers rb;
    memset(&rb, 0, sizeof rb);
    rb.count = nreq;
    rb.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    rb.memory = V4L2_MEMORY_MMAP;
    rc = xioctl(c, VIDIOC_REQBUFS, &rb);
    if (rc)
        return ioctl_error(c, rc, "VIDIOC_REQBUFS");
    if (rb.count == 0)
        return fshm_set_error(-ENOMEM, "%s granted no capture buffers", c->path);
    /* Drivers may grant fewer or more than asked; more than we track stay unqueued. */
    c->nbufs = rb.count < FSHM_V4L2_MAX_BUFFERS ? rb.count : FSHM_V4L2_MAX_BUFFERS;
    c->fmt.nbuffers = c->nbufs;
    size_t min_len = SIZE_MAX;
    for (uint32_t i = 0; i < c->nbufs; i++) {
        struct v4l2_buffer b;
        memset(&b, 0, sizeof b);
        b.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        b.memory = V4L2_MEMORY_MMAP;
        b.index = i;
        rc = xioctl(c, VIDIOC_QUERYBUF, &b);
        if (rc) {
            rc = ioctl_error(c, rc, "VIDIOC_QUERYBUF");
            goto fail;
        }
        void *p = c->be->mmap(c->be->ctx, NULL, b.length, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, b.m.offset);
        if (p == MAP_FAILED) {
            rc = fshm_set_error(-errno, "mapping buffer %u (%u bytes) of %s failed: %s", i, b.length, c->path,
                                strerror(errno));
            goto fail;
        }
        c->bufs[i].start = p;
        c->bufs[i].length = b.length;
        c->bufs[i].state = BUF_IDLE;
        if (b.length < min_len)
            min_len = b.length;
    }
    if ((rc = layout(c, min_len)))
        goto fail;
    if ((rc = out_tensor(c, want, min_len)))
        goto fail;
    if (c->conv == CONV_COPY) {
        c->fmt.bytesperline = c->fmt.native_bytesperline ? c->fmt.native_bytesperline : c->fmt.bytesperline;
    } else {
        /* Zero-copy delivery of a converted format: one conversion into the buffer's own
         * area, allocated here so that frame delivery never allocates. */
        c->conv_area_len = (size_t)c->nbufs * c->fmt.frame_bytes;
        c->conv_area = mmap(NULL, c->conv_area_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (c->conv_area == MAP_FAILED) {
            c->conv_area = NULL;
            rc = fshm_set_error(-ENOMEM, "cannot allocate %zu bytes of conversion buffers", c->conv_area_len);
            goto fail;
        }
        for (uint32_t i = 0; i < c->nbufs; i++)
            c->bufs[i].conv = c->conv_area + (size_t)i * c->fmt.frame_bytes;
#ifdef FSHM_HAVE_LIBV4L2
        if (c->conv == CONV_LIBV4L || c->conv == CONV_LIBV4L_GREY) {
            c->cv_src = c->native;
            c->cv_dst.fmt.pix.bytesperline = 0;   /* packed output */
            c->cv_dst.fmt.pix.sizeimage = 0;
            v4lconvert_fixup_fmt(&c->cv_dst);
        }
        if (c->conv == CONV_LIBV4L_GREY) {
            c->scratch_len = (size_t)c->fmt.width * c->fmt.height * 3 / 2;
            c->scratch = malloc(c->scratch_len);
            if (!c->scratch) {
                rc = fshm_set_error(-ENOMEM, "out of memory");
                goto fail;
            }
        }
#endif
    }
    pthread_mutex_lock(&c->lock);
    for (uint32_t i = 0; i < c->nbufs && !rc; i++)
        rc = queue_locked(c, i);
    pthread_mutex_unlock(&c->lock);
    if (rc) {
        rc = ioctl_error(c, rc, "VIDIOC_QBUF");
        goto fail;
    }
    int type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    rc = xioctl(c, VIDIOC_STREAMON, &type);
    if (rc) {
        rc = ioctl_error(c, rc, "VIDIOC_STREAMON");
        goto fail;
    }
    c->streaming = 1;
    c->started = 1;
    c->held = 0;
    c->ready_count = c->ready_head = 0;
    c->have_sequence = 0;
    return 0;
fail:
    release_buffers(c);
    return rc;
}

void fshm_v4l2_get_format(const fshm_v4l2_cam *c, fshm_v4l2_format *out) { *out = c->fmt; }

int fshm_v4l2_set_rate(fshm_v4l2_cam *c, uint32_t fps_num, uint32_t fps_den)
{
    if (c->gone)
        return gone_error(c);
    if (!c->started)
        return fshm_set_error(-EINVAL, "camera %s is not started", c->path);
    if (fps_num && !fps_den)
        return fshm_set_error(-EINVAL, "frame rate %u/0", fps_num);
    if (!fps_num) {
        fps_num = c->start_fps_num;
        fps_den = c->start_fps_den;
        if (!fps_num) {
            /* Nothing asked at start: lift the limit, leave the device's rate. */
            c->min_interval_ns = c->next_due_ns = 0;
            c->fmt.rate_limit_num = c->fmt.rate_limit_den = 0;
            read_device_rate(c);
            return 1;
        }
    }
    return apply_rate(c, fps_num, fps_den);
}

/* ---- frames ---- */

static int streamoff_locked(fshm_v4l2_cam *c)
{
    if (!c->streaming)
        return 0;
    int type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    int rc = xioctl(c, VIDIOC_STREAMOFF, &type);
    c->streaming = 0;
    /* STREAMOFF returns every buffer to the application. */
    for (uint32_t i = 0; i < c->nbufs; i++)
        if (c->bufs[i].state == BUF_QUEUED)
            c->bufs[i].state = BUF_IDLE;
    return rc;
}

/* Non-blocking DQBUF under the lock: 0, -EAGAIN, or an error. */
static int dq_locked(fshm_v4l2_cam *c, struct v4l2_buffer *b)
{
    memset(b, 0, sizeof *b);
    b->type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    b->memory = V4L2_MEMORY_MMAP;
    int rc = xioctl(c, VIDIOC_DQBUF, b);
    if (rc)
        return rc;
    if (b->index >= c->nbufs || c->bufs[b->index].state != BUF_QUEUED)
        return fshm_set_error(-EIO, "%s returned buffer %u, which was not queued", c->path, b->index);
    cam_buf *cb = &c->bufs[b->index];
    cb->vb = *b;
    cb->state = BUF_IDLE;
    cb->rate_ok = 0;
    uint64_t now = fshm_now_ns();
    uint64_t ts = tv_ns(&b->timestamp);
    /* Driver capture time when it is CLOCK_MONOTONIC and plausible; else dequeue time. */
    cb->driver_ts = (b->flags & V4L2_BUF_FLAG_TIMESTAMP_MASK) == V4L2_BUF_FLAG_TIMESTAMP_MONOTONIC && ts &&
                    ts <= now + 1000000;
    cb->ts_ns = cb->driver_ts ? ts : now;
    if (c->have_sequence && b->sequence > c->last_sequence + 1)
        c->stats.driver_gaps += b->sequence - c->last_sequence - 1;
    c->last_sequence = b->sequence;
    c->have_sequence = 1;
    return 0;
}

static size_t native_frame_bytes(const fshm_v4l2_cam *c)
{
    const fmt_info *fi = c->nfi;
    uint32_t w = c->native.fmt.pix.width, h = c->native.fmt.pix.height, bpl = c->native.fmt.pix.bytesperline;
    switch (fi->kind) {
    case FK_PACKED: return (size_t)bpl * (h - 1) + (size_t)w * fi->bpp;
    case FK_NV: case FK_YUV420: return (size_t)bpl * h * 3 / 2;
    default: return 1;
    }
}

/* Waits for the next acceptable frame: a dequeued buffer index (state IDLE) the caller
 * now owns. Errored/short buffers and frames above the rate limit are requeued here. */
static int next_frame(fshm_v4l2_cam *c, int64_t timeout_ns, uint32_t *index)
{
    if (c->gone)
        return gone_error(c);
    if (!c->streaming)
        return fshm_set_error(FSHM_E_CLOSED, "camera %s is not streaming", c->path);
    uint64_t deadline = timeout_ns < 0 ? UINT64_MAX : fshm_now_ns() + (uint64_t)timeout_ns;
    size_t need = native_frame_bytes(c);
    for (;;) {
        struct v4l2_buffer b;
        int rc, idx = -1;
        pthread_mutex_lock(&c->lock);
        if (c->ready_count) {
            idx = (int)c->ready[c->ready_head];
            c->ready_head = (c->ready_head + 1) % FSHM_V4L2_MAX_BUFFERS;
            c->ready_count--;
            c->bufs[idx].state = BUF_IDLE;
            rc = 0;
        } else {
            rc = dq_locked(c, &b);
            if (rc == 0)
                idx = (int)b.index;
        }
        unsigned queued = 0;
        if (rc == -EAGAIN)
            for (uint32_t i = 0; i < c->nbufs; i++)
                queued += c->bufs[i].state == BUF_QUEUED;
        pthread_mutex_unlock(&c->lock);

        if (rc == 0) {
            cam_buf *cb = &c->bufs[idx];
            const struct v4l2_buffer *vb = &cb->vb;
            int bad = (vb->flags & V4L2_BUF_FLAG_ERROR) || vb->bytesused == 0 ||
                      (c->nfi->kind != FK_COMPRESSED && c->nfi->kind != FK_OPAQUE && vb->bytesused < need);
            int drop = 0;
            if (bad) {
                c->stats.errors++;
            } else if (c->min_interval_ns && !cb->rate_ok) {
                /* Keep a frame when it is at most a quarter interval early. A frame on time
                 * or early advances the due time in phase (exact decimation of a jittery
                 * camera); a late one restarts the phase from itself. Either way the next
                 * due time is at least one interval after the frame kept, so no two frames
                 * delivered are closer than 3/4 of the interval: keeping the phase after a
                 * late frame (the camera lost the ones before it, a starved consumer) let
                 * the next frame through half an interval later. */
                uint64_t slack = c->min_interval_ns / 4, ts = cb->ts_ns;
                if (c->next_due_ns && ts + slack < c->next_due_ns) {
                    drop = 1;
                    c->stats.rate_dropped++;
                } else {
                    c->next_due_ns = c->next_due_ns && ts <= c->next_due_ns
                                         ? c->next_due_ns + c->min_interval_ns
                                         : ts + c->min_interval_ns;
                }
            }
            if (!bad && !drop) {
                cb->rate_ok = 1;
                *index = (uint32_t)idx;
                return 0;
            }
            pthread_mutex_lock(&c->lock);
            rc = queue_locked(c, (uint32_t)idx);
            pthread_mutex_unlock(&c->lock);
            if (rc)
                return ioctl_error(c, rc, "VIDIOC_QBUF");
            continue;
        }
        if (rc != -EAGAIN)
            return dqbuf_error(c, rc);
        if (queued == 0)
            return fshm_set_error(FSHM_E_V4L2_NOBUFS,
                                  "all %u buffers of %s are held by the application: release frames "
                                  "(and drop their numpy views) before reading more",
                                  c->nbufs, c->path);
        uint64_t now = fshm_now_ns();
        if (now >= deadline)
            return fshm_set_error(-ETIMEDOUT, "no frame from %s within %.3f s", c->path, (double)timeout_ns / 1e9);
        int ms = deadline == UINT64_MAX ? -1 : (int)((deadline - now + 999999) / 1000000);
        struct pollfd pfd = {c->fd, POLLIN, 0};
        int pr = c->be->poll(c->be->ctx, &pfd, 1, ms);
        if (pr < 0) {
            if (errno == EINTR)
                return fshm_set_error(-EINTR, "interrupted");
            return fshm_set_error(-errno, "poll on %s failed: %s", c->path, strerror(errno));
        }
        if (pr > 0 && (pfd.revents & (POLLERR | POLLHUP | POLLNVAL)) && !(pfd.revents & POLLIN)) {
            /* DQBUF says why (ENODEV when unplugged). */
            pthread_mutex_lock(&c->lock);
            rc = dq_locked(c, &b);
            if (rc == 0) {
                /* A frame came after all: the next round takes it from the FIFO. */
                c->ready[(c->ready_head + c->ready_count) % FSHM_V4L2_MAX_BUFFERS] = b.index;
                c->ready_count++;
                c->bufs[b.index].state = BUF_READY;
                pthread_mutex_unlock(&c->lock);
                continue;
            }
            pthread_mutex_unlock(&c->lock);
            if (rc == -EAGAIN)
                return fshm_set_error(-EIO, "poll reported an error on %s (revents 0x%x) with no frame", c->path,
                                      pfd.revents);
            return dqbuf_error(c, rc);
        }
    }
}

static void grey_packed(uint8_t *dst, const uint8_t *src, uint32_t w, uint32_t h, uint32_t bpl, unsigned off)
{
    for (uint32_t y = 0; y < h; y++) {
        const uint8_t *s = src + (size_t)y * bpl + off;
        uint8_t *d = dst + (size_t)y * w;
        for (uint32_t x = 0; x < w; x++)
            d[x] = s[2 * x];
    }
}

static void grey_rgb(uint8_t *dst, const uint8_t *src, uint32_t w, uint32_t h, uint32_t bpl, unsigned ri)
{
    unsigned bi = 2 - ri;
    for (uint32_t y = 0; y < h; y++) {
        const uint8_t *s = src + (size_t)y * bpl;
        uint8_t *d = dst + (size_t)y * w;
        for (uint32_t x = 0; x < w; x++, s += 3)   /* BT.601 luma, full range */
            d[x] = (uint8_t)((77u * s[ri] + 150u * s[1] + 29u * s[bi] + 128u) >> 8);
    }
}

static void copy_rows(uint8_t *dst, const uint8_t *src, size_t row, size_t rows, size_t bpl)
{
    if (bpl == row) {
        memcpy(dst, src, row * rows);
        return;
    }
    for (size_t y = 0; y < rows; y++)
        memcpy(dst + y * row, src + y * bpl, row);
}

/* Converts/copies buffer idx into dst; returns bytes written or a negative code. */
static long convert_into(fshm_v4l2_cam *c, uint32_t idx, uint8_t *dst, size_t cap)
{
    cam_buf *cb = &c->bufs[idx];
    const uint8_t *src = cb->start;
    size_t used = cb->vb.bytesused < cb->length ? cb->vb.bytesused : cb->length;
    uint32_t w = c->fmt.width, h = c->fmt.height, bpl = c->native.fmt.pix.bytesperline;
    const fmt_info *fi = c->nfi;
    size_t out = c->fmt.frame_bytes;
    if (c->fmt.compressed)
        out = used;
    if (cap < out)
        return fshm_set_error(-ENOSPC, "a %zu-byte frame does not fit in %zu bytes", out, cap);
    switch (c->conv) {
    case CONV_COPY:
        switch (fi->kind) {
        case FK_PACKED: copy_rows(dst, src, (size_t)w * fi->bpp, h, bpl); break;
        case FK_NV: copy_rows(dst, src, w, (size_t)h * 3 / 2, bpl); break;
        case FK_YUV420:
            copy_rows(dst, src, w, h, bpl);
            copy_rows(dst + (size_t)w * h, src + (size_t)bpl * h, w / 2, h, bpl / 2);   /* U then V, h/2 rows each */
            break;
        default: memcpy(dst, src, out); break;
        }
        break;
    case CONV_GREY_PACKED: grey_packed(dst, src, w, h, bpl, c->luma_off); break;
    case CONV_GREY_RGB: grey_rgb(dst, src, w, h, bpl, c->luma_off); break;
    case CONV_GREY_PLANAR: copy_rows(dst, src, w, h, bpl); break;
#ifdef FSHM_HAVE_LIBV4L2
    case CONV_LIBV4L: {
        int n = v4lconvert_convert(c->cv, &c->cv_src, &c->cv_dst, (unsigned char *)src, (int)used, dst, (int)cap);
        if (n < 0)
            return fshm_set_error(-EIO, "libv4lconvert: %s", v4lconvert_get_error_message(c->cv));
        out = (size_t)n < out ? (size_t)n : out;
        break;
    }
    case CONV_LIBV4L_GREY: {
        int n = v4lconvert_convert(c->cv, &c->cv_src, &c->cv_dst, (unsigned char *)src, (int)used, c->scratch,
                                   (int)c->scratch_len);
        if (n < 0)
            return fshm_set_error(-EIO, "libv4lconvert: %s", v4lconvert_get_error_message(c->cv));
        memcpy(dst, c->scratch, (size_t)w * h);
        break;
    }
#else
    default: return fshm_set_error(FSHM_E_V4L2_NOLIB, NOLIB_MSG);
#endif
    }
    return (long)out;
}

static void fill_info(const fshm_v4l2_cam *c, uint32_t idx, const void *data, size_t bytes, uint32_t bpl,
                      fshm_v4l2_buf *o)
{
    const cam_buf *cb = &c->bufs[idx];
    o->index = idx;
    o->data = data;
    o->bytesused = bytes;
    o->bytesperline = bpl;
    o->timestamp_ns = cb->ts_ns;
    o->dequeue_ns = fshm_now_ns();
    o->sequence = cb->vb.sequence;
    o->flags = cb->vb.flags;
    o->driver_timestamp = cb->driver_ts;
}

static int requeue_idle(fshm_v4l2_cam *c, uint32_t idx)
{
    pthread_mutex_lock(&c->lock);
    int rc = c->streaming ? queue_locked(c, idx) : 0;
    pthread_mutex_unlock(&c->lock);
    return rc ? ioctl_error(c, rc, "VIDIOC_QBUF") : 0;
}

/* A frame whose conversion failed is skipped like an errored buffer, unless every frame
 * fails: then the error is returned. */
#define MAX_BAD_IN_A_ROW 8

int fshm_v4l2_dequeue(fshm_v4l2_cam *c, int64_t timeout_ns, fshm_v4l2_buf *out)
{
    for (;;) {
        uint32_t idx;
        int rc = next_frame(c, timeout_ns, &idx);
        if (rc)
            return rc;
        cam_buf *cb = &c->bufs[idx];
        if (c->conv == CONV_COPY) {
            size_t used = cb->vb.bytesused < cb->length ? cb->vb.bytesused : cb->length;
            fill_info(c, idx, cb->start, c->fmt.compressed ? used : native_frame_bytes(c),
                      c->fmt.bytesperline, out);
        } else {
            long n = convert_into(c, idx, cb->conv, c->fmt.frame_bytes);
            if (n < 0) {
                c->stats.errors++;
                if ((rc = requeue_idle(c, idx)))
                    return rc;
                if (++c->bad_in_a_row >= MAX_BAD_IN_A_ROW)
                    return (int)n;
                continue;
            }
            fill_info(c, idx, cb->conv, (size_t)n, c->fmt.bytesperline, out);
        }
        c->bad_in_a_row = 0;
        pthread_mutex_lock(&c->lock);
        cb->state = BUF_HELD;
        c->held++;
        pthread_mutex_unlock(&c->lock);
        c->stats.delivered++;
        return 0;
    }
}

int fshm_v4l2_wait(fshm_v4l2_cam *c, int64_t timeout_ns)
{
    uint32_t idx;
    int rc = next_frame(c, timeout_ns, &idx);
    if (rc)
        return rc;
    cam_buf *cb = &c->bufs[idx];
    size_t used = cb->vb.bytesused < cb->length ? cb->vb.bytesused : cb->length;
    /* Back to the front of the FIFO: the next delivery takes exactly this frame (and the
     * rate limit, already applied, is not applied twice). */
    pthread_mutex_lock(&c->lock);
    c->ready_head = (c->ready_head + FSHM_V4L2_MAX_BUFFERS - 1) % FSHM_V4L2_MAX_BUFFERS;
    c->ready[c->ready_head] = idx;
    c->ready_count++;
    cb->state = BUF_READY;
    pthread_mutex_unlock(&c->lock);
    return (int)(c->fmt.compressed ? used : c->fmt.frame_bytes);
}

int fshm_v4l2_requeue(fshm_v4l2_cam *c, uint32_t index)
{
    pthread_mutex_lock(&c->lock);
    if (index >= c->nbufs || c->bufs[index].state != BUF_HELD) {
        pthread_mutex_unlock(&c->lock);
        return fshm_set_error(-EINVAL, "buffer %u of %s is not held by the application", index, c->path);
    }
    c->held--;
    int rc = 0;
    if (c->streaming && !c->gone)
        rc = queue_locked(c, index);
    else
        c->bufs[index].state = BUF_IDLE;
    pthread_mutex_unlock(&c->lock);
    if (rc) {
        c->bufs[index].state = BUF_IDLE;
        return ioctl_error(c, rc, "VIDIOC_QBUF");
    }
    return 0;
}

unsigned fshm_v4l2_held(const fshm_v4l2_cam *c) { return c->held; }

int fshm_v4l2_read_into(fshm_v4l2_cam *c, int64_t timeout_ns, void *dst, size_t capacity, fshm_v4l2_buf *info)
{
    if (c->started && !c->fmt.compressed && capacity < c->fmt.frame_bytes)
        return fshm_set_error(-EINVAL, "destination of %zu bytes; frames are %u bytes", capacity, c->fmt.frame_bytes);
    for (;;) {
        uint32_t idx;
        int rc = next_frame(c, timeout_ns, &idx);
        if (rc)
            return rc;
        long n = convert_into(c, idx, dst, capacity);
        if (info && n >= 0)
            fill_info(c, idx, dst, (size_t)n, c->fmt.bytesperline, info);
        if ((rc = requeue_idle(c, idx)))
            return rc;
        if (n < 0) {
            c->stats.errors++;
            if (n == -ENOSPC || ++c->bad_in_a_row >= MAX_BAD_IN_A_ROW)
                return (int)n;
            continue;
        }
        c->bad_in_a_row = 0;
        c->stats.delivered++;
        return 0;
    }
}

int fshm_v4l2_capture(fshm_v4l2_cam *c, fshm_writer *w, int64_t timeout_ns, const fshm_tensor *t, uint64_t *seq_out,
                      fshm_v4l2_buf *info)
{
    for (;;) {
        uint32_t idx;
        int rc = next_frame(c, timeout_ns, &idx);
        if (rc)
            return rc;
        cam_buf *cb = &c->bufs[idx];
        size_t need = c->fmt.compressed ? (cb->vb.bytesused < cb->length ? cb->vb.bytesused : cb->length)
                                        : c->fmt.frame_bytes;
        fshm_loan loan;
        rc = fshm_writer_loan(w, need, &loan);
        if (rc) {
            int rc2 = requeue_idle(c, idx);
            return rc2 ? rc2 : rc;
        }
        long n = convert_into(c, idx, loan.data, loan.capacity);
        uint64_t ts = cb->ts_ns;
        if (info && n >= 0)
            fill_info(c, idx, loan.data, (size_t)n, c->fmt.bytesperline, info);
        /* The driver gets its buffer back before the commit: the data is in the slot. */
        if ((rc = requeue_idle(c, idx)))
            return rc;
        if (n < 0) {
            /* The loan is abandoned (the next loan takes a fresh slot). */
            c->stats.errors++;
            if (++c->bad_in_a_row >= MAX_BAD_IN_A_ROW)
                return (int)n;
            continue;
        }
        c->bad_in_a_row = 0;
        fshm_tensor tt = t ? *t : c->fmt.tensor;
        if (!t && tt.ndims == 1)
            tt.dims[0] = (int32_t)n;
        if ((rc = fshm_writer_commit(w, &tt, (size_t)n, ts)))
            return rc;
        if (seq_out)
            *seq_out = loan.seq;
        c->stats.delivered++;
        return 0;
    }
}

int fshm_v4l2_flush(fshm_v4l2_cam *c, uint64_t max_age_ns)
{
    if (c->gone)
        return gone_error(c);
    if (!c->streaming)
        return 0;
    uint64_t now = fshm_now_ns();
    int discarded = 0, rc = 0;
    uint32_t keep[FSHM_V4L2_MAX_BUFFERS];
    unsigned nkeep = 0;
    pthread_mutex_lock(&c->lock);
    /* Frames kept by an earlier flush come first: they are older. */
    while (c->ready_count) {
        uint32_t i = c->ready[c->ready_head];
        c->ready_head = (c->ready_head + 1) % FSHM_V4L2_MAX_BUFFERS;
        c->ready_count--;
        keep[nkeep++] = i;
    }
    int dq_err = 0;
    for (;;) {
        struct v4l2_buffer b;
        rc = dq_locked(c, &b);
        if (rc)
            break;
        keep[nkeep++] = b.index;
        c->bufs[b.index].state = BUF_READY;
    }
    if (rc != -EAGAIN)
        dq_err = rc;
    rc = 0;
    c->ready_head = 0;
    for (unsigned k = 0; k < nkeep; k++) {
        cam_buf *cb = &c->bufs[keep[k]];
        if (cb->ts_ns + max_age_ns < now && !rc && !dq_err) {
            int q = queue_locked(c, keep[k]);
            if (q) {
                rc = q;
                cb->state = BUF_IDLE;
                continue;
            }
            discarded++;
        } else {
            cb->state = BUF_READY;
            c->ready[c->ready_count++] = keep[k];
        }
    }
    c->stats.flushed += (uint64_t)discarded;
    pthread_mutex_unlock(&c->lock);
    if (dq_err)
        return dqbuf_error(c, dq_err);
    if (rc)
        return ioctl_error(c, rc, "VIDIOC_QBUF");
    return discarded;
}

void fshm_v4l2_get_stats(const fshm_v4l2_cam *c, fshm_v4l2_stats *out) { *out = c->stats; }

int fshm_v4l2_stop(fshm_v4l2_cam *c)
{
    pthread_mutex_lock(&c->lock);
    int rc = c->gone ? 0 : streamoff_locked(c);
    c->streaming = 0;
    c->ready_count = 0;
    for (uint32_t i = 0; i < c->nbufs; i++)
        if (c->bufs[i].state == BUF_READY || c->bufs[i].state == BUF_QUEUED)
            c->bufs[i].state = BUF_IDLE;
    pthread_mutex_unlock(&c->lock);
    if (rc == -ENODEV || rc == -ENXIO)
        return 0;   /* gone: streaming is over anyway */
    return rc ? ioctl_error(c, rc, "VIDIOC_STREAMOFF") : 0;
}

int fshm_v4l2_gone(const fshm_v4l2_cam *c) { return c->gone; }

void fshm_v4l2_close(fshm_v4l2_cam *c)
{
    if (!c)
        return;
    fshm_v4l2_stop(c);
    release_buffers(c);
#ifdef FSHM_HAVE_LIBV4L2
    if (c->cv)
        v4lconvert_destroy(c->cv);
#endif
    c->be->close(c->be->ctx, c->fd);
    pthread_mutex_destroy(&c->lock);
    free(c);
}
