/* The virtual camera: a frameshm stream served as a PipeWire Video/Source node
 * (fshm_pwcam.h has the contract). */
#include "fshm_pwcam.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <frameshm/frameshm.h>

#ifdef FSHM_HAVE_PIPEWIRE
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <time.h>

#include <pipewire/pipewire.h>
#include <spa/buffer/meta.h>
#include <spa/node/command.h>
#include <spa/param/video/format-utils.h>
#include <spa/utils/result.h>
#define SPA(x) (x)
#else
#define SPA(x) 0
#endif

/* ---- layouts (no PipeWire needed) ---- */

enum { KIND_PACKED = 0, KIND_420 = 1 };

static const struct {
    const char *name;
    uint32_t spa;
    int16_t dtype;
    uint8_t channels;   /* last dimension (1: a 2-D frame) */
    uint8_t bpp;        /* bytes per pixel of the first plane */
    uint8_t kind;
} formats[] = {
    {"GRAY8", SPA(SPA_VIDEO_FORMAT_GRAY8), FSHM_DTYPE_UINT8, 1, 1, KIND_PACKED},
    {"GRAY16", SPA(SPA_VIDEO_FORMAT_GRAY16_LE), FSHM_DTYPE_UINT16, 1, 2, KIND_PACKED},
    {"RGB", SPA(SPA_VIDEO_FORMAT_RGB), FSHM_DTYPE_UINT8, 3, 3, KIND_PACKED},
    {"BGR", SPA(SPA_VIDEO_FORMAT_BGR), FSHM_DTYPE_UINT8, 3, 3, KIND_PACKED},
    {"RGBA", SPA(SPA_VIDEO_FORMAT_RGBA), FSHM_DTYPE_UINT8, 4, 4, KIND_PACKED},
    {"BGRA", SPA(SPA_VIDEO_FORMAT_BGRA), FSHM_DTYPE_UINT8, 4, 4, KIND_PACKED},
    {"RGBX", SPA(SPA_VIDEO_FORMAT_RGBx), FSHM_DTYPE_UINT8, 4, 4, KIND_PACKED},
    {"BGRX", SPA(SPA_VIDEO_FORMAT_BGRx), FSHM_DTYPE_UINT8, 4, 4, KIND_PACKED},
    {"YUYV", SPA(SPA_VIDEO_FORMAT_YUY2), FSHM_DTYPE_UINT8, 2, 2, KIND_PACKED},
    {"UYVY", SPA(SPA_VIDEO_FORMAT_UYVY), FSHM_DTYPE_UINT8, 2, 2, KIND_PACKED},
    {"NV12", SPA(SPA_VIDEO_FORMAT_NV12), FSHM_DTYPE_UINT8, 1, 1, KIND_420},
    {"I420", SPA(SPA_VIDEO_FORMAT_I420), FSHM_DTYPE_UINT8, 1, 1, KIND_420},
};
#define NFORMATS (sizeof formats / sizeof formats[0])
#define SUPPORTED_TEXT                                                                             \
    "uint8 (H,W) GRAY8, (H,W,2) YUYV/UYVY, (H,W,3) RGB/BGR, (H,W,4) RGBA/BGRA/RGBX/BGRX, "          \
    "(H*3/2,W) NV12/I420 (asked for), uint16 (H,W) GRAY16"

static const char *dtype_name(int d)
{
    static const char *names[] = {"unknown", "uint8",   "int8",    "uint16", "int16",
                                  "uint32",  "int32",   "uint64",  "int64",  "float32",
                                  "float64", "bool",    "?",       "bytes"};
    return d >= 0 && d < (int)(sizeof names / sizeof names[0]) ? names[d] : "?";
}

static void shape_text(const fshm_tensor *t, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "(");
    for (int i = 0; i < t->ndims && i < FSHM_MAX_DIMS && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %d" : "%d", t->dims[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, t->ndims == 1 ? ",)" : ")");
}

/* Row-major and packed: strides 0 (inferred) or exactly the contiguous ones. */
static int contiguous(const fshm_tensor *t)
{
    if (t->major_order && t->major_order != FSHM_ORDER_ROW)
        return 0;
    int64_t want = fshm_dtype_size(t->dtype);
    for (int i = t->ndims - 1; i >= 0; i--) {
        if (t->strides[i] && t->strides[i] != want)
            return 0;
        want *= t->dims[i];
    }
    return 1;
}

/* Index in formats[] of a format name (V4L2's GREY and GStreamer's YUY2 too), -1 if none. */
static int format_index(const char *name)
{
    for (unsigned i = 0; i < NFORMATS; i++)
        if (strcasecmp(name, formats[i].name) == 0)
            return (int)i;
    if (strcasecmp(name, "GREY") == 0)
        return 0;
    if (strcasecmp(name, "YUY2") == 0)
        return format_index("YUYV");
    return -1;
}

