/* GigE Vision capture through Aravis (see fshm_gige.h).
 *
 * Buffers: a pool of nbuffers Aravis buffers of the camera's payload size lives in the
 * Aravis stream (its receiving thread fills them). A delivery pops one, copies the image
 * once into the caller's destination (a stream slot) and pushes it back at once. Frames
 * popped by fshm_gige_wait/fshm_gige_flush that are still to be delivered wait in a small
 * FIFO of our own, ahead of the stream's output queue.
 *
 * Lost frames: every buffer Aravis returns is accounted once, when it is popped
 * (fshm_gige_loss, below: pure, so that it is tested without a camera). */
#include <frameshm/frameshm.h>
#include "fshm_gige.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOLIB_MSG \
    "frameshm was built without Aravis: apt-get install libaravis-dev libusb-1.0-0-dev and reinstall"

/* ---- lost-frame accounting ---- */

#define GV_ID16_MAX 0xffffu

int64_t fshm_gige_ids_between(uint64_t prev, uint64_t id)
{
    if (!prev || !id)
        return -1;
    uint64_t step;
    if (prev <= GV_ID16_MAX && id <= GV_ID16_MAX)
        /* 16-bit block ids cycle through 1..65535 (0 is not a frame id) */
        step = ((id - 1) + GV_ID16_MAX - (prev - 1)) % GV_ID16_MAX;
    else
        step = id > prev ? id - prev : 0;
    if (step == 0 || step > FSHM_GIGE_MAX_ID_STEP)
        return -1;
    return (int64_t)step - 1;
}

uint64_t fshm_gige_loss_account(fshm_gige_loss *l, int complete, uint64_t frame_id)
{
    if (!complete) {
        /* its frame id may be the buffer's previous frame's: it says nothing */
        l->incomplete++;
        l->incomplete_run++;
        return 1;
    }
    uint64_t gaps = 0;
    if (l->last_id) {
        int64_t between = fshm_gige_ids_between(l->last_id, frame_id);
        if (between < 0)
            l->resyncs++;
        else if ((uint64_t)between > l->incomplete_run)
            gaps = (uint64_t)between - l->incomplete_run;
    }
    l->id_gaps += gaps;
    l->incomplete_run = 0;
    l->last_id = frame_id;   /* 0 (no id): the next complete frame starts afresh */
    return gaps;
}

#ifndef FSHM_HAVE_ARAVIS

int fshm_gige_have_aravis(void) { return 0; }
int fshm_gige_open(const char *id, fshm_gige_cam **out)
{
    (void)id;
    if (out)
        *out = NULL;
    return fshm_set_error(FSHM_E_GIGE_NOLIB, NOLIB_MSG);
}
void fshm_gige_get_info(const fshm_gige_cam *c, fshm_gige_info *out) { (void)c; memset(out, 0, sizeof *out); }
int fshm_gige_start(fshm_gige_cam *c, const fshm_gige_request *r) { (void)c; (void)r; return fshm_set_error(FSHM_E_GIGE_NOLIB, NOLIB_MSG); }
void fshm_gige_get_format(const fshm_gige_cam *c, fshm_gige_format *out) { (void)c; memset(out, 0, sizeof *out); }
int fshm_gige_set_rate(fshm_gige_cam *c, double f) { (void)c; (void)f; return fshm_set_error(FSHM_E_GIGE_NOLIB, NOLIB_MSG); }
int fshm_gige_read_into(fshm_gige_cam *c, int64_t t, void *d, size_t n, fshm_gige_frame *i)
{
    (void)c; (void)t; (void)d; (void)n; (void)i;
    return fshm_set_error(FSHM_E_GIGE_NOLIB, NOLIB_MSG);
}
int fshm_gige_wait(fshm_gige_cam *c, int64_t t) { (void)c; (void)t; return fshm_set_error(FSHM_E_GIGE_NOLIB, NOLIB_MSG); }
int fshm_gige_capture(fshm_gige_cam *c, fshm_writer *w, int64_t t, const fshm_tensor *tt, uint64_t *s,
                      fshm_gige_frame *i)
{
    (void)c; (void)w; (void)t; (void)tt; (void)s; (void)i;
    return fshm_set_error(FSHM_E_GIGE_NOLIB, NOLIB_MSG);
}
int fshm_gige_flush(fshm_gige_cam *c, uint64_t a) { (void)c; (void)a; return fshm_set_error(FSHM_E_GIGE_NOLIB, NOLIB_MSG); }
int fshm_gige_probe(fshm_gige_cam *c) { (void)c; return fshm_set_error(FSHM_E_GIGE_NOLIB, NOLIB_MSG); }
void fshm_gige_get_stats(const fshm_gige_cam *c, fshm_gige_stats *out) { (void)c; memset(out, 0, sizeof *out); }
int fshm_gige_stop(fshm_gige_cam *c) { (void)c; return 0; }
int fshm_gige_gone(const fshm_gige_cam *c) { (void)c; return 0; }
void fshm_gige_close(fshm_gige_cam *c) { (void)c; }

