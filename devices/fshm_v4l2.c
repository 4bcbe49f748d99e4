/* V4L2 capture (see fshm_v4l2.h): the device, its backends (libv4l2, the test hooks), start
 * and stop, rate control and the mmap buffers. Formats and negotiation are in
 * fshm_v4l2_format.c, frame delivery (zero-copy, one-copy, flush) in fshm_v4l2_frames.c.
 *
 * Buffer life cycle: QUEUED (owned by the driver) -> dequeued -> one of
 *   HELD   handed to the application (zero-copy); back to QUEUED on fshm_v4l2_requeue,
 *   READY  kept by fshm_v4l2_flush for the next delivery (it was young enough),
 *   or requeued at once (one-copy paths, dropped frames).
 * The per-camera mutex guards buffer states and QBUF/DQBUF so that a frame released on
 * another thread can be requeued while this thread sleeps in poll(). */
#include "fshm_v4l2_impl.h"

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

int cam_ioctl(fshm_v4l2_cam *c, unsigned long req, void *arg)
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
int cam_ioctl_error(fshm_v4l2_cam *c, int rc, const char *what)
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
int cam_dqbuf_error(fshm_v4l2_cam *c, int rc)
{
    if (rc == -EINVAL && c->started) {
        c->gone = 1;
        return fshm_set_error(-ENODEV,
                              "camera %s stopped streaming by itself (VIDIOC_DQBUF: EINVAL): the device "
                              "or its PipeWire node went away; close it and open it again once it is back",
                              c->path);
    }
    return cam_ioctl_error(c, rc, "VIDIOC_DQBUF");
}

int cam_gone_error(fshm_v4l2_cam *c)
{
    return fshm_set_error(-ENODEV, "camera %s is gone (ENODEV earlier): close it and open it again",
                          c->path);
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
    rc = cam_ioctl(c, VIDIOC_QUERYCAP, &cap);
    if (rc) {
        if (rc == -ENOTTY || rc == -EINVAL)
            rc = fshm_set_error(-ENOTTY, "%s is not a V4L2 device (VIDIOC_QUERYCAP: %s)", path, strerror(-rc));
        else
            rc = cam_ioctl_error(c, rc, "VIDIOC_QUERYCAP");
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

static int get_parm(fshm_v4l2_cam *c, struct v4l2_streamparm *p)
{
    memset(p, 0, sizeof *p);
    p->type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    return cam_ioctl(c, VIDIOC_G_PARM, p);
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
int cam_queue_locked(fshm_v4l2_cam *c, uint32_t i);

/* VIDIOC_S_PARM while streaming is refused (EBUSY) by many drivers (uvcvideo): stop,
 * set, requeue what the driver owned, restart. Held buffers stay with the application. */
static int s_parm(fshm_v4l2_cam *c, struct v4l2_streamparm *p)
{
    int rc = cam_ioctl(c, VIDIOC_S_PARM, p);
    if (rc != -EBUSY || !c->streaming)
        return rc;
    pthread_mutex_lock(&c->lock);
    rc = streamoff_locked(c);
    if (!rc)
        rc = cam_ioctl(c, VIDIOC_S_PARM, p);
    int rc2 = 0;
    for (uint32_t i = 0; i < c->nbufs && !rc2; i++)
        if (c->bufs[i].state == BUF_IDLE || c->bufs[i].state == BUF_READY)
            rc2 = cam_queue_locked(c, i);
    c->ready_count = 0;
    if (!rc2) {
        int t = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        rc2 = cam_ioctl(c, VIDIOC_STREAMON, &t);
        if (!rc2)
            c->streaming = 1;
    }
    pthread_mutex_unlock(&c->lock);
    if (rc2)
        return cam_ioctl_error(c, rc2, "restarting the stream after VIDIOC_S_PARM");
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
        cam_ioctl(c, VIDIOC_REQBUFS, &rb);   /* best effort: frees the driver's buffers */
    }
}

int cam_queue_locked(fshm_v4l2_cam *c, uint32_t i)
{
    struct v4l2_buffer b;
    memset(&b, 0, sizeof b);
    b.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    b.memory = V4L2_MEMORY_MMAP;
    b.index = i;
    int rc = cam_ioctl(c, VIDIOC_QBUF, &b);
    if (rc)
        return rc;
    c->bufs[i].state = BUF_QUEUED;
    return 0;
}

int fshm_v4l2_start(fshm_v4l2_cam *c, const fshm_v4l2_request *req)
{
    if (c->gone)
        return cam_gone_error(c);
    if (c->started)
        return fshm_set_error(-EINVAL, "camera %s is already started", c->path);
    char text[512];
    struct v4l2_format cur;
    memset(&cur, 0, sizeof cur);
    cur.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    int rc = cam_ioctl(c, VIDIOC_G_FMT, &cur);
    if (rc)
        return cam_ioctl_error(c, rc, "VIDIOC_G_FMT");
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
    int nn = cam_native_formats(c, nat, MAX_FMTS);
    memset(&c->fmt, 0, sizeof c->fmt);
    c->conv = CONV_COPY;
    if (cam_is_native(nat, nn, want) || (nn == 0 && !req->fourcc)) {
        rc = cam_set_native_format(c, want, w, h, exact, want);
        if (rc)
            return rc;
    } else if (want == FCC_GREY && cam_grey_source(nat, nn)) {
        /* GRAY8 from the first luma-carrying native format that offers the size. */
        rc = FSHM_E_V4L2_UNSUPPORTED;
        for (size_t k = 0; k < cam_n_grey_sources && rc; k++) {
            if (!cam_is_native(nat, nn, cam_grey_sources[k]))
                continue;
            rc = cam_set_native_format(c, cam_grey_sources[k], w, h, exact, want);
            if (rc == -ENODEV || rc == -EBUSY)
                return rc;
        }
        if (rc)
            return rc;
        const fmt_info *src = cam_fmt_lookup(c->native.fmt.pix.pixelformat);
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
            cam_formats_text(c, text, sizeof text);
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s cannot deliver %s; it offers: %s", c->path,
                                  fshm_v4l2_fourcc_str(want), text);
        }
        if (exact && (dst.fmt.pix.width != w || dst.fmt.pix.height != h)) {
            cam_sizes_text(c, want, text, sizeof text);
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s cannot deliver %s at %ux%u; sizes: %s", c->path,
                                  fshm_v4l2_fourcc_str(want), w, h, text);
        }
        rc = cam_set_native_format(c, src.fmt.pix.pixelformat, src.fmt.pix.width, src.fmt.pix.height, 1, want);
        if (rc)
            return rc;
        c->cv_dst = dst;
        c->conv = grey ? CONV_LIBV4L_GREY : CONV_LIBV4L;
        w = dst.fmt.pix.width;
        h = dst.fmt.pix.height;
#else
        cam_formats_text(c, text, sizeof text);
        int convertible = 0;
        for (size_t k = 0; k < cam_n_converted; k++)
            convertible |= cam_converted[k] == want;
        if (convertible)
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s: converting to %s needs libv4l2; %s. The device offers: %s",
                                  c->path, fshm_v4l2_fourcc_str(want), NOLIB_MSG, text);
        return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s cannot deliver %s; it offers: %s", c->path,
                              fshm_v4l2_fourcc_str(want), text);