int fshm_pwcam_layout_for(const fshm_tensor *t, const char *format, uint32_t width,
                          uint32_t height, fshm_pwcam_layout *out)
{
    memset(out, 0, sizeof *out);
    int fi = -1;
    if (format && *format && (fi = format_index(format)) < 0)
        return fshm_set_error(-EINVAL, "unknown virtual-camera format '%s' (one of GRAY8 GRAY16 "
                              "RGB BGR RGBA BGRA RGBX BGRX YUYV UYVY NV12 I420)", format);
    char shape[96];
    if (!t) {
        if (fi < 0 || !width || !height)
            return fshm_set_error(-EINVAL, "without a frame to learn from, the virtual camera needs "
                                  "format, width and height");
    } else {
        shape_text(t, shape, sizeof shape);
        int last = t->ndims == 3 ? t->dims[2] : 1;
        if (t->ndims < 2 || t->ndims > 3 || !contiguous(t))
            return fshm_set_error(FSHM_E_PW_UNSUPPORTED, "frames of %s %s (%s) cannot be served as "
                                  "video: the virtual camera serves " SUPPORTED_TEXT,
                                  dtype_name(t->dtype), shape,
                                  contiguous(t) ? "need 2 or 3 dimensions" : "not packed row-major");
        if (fi < 0) {
            for (unsigned i = 0; i < NFORMATS && fi < 0; i++)
                if (formats[i].kind == KIND_PACKED && formats[i].dtype == t->dtype &&
                    formats[i].channels == last)
                    fi = (int)i;   /* the first of a group is its default: RGB, RGBA, YUYV */
            if (fi < 0)
                return fshm_set_error(FSHM_E_PW_UNSUPPORTED, "frames of %s %s cannot be served as "
                                      "video: the virtual camera serves " SUPPORTED_TEXT,
                                      dtype_name(t->dtype), shape);
        }
        if (formats[fi].dtype != t->dtype || formats[fi].channels != last)
            return fshm_set_error(FSHM_E_PW_UNSUPPORTED, "format %s does not fit frames of %s %s "
                                  "(the virtual camera serves " SUPPORTED_TEXT ")",
                                  formats[fi].name, dtype_name(t->dtype), shape);
        uint32_t rows = (uint32_t)t->dims[0], w = (uint32_t)t->dims[1];
        uint32_t h = rows;
        if (formats[fi].kind == KIND_420) {
            if (rows % 3 || (rows / 3) % 2 || w % 2)
                return fshm_set_error(FSHM_E_PW_UNSUPPORTED, "%s frames are (H*3/2, W) with even H "
                                      "and W; %s is not", formats[fi].name, shape);
            h = rows / 3 * 2;
        }
        if ((width && width != w) || (height && height != h))
            return fshm_set_error(-EINVAL, "the stream's frames are %ux%u (%s), not the %ux%u asked for",
                                  w, h, shape, width ? width : w, height ? height : h);
        width = w;
        height = h;
    }
    if (formats[fi].kind == KIND_420 && (width % 2 || height % 2))
        return fshm_set_error(-EINVAL, "%s needs an even width and height, not %ux%u",
                              formats[fi].name, width, height);
    if (width > 16384 || height > 16384)
        return fshm_set_error(-EINVAL, "%ux%u frames are too large for a virtual camera", width, height);
    snprintf(out->format, sizeof out->format, "%s", formats[fi].name);
    out->spa_format = formats[fi].spa;
    out->width = width;
    out->height = height;
    out->stride = width * formats[fi].bpp;
    out->frame_bytes = formats[fi].kind == KIND_420 ? width * height * 3 / 2 : out->stride * height;
    out->dtype = formats[fi].dtype;
    out->dims[0] = (int32_t)(formats[fi].kind == KIND_420 ? height * 3 / 2 : height);
    out->dims[1] = (int32_t)width;
    out->dims[2] = formats[fi].channels;
    out->ndims = formats[fi].channels > 1 ? 3 : 2;
    return 0;
}

#ifndef FSHM_HAVE_PIPEWIRE

#define NOLIB_MSG "frameshm was built without PipeWire (libpipewire-0.3 not found at build time): " \
                  "install libpipewire-0.3-dev and reinstall"

int fshm_pwcam_have_pipewire(void) { return 0; }

int fshm_pwcam_open(const fshm_pwcam_config *cfg, fshm_pwcam **out)
{
    (void)cfg;
    if (out)
        *out = NULL;
    return fshm_set_error(FSHM_E_PW_NOLIB, NOLIB_MSG);
}

int fshm_pwcam_next_event(fshm_pwcam *c, int64_t timeout_ns, fshm_pwcam_event *ev)
{
    (void)c, (void)timeout_ns, (void)ev;
    return fshm_set_error(FSHM_E_PW_NOLIB, NOLIB_MSG);
}

void fshm_pwcam_get_info(fshm_pwcam *c, fshm_pwcam_info *out)
{
    (void)c;
    memset(out, 0, sizeof *out);
}

void fshm_pwcam_close(fshm_pwcam *c) { (void)c; }

#else /* FSHM_HAVE_PIPEWIRE */

#define EVQ 64
#define SERVE_WAIT_NS 100000000ll     /* longest frame wait: stop/idle are noticed this fast */
#define READY_TIMEOUT_NS 10000000000ull
#define MEASURE_NS 1000000000ull      /* rate measurement window */
#define MEASURE_FRAMES 16
#define FALLBACK_FPS 30
#define STARVE_NS 1000000000ull       /* no free buffer this long: say so */

typedef struct peer_node {
    uint32_t id;
    char name[96];
    struct peer_node *next;
} peer_node;

typedef struct link_rec {
    uint32_t id, peer;
    struct link_rec *next;
} link_rec;

struct fshm_pwcam {
    /* configuration (owned copies) */
    char *stream_name, *base_dir, *ns, *node_name, *description, *format, *consumer, *remote;
    char *driver;
    fshm_stream_addr addr;
    uint32_t want_w, want_h, fps_num, fps_den, nbuffers;
    int64_t learn_timeout_ns;

    pthread_t worker;
    int worker_started;

    /* mu guards the fields down to the event queue. Lock order: the thread loop's lock
     * first, then mu (PipeWire callbacks run with the loop lock held and take mu); the
     * worker never takes the loop lock while holding mu. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop, failed, fail_code;
    char fail_msg[512];
    int ready, streaming, fps_measured;
    uint32_t node_id, clients;
    uint64_t serial;
    fshm_pwcam_event ev[EVQ];
    unsigned ev_head, ev_count;
    uint64_t ev_lost;

    /* counters written by the worker, read by get_info */
    _Atomic uint64_t served, no_buffer, torn, mismatched, last_seq, last_ts;

    /* PipeWire objects: used with the thread loop's lock held */
    struct pw_thread_loop *loop;
    struct pw_context *context;
    struct pw_core *core;
    struct spa_hook core_listener;
    struct pw_registry *registry;
    struct spa_hook registry_listener;
    struct pw_proxy *node_proxy;   /* our own node, to suspend it */
    struct pw_stream *stream;
    struct spa_hook stream_listener;
    struct pw_buffer *held;    /* dequeued but not filled (a torn copy): used next */
    int pw_streaming;          /* stream state, as the loop saw it */
    peer_node *nodes;
    link_rec *links;

    /* worker only */
    fshm_reader *reader;
    fshm_pwcam_layout layout;
    int producer_gone, mismatch_warned, error_warned, buffer_warned, starve_warned;
    uint64_t starve_since;     /* first frame with no free buffer in a row, 0 = none */
};

