/* Deterministic fake V4L2 device: see fake_v4l2.h. One global mutex guards everything;
 * poll() sleeps without it until the next frame is due. Only what frameshm and
 * libv4lconvert ask is implemented; anything else is ENOTTY like a driver without it. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fake_v4l2.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <linux/videodev2.h>

#define FMAX 8
#define DEVMAX 4
#define FDMAX 32
#define BUFMAX 32
#define ALLOCMAX 64

typedef struct ffmt {
    uint32_t fourcc, w, h, fps;
} ffmt;

/* Buffers of one REQBUFS: freed when neither the device nor any mapping uses them. */
typedef struct falloc {
    int used;
    int refs;                /* device ownership + live mappings */
    uint32_t n;
    size_t len, stride;      /* bytes per buffer, distance between buffers */
    uint8_t *mem;
} falloc;

typedef struct fbuf {
    int queued, done;
    uint32_t bytesused, sequence, flags;
    uint64_t ts;
} fbuf;

typedef struct fdev {
    int used;
    char path[64];
    /* config */
    ffmt fmts[FMAX];
    int nfmts;
    uint32_t pad, min_buffers, max_buffers, gone_after, gone_ms, error_every;
    int timeperframe, sparm_busy, eacces;
    /* state */
    uint32_t generation;     /* bumped when the device disappears: older fds are dead */
    int gone;
    uint64_t back_at;        /* gone_ms: when open() works again */
    uint32_t fourcc, w, h, bpl, sizeimage, max_fps;
    uint32_t fps_num, fps_den;
    int owner;               /* fd that owns the buffers (-1: none) */
    falloc *alloc;
    uint32_t nbufs, requested;
    fbuf bufs[BUFMAX];
    uint32_t qfifo[BUFMAX], qhead, qcount;   /* queued, filled in this order */
    uint32_t dfifo[BUFMAX], dhead, dcount;   /* done, dequeued in this order */
    int streaming;
    uint64_t t0, interval, k;                /* frame k is captured at t0 + k*interval */
    uint32_t sequence;
    uint64_t frames_made, frames_dropped, dqbufs, delivered, s_parm_calls, streamons;
} fdev;

typedef struct ffd {
    int fd;                  /* a real eventfd: unique, pollable, fstat-able */
    int dev;
    uint32_t generation;
} ffd;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static fdev devs[DEVMAX];
static ffd fds[FDMAX];
static int nfds_open;
static falloc allocs[ALLOCMAX];
static int env_loaded;

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint32_t bpp_of(uint32_t f)
{
    switch (f) {
    case V4L2_PIX_FMT_YUYV: case V4L2_PIX_FMT_UYVY: return 2;
    case V4L2_PIX_FMT_RGB24: case V4L2_PIX_FMT_BGR24: return 3;
    case V4L2_PIX_FMT_GREY: case V4L2_PIX_FMT_NV12: return 1;
    default: return 0;
    }
}

static uint32_t rows_of(uint32_t f, uint32_t h) { return f == V4L2_PIX_FMT_NV12 ? h * 3 / 2 : h; }

/* ---- configuration ---- */