#else /* FSHM_HAVE_ARAVIS */

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <arv.h>

#define GVBS_CCP 0x0a00u          /* GigE Vision control channel privilege register */
#define GVBS_CCP_CONTROL 0x2u
#define GVBS_CCP_EXCLUSIVE 0x1u
#define GVCP_PORT 3956
#define POP_SLICE_US 100000ull    /* a wait notices control-lost within this */

struct fshm_gige_cam {
    ArvCamera *cam;
    ArvDevice *dev;               /* borrowed from cam */
    ArvStream *stream;
    gulong lost_handler;
    int is_gv;
    volatile int gone;            /* set by the heartbeat thread (control-lost) or a probe */
    fshm_gige_info info;
    fshm_gige_format fmt;
    int started;
    double start_fps;             /* rate asked at start (0: none) */
    ArvBuffer *ready[FSHM_GIGE_MAX_BUFFERS];
    unsigned ready_head, ready_count;
    fshm_gige_loss loss;          /* id_gaps, incomplete; the id sequence since start */
    uint32_t pending_lost;        /* lost since the last delivery */
    uint64_t last_activity_ns;    /* last buffer from the camera, or start */
    uint64_t last_probe_ns;
    fshm_gige_stats stats;
    uint64_t base_underruns, base_resent, base_missing;  /* from streams already dropped */
};

int fshm_gige_have_aravis(void) { return 1; }

static int gerror_code(const GError *e, int fallback)
{
    if (e && e->domain == ARV_DEVICE_ERROR) {
        switch (e->code) {
        case ARV_DEVICE_ERROR_NOT_FOUND: return -ENOENT;
        case ARV_DEVICE_ERROR_NOT_CONTROLLER:
        case ARV_DEVICE_ERROR_PROTOCOL_ERROR_ACCESS_DENIED:
        case ARV_DEVICE_ERROR_PROTOCOL_ERROR_BUSY: return -EBUSY;
        case ARV_DEVICE_ERROR_TIMEOUT:
        case ARV_DEVICE_ERROR_NOT_CONNECTED:
        case ARV_DEVICE_ERROR_TRANSFER_ERROR: return fallback == -ENOENT ? -ENOENT : -ENODEV;
        default: break;
        }
    }
    return fallback;
}

/* Sets the error from a GError (freed) and returns the code. */
static int gerr(GError **e, int code, const char *what)
{
    int rc = fshm_set_error(code, "%s: %s", what, *e ? (*e)->message : "unknown Aravis error");
    g_clear_error(e);
    return rc;
}

static void on_control_lost(ArvDevice *dev, gpointer data)
{
    (void)dev;
    fshm_gige_cam *c = data;
    __atomic_store_n(&c->gone, 1, __ATOMIC_RELEASE);
}

static int is_gone(const fshm_gige_cam *c) { return __atomic_load_n(&c->gone, __ATOMIC_ACQUIRE); }

static int gone_error(const fshm_gige_cam *c)
{
    return fshm_set_error(-ENODEV, "GigE camera %s is gone (control lost: disconnected, restarted or taken over)",
                          c->info.id);
}

/* Local address the kernel would use to reach ip (no packet is sent). */
static int local_addr_for(const char *ip, char *out, size_t n)
{
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(GVCP_PORT)};
    if (inet_pton(AF_INET, ip, &dst.sin_addr) != 1)
        return -EINVAL;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    struct sockaddr_in me;
    socklen_t len = sizeof me;
    int rc = 0;
    if (connect(s, (struct sockaddr *)&dst, sizeof dst) || getsockname(s, (struct sockaddr *)&me, &len))
        rc = -errno;
    close(s);
    if (!rc && !inet_ntop(AF_INET, &me.sin_addr, out, (socklen_t)n))
        rc = -errno;
    return rc;
}

static void copy_str(char *dst, size_t n, const char *src)
{
    snprintf(dst, n, "%s", src ? src : "");
}

