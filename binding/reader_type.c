/* frameshm._core.Reader: the consumer side of a stream. Waits release the GIL; calls from
 * several threads are serialised by the Reader's guard, a wait holding it a slice at a time. */
#include "binding.h"

#include <unistd.h>

#define MAP_CACHE 8

typedef struct {
    PyObject_HEAD
    fshm_reader *r;
    fshm_guard guard;        /* held by every call into r (binding.h) */
    fshm_map *cache_key[MAP_CACHE];
    PyObject *cache_obj[MAP_CACHE];
    unsigned cache_next;
    fshm_frame_maker frames;
} FshmReader;

#define CHECK_OPEN(self)                                                                         \
    if (!(self)->r)                                                                              \
        return fshm_raise_closed("Reader");

/* Enters the guard around a call into the reader: `r` is the handle, or the function
 * returns NULL with the exception set. */
#define ENTER(self, r)                                                                           \
    fshm_reader *r = fshm_guard_open(&(self)->guard, (void *const *)&(self)->r, "Reader");       \
    if (!r)                                                                                      \
        return NULL;
#define LEAVE(self) fshm_guard_leave(&(self)->guard)

/* Wait slices: short, so a call from another thread (valid(), producer, close) waits at
 * most this long behind a wait with no frame coming. */
#define READER_SLICE_NS 50000000ll

static int reader_init(FshmReader *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "stream_id", "consumer", "base_dir", "namespace", "spin",
                             "subscribe", "max_rate_hz", "driver", "publish_mode", "client_id",
                             "lease_events", "frame_type", "dtypes", "foreign", "array_type", "queue",
                             NULL};
    PyObject *name = Py_None, *consumer = Py_None, *base = Py_None, *ns = Py_None;
    PyObject *driver = Py_None, *pmode = Py_None, *frame_type = Py_None, *dtypes = Py_None;
    PyObject *array_type = Py_None;
    unsigned long sid = 0, rate = 0, client = 0;
    int spin = 1, subscribe = 1, lease_events = 0, foreign = 0, queue = 1;
    if (self->r) {
        PyErr_SetString(fshm_exc_state, "Reader already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$kOOOppkOOkpOOpOp", kwlist, &name, &sid, &consumer,
                                     &base, &ns, &spin, &subscribe, &rate, &driver, &pmode, &client,
                                     &lease_events, &frame_type, &dtypes, &foreign, &array_type,
                                     &queue))
        return -1;
    if (fshm_frame_maker_set(&self->frames, frame_type, dtypes, array_type))
        return -1;
    fshm_reader_config cfg = FSHM_READER_CONFIG_INIT;
    if (fshm_parse_driver(driver, pmode, client, &cfg.driver, &cfg.publish_mode, &cfg.client_id))
        return -1;
    cfg.lease_events = lease_events;
    cfg.foreign = foreign;
    if (fshm_parse_addr(name, sid, base, ns, &cfg.addr))
        return -1;
    cfg.spin = spin;
    cfg.passive = !subscribe;
    cfg.no_queue = !queue;
    if (rate > 1000000) {
        PyErr_SetString(fshm_exc_invalid, "max_rate_hz must be between 0 (unlimited) and 1000000");
        return -1;
    }
    cfg.max_rate_hz = (uint32_t)rate;
    if (consumer != Py_None) {
        cfg.consumer = fshm_cstr(consumer, "consumer");
        if (!cfg.consumer)
            return -1;
    }
    fshm_reader *r = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_reader_open(&cfg, &r);
    Py_END_ALLOW_THREADS
    if (rc) {
        fshm_raise(rc);
        return -1;
    }
    self->r = r;
    return 0;
}

static void clear_cache(FshmReader *self)
{
    fshm_frame_maker_forget(&self->frames, NULL);
    for (unsigned i = 0; i < MAP_CACHE; i++) {
        self->cache_key[i] = NULL;
        Py_CLEAR(self->cache_obj[i]);
    }
}