static pthread_once_t pw_once = PTHREAD_ONCE_INIT;
static void pw_init_once(void) { pw_init(NULL, NULL); }

int fshm_pwcam_have_pipewire(void) { return 1; }

static int64_t mono_left(uint64_t deadline)
{
    uint64_t now = fshm_now_ns();
    return now >= deadline ? 0 : (int64_t)(deadline - now);
}

/* Absolute CLOCK_MONOTONIC time ns from now (the condition variable uses that clock). */
static struct timespec abs_in(int64_t ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t t = (uint64_t)ts.tv_nsec + (uint64_t)ns;
    ts.tv_sec += (time_t)(t / 1000000000ull);
    ts.tv_nsec = (long)(t % 1000000000ull);
    return ts;
}

/* ---- events (mu held) ---- */

static fshm_pwcam_event *event_slot(fshm_pwcam *c, int kind)
{
    if (c->ev_count == EVQ) {   /* nobody polls: the oldest goes */
        c->ev_head = (c->ev_head + 1) % EVQ;
        c->ev_count--;
        c->ev_lost++;
    }
    fshm_pwcam_event *e = &c->ev[(c->ev_head + c->ev_count++) % EVQ];
    memset(e, 0, sizeof *e);
    e->kind = kind;
    e->clients = c->clients;
    pthread_cond_broadcast(&c->cv);
    return e;
}

__attribute__((format(printf, 3, 4))) static void push_event(fshm_pwcam *c, int kind, const char *fmt, ...)
{
    pthread_mutex_lock(&c->mu);
    fshm_pwcam_event *e = event_slot(c, kind);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->text, sizeof e->text, fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&c->mu);
}