int fshm_gige_open(const char *id, fshm_gige_cam **out)
{
    *out = NULL;
    if (!id || !*id)
        return fshm_set_error(-EINVAL,
                              "a GigE camera id is required (IP address, camera name or Fake_1); frameshm "
                              "does not open 'the first camera found', which would broadcast discovery");
    GError *e = NULL;
    ArvCamera *cam = NULL;
    struct in_addr a4;
    const char *protocol = "";
    char address[64] = "";
    if (strncmp(id, "Fake_", 5) == 0 && id[5]) {
        /* Aravis' fake interface names its camera Fake_<serial>: open it directly, so no
         * other interface (and no discovery) is involved. */
        ArvDevice *dev = arv_fake_device_new(id + 5, &e);
        if (dev) {
            cam = arv_camera_new_with_device(dev, &e);
            g_object_unref(dev);
        }
        protocol = "Fake";
    } else if (inet_pton(AF_INET, id, &a4) == 1) {
        char local[64];
        int rc = local_addr_for(id, local, sizeof local);
        if (rc)
            return fshm_set_error(rc == -ENETUNREACH ? -ENOENT : rc, "no route to GigE camera %s: %s", id,
                                  strerror(-rc));
        GInetAddress *ia = g_inet_address_new_from_string(local), *da = g_inet_address_new_from_string(id);
        ArvDevice *dev = arv_gv_device_new(ia, da, &e);
        g_object_unref(ia);
        g_object_unref(da);
        if (dev) {
            cam = arv_camera_new_with_device(dev, &e);
            g_object_unref(dev);
        }
        protocol = "GigEVision";
        copy_str(address, sizeof address, id);
    } else {
        cam = arv_camera_new(id, &e);
    }
    if (!cam) {
        int code = gerror_code(e, -ENOENT);
        if (code == -ENODEV)
            code = -ENOENT;
        return gerr(&e, code, id);
    }
    fshm_gige_cam *c = calloc(1, sizeof *c);
    if (!c) {
        g_object_unref(cam);
        return fshm_set_error(-ENOMEM, "out of memory");
    }
    c->cam = cam;
    c->dev = arv_camera_get_device(cam);
    c->is_gv = arv_camera_is_gv_device(cam);
    if (!*protocol)
        protocol = c->is_gv ? "GigEVision" : arv_camera_is_uv_device(cam) ? "USB3Vision" : "other";
    copy_str(c->info.id, sizeof c->info.id, id);
    copy_str(c->info.protocol, sizeof c->info.protocol, protocol);
    copy_str(c->info.address, sizeof c->info.address, address);
    copy_str(c->info.vendor, sizeof c->info.vendor, arv_camera_get_vendor_name(cam, NULL));
    copy_str(c->info.model, sizeof c->info.model, arv_camera_get_model_name(cam, NULL));
    copy_str(c->info.serial, sizeof c->info.serial, arv_camera_get_device_serial_number(cam, NULL));
    copy_str(c->info.device_id, sizeof c->info.device_id, arv_camera_get_device_id(cam, NULL));
    if (c->is_gv && !*c->info.address) {
        GSocketAddress *sa = arv_gv_device_get_device_address(ARV_GV_DEVICE(c->dev));
        if (sa && G_IS_INET_SOCKET_ADDRESS(sa)) {
            gchar *s = g_inet_address_to_string(g_inet_socket_address_get_address(G_INET_SOCKET_ADDRESS(sa)));
            copy_str(c->info.address, sizeof c->info.address, s);
            g_free(s);
        }
    }
    c->lost_handler = g_signal_connect(c->dev, "control-lost", G_CALLBACK(on_control_lost), c);
    *out = c;
    return 0;
}

void fshm_gige_get_info(const fshm_gige_cam *c, fshm_gige_info *out) { *out = c->info; }

/* ---- stream set-up ---- */

static void ready_drain(fshm_gige_cam *c)
{
    while (c->ready_count) {
        ArvBuffer *b = c->ready[c->ready_head];
        c->ready_head = (c->ready_head + 1) % FSHM_GIGE_MAX_BUFFERS;
        c->ready_count--;
        if (c->stream)
            arv_stream_push_buffer(c->stream, b);
        else
            g_object_unref(b);
    }
    c->ready_head = 0;
}

static uint64_t stream_info_u64(ArvStream *s, const char *name)
{
    guint n = arv_stream_get_n_infos(s);
    for (guint i = 0; i < n; i++) {
        const char *nm = arv_stream_get_info_name(s, i);
        if (nm && strcmp(nm, name) == 0 && arv_stream_get_info_type(s, i) == G_TYPE_UINT64)
            return arv_stream_get_info_uint64(s, i);
    }
    return 0;
}

static void stream_counters(ArvStream *s, uint64_t *underruns, uint64_t *resent, uint64_t *missing)
{
    guint64 done = 0, fail = 0, under = 0;
    arv_stream_get_statistics(s, &done, &fail, &under);
    *underruns = under;
    *resent = stream_info_u64(s, "n_resent_packets");
    *missing = stream_info_u64(s, "n_missing_packets");
}