static int parse_device(const char *spec)
{
    fdev d;
    memset(&d, 0, sizeof d);
    snprintf(d.path, sizeof d.path, "/dev/video0");
    d.min_buffers = 2;
    d.max_buffers = BUFMAX;
    d.timeperframe = 1;
    d.owner = -1;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", spec);
    char *save = NULL;
    for (char *tok = strtok_r(buf, " ;\t\n", &save); tok; tok = strtok_r(NULL, " ;\t\n", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq)
            return -EINVAL;
        *eq = 0;
        const char *k = tok, *v = eq + 1;
        if (!strcmp(k, "path")) {
            snprintf(d.path, sizeof d.path, "%s", v);
        } else if (!strcmp(k, "formats")) {
            char fb[512], *s2 = NULL;
            snprintf(fb, sizeof fb, "%s", v);
            for (char *f = strtok_r(fb, ",", &s2); f; f = strtok_r(NULL, ",", &s2)) {
                char cc[5] = {0};
                unsigned w, h, fps;
                if (d.nfmts >= FMAX || sscanf(f, "%4[^:]:%ux%u@%u", cc, &w, &h, &fps) != 4 || strlen(cc) != 4)
                    return -EINVAL;
                uint32_t fourcc = v4l2_fourcc(cc[0], cc[1], cc[2], cc[3]);
                if (!bpp_of(fourcc) || !w || !h || !fps)
                    return -EINVAL;
                d.fmts[d.nfmts++] = (ffmt){fourcc, w, h, fps};
            }
        } else {
            char *end;
            unsigned long n = strtoul(v, &end, 10);
            if (*end)
                return -EINVAL;
            if (!strcmp(k, "pad")) d.pad = (uint32_t)n;
            else if (!strcmp(k, "min_buffers")) d.min_buffers = (uint32_t)n;
            else if (!strcmp(k, "max_buffers")) d.max_buffers = n > BUFMAX ? BUFMAX : (uint32_t)n;
            else if (!strcmp(k, "timeperframe")) d.timeperframe = (int)n;
            else if (!strcmp(k, "sparm_busy")) d.sparm_busy = (int)n;
            else if (!strcmp(k, "gone_after")) d.gone_after = (uint32_t)n;
            else if (!strcmp(k, "gone_ms")) d.gone_ms = (uint32_t)n;
            else if (!strcmp(k, "eacces")) d.eacces = (int)n;
            else if (!strcmp(k, "error_every")) d.error_every = (uint32_t)n;
            else return -EINVAL;
        }
    }
    if (!d.nfmts)
        d.fmts[d.nfmts++] = (ffmt){V4L2_PIX_FMT_YUYV, 640, 480, 30};
    d.used = 1;
    int slot = -1;
    for (int i = 0; i < DEVMAX; i++)
        if (devs[i].used && !strcmp(devs[i].path, d.path))
            slot = i;
    for (int i = 0; i < DEVMAX && slot < 0; i++)
        if (!devs[i].used)
            slot = i;
    if (slot < 0)
        return -ENOSPC;
    d.generation = devs[slot].generation + 1;   /* fds of a replaced device die */
    devs[slot] = d;
    return 0;
}

static void load_env_locked(void)
{
    if (env_loaded)
        return;
    env_loaded = 1;
    const char *spec = getenv("FSHM_FAKE_V4L2");
    if (!spec)
        return;
    char buf[4096], *save = NULL;
    snprintf(buf, sizeof buf, "%s", spec);
    for (char *one = strtok_r(buf, "|", &save); one; one = strtok_r(NULL, "|", &save))
        if (parse_device(one))
            fprintf(stderr, "fake_v4l2: bad FSHM_FAKE_V4L2 entry: %s\n", one);
}

int fake_v4l2_configure(const char *spec)
{
    pthread_mutex_lock(&lock);
    env_loaded = 1;
    int rc = parse_device(spec);
    pthread_mutex_unlock(&lock);
    return rc;
}

static void alloc_unref(falloc *a)
{
    if (a && --a->refs == 0) {
        munmap(a->mem, a->stride * a->n);
        a->used = 0;
    }
}

static void drop_buffers(fdev *d)
{
    alloc_unref(d->alloc);
    d->alloc = NULL;
    d->nbufs = 0;
    d->owner = -1;
    d->streaming = 0;
    d->qcount = d->dcount = d->qhead = d->dhead = 0;
    memset(d->bufs, 0, sizeof d->bufs);
}

void fake_v4l2_reset(void)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < DEVMAX; i++) {
        if (devs[i].used)
            drop_buffers(&devs[i]);
        uint32_t gen = devs[i].generation + 1;
        memset(&devs[i], 0, sizeof devs[i]);
        devs[i].generation = gen;
    }
    env_loaded = 1;
    pthread_mutex_unlock(&lock);
}

static fdev *dev_by_path(const char *path)
{
    for (int i = 0; i < DEVMAX; i++)
        if (devs[i].used && !strcmp(devs[i].path, path))
            return &devs[i];
    return NULL;
}

