/* frameshm._core.Reader: the consumer side of a stream. Waits release the GIL. */
#include "binding.h"

#include <unistd.h>

#define MAP_CACHE 8

typedef struct {
    PyObject_HEAD
    fshm_reader *r;
    int busy;
    fshm_map *cache_key[MAP_CACHE];
    PyObject *cache_obj[MAP_CACHE];
    unsigned cache_next;
    fshm_frame_maker frames;
} FshmReader;

#define CHECK_OPEN(self)                                                                         \
    if (!(self)->r)                                                                              \
        return fshm_raise_closed("Reader");

static int reader_init(FshmReader *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "stream_id", "consumer", "base_dir", "namespace", "spin",
                             "subscribe", "max_rate_hz", "driver", "publish_mode", "client_id",
                             "lease_events", "frame_type", "dtypes", "foreign", NULL};
    PyObject *name = Py_None, *consumer = Py_None, *base = Py_None, *ns = Py_None;
    PyObject *driver = Py_None, *pmode = Py_None, *frame_type = Py_None, *dtypes = Py_None;
    unsigned long sid = 0, rate = 0, client = 0;
    int spin = 1, subscribe = 1, lease_events = 0, foreign = 0;
    if (self->r) {
        PyErr_SetString(fshm_exc_state, "Reader already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$kOOOppkOOkpOOp", kwlist, &name, &sid, &consumer,
                                     &base, &ns, &spin, &subscribe, &rate, &driver, &pmode, &client,
                                     &lease_events, &frame_type, &dtypes, &foreign))
        return -1;
    if (fshm_frame_maker_set(&self->frames, frame_type, dtypes))
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
    if (rate > 1000000) {
        PyErr_SetString(fshm_exc_invalid, "max_rate_hz must be between 0 (unlimited) and 1000000");
        return -1;
    }
    cfg.max_rate_hz = (uint32_t)rate;
    if (consumer != Py_None) {
        if (!PyUnicode_Check(consumer)) {
            PyErr_SetString(PyExc_TypeError, "consumer must be a str");
            return -1;
        }
        cfg.consumer = PyUnicode_AsUTF8(consumer);
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
    Py_XDECREF(self->cache_obj[slot]);
    self->cache_key[slot] = m;
    self->cache_obj[slot] = obj;
    Py_INCREF(obj);
    return obj;
}

/* The frame object for f, a view into its pool's mapping. */
static PyObject *frame_view(FshmReader *self, const fshm_frame *f)
{
    PyObject *map = mapping_for(self, f->map);
    if (!map)
        return NULL;
    size_t off = (size_t)((const uint8_t *)f->data - (const uint8_t *)fshm_map_base(f->map));
    PyObject *frame = fshm_frame_new(&self->frames, (PyObject *)self, map, (Py_ssize_t)off, f);
    Py_DECREF(map);
    return frame;
}

static PyObject *do_wait(FshmReader *self, PyObject *args, PyObject *kw, int latest)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *tobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O", kwlist, &tobj))
        return NULL;
    CHECK_OPEN(self);
    int64_t timeout;
    if (fshm_parse_timeout(tobj, &timeout))
        return NULL;
    if (self->busy)
        return PyErr_Format(fshm_exc_state, "Reader used from two threads at once");
    uint64_t deadline = timeout < 0 ? 0 : fshm_now_ns() + (uint64_t)timeout;
    fshm_frame f;
    int rc;
    self->busy = 1;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = latest ? fshm_reader_wait_latest(self->r, timeout, &f)
                    : fshm_reader_wait_next(self->r, timeout, &f);
        Py_END_ALLOW_THREADS
        if (rc != -EINTR)
            break;
        /* A signal: let Python run its handler (Ctrl-C raises KeyboardInterrupt). */
        if (PyErr_CheckSignals() < 0) {
            self->busy = 0;
            return NULL;
        }
        if (timeout >= 0) {
            uint64_t now = fshm_now_ns();
            timeout = now >= deadline ? 0 : (int64_t)(deadline - now);
        }
    }
    self->busy = 0;
    if (rc)
        return fshm_raise(rc);
    return frame_view(self, &f);
}

static PyObject *reader_wait_latest(FshmReader *self, PyObject *args, PyObject *kw)
{
    return do_wait(self, args, kw, 1);
}

static PyObject *reader_wait_next(FshmReader *self, PyObject *args, PyObject *kw)
{
    return do_wait(self, args, kw, 0);
}

/* Runs stmt, without the GIL when the reader may first have to re-attach through the
 * driver (a round trip): the usual case stays a plain call. */
#define LEASE_AWARE(self, stmt)                                                                  \
    do {                                                                                         \
        if ((self)->busy || fshm_reader_lease_ok((self)->r)) {                                   \
            stmt;                                                                                \
        } else {                                                                                 \
            (self)->busy = 1;                                                                    \
            Py_BEGIN_ALLOW_THREADS                                                               \
            stmt;                                                                                \
            Py_END_ALLOW_THREADS                                                                 \
            (self)->busy = 0;                                                                    \
        }                                                                                        \
    } while (0)

static PyObject *reader_peek_latest(FshmReader *self, PyObject *unused)
{
    CHECK_OPEN(self);
    fshm_frame f;
    int rc;
    LEASE_AWARE(self, rc = fshm_reader_peek_latest(self->r, &f));
    if (rc == -EAGAIN)
        Py_RETURN_NONE;
    if (rc)
        return fshm_raise(rc);
    return frame_view(self, &f);
}