static void drop_stream(fshm_gige_cam *c)
{
    if (!c->stream)
        return;
    ready_drain(c);
    uint64_t u, r, m;
    stream_counters(c->stream, &u, &r, &m);
    c->base_underruns += u;
    c->base_resent += r;
    c->base_missing += m;
    g_object_unref(c->stream);   /* stops its thread and frees the pool */
    c->stream = NULL;
}

int fshm_gige_stop(fshm_gige_cam *c)
{
    int rc = 0;
    if (c->started && !is_gone(c)) {
        GError *e = NULL;
        arv_camera_stop_acquisition(c->cam, &e);
        if (e)
            rc = gerr(&e, gerror_code(e, FSHM_E_GIGE_ARAVIS), "AcquisitionStop");
    }
    drop_stream(c);
    c->started = 0;
    return rc == -ENODEV ? 0 : rc;
}

static int dtype_layout(fshm_gige_format *f)
{
    fshm_tensor *t = &f->tensor;
    memset(t, 0, sizeof *t);
    t->ndims = 2;
    t->dims[0] = (int32_t)f->height;
    t->dims[1] = (int32_t)f->width;
    switch (f->bits_per_pixel) {
    case 8: t->dtype = FSHM_DTYPE_UINT8; break;
    case 16: t->dtype = FSHM_DTYPE_UINT16; break;
    case 24: t->dtype = FSHM_DTYPE_UINT8; t->ndims = 3; t->dims[2] = 3; break;
    case 32: t->dtype = FSHM_DTYPE_UINT8; t->ndims = 3; t->dims[2] = 4; break;
    default:
        return fshm_set_error(FSHM_E_GIGE_UNSUPPORTED,
                              "pixel format %s (%u bits per pixel, packed) is not supported: use Mono8, Mono16, "
                              "RGB8 or Bayer*8",
                              f->pixel_format, f->bits_per_pixel);
    }
    f->frame_bytes = f->width * f->height * (f->bits_per_pixel / 8);
    return 0;
}

static int set_format(fshm_gige_cam *c, const char *pf)
{
    GError *e = NULL;
    arv_camera_set_pixel_format_from_string(c->cam, pf, &e);
    if (!e) {
        const char *now = arv_camera_get_pixel_format_as_string(c->cam, &e);
        if (!e && now && strcmp(now, pf) == 0)
            return 0;
    }
    g_clear_error(&e);
    guint n = 0;
    const char **avail = arv_camera_dup_available_pixel_formats_as_strings(c->cam, &n, NULL);
    char list[512] = "";
    size_t len = 0;
    for (guint i = 0; avail && i < n && len < sizeof list - 2; i++)
        len += (size_t)snprintf(list + len, sizeof list - len, "%s%s", i ? ", " : "", avail[i]);
    g_free(avail);
    return fshm_set_error(FSHM_E_GIGE_UNSUPPORTED, "camera %s does not offer pixel format %s; it offers: %s",
                          c->info.id, pf, *list ? list : "?");
}

static int apply_rate(fshm_gige_cam *c, double fps)
{
    GError *e = NULL;
    c->fmt.frame_rate_available = arv_camera_is_frame_rate_available(c->cam, NULL) ? 1 : 0;
    if (fps > 0 && c->fmt.frame_rate_available) {
        double lo = 0, hi = 0;
        arv_camera_get_frame_rate_bounds(c->cam, &lo, &hi, NULL);
        if (hi > 0 && (fps < lo || fps > hi))
            return fshm_set_error(FSHM_E_GIGE_UNSUPPORTED, "camera %s: %g fps is outside its range %g..%g",
                                  c->info.id, fps, lo, hi);
        arv_camera_set_frame_rate(c->cam, fps, &e);
        if (e)
            return gerr(&e, is_gone(c) ? -ENODEV : gerror_code(e, FSHM_E_GIGE_UNSUPPORTED), "AcquisitionFrameRate");
    }
    c->fmt.fps = c->fmt.frame_rate_available ? arv_camera_get_frame_rate(c->cam, NULL) : 0;
    return c->fmt.frame_rate_available;
}

