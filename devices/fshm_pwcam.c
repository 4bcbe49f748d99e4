/* The virtual camera: a frameshm stream served as a PipeWire Video/Source node
 * (fshm_pwcam.h has the contract). This file owns the entry points (and their stubs in a
 * build without PipeWire), the camera's lifetime (open starts the worker, close joins it and
 * tears the node down), the event queue and the failure record, and the PipeWire side: the
 * node (pwc_start, called by the worker) and the callbacks of its core, stream and registry,
 * which run on PipeWire's loop thread. Layouts are in fshm_pwcam_layout.c, the worker
 * (learning the layout and rate, reading the stream, serving frames) in fshm_pwcam_serve.c. */
#include "fshm_pwcam_impl.h"

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

static pthread_once_t pw_once = PTHREAD_ONCE_INIT;
static void pw_init_once(void) { pw_init(NULL, NULL); }

int fshm_pwcam_have_pipewire(void) { return 1; }

/* Absolute CLOCK_MONOTONIC time ns from now (the condition variable uses that clock). */
struct timespec pwc_abs_in(int64_t ns)
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

__attribute__((format(printf, 3, 4))) void pwc_push_event(fshm_pwcam *c, int kind, const char *fmt, ...)
{
    pthread_mutex_lock(&c->mu);
    fshm_pwcam_event *e = event_slot(c, kind);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->text, sizeof e->text, fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&c->mu);
}

void pwc_fail(fshm_pwcam *c, int code, const char *msg)
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
    pwc_fail(c, code, buf);
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
        pwc_fail(c, FSHM_E_PW, "PipeWire disconnected the virtual camera's node");
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
        pwc_fail(c, FSHM_E_PW, "lost the connection to PipeWire (the daemon stopped?)");
    else if (id == PW_ID_CORE)
        failf(c, FSHM_E_PW, "PipeWire: %s (%s)", message ? message : "error", spa_strerror(res));
}

static const struct pw_core_events core_events = {
    PW_VERSION_CORE_EVENTS,
    .error = on_core_error,
};

/* ---- the node (on the worker thread) ---- */

int pwc_start(fshm_pwcam *c)
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
    if (cfg->format && *cfg->format && pwc_format_index(cfg->format) < 0)
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
    rc = pthread_create(&c->worker, NULL, pwc_worker_main, c);
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
        ts = pwc_abs_in(timeout_ns);
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