/* The device disappears: every fd open on it is dead, its buffers stay mapped for
 * whoever mapped them, open() fails until it comes back. */
static void unplug_locked(fdev *d)
{
    if (d->gone)
        return;
    d->gone = 1;
    d->generation++;
    d->back_at = d->gone_ms ? now_ns() + (uint64_t)d->gone_ms * 1000000ull : 0;
    drop_buffers(d);
}

static void replug_locked(fdev *d)
{
    d->gone = 0;
    d->back_at = 0;
    d->fourcc = 0;   /* fresh device state, like a re-enumerated USB camera */
    d->delivered = 0;
}

void fake_v4l2_unplug(const char *path)
{
    pthread_mutex_lock(&lock);
    fdev *d = dev_by_path(path);
    if (d)
        unplug_locked(d);
    pthread_mutex_unlock(&lock);
}

void fake_v4l2_replug(const char *path)
{
    pthread_mutex_lock(&lock);
    fdev *d = dev_by_path(path);
    if (d)
        replug_locked(d);
    pthread_mutex_unlock(&lock);
}

void fake_v4l2_get_stats(const char *path, fake_v4l2_stats *o)
{
    memset(o, 0, sizeof *o);
    pthread_mutex_lock(&lock);
    load_env_locked();
    fdev *d = dev_by_path(path);
    if (d) {
        o->exists = 1;
        for (int i = 0; i < FDMAX; i++)
            o->open_fds += fds[i].fd > 0 && fds[i].dev == d - devs;
        o->mapped = d->alloc ? d->alloc->refs - 1 : 0;
        o->queued = (int)(d->qcount + d->dcount);   /* empty or filled, not yet dequeued */
        o->streaming = d->streaming;
        o->gone = d->gone;
        o->nbuffers = d->nbufs;
        o->requested = d->requested;
        o->fps_num = d->fps_num;
        o->fps_den = d->fps_den;
        o->bytesperline = d->bpl;
        o->frames_made = d->frames_made;
        o->frames_dropped = d->frames_dropped;
        o->dqbufs = d->dqbufs;
        o->s_parm_calls = d->s_parm_calls;
        o->streamons = d->streamons;
    }
    pthread_mutex_unlock(&lock);
}

int fake_v4l2_live_mappings(void)
{
    int n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < ALLOCMAX; i++)
        if (allocs[i].used)
            n += allocs[i].refs;
    for (int i = 0; i < DEVMAX; i++)
        if (devs[i].used && devs[i].alloc)
            n--;   /* the device's own reference is not a mapping */
    pthread_mutex_unlock(&lock);
    return n;
}

/* ---- the device ---- */

static void set_format(fdev *d, const ffmt *f)
{
    d->fourcc = f->fourcc;
    d->w = f->w;
    d->h = f->h;
    d->bpl = f->w * bpp_of(f->fourcc) + d->pad;
    d->sizeimage = d->bpl * rows_of(f->fourcc, f->h);
    d->max_fps = f->fps;
    d->fps_num = f->fps;
    d->fps_den = 1;
}

static void ensure_format(fdev *d)
{
    if (!d->fourcc)
        set_format(d, &d->fmts[0]);
}

/* Nearest entry: the fourcc if offered (else the first format), then the closest size. */
static const ffmt *nearest(fdev *d, uint32_t fourcc, uint32_t w, uint32_t h)
{
    int have = 0;
    for (int i = 0; i < d->nfmts; i++)
        have |= d->fmts[i].fourcc == fourcc;
    if (!have)
        fourcc = d->fmts[0].fourcc;
    const ffmt *best = NULL;
    uint64_t bestd = UINT64_MAX;
    for (int i = 0; i < d->nfmts; i++) {
        if (d->fmts[i].fourcc != fourcc)
            continue;
        int64_t dw = (int64_t)d->fmts[i].w - w, dh = (int64_t)d->fmts[i].h - h;
        uint64_t dist = (uint64_t)(dw * dw + dh * dh);
        if (dist < bestd)
            best = &d->fmts[i], bestd = dist;
    }
    return best;
}