int fshm_gige_start(fshm_gige_cam *c, const fshm_gige_request *req)
{
    if (is_gone(c))
        return gone_error(c);
    int rc = fshm_gige_stop(c);
    if (rc)
        return rc;
    fshm_gige_request r = *req;
    if (!r.nbuffers)
        r.nbuffers = FSHM_GIGE_DEFAULT_BUFFERS;
    if (r.nbuffers > FSHM_GIGE_MAX_BUFFERS)
        return fshm_set_error(-EINVAL, "%u buffers asked; at most %d", r.nbuffers, FSHM_GIGE_MAX_BUFFERS);
    if ((r.width == 0) != (r.height == 0))
        return fshm_set_error(-EINVAL, "give both width and height, or neither");
    if (r.fps < 0 || r.fps != r.fps)
        return fshm_set_error(-EINVAL, "fps must be positive (or 0: leave the camera's rate)");
    GError *e = NULL;
    fshm_gige_format *f = &c->fmt;
    memset(f, 0, sizeof *f);

    /* Free-running continuous acquisition, whatever the last session left. */
    arv_camera_clear_triggers(c->cam, NULL);
    arv_camera_set_acquisition_mode(c->cam, ARV_ACQUISITION_MODE_CONTINUOUS, &e);
    if (e)
        return gerr(&e, is_gone(c) ? -ENODEV : gerror_code(e, FSHM_E_GIGE_ARAVIS), "AcquisitionMode");

    if (r.pixel_format && *r.pixel_format && (rc = set_format(c, r.pixel_format)))
        return rc;
    if (r.width) {
        gint wmin = 0, wmax = 0, hmin = 0, hmax = 0;
        arv_camera_get_width_bounds(c->cam, &wmin, &wmax, NULL);
        arv_camera_get_height_bounds(c->cam, &hmin, &hmax, NULL);
        gint sw = 0, sh = 0;
        arv_camera_get_sensor_size(c->cam, &sw, &sh, NULL);
        if ((wmax && (r.width < (uint32_t)wmin || r.width > (uint32_t)wmax)) ||
            (hmax && (r.height < (uint32_t)hmin || r.height > (uint32_t)hmax)) ||
            (sw > 0 && r.x + r.width > (uint32_t)sw) || (sh > 0 && r.y + r.height > (uint32_t)sh))
            return fshm_set_error(FSHM_E_GIGE_UNSUPPORTED,
                                  "camera %s cannot do region %ux%u+%u+%u (width %d..%d, height %d..%d, "
                                  "sensor %dx%d)",
                                  c->info.id, r.width, r.height, r.x, r.y, wmin, wmax, hmin, hmax, sw, sh);
        /* Offsets first to 0 so that a larger size fits, then the region asked. */
        arv_camera_set_region(c->cam, 0, 0, (gint)r.width, (gint)r.height, NULL);
        arv_camera_set_region(c->cam, (gint)r.x, (gint)r.y, (gint)r.width, (gint)r.height, &e);
        g_clear_error(&e);
        gint x, y, w, h;
        arv_camera_get_region(c->cam, &x, &y, &w, &h, &e);
        if (e)
            return gerr(&e, is_gone(c) ? -ENODEV : FSHM_E_GIGE_ARAVIS, "reading the region");
        if ((uint32_t)w != r.width || (uint32_t)h != r.height || (uint32_t)x != r.x || (uint32_t)y != r.y)
            return fshm_set_error(FSHM_E_GIGE_UNSUPPORTED,
                                  "camera %s cannot do region %ux%u+%u+%u (got %dx%d+%d+%d; width %d..%d, "
                                  "height %d..%d)",
                                  c->info.id, r.width, r.height, r.x, r.y, w, h, x, y, wmin, wmax, hmin, hmax);
    }
    {
        gint x, y, w, h;
        arv_camera_get_region(c->cam, &x, &y, &w, &h, &e);
        if (e)
            return gerr(&e, is_gone(c) ? -ENODEV : FSHM_E_GIGE_ARAVIS, "reading the region");
        f->x = (uint32_t)x;
        f->y = (uint32_t)y;
        f->width = (uint32_t)w;
        f->height = (uint32_t)h;
    }
    f->pixel_format_code = (uint32_t)arv_camera_get_pixel_format(c->cam, NULL);
    copy_str(f->pixel_format, sizeof f->pixel_format, arv_camera_get_pixel_format_as_string(c->cam, NULL));
    f->bits_per_pixel = ARV_PIXEL_FORMAT_BIT_PER_PIXEL(f->pixel_format_code);
    if ((rc = dtype_layout(f)))
        return rc;

    if ((rc = apply_rate(c, r.fps)) < 0)
        return rc;
    c->start_fps = r.fps;

    if (c->is_gv) {
        if (r.packet_size) {
            arv_camera_gv_set_packet_size(c->cam, (gint)r.packet_size, &e);
            if (e)
                return gerr(&e, gerror_code(e, FSHM_E_GIGE_UNSUPPORTED), "GevSCPSPacketSize");
        } else {
            arv_camera_gv_auto_packet_size(c->cam, NULL);
        }
        f->packet_size = arv_camera_gv_get_packet_size(c->cam, NULL);
        if (r.packet_size && f->packet_size != r.packet_size)
            return fshm_set_error(FSHM_E_GIGE_UNSUPPORTED, "camera %s took packet size %u instead of %u",
                                  c->info.id, f->packet_size, r.packet_size);
    } else if (r.packet_size) {
        return fshm_set_error(-EINVAL, "packet_size applies to GigE Vision cameras only (%s is %s)", c->info.id,
                              c->info.protocol);
    }

    f->payload = arv_camera_get_payload(c->cam, &e);
    if (e)
        return gerr(&e, is_gone(c) ? -ENODEV : FSHM_E_GIGE_ARAVIS, "PayloadSize");
    if (f->payload < f->frame_bytes)
        return fshm_set_error(FSHM_E_GIGE_UNSUPPORTED, "camera %s: payload of %u bytes for a %u-byte image",
                              c->info.id, f->payload, f->frame_bytes);

    c->stream = arv_camera_create_stream(c->cam, NULL, NULL, &e);
    if (!c->stream)
        return gerr(&e, is_gone(c) ? -ENODEV : gerror_code(e, FSHM_E_GIGE_ARAVIS), "creating the stream");
    for (uint32_t i = 0; i < r.nbuffers; i++)
        arv_stream_push_buffer(c->stream, arv_buffer_new_allocate(f->payload));
    f->nbuffers = r.nbuffers;
    arv_camera_start_acquisition(c->cam, &e);
    if (e) {
        rc = gerr(&e, is_gone(c) ? -ENODEV : gerror_code(e, FSHM_E_GIGE_ARAVIS), "AcquisitionStart");
        drop_stream(c);
        return rc;
    }
    c->started = 1;
    /* a new acquisition: its ids do not follow the last one's (counters stay) */
    c->loss.last_id = 0;
    c->loss.incomplete_run = 0;
    c->pending_lost = 0;
    c->last_activity_ns = c->last_probe_ns = fshm_now_ns();
    return 0;
}