static void reader_dealloc(FshmReader *self)
{
    if (self->r)
        fshm_reader_close(self->r);
    clear_cache(self);
    fshm_frame_maker_clear(&self->frames);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

fshm_reader *fshm_reader_handle(PyObject *reader)
{
    return ((FshmReader *)reader)->r;
}

fshm_frame_maker *fshm_reader_frames(PyObject *reader)
{
    return &((FshmReader *)reader)->frames;
}

/* The Mapping object for a frame's pool: one Python object per mapping, so views
 * of the same pool share it. */
static PyObject *mapping_for(FshmReader *self, fshm_map *m)
{
    for (unsigned i = 0; i < MAP_CACHE; i++)
        if (self->cache_key[i] == m) {
            Py_INCREF(self->cache_obj[i]);
            return self->cache_obj[i];
        }
    PyObject *obj = fshm_mapping_new(m);
    if (!obj)
        return NULL;
    unsigned slot = self->cache_next++ % MAP_CACHE;
    /* The slot arrays over an evicted mapping go with it: they would keep it mapped. */
    if (self->cache_obj[slot])
        fshm_frame_maker_forget(&self->frames, self->cache_obj[slot]);
    Py_XDECREF(self->cache_obj[slot]);
    self->cache_key[slot] = m;
    self->cache_obj[slot] = obj;
    Py_INCREF(obj);
    return obj;
}

/* The Mapping of the header ring a frame came from: valid() re-checks the frame's slot
 * there, without the Reader (so from any thread, and after close). */
static PyObject *ring_mapping(FshmReader *self, fshm_map *ring)
{
    return ring ? mapping_for(self, ring) : Py_NewRef(Py_None);
}

/* What a call under the guard hands to frame_view: the frame and references to its pool
 * and ring mappings, taken before the guard is left (another thread's call may remap). */
typedef struct {
    fshm_frame f;
    fshm_map *ring;
} held_frame;

static void hold_frame(fshm_reader *r, held_frame *h)
{
    fshm_map_ref(h->f.map);
    h->ring = fshm_reader_ring(r);
    if (h->ring)
        fshm_map_ref(h->ring);
}

static void unhold_frame(held_frame *h)
{
    fshm_map_unref(h->f.map);
    if (h->ring)
        fshm_map_unref(h->ring);
}

/* The frame object for h->f, a view into its pool's mapping; drops h's references. */
static PyObject *frame_view(FshmReader *self, held_frame *h)
{
    PyObject *frame = NULL;
    PyObject *map = mapping_for(self, h->f.map);
    PyObject *ring = map ? ring_mapping(self, h->ring) : NULL;
    if (ring) {
        size_t off = (size_t)((const uint8_t *)h->f.data - (const uint8_t *)fshm_map_base(h->f.map));
        frame = fshm_frame_new(&self->frames, (PyObject *)self, map, ring, (Py_ssize_t)off, &h->f);
    }
    Py_XDECREF(map);
    Py_XDECREF(ring);
    unhold_frame(h);
    return frame;
}

typedef struct {
    int latest;
    held_frame h;
    int last_rc;        /* what the last slice's wait returned */
    FshmReader *self;
    int rehearse;       /* build prev's Frame and array as a spin window opens */
} wait_arg;

/* fshm_reader_on_window's hook: the frame about to come takes the path a frame takes to
 * the caller (held mappings, the Frame object, its array view), and on a shared host that
 * path goes cold over a frame period: 25-35 us of the 40-50 us from commit to a Python
 * consumer holding the view, against 1-2 us when warm (docs/benchmarks.md §11). So it is
 * walked once for the previous frame while the new one is being filled. Inside the wait
 * (the guard held, the GIL not); nothing here calls into the reader. */
static void rehearse(void *arg, const fshm_frame *prev)
{
    static PyObject *array_name;
    wait_arg *a = arg;
    if (!prev)
        return;
    held_frame h = {.f = *prev};
    hold_frame(a->self->r, &h);
    PyGILState_STATE st = PyGILState_Ensure();
    PyObject *frame = frame_view(a->self, &h);   /* drops h's references */
    if (frame && a->self->frames.array_type &&
        (array_name || (array_name = PyUnicode_InternFromString("array"))))
        Py_XDECREF(PyObject_GetAttr(frame, array_name));
    Py_XDECREF(frame);
    PyErr_Clear();   /* a failure here is the next frame's to report, if it recurs */
    PyGILState_Release(st);
}

/* Whether the hook may take the GIL from inside the wait: only while ours is the
 * interpreter's one thread. Another thread may hold the GIL for its whole switch interval
 * (5 ms), and the frame would wait for that twice. And only for frames that build what a
 * Reader of frameshm builds (an array_type of numpy's): a caller's own factory is not run
 * for frames it never asked for. */
static int may_rehearse(FshmReader *self)
{
    PyObject *at = self->frames.array_type;
    if (at && (!PyType_Check(at) || strcmp(((PyTypeObject *)at)->tp_name, "numpy.ndarray") != 0))
        return 0;
    PyThreadState *head = PyInterpreterState_ThreadHead(PyThreadState_GetInterpreter(PyThreadState_Get()));
    return head && !PyThreadState_Next(head);
}

static int wait_slice(void *obj, int64_t slice_ns, void *arg)
{
    FshmReader *self = obj;
    wait_arg *a = arg;
    uint64_t end = fshm_now_ns() + (uint64_t)slice_ns;
    fshm_reader_on_window(self->r, a->rehearse ? rehearse : NULL, a);
    int rc = a->latest ? fshm_reader_wait_latest(self->r, slice_ns, &a->h.f)
                       : fshm_reader_wait_next(self->r, slice_ns, &a->h.f);
    fshm_reader_on_window(self->r, NULL, NULL);
    a->last_rc = rc;
    if (rc == 0) {
        hold_frame(self->r, &a->h);
        return 0;
    }
    /* A wait that ran out reports why (no producer, producer dead, frames dropped as
     * corrupt); only the slice ran out unless the caller's whole timeout did. */
    if ((rc == FSHM_E_PRODUCER_DEAD || rc == FSHM_E_CORRUPT) && fshm_now_ns() >= end)
        return -ETIMEDOUT;
    return rc;
}

/* (timeout=None), parsed by hand: the keyword parser costs a good part of a wait that
 * finds its frame already there. */
static PyObject *do_wait(FshmReader *self, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames, int latest)
{
    const char *name = latest ? "wait_latest" : "wait_next";
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *tobj = Py_None;
    if (nargs + nkw > 1)
        return PyErr_Format(PyExc_TypeError, "%s() takes at most 1 argument (timeout)", name);
    if (nargs == 1)
        tobj = args[0];
    if (nkw == 1) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, 0);
        if (!PyUnicode_Check(key) || PyUnicode_CompareWithASCIIString(key, "timeout") != 0)
            return PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R",
                                name, key);
        tobj = args[nargs];
    }
    wait_arg a = {.latest = latest, .self = self, .rehearse = may_rehearse(self)};
    int64_t timeout;
    int rc = fshm_run_sliced(self, &self->guard, (void *const *)&self->r, "Reader", tobj,
                             READER_SLICE_NS, wait_slice, &a, &timeout);
    if (rc == INT_MIN)
        return NULL;
    if (rc == -ETIMEDOUT)
        rc = a.last_rc;   /* the last slice's own answer, whose message is this thread's */
    if (rc)
        return fshm_raise(rc);
    return frame_view(self, &a.h);
}