static void fill_frame(fdev *d, uint8_t *p, uint32_t n)
{
    uint32_t row = d->w * bpp_of(d->fourcc), rows = rows_of(d->fourcc, d->h);
    for (uint32_t y = 0; y < rows; y++) {
        uint8_t *r = p + (size_t)y * d->bpl;
        uint8_t base = (uint8_t)(y + 4 * n);
        for (uint32_t x = 0; x < row; x++)
            r[x] = (uint8_t)(base + x);
        memset(r + row, 0xEE, d->bpl - row);
    }
    memcpy(p, &n, 4);
}

/* Captures every frame due by `now` into queued buffers (or drops it). */
static void advance(fdev *d, uint64_t now)
{
    if (!d->streaming || !d->interval)
        return;
    /* Long idle: skip ahead instead of generating thousands of dropped frames. */
    uint64_t due = d->t0 + d->k * d->interval;
    if (now > due + 64 * d->interval) {
        uint64_t skip = (now - due) / d->interval - 1;
        d->k += skip;
        d->sequence += (uint32_t)skip;
        d->frames_dropped += skip;
    }
    while (d->t0 + d->k * d->interval <= now) {
        uint64_t ts = d->t0 + d->k * d->interval;
        if (d->qcount) {
            uint32_t i = d->qfifo[d->qhead];
            d->qhead = (d->qhead + 1) % BUFMAX;
            d->qcount--;
            fbuf *b = &d->bufs[i];
            fill_frame(d, d->alloc->mem + (size_t)i * d->alloc->stride, d->sequence);
            b->queued = 0;
            b->done = 1;
            b->bytesused = d->sizeimage;
            b->sequence = d->sequence;
            b->ts = ts;
            b->flags = V4L2_BUF_FLAG_TIMESTAMP_MONOTONIC |
                       (d->error_every && (d->sequence + 1) % d->error_every == 0 ? V4L2_BUF_FLAG_ERROR : 0);
            d->dfifo[(d->dhead + d->dcount) % BUFMAX] = i;
            d->dcount++;
            d->frames_made++;
        } else {
            d->frames_dropped++;
        }
        d->sequence++;
        d->k++;
    }
}

static ffd *fd_lookup(int fd)
{
    for (int i = 0; i < FDMAX; i++)
        if (fds[i].fd == fd && fd > 0)
            return &fds[i];
    return NULL;
}

/* The device behind fd, or NULL with errno ENODEV when it disappeared since the open. */
static fdev *live_dev(ffd *f)
{
    fdev *d = &devs[f->dev];
    if (!d->used || d->gone || d->generation != f->generation) {
        errno = ENODEV;
        return NULL;
    }
    return d;
}

