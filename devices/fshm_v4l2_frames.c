/* V4L2 frame delivery: dequeue (non-blocking, under the camera lock), software rate limit,
 * conversion into the delivered format, zero-copy hold and requeue, one-copy read and
 * capture into a stream, flush of stale frames. */
#include "fshm_v4l2_impl.h"

static uint64_t tv_ns(const struct timeval *tv)
{
    return (uint64_t)tv->tv_sec * 1000000000ull + (uint64_t)tv->tv_usec * 1000ull;
}

/* Non-blocking DQBUF under the lock: 0, -EAGAIN, or an error. */
static int dq_locked(fshm_v4l2_cam *c, struct v4l2_buffer *b)
{
    memset(b, 0, sizeof *b);
    b->type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    b->memory = V4L2_MEMORY_MMAP;
    int rc = cam_ioctl(c, VIDIOC_DQBUF, b);
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
        return cam_gone_error(c);
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
            rc = cam_queue_locked(c, (uint32_t)idx);
            pthread_mutex_unlock(&c->lock);
            if (rc)
                return cam_ioctl_error(c, rc, "VIDIOC_QBUF");
            continue;
        }
        if (rc != -EAGAIN)
            return cam_dqbuf_error(c, rc);
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
            return cam_dqbuf_error(c, rc);
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
    int rc = c->streaming ? cam_queue_locked(c, idx) : 0;
    pthread_mutex_unlock(&c->lock);
    return rc ? cam_ioctl_error(c, rc, "VIDIOC_QBUF") : 0;
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
        rc = cam_queue_locked(c, index);
    else
        c->bufs[index].state = BUF_IDLE;
    pthread_mutex_unlock(&c->lock);
    if (rc) {
        c->bufs[index].state = BUF_IDLE;
        return cam_ioctl_error(c, rc, "VIDIOC_QBUF");
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
        return cam_gone_error(c);
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
            int q = cam_queue_locked(c, keep[k]);
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
        return cam_dqbuf_error(c, dq_err);
    if (rc)
        return cam_ioctl_error(c, rc, "VIDIOC_QBUF");
    return discarded;
}

void fshm_v4l2_get_stats(const fshm_v4l2_cam *c, fshm_v4l2_stats *out) { *out = c->stats; }