void fshm_gige_get_format(const fshm_gige_cam *c, fshm_gige_format *out) { *out = c->fmt; }

int fshm_gige_set_rate(fshm_gige_cam *c, double fps)
{
    if (is_gone(c))
        return gone_error(c);
    if (fps < 0 || fps != fps)
        return fshm_set_error(-EINVAL, "fps must be >= 0");
    return apply_rate(c, fps > 0 ? fps : c->start_fps);
}

/* ---- frames ---- */

int fshm_gige_probe(fshm_gige_cam *c)
{
    if (is_gone(c))
        return gone_error(c);
    c->last_probe_ns = fshm_now_ns();
    if (!c->is_gv)
        return 0;
    GError *e = NULL;
    guint32 v = 0;
    if (!arv_device_read_register(c->dev, GVBS_CCP, &v, &e)) {
        __atomic_store_n(&c->gone, 1, __ATOMIC_RELEASE);
        return gerr(&e, -ENODEV, "GigE camera does not answer");
    }
    if (!(v & (GVBS_CCP_CONTROL | GVBS_CCP_EXCLUSIVE))) {
        __atomic_store_n(&c->gone, 1, __ATOMIC_RELEASE);
        return fshm_set_error(-ENODEV,
                              "GigE camera %s answers but we no longer control it (it restarted or another "
                              "application took it)",
                              c->info.id);
    }
    return 0;
}

static void add_pending_lost(fshm_gige_cam *c, uint64_t n)
{
    c->pending_lost = n > UINT32_MAX - c->pending_lost ? UINT32_MAX : c->pending_lost + (uint32_t)n;
}

/* Accounts a buffer just popped off the stream; 1 if it holds a complete frame, else it has
 * been given back. */
static int account_pop(fshm_gige_cam *c, ArvBuffer *b)
{
    int complete = arv_buffer_get_status(b) == ARV_BUFFER_STATUS_SUCCESS;
    c->last_activity_ns = fshm_now_ns();
    add_pending_lost(c, fshm_gige_loss_account(&c->loss, complete, arv_buffer_get_frame_id(b)));
    if (!complete)
        arv_stream_push_buffer(c->stream, b);
    return complete;
}

/* A complete buffer with too little data: lost (its id was accounted already). */
static void account_short(fshm_gige_cam *c)
{
    c->loss.incomplete++;
    add_pending_lost(c, 1);
}

static uint64_t mono_from_system(uint64_t sys_ns)
{
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    uint64_t now = fshm_now_ns(), real = (uint64_t)rt.tv_sec * 1000000000ull + (uint64_t)rt.tv_nsec;
    if (!sys_ns || sys_ns > real)
        return now;
    uint64_t age = real - sys_ns;
    return age < now ? now - age : now;
}