static PyObject *reader_wait_latest(FshmReader *self, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    return do_wait(self, args, nargs, kwnames, 1);
}

static PyObject *reader_wait_next(FshmReader *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    return do_wait(self, args, nargs, kwnames, 0);
}

/* Runs stmt on r (the guard held), without the GIL when the reader may first have to
 * re-attach through the driver (a round trip): the usual case stays a plain call. */
#define LEASE_AWARE(r, stmt)                                                                     \
    do {                                                                                         \
        if (fshm_reader_lease_ok(r)) {                                                           \
            stmt;                                                                                \
        } else {                                                                                 \
            Py_BEGIN_ALLOW_THREADS                                                               \
            stmt;                                                                                \
            Py_END_ALLOW_THREADS                                                                 \
        }                                                                                        \
    } while (0)

static PyObject *reader_peek_latest(FshmReader *self, PyObject *unused)
{
    held_frame h;
    int rc;
    ENTER(self, r);
    LEASE_AWARE(r, rc = fshm_reader_peek_latest(r, &h.f));
    if (rc == 0)
        hold_frame(r, &h);
    LEAVE(self);
    if (rc == -EAGAIN)
        Py_RETURN_NONE;
    if (rc)
        return fshm_raise(rc);
    return frame_view(self, &h);
}

