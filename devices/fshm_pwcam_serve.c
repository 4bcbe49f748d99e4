/* The virtual camera's worker thread: the frameshm reader (opened while a client streams,
 * closed when none does), learning the layout from the stream's newest frame and the
 * producer's rate from about a second of frames, and serving: the newest committed frame
 * copied into a PipeWire buffer and sent, with the warnings and events of a producer that
 * goes and comes back, mismatched frames and starved buffers. The PipeWire node it starts
 * (pwc_start) and its callbacks are in fshm_pwcam.c. */
#include "fshm_pwcam_impl.h"

#ifdef FSHM_HAVE_PIPEWIRE

#define SERVE_WAIT_NS 100000000ll     /* longest frame wait: stop/idle are noticed this fast */
#define READY_TIMEOUT_NS 10000000000ull
#define MEASURE_NS 1000000000ull      /* rate measurement window */
#define MEASURE_FRAMES 16
#define FALLBACK_FPS 30
#define STARVE_NS 1000000000ull       /* no free buffer this long: say so */

static int64_t mono_left(uint64_t deadline)
{
    uint64_t now = fshm_now_ns();
    return now >= deadline ? 0 : (int64_t)(deadline - now);
}

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
        pwc_push_event(c, FSHM_PWCAM_EV_WARNING, "stream '%s': under two frames in %.1f s, so its rate "
                       "could not be measured; announcing %d fps (give fps to set it)", c->stream_name,
                       MEASURE_NS / 1e9, FALLBACK_FPS);
    }
    return 0;
}

static int frame_fits(const fshm_pwcam_layout *l, const fshm_frame *f)
{
    const fshm_tensor *t = &f->tensor;
    if (t->dtype != l->dtype || t->ndims < 2 || t->ndims > 3 || t->dims[0] != l->dims[0] ||
        t->dims[1] != l->dims[1] || (t->ndims == 3 ? t->dims[2] : 1) != (l->ndims == 3 ? l->dims[2] : 1))
        return 0;
    return f->nbytes >= l->frame_bytes && pwc_contiguous(t);
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
        pwc_push_event(c, FSHM_PWCAM_EV_PRODUCER_GONE, "stream '%s' has no producer (%s); the node stays "
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
            pwc_push_event(c, FSHM_PWCAM_EV_WARNING, "stream '%s': %s (frames skipped)", c->stream_name,
                           fshm_last_error());
        }
        struct timespec ts = {0, SERVE_WAIT_NS};   /* an error returns at once: do not spin */
        nanosleep(&ts, NULL);
        return;
    }
    c->error_warned = 0;
    if (c->producer_gone) {
        c->producer_gone = 0;
        pwc_push_event(c, FSHM_PWCAM_EV_PRODUCER_BACK, "stream '%s' has frames again", c->stream_name);
    }
    if (!frame_fits(&c->layout, &f)) {
        atomic_fetch_add_explicit(&c->mismatched, 1, memory_order_relaxed);
        if (!c->mismatch_warned) {
            char shape[96];
            c->mismatch_warned = 1;
            pwc_shape_text(&f.tensor, shape, sizeof shape);
            pwc_push_event(c, FSHM_PWCAM_EV_WARNING, "stream '%s' now carries %s %s frames, not the %s "
                           "%ux%u the node serves: skipped (restart the virtual camera to serve them)",
                           c->stream_name, pwc_dtype_name(f.tensor.dtype), shape, c->layout.format,
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
            pwc_push_event(c, FSHM_PWCAM_EV_WARNING, "clients have held every PipeWire buffer for %.0f s: "
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
            pwc_push_event(c, FSHM_PWCAM_EV_WARNING, "PipeWire gave %s buffers of %u bytes for %u-byte "
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
                pwc_fail(c, FSHM_E_PW, "PipeWire did not publish the virtual camera's node within 10 s");
                pthread_mutex_lock(&c->mu);
                break;
            }
            struct timespec ts = pwc_abs_in(SERVE_WAIT_NS);
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
            pwc_push_event(c, FSHM_PWCAM_EV_IDLE, "no client streams: stopped reading '%s'", c->stream_name);
            continue;
        }
        if (!c->reader) {
            if (open_reader(c)) {
                if (!open_warned)
                    pwc_push_event(c, FSHM_PWCAM_EV_WARNING, "cannot read stream '%s': %s (retrying)",
                                   c->stream_name, fshm_last_error());
                open_warned = 1;
                struct timespec ts = {0, 5 * SERVE_WAIT_NS};
                nanosleep(&ts, NULL);
                continue;
            }
            open_warned = 0;
            pwc_push_event(c, FSHM_PWCAM_EV_STREAMING, "streaming: serving the newest frames of '%s' to "
                           "%u client(s)", c->stream_name, clients);
        }
        serve_one(c);
    }
}

void *pwc_worker_main(void *arg)
{
    fshm_pwcam *c = arg;
    int rc = learn(c);
    if (rc == 0)
        rc = pwc_start(c);
    if (rc && rc != -ECANCELED)
        pwc_fail(c, rc, fshm_last_error());
    if (rc == 0)
        serve_loop(c);
    close_reader(c);
    return NULL;
}

#endif /* FSHM_HAVE_PIPEWIRE */