/* Pops the next complete frame (ours first, then the stream's). */
static int next_frame(fshm_gige_cam *c, int64_t timeout_ns, ArvBuffer **out)
{
    if (!c->started)
        return fshm_set_error(-EINVAL, "GigE camera %s is not started", c->info.id);
    if (c->ready_count) {
        *out = c->ready[c->ready_head];
        c->ready_head = (c->ready_head + 1) % FSHM_GIGE_MAX_BUFFERS;
        c->ready_count--;
        return 0;
    }
    uint64_t deadline = timeout_ns < 0 ? UINT64_MAX : fshm_now_ns() + (uint64_t)timeout_ns;
    for (;;) {
        if (is_gone(c))
            return gone_error(c);
        uint64_t now = fshm_now_ns();
        uint64_t left_us = deadline == UINT64_MAX ? POP_SLICE_US : (deadline > now ? (deadline - now) / 1000 : 0);
        ArvBuffer *b = left_us ? arv_stream_timeout_pop_buffer(c->stream, left_us < POP_SLICE_US ? left_us : POP_SLICE_US)
                               : arv_stream_try_pop_buffer(c->stream);
        if (b) {
            if (!account_pop(c, b))
                continue;
            *out = b;
            return 0;
        }
        now = fshm_now_ns();
        if (now >= deadline) {
            c->stats.timeouts++;
            if (now - c->last_activity_ns >= FSHM_GIGE_PROBE_AFTER_NS && now - c->last_probe_ns >= FSHM_GIGE_PROBE_AFTER_NS) {
                int rc = fshm_gige_probe(c);
                if (rc)
                    return rc;
            }
            return fshm_set_error(-ETIMEDOUT, "no frame from GigE camera %s within %.3f s", c->info.id,
                                  (double)timeout_ns / 1e9);
        }
    }
}

static void unpop(fshm_gige_cam *c, ArvBuffer *b)
{
    c->ready_head = (c->ready_head + FSHM_GIGE_MAX_BUFFERS - 1) % FSHM_GIGE_MAX_BUFFERS;
    c->ready[c->ready_head] = b;
    c->ready_count++;
}

static long copy_frame(fshm_gige_cam *c, ArvBuffer *b, void *dst, size_t cap, fshm_gige_frame *info)
{
    size_t size = 0;
    const void *data = arv_buffer_get_image_data(b, &size);
    size_t need = c->fmt.frame_bytes;
    if (!data || size < need)
        data = arv_buffer_get_data(b, &size);
    if (!data || size < need)
        return fshm_set_error(-EIO, "GigE camera %s sent %zu bytes for a %zu-byte frame", c->info.id, size, need);
    if (cap < need)
        return fshm_set_error(-EINVAL, "destination of %zu bytes; frames are %zu bytes", cap, need);
    memcpy(dst, data, need);
    if (info) {
        info->frame_id = arv_buffer_get_frame_id(b);
        info->timestamp_ns = mono_from_system(arv_buffer_get_system_timestamp(b));
        info->camera_timestamp = arv_buffer_get_timestamp(b);
        info->bytes = need;
        info->lost_before = c->pending_lost;
    }
    c->pending_lost = 0;
    return (long)need;
}

int fshm_gige_read_into(fshm_gige_cam *c, int64_t timeout_ns, void *dst, size_t capacity, fshm_gige_frame *info)
{
    if (c->started && capacity < c->fmt.frame_bytes)
        return fshm_set_error(-EINVAL, "destination of %zu bytes; frames are %u bytes", capacity, c->fmt.frame_bytes);
    ArvBuffer *b;
    int rc = next_frame(c, timeout_ns, &b);
    if (rc)
        return rc;
    fshm_gige_frame fi;
    long n = copy_frame(c, b, dst, capacity, info ? info : &fi);
    arv_stream_push_buffer(c->stream, b);
    if (n < 0) {
        account_short(c);
        return (int)n;
    }
    c->stats.delivered++;
    return 0;
}

int fshm_gige_wait(fshm_gige_cam *c, int64_t timeout_ns)
{
    ArvBuffer *b;
    int rc = next_frame(c, timeout_ns, &b);
    if (rc)
        return rc;
    unpop(c, b);
    return (int)c->fmt.frame_bytes;
}

int fshm_gige_capture(fshm_gige_cam *c, fshm_writer *w, int64_t timeout_ns, const fshm_tensor *t, uint64_t *seq_out,
                      fshm_gige_frame *info)
{
    ArvBuffer *b;
    int rc = next_frame(c, timeout_ns, &b);
    if (rc)
        return rc;
    fshm_loan loan;
    if ((rc = fshm_writer_loan(w, c->fmt.frame_bytes, &loan))) {
        unpop(c, b);
        return rc;
    }
    fshm_gige_frame fi;
    if (!info)
        info = &fi;
    long n = copy_frame(c, b, loan.data, loan.capacity, info);
    arv_stream_push_buffer(c->stream, b);   /* the data is in the slot */
    if (n < 0) {
        account_short(c);
        return (int)n;   /* the loan is abandoned: the next loan takes a fresh slot */
    }
    if ((rc = fshm_writer_commit(w, t ? t : &c->fmt.tensor, (size_t)n, info->timestamp_ns)))
        return rc;
    if (seq_out)
        *seq_out = loan.seq;
    c->stats.delivered++;
    return 0;
}