/* Newest frame copied into a fresh bytearray (the returned frame's buffer), retried until
 * the copy is untorn. */
static PyObject *reader_read_copy(FshmReader *self, PyObject *unused)
{
    CHECK_OPEN(self);
    if (self->busy)
        return PyErr_Format(fshm_exc_state, "Reader used from two threads at once");
    for (int attempt = 0; attempt < 100; attempt++) {
        fshm_frame f;
        int rc;
        LEASE_AWARE(self, rc = fshm_reader_peek_latest(self->r, &f));
        if (rc == -EAGAIN)
            Py_RETURN_NONE;
        if (rc == FSHM_E_OVERRUN && attempt < 99) {
            Py_BEGIN_ALLOW_THREADS
            usleep(20u << (attempt < 6 ? attempt : 6));
            Py_END_ALLOW_THREADS
            continue;
        }
        if (rc)
            return fshm_raise(rc);
        PyObject *ba = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)f.nbytes);
        if (!ba)
            return NULL;
        fshm_map_ref(f.map);   /* a remap inside peek must not unmap f.data under us */
        self->busy = 1;
        Py_BEGIN_ALLOW_THREADS
        rc = fshm_frame_copy(self->r, &f, PyByteArray_AS_STRING(ba), f.nbytes);
        Py_END_ALLOW_THREADS
        self->busy = 0;
        if (rc == 0) {
            PyObject *frame = fshm_frame_new(&self->frames, (PyObject *)self, ba, 0, &f);
            fshm_map_unref(f.map);
            Py_DECREF(ba);
            return frame;
        }
        fshm_map_unref(f.map);
        Py_DECREF(ba);
        if (rc != FSHM_E_OVERRUN)
            return fshm_raise(rc);
        /* Overwritten mid-copy (few slots, fast producer): back off a little so the
         * producer finishes its write, then take the newer frame. */
        Py_BEGIN_ALLOW_THREADS
        usleep(20u << (attempt < 6 ? attempt : 6));
        Py_END_ALLOW_THREADS
    }
    /* Every one of the 100 copies was torn: the producer rewrites the slot faster than a copy. */
    fshm_set_error(FSHM_E_OVERRUN, "read_latest(copy=True) starved: the producer overwrote the "
                   "frame during each of 100 copies (use more slots or wait_latest)");
    return fshm_raise(FSHM_E_OVERRUN);
}

static PyObject *reader_valid(FshmReader *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_OPEN(self);
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
    return PyBool_FromLong(fshm_frame_valid(self->r, &f));
}

static PyObject *reader_producer(FshmReader *self, PyObject *unused)
{
    CHECK_OPEN(self);
    int64_t pid = 0;
    int st;
    LEASE_AWARE(self, st = fshm_reader_producer_state(self->r, &pid));
    static const char *names[] = {"none", "alive", "dead", "closed"};
    return Py_BuildValue("(sL)", names[st & 3], (long long)pid);
}

static PyObject *reader_close(FshmReader *self, PyObject *unused)
{
    if (self->busy)
        return PyErr_Format(fshm_exc_state, "close() while another thread waits on this Reader");
    if (self->r) {
        fshm_reader *r = self->r;
        self->r = NULL;
        fshm_reader_close(r);   /* frames' Mapping objects keep their regions mapped */
    }
    clear_cache(self);
    Py_RETURN_NONE;
}

static PyObject *reader_control(FshmReader *self, PyObject *index)
{
    CHECK_OPEN(self);
    unsigned i;
    if (fshm_parse_control(index, NULL, &i, NULL))
        return NULL;
    int v;
    LEASE_AWARE(self, v = fshm_reader_control(self->r, i));
    return v < 0 ? fshm_raise(v) : PyLong_FromLong(v);
}

static PyObject *reader_set_control(FshmReader *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_OPEN(self);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_control(index, value)");
        return NULL;
    }
    unsigned i;
    uint8_t v;
    if (fshm_parse_control(args[0], args[1], &i, &v))
        return NULL;
    int rc;
    LEASE_AWARE(self, rc = fshm_reader_set_control(self->r, i, v));
    if (rc)
        return fshm_raise(rc);
    Py_RETURN_NONE;
}

#define RGET(fn, conv, expr)                                                                     \
    static PyObject *fn(FshmReader *self, void *c)                                               \
    {                                                                                            \
        CHECK_OPEN(self);                                                                        \
        return conv(expr);                                                                       \
    }
RGET(reader_epoch, PyLong_FromUnsignedLongLong, fshm_reader_epoch(self->r))
RGET(reader_stream_id, PyLong_FromUnsignedLong, fshm_reader_stream_id(self->r))
RGET(reader_overruns, PyLong_FromUnsignedLongLong, fshm_reader_overruns(self->r))
RGET(reader_drops, PyLong_FromUnsignedLongLong, fshm_reader_drops(self->r))
RGET(reader_queue, PyUnicode_FromString, fshm_reader_queue_name(self->r))

static PyObject *reader_closed(FshmReader *self, void *c) { return PyBool_FromLong(self->r == NULL); }

static PyMethodDef reader_methods[] = {
    {"wait_latest", (PyCFunction)(void (*)(void))reader_wait_latest, METH_VARARGS | METH_KEYWORDS,
     "wait_latest(timeout=None) -> Frame"},
    {"wait_next", (PyCFunction)(void (*)(void))reader_wait_next, METH_VARARGS | METH_KEYWORDS,
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