static int f_open(void *ctx, const char *path, int flags)
{
    (void)ctx, (void)flags;
    pthread_mutex_lock(&lock);
    load_env_locked();
    fdev *d = dev_by_path(path);
    int rc = -1;
    if (d && d->gone && d->back_at && now_ns() >= d->back_at)
        replug_locked(d);
    if (!d || d->gone) {
        errno = ENOENT;
    } else if (d->eacces) {
        errno = EACCES;
    } else if (nfds_open >= FDMAX) {
        errno = EMFILE;
    } else {
        int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (efd >= 0) {
            for (int i = 0; i < FDMAX; i++)
                if (fds[i].fd <= 0) {
                    fds[i] = (ffd){efd, (int)(d - devs), d->generation};
                    nfds_open++;
                    break;
                }
            ensure_format(d);
            rc = efd;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

static int f_close(void *ctx, int fd)
{
    (void)ctx;
    pthread_mutex_lock(&lock);
    ffd *f = fd_lookup(fd);
    if (!f) {
        pthread_mutex_unlock(&lock);
        errno = EBADF;
        return -1;
    }
    fdev *d = &devs[f->dev];
    if (d->used && d->generation == f->generation && d->owner == fd)
        drop_buffers(d);
    f->fd = 0;
    nfds_open--;
    pthread_mutex_unlock(&lock);
    return close(fd);
}

static int busy_for(fdev *d, int fd) { return d->owner >= 0 && d->owner != fd; }

static int do_ioctl(ffd *f, fdev *d, unsigned long req, void *arg)
{
    int fd = f->fd;
    switch (req) {
    case VIDIOC_QUERYCAP: {
        struct v4l2_capability *c = arg;
        memset(c, 0, sizeof *c);
        snprintf((char *)c->driver, sizeof c->driver, "fshm-fake");
        snprintf((char *)c->card, sizeof c->card, "frameshm fake camera");
        snprintf((char *)c->bus_info, sizeof c->bus_info, "fake:%s", d->path);
        c->version = 0x060000;
        c->device_caps = V4L2_CAP_VIDEO_CAPTURE | V4L2_CAP_STREAMING;
        c->capabilities = c->device_caps | V4L2_CAP_DEVICE_CAPS;
        return 0;
    }
    case VIDIOC_ENUM_FMT: {
        struct v4l2_fmtdesc *fd_ = arg;
        if (fd_->type != V4L2_BUF_TYPE_VIDEO_CAPTURE)
            return -EINVAL;
        uint32_t seen[FMAX], n = 0;
        for (int i = 0; i < d->nfmts; i++) {
            int dup = 0;
            for (uint32_t j = 0; j < n; j++)
                dup |= seen[j] == d->fmts[i].fourcc;
            if (dup)
                continue;
            if (n == fd_->index) {
                uint32_t idx = fd_->index;
                memset(fd_, 0, sizeof *fd_);
                fd_->index = idx;
                fd_->type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
                fd_->pixelformat = d->fmts[i].fourcc;
                snprintf((char *)fd_->description, sizeof fd_->description, "fake %.4s",
                         (const char *)&d->fmts[i].fourcc);
                return 0;
            }
            seen[n++] = d->fmts[i].fourcc;
        }
        return -EINVAL;
    }
    case VIDIOC_ENUM_FRAMESIZES: {
        struct v4l2_frmsizeenum *s = arg;
        uint32_t n = 0;
        for (int i = 0; i < d->nfmts; i++)
            if (d->fmts[i].fourcc == s->pixel_format && n++ == s->index) {
                s->type = V4L2_FRMSIZE_TYPE_DISCRETE;
                s->discrete.width = d->fmts[i].w;
                s->discrete.height = d->fmts[i].h;
                return 0;
            }
        return -EINVAL;
    }
    case VIDIOC_ENUM_FRAMEINTERVALS: {
        struct v4l2_frmivalenum *v = arg;
        for (int i = 0; i < d->nfmts; i++)
            if (d->fmts[i].fourcc == v->pixel_format && d->fmts[i].w == v->width && d->fmts[i].h == v->height) {
                /* fps, fps/2, fps/3, fps/6 when the rate can be set; else just fps */
                static const uint32_t div[] = {1, 2, 3, 6};
                uint32_t n = d->timeperframe ? 4 : 1;
                if (v->index >= n || d->fmts[i].fps / div[v->index] == 0)
                    return -EINVAL;
                v->type = V4L2_FRMIVAL_TYPE_DISCRETE;
                v->discrete.numerator = div[v->index];
                v->discrete.denominator = d->fmts[i].fps;
                return 0;
            }
        return -EINVAL;
    }
    case VIDIOC_G_FMT: case VIDIOC_S_FMT: case VIDIOC_TRY_FMT: {
        struct v4l2_format *fm = arg;
        if (fm->type != V4L2_BUF_TYPE_VIDEO_CAPTURE)
            return -EINVAL;
        if (req != VIDIOC_G_FMT) {
            const ffmt *n = nearest(d, fm->fmt.pix.pixelformat, fm->fmt.pix.width, fm->fmt.pix.height);
            if (req == VIDIOC_S_FMT) {
                if (busy_for(d, fd) || (d->owner == fd && d->nbufs))
                    return -EBUSY;   /* vb2: the queue is busy */
                set_format(d, n);
            } else {
                memset(&fm->fmt.pix, 0, sizeof fm->fmt.pix);
                fm->fmt.pix.pixelformat = n->fourcc;
                fm->fmt.pix.width = n->w;
                fm->fmt.pix.height = n->h;
                fm->fmt.pix.bytesperline = n->w * bpp_of(n->fourcc) + d->pad;
                fm->fmt.pix.sizeimage = fm->fmt.pix.bytesperline * rows_of(n->fourcc, n->h);
                fm->fmt.pix.field = V4L2_FIELD_NONE;
                fm->fmt.pix.colorspace = V4L2_COLORSPACE_SRGB;
                return 0;
            }
        }
        memset(&fm->fmt.pix, 0, sizeof fm->fmt.pix);
        fm->fmt.pix.pixelformat = d->fourcc;
        fm->fmt.pix.width = d->w;
        fm->fmt.pix.height = d->h;
        fm->fmt.pix.bytesperline = d->bpl;
        fm->fmt.pix.sizeimage = d->sizeimage;
        fm->fmt.pix.field = V4L2_FIELD_NONE;
        fm->fmt.pix.colorspace = V4L2_COLORSPACE_SRGB;
        return 0;
    }
    case VIDIOC_G_PARM: case VIDIOC_S_PARM: {
        struct v4l2_streamparm *p = arg;
        if (p->type != V4L2_BUF_TYPE_VIDEO_CAPTURE)
            return -EINVAL;
        if (req == VIDIOC_S_PARM) {
            if (!d->timeperframe)
                return -ENOTTY;
            d->s_parm_calls++;
            if (d->streaming && d->sparm_busy)
                return -EBUSY;
            uint32_t num = p->parm.capture.timeperframe.numerator, den = p->parm.capture.timeperframe.denominator;
            if (num && den) {
                /* fps = den/num, clamped to 1..max_fps, kept as a fraction */
                uint64_t fps_milli = (uint64_t)den * 1000 / num;
                if (fps_milli > (uint64_t)d->max_fps * 1000)
                    num = 1, den = d->max_fps;
                else if (fps_milli < 1000)
                    num = 1, den = 1;
                d->fps_num = den;
                d->fps_den = num;
                if (d->streaming) {   /* new pace from now on */
                    d->interval = (uint64_t)d->fps_den * 1000000000ull / d->fps_num;
                    d->t0 = now_ns();
                    d->k = 1;
                }
            }
        }
        memset(&p->parm, 0, sizeof p->parm);
        p->parm.capture.capability = d->timeperframe ? V4L2_CAP_TIMEPERFRAME : 0;
        p->parm.capture.timeperframe.numerator = d->fps_den;
        p->parm.capture.timeperframe.denominator = d->fps_num;
        p->parm.capture.readbuffers = 0;
        return 0;
    }
    case VIDIOC_REQBUFS: {
        struct v4l2_requestbuffers *r = arg;
        if (r->type != V4L2_BUF_TYPE_VIDEO_CAPTURE || r->memory != V4L2_MEMORY_MMAP)
            return -EINVAL;
        if (busy_for(d, fd) || d->streaming)
            return -EBUSY;
        d->requested = r->count;
        if (r->count == 0) {
            if (d->alloc && d->alloc->refs > 1)
                return -EBUSY;   /* still mapped */
            drop_buffers(d);
            return 0;
        }
        if (d->alloc && d->alloc->refs > 1)
            return -EBUSY;
        drop_buffers(d);
        uint32_t n = r->count < d->min_buffers ? d->min_buffers : r->count;
        if (n > d->max_buffers)
            n = d->max_buffers;
        falloc *a = NULL;
        for (int i = 0; i < ALLOCMAX && !a; i++)
            if (!allocs[i].used)
                a = &allocs[i];
        if (!a)
            return -ENOMEM;
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        a->len = d->sizeimage;
        a->stride = (a->len + page - 1) / page * page;
        a->n = n;
        a->mem = mmap(NULL, a->stride * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (a->mem == MAP_FAILED)
            return -ENOMEM;
        a->used = 1;
        a->refs = 1;
        d->alloc = a;
        d->nbufs = n;
        d->owner = fd;
        r->count = n;
        r->capabilities = V4L2_BUF_CAP_SUPPORTS_MMAP;
        return 0;
    }
    case VIDIOC_QUERYBUF: case VIDIOC_QBUF: case VIDIOC_DQBUF: {
        struct v4l2_buffer *b = arg;
        if (b->type != V4L2_BUF_TYPE_VIDEO_CAPTURE || b->memory != V4L2_MEMORY_MMAP)
            return -EINVAL;
        if (d->owner != fd)
            return busy_for(d, fd) ? -EBUSY : -EINVAL;
        if (req == VIDIOC_DQBUF) {
            if (!d->streaming)
                return -EINVAL;
            if (d->gone_after && d->delivered >= d->gone_after) {
                d->gone_after = 0;   /* one outage: the device that comes back stays */
                unplug_locked(d);
                return -ENODEV;
            }
            advance(d, now_ns());
            if (!d->dcount)
                return -EAGAIN;
            uint32_t i = d->dfifo[d->dhead];
            d->dhead = (d->dhead + 1) % BUFMAX;
            d->dcount--;
            fbuf *fb = &d->bufs[i];
            fb->done = 0;
            memset(b, 0, sizeof *b);
            b->index = i;
            b->type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
            b->memory = V4L2_MEMORY_MMAP;
            b->bytesused = fb->bytesused;
            b->flags = fb->flags | V4L2_BUF_FLAG_MAPPED;
            b->field = V4L2_FIELD_NONE;
            b->sequence = fb->sequence;
            b->timestamp.tv_sec = (time_t)(fb->ts / 1000000000ull);
            b->timestamp.tv_usec = (suseconds_t)(fb->ts % 1000000000ull / 1000);
            b->length = (uint32_t)d->alloc->len;
            b->m.offset = (uint32_t)(i * d->alloc->stride);
            d->dqbufs++;
            d->delivered++;
            return 0;
        }
        if (b->index >= d->nbufs)
            return -EINVAL;
        fbuf *fb = &d->bufs[b->index];
        if (req == VIDIOC_QBUF) {
            if (fb->queued || fb->done)
                return -EINVAL;
            fb->queued = 1;
            d->qfifo[(d->qhead + d->qcount) % BUFMAX] = b->index;
            d->qcount++;
            b->flags = V4L2_BUF_FLAG_QUEUED | V4L2_BUF_FLAG_MAPPED;
            return 0;
        }
        uint32_t idx = b->index;
        memset(b, 0, sizeof *b);
        b->index = idx;
        b->type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        b->memory = V4L2_MEMORY_MMAP;
        b->length = (uint32_t)d->alloc->len;
        b->m.offset = (uint32_t)(idx * d->alloc->stride);
        b->flags = (fb->queued ? V4L2_BUF_FLAG_QUEUED : 0) | (fb->done ? V4L2_BUF_FLAG_DONE : 0);
        return 0;
    }
    case VIDIOC_STREAMON: case VIDIOC_STREAMOFF: {
        if (*(int *)arg != V4L2_BUF_TYPE_VIDEO_CAPTURE)
            return -EINVAL;
        if (d->owner != fd)
            return busy_for(d, fd) ? -EBUSY : -EINVAL;
        if (req == VIDIOC_STREAMON) {
            if (!d->nbufs)
                return -EINVAL;
            if (!d->streaming) {
                d->streaming = 1;
                d->streamons++;
                d->interval = (uint64_t)d->fps_den * 1000000000ull / d->fps_num;
                d->t0 = now_ns();
                d->k = 1;
                d->sequence = 0;
            }
            return 0;
        }
        d->streaming = 0;
        for (uint32_t i = 0; i < d->nbufs; i++)
            d->bufs[i].queued = d->bufs[i].done = 0;
        d->qcount = d->dcount = d->qhead = d->dhead = 0;
        return 0;
    }
    default:
        return -ENOTTY;
    }
}

static int f_ioctl(void *ctx, int fd, unsigned long req, void *arg)
{
    (void)ctx;
    pthread_mutex_lock(&lock);
    int rc;
    ffd *f = fd_lookup(fd);
    fdev *d = f ? live_dev(f) : NULL;
    if (!f)
        rc = -EBADF;
    else if (!d)
        rc = -ENODEV;
    else
        rc = do_ioctl(f, d, req, arg);
    pthread_mutex_unlock(&lock);
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    return rc;
}

static void *f_mmap(void *ctx, void *addr, size_t len, int prot, int flags, int fd, int64_t off)
{
    (void)ctx, (void)addr, (void)prot, (void)flags;
    pthread_mutex_lock(&lock);
    void *res = MAP_FAILED;
    ffd *f = fd_lookup(fd);
    fdev *d = f ? live_dev(f) : NULL;
    if (!d) {
        errno = f ? ENODEV : EBADF;
    } else if (!d->alloc || d->owner != fd || off < 0 || (uint64_t)off % d->alloc->stride ||
               (uint64_t)off / d->alloc->stride >= d->nbufs || len > d->alloc->stride) {
        errno = EINVAL;
    } else {
        res = d->alloc->mem + off;
        d->alloc->refs++;
    }
    pthread_mutex_unlock(&lock);
    return res;
}

static int f_munmap(void *ctx, void *addr, size_t len)
{
    (void)ctx, (void)len;
    pthread_mutex_lock(&lock);
    int rc = -1;
    errno = EINVAL;
    for (int i = 0; i < ALLOCMAX; i++) {
        falloc *a = &allocs[i];
        if (a->used && (uint8_t *)addr >= a->mem && (uint8_t *)addr < a->mem + a->stride * a->n) {
            alloc_unref(a);
            rc = 0;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

static int f_poll(void *ctx, struct pollfd *pfds, nfds_t n, int timeout_ms)
{
    (void)ctx;
    uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        int ready = 0;
        uint64_t wake = deadline;
        pthread_mutex_lock(&lock);
        uint64_t now = now_ns();
        for (nfds_t i = 0; i < n; i++) {
            pfds[i].revents = 0;
            ffd *f = fd_lookup(pfds[i].fd);
            fdev *d = f ? live_dev(f) : NULL;
            if (!f) {
                pfds[i].revents = POLLNVAL;
            } else if (!d) {
                pfds[i].revents = POLLERR | POLLHUP;
            } else if (d->owner == f->fd) {
                advance(d, now);
                if (d->dcount)
                    pfds[i].revents = pfds[i].events & (POLLIN | POLLRDNORM);
                else if (!d->streaming || !d->qcount)
                    pfds[i].revents = POLLERR;   /* V4L2: nothing queued, nothing to wait for */
                else if (d->t0 + d->k * d->interval < wake)
                    wake = d->t0 + d->k * d->interval;
            }
            ready += pfds[i].revents != 0;
        }
        pthread_mutex_unlock(&lock);
        if (ready)
            return ready;
        now = now_ns();
        if (now >= deadline)
            return 0;
        /* Sleep to the next frame, at most 5 ms so that an unplug is seen promptly. */
        uint64_t sleep_ns = wake > now ? wake - now : 0;
        if (sleep_ns > 5000000)
            sleep_ns = 5000000;
        struct timespec ts = {(time_t)(sleep_ns / 1000000000ull), (long)(sleep_ns % 1000000000ull)};
        if (nanosleep(&ts, NULL) < 0 && errno == EINTR)
            return -1;   /* like poll(): a signal handler has to run */
    }
}

static const fshm_v4l2_backend fake_backend = {
    "fake", NULL, f_open, f_close, f_ioctl, f_mmap, f_munmap, f_poll,
};

const fshm_v4l2_backend *fshm_v4l2_test_backend(void) { return &fake_backend; }