static void backoff(int attempt)
{
    Py_BEGIN_ALLOW_THREADS
    usleep(20u << (attempt < 6 ? attempt : 6));
    Py_END_ALLOW_THREADS
}

/* Newest frame copied into a fresh bytearray (the returned frame's buffer), retried until
 * the copy is untorn. */
static PyObject *reader_read_copy(FshmReader *self, PyObject *unused)
{
    CHECK_OPEN(self);
    for (int attempt = 0; attempt < 100; attempt++) {
        held_frame h;
        int rc;
        {
            ENTER(self, r);
            LEASE_AWARE(r, rc = fshm_reader_peek_latest(r, &h.f));
            if (rc == 0)
                hold_frame(r, &h);   /* a remap by another call must not unmap h.f.data */
            LEAVE(self);
        }
        if (rc == -EAGAIN)
            Py_RETURN_NONE;
        if (rc == FSHM_E_OVERRUN && attempt < 99) {
            backoff(attempt);
            continue;
        }
        if (rc)
            return fshm_raise(rc);
        PyObject *ba = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)h.f.nbytes);
        PyObject *ring = ba ? ring_mapping(self, h.ring) : NULL;
        if (!ring) {
            Py_XDECREF(ba);
            unhold_frame(&h);
            return NULL;
        }
        /* The copy and its check need only the mappings we hold, not the reader. */
        int torn;
        Py_BEGIN_ALLOW_THREADS
        memcpy(PyByteArray_AS_STRING(ba), h.f.data, h.f.nbytes);
        torn = !fshm_ring_holds(h.ring, h.f.slot, h.f.seq);
        Py_END_ALLOW_THREADS
        PyObject *frame = NULL;
        if (!torn)
            frame = fshm_frame_new(&self->frames, (PyObject *)self, ba, ring, 0, &h.f);
        unhold_frame(&h);
        Py_DECREF(ba);
        Py_DECREF(ring);
        if (!torn)
            return frame;
        /* Overwritten mid-copy (few slots, fast producer): back off a little so the
         * producer finishes its write, then take the newer frame. */
        backoff(attempt);
    }
    /* Every one of the 100 copies was torn: the producer rewrites the slot faster than a copy. */
    fshm_set_error(FSHM_E_OVERRUN, "read_latest(copy=True) starved: the producer overwrote the "
                   "frame during each of 100 copies (use more slots or wait_latest)");
    return fshm_raise(FSHM_E_OVERRUN);
}

static PyObject *reader_valid(FshmReader *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "valid(epoch, slot, seq)");
        return NULL;
    }
    fshm_frame f;
    memset(&f, 0, sizeof f);
    f.epoch = PyLong_AsUnsignedLongLong(args[0]);
    f.slot = (uint32_t)PyLong_AsUnsignedLong(args[1]);
    f.seq = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    ENTER(self, r);
    int ok = fshm_frame_valid(r, &f);
    LEAVE(self);
    return PyBool_FromLong(ok);
}

static PyObject *reader_producer(FshmReader *self, PyObject *unused)
{
    int64_t pid = 0;
    int st;
    ENTER(self, r);
    LEASE_AWARE(r, st = fshm_reader_producer_state(r, &pid));
    LEAVE(self);
    static const char *names[] = {"none", "alive", "dead", "closed"};
    return Py_BuildValue("(sL)", names[st & 3], (long long)pid);
}

static PyObject *reader_close(FshmReader *self, PyObject *unused)
{
    if (self->r) {
        /* Waits for a call in progress on another thread (at most a wait slice); that
         * thread's wait then ends with StreamClosed. */
        if (fshm_guard_enter(&self->guard) < 0)
            return NULL;
        fshm_reader *r = self->r;
        self->r = NULL;
        fshm_guard_leave(&self->guard);
        if (r) {
            Py_BEGIN_ALLOW_THREADS
            fshm_reader_close(r);   /* frames' Mapping objects keep their regions mapped */
            Py_END_ALLOW_THREADS
        }
    }
    clear_cache(self);
    Py_RETURN_NONE;
}