static void fail(fshm_pwcam *c, int code, const char *msg)
{
    pthread_mutex_lock(&c->mu);
    if (!c->failed) {
        c->failed = 1;
        c->fail_code = code;
        snprintf(c->fail_msg, sizeof c->fail_msg, "%s", msg);
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

__attribute__((format(printf, 3, 4))) static void failf(fshm_pwcam *c, int code, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fail(c, code, buf);
}

/* ---- PipeWire callbacks (loop thread, loop lock held) ---- */

static const char *peer_name(fshm_pwcam *c, uint32_t id)
{
    for (peer_node *n = c->nodes; n; n = n->next)
        if (n->id == id)
            return n->name;
    return "?";
}

static void announce_ready(fshm_pwcam *c)
{
    pthread_mutex_lock(&c->mu);
    if (!c->ready) {
        c->ready = 1;
        fshm_pwcam_event *e = event_slot(c, FSHM_PWCAM_EV_READY);
        snprintf(e->text, sizeof e->text,
                 "node up: node.id=%u object.serial=%llu node.name=%s format=%s %ux%u@%u/%u fps%s",
                 c->node_id, (unsigned long long)c->serial, c->node_name, c->layout.format,
                 c->layout.width, c->layout.height, c->fps_num, c->fps_den,
                 c->fps_measured ? " (measured)" : "");
    }
    pthread_mutex_unlock(&c->mu);
}

static void on_global(void *data, uint32_t id, uint32_t permissions, const char *type,
                      uint32_t version, const struct spa_dict *props)
{
    fshm_pwcam *c = data;
    (void)permissions, (void)version;
    if (!props)
        return;
    if (strcmp(type, PW_TYPE_INTERFACE_Node) == 0) {
        if (id == c->node_id) {
            const char *s = spa_dict_lookup(props, PW_KEY_OBJECT_SERIAL);
            if (!c->node_proxy)
                c->node_proxy = pw_registry_bind(c->registry, id, PW_TYPE_INTERFACE_Node, PW_VERSION_NODE, 0);
            if (s) {
                pthread_mutex_lock(&c->mu);
                c->serial = strtoull(s, NULL, 10);
                pthread_mutex_unlock(&c->mu);
                announce_ready(c);
            }
            return;
        }
        /* Remembered to name the clients that link to us. */
        peer_node *n = calloc(1, sizeof *n);
        if (!n)
            return;
        const char *app = spa_dict_lookup(props, PW_KEY_APP_NAME);
        const char *name = spa_dict_lookup(props, PW_KEY_NODE_NAME);
        n->id = id;
        snprintf(n->name, sizeof n->name, "%s", app ? app : name ? name : "?");
        n->next = c->nodes;
        c->nodes = n;
    } else if (strcmp(type, PW_TYPE_INTERFACE_Link) == 0) {
        const char *out = spa_dict_lookup(props, PW_KEY_LINK_OUTPUT_NODE);
        const char *in = spa_dict_lookup(props, PW_KEY_LINK_INPUT_NODE);
        if (!out || !in || c->node_id == SPA_ID_INVALID || strtoul(out, NULL, 10) != c->node_id)
            return;
        link_rec *l = calloc(1, sizeof *l);
        if (!l)
            return;
        l->id = id;
        l->peer = (uint32_t)strtoul(in, NULL, 10);
        l->next = c->links;
        c->links = l;
        pthread_mutex_lock(&c->mu);
        c->clients++;
        fshm_pwcam_event *e = event_slot(c, FSHM_PWCAM_EV_CLIENT_ON);
        e->link_id = id;
        e->peer_node_id = l->peer;
        snprintf(e->peer, sizeof e->peer, "%s", peer_name(c, l->peer));
        snprintf(e->text, sizeof e->text, "client connected: %s (node %u, link %u); %u client(s)",
                 e->peer, l->peer, id, c->clients);
        pthread_mutex_unlock(&c->mu);
    }
}

/* Suspending the node makes PipeWire take back its buffers; the next client negotiates
 * fresh ones. Needed because a client may never return the buffers it held when it went
 * away (PipeWire 0.3.65's V4L2 layer: with few buffers the next client then starves),
 * and WirePlumber only suspends idle nodes after seconds. */
static void suspend_self(fshm_pwcam *c)
{
    if (c->node_proxy)
        pw_node_send_command((struct pw_node *)c->node_proxy,
                             &SPA_NODE_COMMAND_INIT(SPA_NODE_COMMAND_Suspend));
}

static void on_global_remove(void *data, uint32_t id)
{
    fshm_pwcam *c = data;
    for (link_rec **p = &c->links; *p; p = &(*p)->next) {
        if ((*p)->id != id)
            continue;
        link_rec *l = *p;
        *p = l->next;
        if (!c->links)
            suspend_self(c);
        pthread_mutex_lock(&c->mu);
        c->clients--;
        fshm_pwcam_event *e = event_slot(c, FSHM_PWCAM_EV_CLIENT_OFF);
        e->link_id = id;
        e->peer_node_id = l->peer;
        snprintf(e->peer, sizeof e->peer, "%s", peer_name(c, l->peer));
        snprintf(e->text, sizeof e->text, "client disconnected: %s (node %u, link %u); %u client(s)",
                 e->peer, l->peer, id, c->clients);
        pthread_mutex_unlock(&c->mu);
        free(l);
        return;
    }
    for (peer_node **p = &c->nodes; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            peer_node *n = *p;
            *p = n->next;
            free(n);
            return;
        }
    }
}

static const struct pw_registry_events registry_events = {
    PW_VERSION_REGISTRY_EVENTS,
    .global = on_global,
    .global_remove = on_global_remove,
};

static void on_state_changed(void *data, enum pw_stream_state old, enum pw_stream_state state,
                             const char *error)
{
    fshm_pwcam *c = data;
    c->pw_streaming = state == PW_STREAM_STATE_STREAMING;
    if (state == PW_STREAM_STATE_PAUSED && !c->registry) {
        /* The node id is known from here on; a registry made now lists every global again,
         * our node (for its object.serial) and the links to it included. */
        pthread_mutex_lock(&c->mu);
        c->node_id = pw_stream_get_node_id(c->stream);
        pthread_mutex_unlock(&c->mu);
        c->registry = pw_core_get_registry(c->core, PW_VERSION_REGISTRY, 0);
        if (c->registry)
            pw_registry_add_listener(c->registry, &c->registry_listener, &registry_events, c);
    }
    pthread_mutex_lock(&c->mu);
    c->streaming = c->pw_streaming;
    int stopping = c->stop;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (state == PW_STREAM_STATE_ERROR)
        failf(c, FSHM_E_PW, "PipeWire stream error: %s", error ? error : "unknown");
    else if (state == PW_STREAM_STATE_UNCONNECTED && old != PW_STREAM_STATE_UNCONNECTED && !stopping)
        fail(c, FSHM_E_PW, "PipeWire disconnected the virtual camera's node");
}

static void on_param_changed(void *data, uint32_t id, const struct spa_pod *param)
{
    fshm_pwcam *c = data;
    if (!param || id != SPA_PARAM_Format)
        return;
    /* Only one format is offered, so the negotiated one is ours: size the buffers. */
    uint8_t buf[1024];
    struct spa_pod_builder b = SPA_POD_BUILDER_INIT(buf, sizeof buf);
    const struct spa_pod *params[2];
    uint32_t n = c->nbuffers;
    params[0] = spa_pod_builder_add_object(
        &b, SPA_TYPE_OBJECT_ParamBuffers, SPA_PARAM_Buffers,
        SPA_PARAM_BUFFERS_buffers, SPA_POD_CHOICE_RANGE_Int(n, 2, n > 32 ? n : 32),
        SPA_PARAM_BUFFERS_blocks, SPA_POD_Int(1),
        SPA_PARAM_BUFFERS_size, SPA_POD_Int(c->layout.frame_bytes),
        SPA_PARAM_BUFFERS_stride, SPA_POD_Int(c->layout.stride));
    params[1] = spa_pod_builder_add_object(
        &b, SPA_TYPE_OBJECT_ParamMeta, SPA_PARAM_Meta,
        SPA_PARAM_META_type, SPA_POD_Id(SPA_META_Header),
        SPA_PARAM_META_size, SPA_POD_Int(sizeof(struct spa_meta_header)));
    pw_stream_update_params(c->stream, params, 2);
}

static void on_remove_buffer(void *data, struct pw_buffer *b)
{
    fshm_pwcam *c = data;
    if (c->held == b)
        c->held = NULL;
}

static const struct pw_stream_events stream_events = {
    PW_VERSION_STREAM_EVENTS,
    .state_changed = on_state_changed,
    .param_changed = on_param_changed,
    .remove_buffer = on_remove_buffer,
};

static void on_core_error(void *data, uint32_t id, int seq, int res, const char *message)
{
    fshm_pwcam *c = data;
    (void)seq;
    if (id == PW_ID_CORE && res == -EPIPE)
        fail(c, FSHM_E_PW, "lost the connection to PipeWire (the daemon stopped?)");
    else if (id == PW_ID_CORE)
        failf(c, FSHM_E_PW, "PipeWire: %s (%s)", message ? message : "error", spa_strerror(res));
}

static const struct pw_core_events core_events = {
    PW_VERSION_CORE_EVENTS,
    .error = on_core_error,
};

/* ---- worker ---- */

static int stopping(fshm_pwcam *c)
{
    pthread_mutex_lock(&c->mu);
    int s = c->stop || c->failed;
    pthread_mutex_unlock(&c->mu);
    return s;
}

static int open_reader(fshm_pwcam *c)
{
    fshm_reader_config rc = {.struct_size = sizeof(fshm_reader_config), .addr = c->addr, .consumer = c->consumer, .driver = c->driver};
    return fshm_reader_open(&rc, &c->reader);
}

static void close_reader(fshm_pwcam *c)
{
    if (c->reader) {
        fshm_reader_close(c->reader);
        c->reader = NULL;
    }
}

/* A measured rate as the fraction V4L2/GStreamer applications expect: integers and the
 * NTSC rates (30000/1001...) exactly, anything else to a thousandth. */
static void rate_fraction(double r, uint32_t *num, uint32_t *den)
{
    uint32_t n = (uint32_t)(r + 0.5);
    if (n >= 1 && (r > n ? r - n : n - r) <= 0.01 * r) {
        *num = n, *den = 1;
        return;
    }
    uint32_t n1001 = (uint32_t)(r * 1.001 + 0.5);
    double ntsc = n1001 / 1.001;
    if (n1001 >= 1 && (r > ntsc ? r - ntsc : ntsc - r) <= 0.002 * r) {
        *num = n1001 * 1000, *den = 1001;
        return;
    }
    uint32_t a = (uint32_t)(r * 1000 + 0.5), b = 1000;
    if (!a)
        a = 1;
    for (uint32_t x = a, y = b; y;) {   /* reduce by the gcd */
        uint32_t t = x % y;
        x = y, y = t;
        if (!y)
            a /= x, b /= x;
    }
    *num = a, *den = b;
}

/* Learns the layout from the stream's newest frame and the producer's rate from about a
 * second of frames, unless the configuration gives them. */
static int learn(fshm_pwcam *c)
{
    int have_fps = c->fps_num && c->fps_den;
    if (have_fps && c->format && c->want_w && c->want_h) {
        c->fps_measured = 0;
        return fshm_pwcam_layout_for(NULL, c->format, c->want_w, c->want_h, &c->layout);
    }
    int rc = open_reader(c);
    if (rc)
        return rc;
    uint64_t deadline = c->learn_timeout_ns < 0 ? UINT64_MAX : fshm_now_ns() + (uint64_t)c->learn_timeout_ns;
    fshm_frame f;
    for (;;) {
        if (stopping(c))
            return -ECANCELED;
        int64_t left = mono_left(deadline);
        rc = fshm_reader_wait_latest(c->reader, left < SERVE_WAIT_NS ? left : SERVE_WAIT_NS, &f);
        if (rc == 0)
            break;
        if (rc != -ETIMEDOUT && rc != FSHM_E_PRODUCER_DEAD && rc != -EINTR)
            return rc;
        if (fshm_now_ns() >= deadline)
            return fshm_set_error(-ETIMEDOUT, "stream '%s': no frame to learn the format from "
                                  "within %.1f s (%s); give format, width, height and fps to start "
                                  "without one", c->stream_name, c->learn_timeout_ns / 1e9,
                                  fshm_last_error());
    }
    if ((rc = fshm_pwcam_layout_for(&f.tensor, c->format, c->want_w, c->want_h, &c->layout)))
        return fshm_set_error(rc, "stream '%s': %s", c->stream_name, fshm_last_error());
    if (have_fps) {
        c->fps_measured = 0;
        close_reader(c);
        return 0;
    }
    /* Rate from the producer's own timestamps and seqs (seqs count the frames this reader
     * skipped); arrival times only if the timestamps do not advance. */
    uint64_t seq0 = f.seq, ts0 = f.timestamp_ns, t0 = fshm_now_ns();
    uint64_t seq1 = seq0, ts1 = ts0, t1 = t0;
    uint64_t end = t0 + MEASURE_NS;
    for (unsigned n = 0; n < MEASURE_FRAMES && !stopping(c);) {
        int64_t left = mono_left(end);
        if (!left)
            break;
        rc = fshm_reader_wait_latest(c->reader, left, &f);
        if (rc == 0) {
            if (f.epoch != fshm_reader_epoch(c->reader) || f.seq <= seq1)
                break;
            seq1 = f.seq, ts1 = f.timestamp_ns, t1 = fshm_now_ns();
            n++;
        } else if (rc != -EINTR) {
            break;   /* timed out or the producer went: measured with what we have */
        }
    }
    close_reader(c);
    if (stopping(c))
        return -ECANCELED;
    double span = ts1 > ts0 ? (double)(ts1 - ts0) : (double)(t1 - t0);
    if (seq1 > seq0 && span > 0) {
        rate_fraction((double)(seq1 - seq0) * 1e9 / span, &c->fps_num, &c->fps_den);
        c->fps_measured = 1;
    } else {
        c->fps_num = FALLBACK_FPS, c->fps_den = 1;
        c->fps_measured = 0;
        push_event(c, FSHM_PWCAM_EV_WARNING, "stream '%s': under two frames in %.1f s, so its rate "
                   "could not be measured; announcing %d fps (give fps to set it)", c->stream_name,
                   MEASURE_NS / 1e9, FALLBACK_FPS);
    }
    return 0;
}

static int pw_start(fshm_pwcam *c)
{
    pthread_once(&pw_once, pw_init_once);
    c->loop = pw_thread_loop_new("fshm-virtualcam", NULL);
    if (!c->loop)
        return fshm_set_error(FSHM_E_PW, "PipeWire: cannot create a thread loop: %s", strerror(errno));
    c->context = pw_context_new(pw_thread_loop_get_loop(c->loop), NULL, 0);
    if (!c->context)
        return fshm_set_error(FSHM_E_PW, "PipeWire: cannot create a context: %s", strerror(errno));
    if (pw_thread_loop_start(c->loop) < 0)
        return fshm_set_error(FSHM_E_PW, "PipeWire: cannot start the thread loop");
    pw_thread_loop_lock(c->loop);
    struct pw_properties *cp = c->remote ? pw_properties_new(PW_KEY_REMOTE_NAME, c->remote, NULL) : NULL;
    c->core = pw_context_connect(c->context, cp, 0);
    if (!c->core) {
        int e = errno;
        const char *rt = getenv("PIPEWIRE_RUNTIME_DIR");
        if (!rt)
            rt = getenv("XDG_RUNTIME_DIR");
        pw_thread_loop_unlock(c->loop);
        return fshm_set_error(FSHM_E_PW, "cannot connect to PipeWire (remote '%s' in %s): %s; is a "
                              "PipeWire daemon running for this user?",
                              c->remote ? c->remote : getenv("PIPEWIRE_REMOTE") ? getenv("PIPEWIRE_REMOTE") : "pipewire-0",
                              rt ? rt : "(no XDG_RUNTIME_DIR)", strerror(e));
    }
    pw_core_add_listener(c->core, &c->core_listener, &core_events, c);
    struct pw_properties *props = pw_properties_new(
        PW_KEY_MEDIA_CLASS, "Video/Source", PW_KEY_MEDIA_TYPE, "Video", PW_KEY_MEDIA_CATEGORY,
        "Capture", PW_KEY_MEDIA_ROLE, "Camera", PW_KEY_NODE_NAME, c->node_name,
        PW_KEY_NODE_DESCRIPTION, c->description, PW_KEY_NODE_NICK, c->node_name, NULL);
    pw_properties_set(props, "frameshm.stream", c->stream_name);
    c->stream = pw_stream_new(c->core, c->node_name, props);
    if (!c->stream) {
        pw_thread_loop_unlock(c->loop);
        return fshm_set_error(FSHM_E_PW, "PipeWire: cannot create a stream: %s", strerror(errno));
    }
    pw_stream_add_listener(c->stream, &c->stream_listener, &stream_events, c);
    uint8_t buf[1024];
    struct spa_pod_builder b = SPA_POD_BUILDER_INIT(buf, sizeof buf);
    const struct spa_pod *params[1];
    /* One fixed format: the stream's. pw-v4l2 lists each EnumFormat as one V4L2 format. */
    params[0] = spa_pod_builder_add_object(
        &b, SPA_TYPE_OBJECT_Format, SPA_PARAM_EnumFormat,
        SPA_FORMAT_mediaType, SPA_POD_Id(SPA_MEDIA_TYPE_video),
        SPA_FORMAT_mediaSubtype, SPA_POD_Id(SPA_MEDIA_SUBTYPE_raw),
        SPA_FORMAT_VIDEO_format, SPA_POD_Id(c->layout.spa_format),
        SPA_FORMAT_VIDEO_size, SPA_POD_Rectangle(&SPA_RECTANGLE(c->layout.width, c->layout.height)),
        SPA_FORMAT_VIDEO_framerate, SPA_POD_Fraction(&SPA_FRACTION(c->fps_num, c->fps_den)));
    int rc = pw_stream_connect(c->stream, PW_DIRECTION_OUTPUT, PW_ID_ANY,
                               PW_STREAM_FLAG_DRIVER | PW_STREAM_FLAG_MAP_BUFFERS, params, 1);
    pw_thread_loop_unlock(c->loop);
    if (rc < 0)
        return fshm_set_error(FSHM_E_PW, "PipeWire: cannot connect the stream: %s", spa_strerror(rc));
    return 0;
}

static int frame_fits(const fshm_pwcam_layout *l, const fshm_frame *f)
{
    const fshm_tensor *t = &f->tensor;
    if (t->dtype != l->dtype || t->ndims < 2 || t->ndims > 3 || t->dims[0] != l->dims[0] ||
        t->dims[1] != l->dims[1] || (t->ndims == 3 ? t->dims[2] : 1) != (l->ndims == 3 ? l->dims[2] : 1))
        return 0;
    return f->nbytes >= l->frame_bytes && contiguous(t);
}

static void note_no_frame(fshm_pwcam *c, int rc)
{
    int gone = rc == FSHM_E_PRODUCER_DEAD;
    if (!gone && rc == -ETIMEDOUT) {
        int st = fshm_reader_producer_state(c->reader, NULL);
        gone = st == FSHM_PRODUCER_CLOSED || st == FSHM_PRODUCER_NONE;
    }
    if (gone && !c->producer_gone) {
        c->producer_gone = 1;
        push_event(c, FSHM_PWCAM_EV_PRODUCER_GONE, "stream '%s' has no producer (%s); the node stays "
                   "up and resumes when it returns", c->stream_name,
                   rc == -ETIMEDOUT ? "not running or closed" : fshm_last_error());
    }
}

/* One frame: the newest committed one, copied into a PipeWire buffer and sent. */
static void serve_one(fshm_pwcam *c)
{
    fshm_frame f;
    int rc = fshm_reader_wait_latest(c->reader, SERVE_WAIT_NS, &f);
    if (rc == -ETIMEDOUT || rc == FSHM_E_PRODUCER_DEAD) {
        note_no_frame(c, rc);
        return;
    }
    if (rc == -EINTR)
        return;
    if (rc < 0) {
        if (!c->error_warned) {
            c->error_warned = 1;
            push_event(c, FSHM_PWCAM_EV_WARNING, "stream '%s': %s (frames skipped)", c->stream_name,
                       fshm_last_error());
        }
        struct timespec ts = {0, SERVE_WAIT_NS};   /* an error returns at once: do not spin */
        nanosleep(&ts, NULL);
        return;
    }
    c->error_warned = 0;
    if (c->producer_gone) {
        c->producer_gone = 0;
        push_event(c, FSHM_PWCAM_EV_PRODUCER_BACK, "stream '%s' has frames again", c->stream_name);
    }
    if (!frame_fits(&c->layout, &f)) {
        atomic_fetch_add_explicit(&c->mismatched, 1, memory_order_relaxed);
        if (!c->mismatch_warned) {
            char shape[96];
            c->mismatch_warned = 1;
            shape_text(&f.tensor, shape, sizeof shape);
            push_event(c, FSHM_PWCAM_EV_WARNING, "stream '%s' now carries %s %s frames, not the %s "
                       "%ux%u the node serves: skipped (restart the virtual camera to serve them)",
                       c->stream_name, dtype_name(f.tensor.dtype), shape, c->layout.format,
                       c->layout.width, c->layout.height);
        }
        return;
    }
    c->mismatch_warned = 0;
    /* Under the loop lock: buffers are only removed by the loop thread, so the one we write
     * into stays mapped until it is queued. */
    pw_thread_loop_lock(c->loop);
    if (!c->pw_streaming) {
        pw_thread_loop_unlock(c->loop);
        return;
    }
    struct pw_buffer *b = c->held ? c->held : pw_stream_dequeue_buffer(c->stream);
    c->held = NULL;
    if (!b) {
        pw_thread_loop_unlock(c->loop);
        atomic_fetch_add_explicit(&c->no_buffer, 1, memory_order_relaxed);
        uint64_t now = fshm_now_ns();
        if (!c->starve_since)
            c->starve_since = now;
        else if (now - c->starve_since > STARVE_NS && !c->starve_warned) {
            c->starve_warned = 1;
            push_event(c, FSHM_PWCAM_EV_WARNING, "clients have held every PipeWire buffer for %.0f s: "
                       "frames are dropped until one comes back", STARVE_NS / 1e9);
        }
        return;
    }
    c->starve_since = 0;
    c->starve_warned = 0;
    struct spa_data *d = &b->buffer->datas[0];
    if (!d->data || d->maxsize < c->layout.frame_bytes) {
        c->held = b;
        pw_thread_loop_unlock(c->loop);
        if (!c->buffer_warned) {
            c->buffer_warned = 1;
            push_event(c, FSHM_PWCAM_EV_WARNING, "PipeWire gave %s buffers of %u bytes for %u-byte "
                       "frames: nothing served", d->data ? "small" : "unmapped", d->maxsize,
                       c->layout.frame_bytes);
        }
        return;
    }
    if (fshm_frame_copy(c->reader, &f, d->data, d->maxsize)) {
        c->held = b;   /* torn: the next frame goes into it */
        pw_thread_loop_unlock(c->loop);
        atomic_fetch_add_explicit(&c->torn, 1, memory_order_relaxed);
        return;
    }
    d->chunk->offset = 0;
    d->chunk->size = c->layout.frame_bytes;
    d->chunk->stride = (int32_t)c->layout.stride;
    d->chunk->flags = 0;
    struct spa_meta_header *h = spa_buffer_find_meta_data(b->buffer, SPA_META_Header, sizeof *h);
    if (h) {
        h->flags = 0;
        h->offset = 0;
        h->pts = (int64_t)f.timestamp_ns;
        h->dts_offset = 0;
        h->seq = f.seq;
    }
    pw_stream_queue_buffer(c->stream, b);
    pw_stream_trigger_process(c->stream);
    pw_thread_loop_unlock(c->loop);
    atomic_fetch_add_explicit(&c->served, 1, memory_order_relaxed);
    atomic_store_explicit(&c->last_seq, f.seq, memory_order_relaxed);
    atomic_store_explicit(&c->last_ts, f.timestamp_ns, memory_order_relaxed);
}

static void serve_loop(fshm_pwcam *c)
{
    uint64_t ready_deadline = fshm_now_ns() + READY_TIMEOUT_NS;
    int open_warned = 0;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        while (!c->stop && !c->failed && !c->streaming && !c->reader) {
            if (!c->ready && fshm_now_ns() >= ready_deadline) {
                pthread_mutex_unlock(&c->mu);
                fail(c, FSHM_E_PW, "PipeWire did not publish the virtual camera's node within 10 s");
                pthread_mutex_lock(&c->mu);
                break;
            }
            struct timespec ts = abs_in(SERVE_WAIT_NS);
            pthread_cond_timedwait(&c->cv, &c->mu, &ts);
        }
        int stop = c->stop || c->failed, streaming = c->streaming;
        uint32_t clients = c->clients;
        pthread_mutex_unlock(&c->mu);
        if (stop)
            return;
        if (!streaming) {
            close_reader(c);
            c->producer_gone = 0;
            c->starve_since = 0;
            push_event(c, FSHM_PWCAM_EV_IDLE, "no client streams: stopped reading '%s'", c->stream_name);
            continue;
        }
        if (!c->reader) {
            if (open_reader(c)) {
                if (!open_warned)
                    push_event(c, FSHM_PWCAM_EV_WARNING, "cannot read stream '%s': %s (retrying)",
                               c->stream_name, fshm_last_error());
                open_warned = 1;
                struct timespec ts = {0, 5 * SERVE_WAIT_NS};
                nanosleep(&ts, NULL);
                continue;
            }
            open_warned = 0;
            push_event(c, FSHM_PWCAM_EV_STREAMING, "streaming: serving the newest frames of '%s' to "
                       "%u client(s)", c->stream_name, clients);
        }
        serve_one(c);
    }
}