#endif
    }
    c->nfi = cam_fmt_lookup(c->native.fmt.pix.pixelformat);
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
    rc = cam_ioctl(c, VIDIOC_REQBUFS, &rb);
    if (rc)
        return cam_ioctl_error(c, rc, "VIDIOC_REQBUFS");
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
        rc = cam_ioctl(c, VIDIOC_QUERYBUF, &b);
        if (rc) {
            rc = cam_ioctl_error(c, rc, "VIDIOC_QUERYBUF");
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
    if ((rc = cam_layout(c, min_len)))
        goto fail;
    if ((rc = cam_out_tensor(c, want, min_len)))
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
        rc = cam_queue_locked(c, i);
    pthread_mutex_unlock(&c->lock);
    if (rc) {
        rc = cam_ioctl_error(c, rc, "VIDIOC_QBUF");
        goto fail;
    }
    int type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    rc = cam_ioctl(c, VIDIOC_STREAMON, &type);
    if (rc) {
        rc = cam_ioctl_error(c, rc, "VIDIOC_STREAMON");
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
        return cam_gone_error(c);
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

/* ---- streaming ---- */

static int streamoff_locked(fshm_v4l2_cam *c)
{
    if (!c->streaming)
        return 0;
    int type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    int rc = cam_ioctl(c, VIDIOC_STREAMOFF, &type);
    c->streaming = 0;
    /* STREAMOFF returns every buffer to the application. */
    for (uint32_t i = 0; i < c->nbufs; i++)
        if (c->bufs[i].state == BUF_QUEUED)
            c->bufs[i].state = BUF_IDLE;
    return rc;
}

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
    return rc ? cam_ioctl_error(c, rc, "VIDIOC_STREAMOFF") : 0;
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