static PyObject *reader_control(FshmReader *self, PyObject *index)
{
    unsigned i;
    if (fshm_parse_control(index, NULL, &i, NULL))
        return NULL;
    int v;
    ENTER(self, r);
    LEASE_AWARE(r, v = fshm_reader_control(r, i));
    LEAVE(self);
    return v < 0 ? fshm_raise(v) : PyLong_FromLong(v);
}

static PyObject *reader_set_control(FshmReader *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_control(index, value)");
        return NULL;
    }
    unsigned i;
    uint8_t v;
    if (fshm_parse_control(args[0], args[1], &i, &v))
        return NULL;
    int rc;
    ENTER(self, r);
    /* Under the sealed transport this is a round trip to the driver: never with the GIL. */
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_reader_set_control(r, i, v);
    Py_END_ALLOW_THREADS
    LEAVE(self);
    if (rc)
        return fshm_raise(rc);
    Py_RETURN_NONE;
}

#define RGET(fn, T, conv, expr)                                                                  \
    static PyObject *fn(FshmReader *self, void *c)                                               \
    {                                                                                            \
        ENTER(self, r);                                                                          \
        T v = expr;                                                                              \
        LEAVE(self);                                                                             \
        return conv(v);                                                                          \
    }
RGET(reader_epoch, uint64_t, PyLong_FromUnsignedLongLong, fshm_reader_epoch(r))
RGET(reader_stream_id, uint32_t, PyLong_FromUnsignedLong, fshm_reader_stream_id(r))
RGET(reader_overruns, uint64_t, PyLong_FromUnsignedLongLong, fshm_reader_overruns(r))
RGET(reader_drops, uint64_t, PyLong_FromUnsignedLongLong, fshm_reader_drops(r))

static PyObject *reader_queue(FshmReader *self, void *c)
{
    ENTER(self, r);
    char q[32];
    snprintf(q, sizeof q, "%s", fshm_reader_queue_name(r));
    LEAVE(self);
    return PyUnicode_FromString(q);
}

static PyObject *reader_closed(FshmReader *self, void *c) { return PyBool_FromLong(self->r == NULL); }

static PyMethodDef reader_methods[] = {
    {"wait_latest", (PyCFunction)(void (*)(void))reader_wait_latest, METH_FASTCALL | METH_KEYWORDS,
     "wait_latest(timeout=None) -> Frame"},
    {"wait_next", (PyCFunction)(void (*)(void))reader_wait_next, METH_FASTCALL | METH_KEYWORDS,
     "wait_next(timeout=None) -> Frame"},
    {"peek_latest", (PyCFunction)reader_peek_latest, METH_NOARGS, "newest Frame (a view) or None"},
    {"read_copy", (PyCFunction)reader_read_copy, METH_NOARGS,
     "newest Frame with its bytes copied (untorn) into a private bytearray; None if no frame"},
    {"valid", (PyCFunction)(void (*)(void))reader_valid, METH_FASTCALL, "valid(epoch, slot, seq)"},
    {"producer", (PyCFunction)reader_producer, METH_NOARGS, "(state, pid)"},
    {"control", (PyCFunction)reader_control, METH_O, "control(index) -> control byte (0..255)"},
    {"set_control", (PyCFunction)(void (*)(void))reader_set_control, METH_FASTCALL,
     "set_control(index, value): sets a control byte"},
    {"close", (PyCFunction)reader_close, METH_NOARGS, "close()"},
    {NULL},
};

static PyGetSetDef reader_getset[] = {
    {"epoch", (getter)reader_epoch, NULL, NULL, NULL},
    {"stream_id", (getter)reader_stream_id, NULL, NULL, NULL},
    {"overruns", (getter)reader_overruns, NULL, NULL, NULL},
    {"drops", (getter)reader_drops, NULL, NULL, NULL},
    {"queue_name", (getter)reader_queue, NULL, NULL, NULL},
    {"closed", (getter)reader_closed, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject FshmReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "frameshm._core.Reader",
    .tp_basicsize = sizeof(FshmReader),
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Low-level stream consumer; use frameshm.Reader.",
    .tp_methods = reader_methods,
    .tp_getset = reader_getset,
    .tp_init = (initproc)reader_init,
    .tp_new = PyType_GenericNew,
};