int fshm_gige_flush(fshm_gige_cam *c, uint64_t max_age_ns)
{
    if (is_gone(c))
        return gone_error(c);
    if (!c->started)
        return 0;
    ArvBuffer *keep[FSHM_GIGE_MAX_BUFFERS];
    unsigned nkeep = 0;
    while (c->ready_count) {
        keep[nkeep++] = c->ready[c->ready_head];
        c->ready_head = (c->ready_head + 1) % FSHM_GIGE_MAX_BUFFERS;
        c->ready_count--;
    }
    ArvBuffer *b;
    while (nkeep < FSHM_GIGE_MAX_BUFFERS && (b = arv_stream_try_pop_buffer(c->stream)))
        if (account_pop(c, b))
            keep[nkeep++] = b;
    uint64_t now = fshm_now_ns();
    int discarded = 0;
    c->ready_head = 0;
    for (unsigned k = 0; k < nkeep; k++) {
        uint64_t ts = mono_from_system(arv_buffer_get_system_timestamp(keep[k]));
        if (ts + max_age_ns < now) {
            arv_stream_push_buffer(c->stream, keep[k]);
            discarded++;
        } else {
            c->ready[c->ready_count++] = keep[k];
        }
    }
    c->stats.flushed += (uint64_t)discarded;
    return discarded;
}

void fshm_gige_get_stats(const fshm_gige_cam *c, fshm_gige_stats *out)
{
    *out = c->stats;
    out->id_gaps = c->loss.id_gaps;
    out->incomplete = c->loss.incomplete;
    uint64_t u = 0, r = 0, m = 0;
    if (c->stream)
        stream_counters(c->stream, &u, &r, &m);
    out->underruns = c->base_underruns + u;
    /* A GigE camera numbers every frame it sends, so a frame Aravis had no buffer for
     * shows as an id gap (its underruns count packets, not frames). Aravis' in-process fake
     * numbers only the frames it fills, one underrun each: the larger of the two counts
     * each such frame once. */
    if (c->is_gv)
        out->lost = out->incomplete + out->id_gaps;
    else
        out->lost = out->incomplete + (out->underruns > out->id_gaps ? out->underruns : out->id_gaps);
    out->resent_packets = c->base_resent + r;
    out->missing_packets = c->base_missing + m;
}

int fshm_gige_gone(const fshm_gige_cam *c) { return is_gone(c); }

typedef struct {
    ArvStream *stream;
    ArvCamera *cam;
} release_job;

static void *release_thread(void *arg)
{
    release_job *j = arg;
    if (j->stream)
        g_object_unref(j->stream);
    g_object_unref(j->cam);
    free(j);
    return NULL;
}

void fshm_gige_close(fshm_gige_cam *c)
{
    if (!c)
        return;
    if (c->lost_handler)
        g_signal_handler_disconnect(c->dev, c->lost_handler);
    /* A gone GigE camera takes seconds to release (Aravis' GVCP retries, to a camera that
     * does not answer, of AcquisitionStop, the stream-channel reset and "leave control"):
     * that is done on a detached thread, so that a reconnecting producer does not wait for
     * it, nor does a Ctrl-C. The same for a camera that went silent without being declared
     * gone yet (12.5 s measured with a paused fake camera); a camera that stays silent is
     * also dropped by its own heartbeat timeout. */
    int silent = c->started && fshm_now_ns() - c->last_activity_ns >= FSHM_GIGE_SILENT_CLOSE_NS;
    release_job *j = NULL;
    if ((is_gone(c) || silent) && c->is_gv && (j = malloc(sizeof *j))) {
        ready_drain(c);
        j->stream = c->stream;
        j->cam = c->cam;
        c->stream = NULL;
        pthread_t th;
        pthread_attr_t at;
        int ok = pthread_attr_init(&at) == 0;
        if (ok) {
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            ok = pthread_create(&th, &at, release_thread, j) == 0;
            pthread_attr_destroy(&at);
        }
        if (!ok)
            release_thread(j);
    } else {
        fshm_gige_stop(c);
        g_object_unref(c->cam);
    }
    free(c);
}

#endif /* FSHM_HAVE_ARAVIS */