static void *worker_main(void *arg)
{
    fshm_pwcam *c = arg;
    int rc = learn(c);
    if (rc == 0)
        rc = pw_start(c);
    if (rc && rc != -ECANCELED)
        fail(c, rc, fshm_last_error());
    if (rc == 0)
        serve_loop(c);
    close_reader(c);
    return NULL;
}

static char *dup_or_null(const char *s, int *oom)
{
    if (!s)
        return NULL;
    char *d = strdup(s);
    if (!d)
        *oom = 1;
    return d;
}

static void free_cam(fshm_pwcam *c)
{
    while (c->nodes) {
        peer_node *n = c->nodes;
        c->nodes = n->next;
        free(n);
    }
    while (c->links) {
        link_rec *l = c->links;
        c->links = l->next;
        free(l);
    }
    free(c->stream_name), free(c->base_dir), free(c->ns), free(c->node_name);
    free(c->description), free(c->format), free(c->consumer), free(c->remote), free(c->driver);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c);
}

int fshm_pwcam_open(const fshm_pwcam_config *cfg, fshm_pwcam **out)
{
    *out = NULL;
    const char *name = cfg->addr.name;
    char id_name[32];
    if ((!name || !*name) && cfg->addr.stream_id) {
        /* Driver streams go by id; the id's label names the node. */
        snprintf(id_name, sizeof id_name, "stream-%u", cfg->addr.stream_id);
        name = id_name;
    }
    if (!name || !*name)
        return fshm_set_error(-EINVAL, "the virtual camera needs the name or id of a stream");
    int rc = fshm_validate_name(name, "stream");
    if (rc)
        return rc;
    if (cfg->consumer && (rc = fshm_validate_name(cfg->consumer, "consumer")))
        return rc;
    if ((cfg->fps_num == 0) != (cfg->fps_den == 0))
        return fshm_set_error(-EINVAL, "fps_num and fps_den go together (both 0: measured)");
    if ((cfg->width == 0) != (cfg->height == 0))
        return fshm_set_error(-EINVAL, "width and height go together (both 0: the stream's)");
    if (cfg->buffers && (cfg->buffers < 2 || cfg->buffers > 64))
        return fshm_set_error(-EINVAL, "buffers must be 2..64, not %u", cfg->buffers);
    if (cfg->node_name && (!*cfg->node_name || strlen(cfg->node_name) > 120))
        return fshm_set_error(-EINVAL, "node name must be 1..120 characters");
    fshm_pwcam_layout probe;
    if (cfg->format && *cfg->format && format_index(cfg->format) < 0)
        return fshm_pwcam_layout_for(NULL, cfg->format, 0, 0, &probe);   /* says which exist */
    int fully_given = cfg->format && *cfg->format && cfg->width && cfg->fps_num;
    if (fully_given && (rc = fshm_pwcam_layout_for(NULL, cfg->format, cfg->width, cfg->height, &probe)))
        return rc;
    if (!fully_given && !(cfg->driver && *cfg->driver)) {
        /* The format comes from the stream's frames: a stream that does not exist is a
         * mistake (a typo, or the producer is not started), said now rather than after
         * the learning timeout. */
        fshm_stream_info *info = malloc(sizeof *info);
        if (!info)
            return fshm_set_error(-ENOMEM, "out of memory");
        rc = fshm_stream_info_get(&cfg->addr, info);
        free(info);
        if (rc == -ENOENT)
            return fshm_set_error(-ENOENT, "stream '%s' not found: start its producer first (or give "
                                  "format, width, height and fps to wait for it)", name);
        if (rc)
            return rc;
    }
    fshm_pwcam *c = calloc(1, sizeof *c);
    if (!c)
        return fshm_set_error(-ENOMEM, "out of memory");
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&c->mu, NULL);
    int oom = 0;
    char buf[160];
    c->stream_name = dup_or_null(name, &oom);
    c->base_dir = dup_or_null(cfg->addr.base_dir, &oom);
    c->ns = dup_or_null(cfg->addr.ns, &oom);
    snprintf(buf, sizeof buf, "frameshm-%s", name);
    c->node_name = dup_or_null(cfg->node_name ? cfg->node_name : buf, &oom);
    snprintf(buf, sizeof buf, "frameshm %s", name);
    c->description = dup_or_null(cfg->description && *cfg->description ? cfg->description : buf, &oom);
    c->format = dup_or_null(cfg->format && *cfg->format ? cfg->format : NULL, &oom);
    c->consumer = dup_or_null(cfg->consumer ? cfg->consumer : "virtualcam", &oom);
    c->remote = dup_or_null(cfg->remote && *cfg->remote ? cfg->remote : NULL, &oom);
    c->driver = dup_or_null(cfg->driver && *cfg->driver ? cfg->driver : NULL, &oom);
    if (oom) {
        free_cam(c);
        return fshm_set_error(-ENOMEM, "out of memory");
    }
    c->addr = cfg->addr;
    c->addr.name = cfg->addr.name && *cfg->addr.name ? c->stream_name : NULL;
    c->addr.base_dir = c->base_dir;
    c->addr.ns = c->ns;
    c->want_w = cfg->width, c->want_h = cfg->height;
    c->fps_num = cfg->fps_num, c->fps_den = cfg->fps_den;
    c->nbuffers = cfg->buffers ? cfg->buffers : 8;
    c->learn_timeout_ns = cfg->learn_timeout_ns;
    c->node_id = SPA_ID_INVALID;
    /* The worker (and PipeWire's loop thread it starts, which inherits this) takes no
     * signals: Ctrl-C belongs to the application's threads. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&c->worker, NULL, worker_main, c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        free_cam(c);
        return fshm_set_error(-rc, "cannot start the virtual camera's thread: %s", strerror(rc));
    }
    c->worker_started = 1;
    *out = c;
    return 0;
}

int fshm_pwcam_next_event(fshm_pwcam *c, int64_t timeout_ns, fshm_pwcam_event *ev)
{
    struct timespec ts;
    if (timeout_ns >= 0)
        ts = abs_in(timeout_ns);
    pthread_mutex_lock(&c->mu);
    /* Events queued before a failure are still delivered first: they explain it. */
    while (!c->ev_count && !c->failed) {
        if (timeout_ns < 0)
            pthread_cond_wait(&c->cv, &c->mu);
        else if (pthread_cond_timedwait(&c->cv, &c->mu, &ts) == ETIMEDOUT)
            break;
    }
    int rc = 0;
    if (c->ev_count) {
        *ev = c->ev[c->ev_head];
        c->ev_head = (c->ev_head + 1) % EVQ;
        c->ev_count--;
        rc = 1;
    } else if (c->failed) {
        rc = c->fail_code;
        char msg[sizeof c->fail_msg];
        memcpy(msg, c->fail_msg, sizeof msg);
        pthread_mutex_unlock(&c->mu);
        return fshm_set_error(rc, "%s", msg);
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

void fshm_pwcam_get_info(fshm_pwcam *c, fshm_pwcam_info *o)
{
    memset(o, 0, sizeof *o);
    pthread_mutex_lock(&c->mu);
    snprintf(o->stream, sizeof o->stream, "%s", c->stream_name);
    snprintf(o->node_name, sizeof o->node_name, "%s", c->node_name);
    snprintf(o->description, sizeof o->description, "%s", c->description);
    o->node_id = c->node_id;
    o->serial = c->serial;
    o->ready = c->ready;
    o->failed = c->failed;
    o->streaming = c->streaming;
    if (c->ready) {   /* written by the worker before the node existed */
        o->layout = c->layout;
        o->fps_num = c->fps_num;
        o->fps_den = c->fps_den;
        o->fps_measured = c->fps_measured;
    }
    o->clients = c->clients;
    o->events_lost = c->ev_lost;
    pthread_mutex_unlock(&c->mu);
    o->served = atomic_load_explicit(&c->served, memory_order_relaxed);
    o->no_buffer = atomic_load_explicit(&c->no_buffer, memory_order_relaxed);
    o->torn = atomic_load_explicit(&c->torn, memory_order_relaxed);
    o->mismatched = atomic_load_explicit(&c->mismatched, memory_order_relaxed);
    o->last_seq = atomic_load_explicit(&c->last_seq, memory_order_relaxed);
    o->last_timestamp_ns = atomic_load_explicit(&c->last_ts, memory_order_relaxed);
}

void fshm_pwcam_close(fshm_pwcam *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (c->worker_started)
        pthread_join(c->worker, NULL);
    if (c->loop) {
        pw_thread_loop_lock(c->loop);
        /* Destroying the stream removes the node: clients see the camera go away. */
        if (c->stream)
            pw_stream_destroy(c->stream);
        if (c->node_proxy)
            pw_proxy_destroy(c->node_proxy);
        if (c->registry)
            pw_proxy_destroy((struct pw_proxy *)c->registry);
        if (c->core)
            pw_core_disconnect(c->core);
        c->stream = NULL, c->registry = NULL, c->core = NULL, c->node_proxy = NULL;
        pw_thread_loop_unlock(c->loop);
        pw_thread_loop_stop(c->loop);
    }
    if (c->context)
        pw_context_destroy(c->context);
    if (c->loop)
        pw_thread_loop_destroy(c->loop);
    free_cam(c);
}

#endif /* FSHM_HAVE_PIPEWIRE */
