/* frameshm._core.Writer: the producer side of a stream. Calls from several threads are
 * serialised by the Writer's guard (binding.h). */
#include "binding.h"

typedef struct {
    PyObject *array;
    unsigned pool;
    size_t offset;
} loan_view;

typedef struct {
    PyObject_HEAD
    fshm_writer *w;
    PyObject *maps;          /* tuple of Mapping, one per pool */
    fshm_tensor tensor;      /* layout used by commit()/publish() */
    size_t loan_bytes;
    int loaned;
    fshm_guard guard;        /* held by every call into w */
    uint32_t gen;            /* fshm_writer_attach_gen when maps was built */
    /* The stream's fixed layout (set_layout), for loan_array(): */
    fshm_tensor layout;
    size_t layout_bytes;
    PyObject *array_type;    /* numpy.ndarray, or NULL: no fixed layout */
    PyObject *layout_shape, *layout_dtype;
    /* One writable array per slot, built on a slot's first loan: the same object comes back
     * for every later loan of that slot while the pools stay where they are (views_gen). */
    loan_view *views;
    uint32_t nviews;
    uint32_t views_gen;
} FshmWriter;

#define CHECK_OPEN(self)                                                                         \
    if (!(self)->w)                                                                              \
        return fshm_raise_closed("Writer");

/* Enters the guard around a call into the writer: `w` is the handle, or the function
 * returns NULL with the exception set. */
#define ENTER(self, w)                                                                           \
    fshm_writer *w = fshm_guard_open(&(self)->guard, (void *const *)&(self)->w, "Writer");       \
    if (!w)                                                                                      \
        return NULL;
#define LEAVE(self) fshm_guard_leave(&(self)->guard)

static int parse_int_tuple(PyObject *seq, int32_t *out, int maxn, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, "shape and strides must be sequences of ints");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > maxn) {
        Py_DECREF(fast);
        PyErr_Format(fshm_exc_invalid, "%s has %zd dimensions; at most %d are supported", what, n,
                     maxn);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (v < 0 || v > INT32_MAX) {
            Py_DECREF(fast);
            PyErr_Format(fshm_exc_invalid, "%s[%zd] = %lld is outside 0..2^31-1", what, i, v);
            return -1;
        }
        out[i] = (int32_t)v;
    }
    Py_DECREF(fast);
    return (int)n;
}

static PyObject *build_maps(fshm_writer *w)
{
    unsigned n = fshm_writer_npools(w);
    PyObject *maps = PyTuple_New(n);
    if (!maps)
        return NULL;
    for (unsigned i = 0; i < n; i++) {
        PyObject *m = fshm_mapping_new(fshm_writer_pool_map(w, i));
        if (!m) {
            Py_DECREF(maps);
            return NULL;
        }
        PyTuple_SET_ITEM(maps, i, m);
    }
    return maps;
}

/* Driver model: a re-attach moved the pools; views handed out earlier keep the old
 * mappings alive through their own references. */
static int refresh_maps(FshmWriter *self)
{
    uint32_t g = fshm_writer_attach_gen(self->w);
    if (g == self->gen)
        return 0;
    PyObject *maps = build_maps(self->w);
    if (!maps)
        return -1;
    Py_XSETREF(self->maps, maps);
    self->gen = g;
    return 0;
}

static int writer_init(FshmWriter *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "stream_id", "nslots", "pools", "base_dir", "namespace",
                             "file_mode", "driver", "publish_mode", "client_id", "fill_threads", NULL};
    PyObject *name = Py_None, *pools = NULL, *base = Py_None, *ns = Py_None;
    PyObject *driver = Py_None, *pmode = Py_None;
    unsigned long sid = 0, nslots = 4, client = 0;
    int fill_threads = 0;
    unsigned int mode = 0600;
    if (self->w) {
        PyErr_SetString(fshm_exc_state, "Writer already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$kkOOOIOOki", kwlist, &name, &sid, &nslots, &pools,
                                     &base, &ns, &mode, &driver, &pmode, &client, &fill_threads))
        return -1;
    if (fill_threads < 0 || fill_threads > FSHM_MAX_FILL_THREADS) {
        PyErr_Format(fshm_exc_invalid, "fill_threads must be 0 (the default: the publishing thread alone) "
                     "to %d, not %d", FSHM_MAX_FILL_THREADS, fill_threads);
        return -1;
    }
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    if (fshm_parse_driver(driver, pmode, client, &cfg.driver, &cfg.publish_mode, &cfg.client_id))
        return -1;
    if (fshm_parse_addr(name, sid, base, ns, &cfg.addr))
        return -1;
    if (nslots > UINT32_MAX) {
        PyErr_SetString(fshm_exc_invalid, "nslots too large");
        return -1;
    }
    cfg.nslots = (uint32_t)nslots;
    cfg.file_mode = mode;
    cfg.fill_threads = (uint32_t)fill_threads;
    if (!pools) {
        PyErr_SetString(PyExc_TypeError, "pools (a sequence of slot sizes in bytes) is required");
        return -1;
    }
    PyObject *fast = PySequence_Fast(pools, "pools must be a sequence of byte sizes");
    if (!fast)
        return -1;
    Py_ssize_t np = PySequence_Fast_GET_SIZE(fast);
    if (np < 1 || np > FSHM_MAX_POOLS) {
        Py_DECREF(fast);
        PyErr_Format(fshm_exc_invalid, "a stream has 1 to %d pools, not %zd", FSHM_MAX_POOLS, np);
        return -1;
    }
    for (Py_ssize_t i = 0; i < np; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (v == 0 || v > 0x80000000ull) {
            Py_DECREF(fast);
            PyErr_Format(fshm_exc_invalid, "pool size %llu is outside 1 byte .. 2 GiB", v);
            return -1;
        }
        cfg.pool_bytes[i] = (uint32_t)v;
    }
    Py_DECREF(fast);
    cfg.npools = (uint32_t)np;
    fshm_writer *w = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_writer_open(&cfg, &w);
    Py_END_ALLOW_THREADS
    if (rc) {
        fshm_raise(rc);
        return -1;
    }
    PyObject *maps = build_maps(w);
    if (!maps) {
        fshm_writer_close(w, 1);
        return -1;
    }
    self->w = w;
    self->maps = maps;
    self->gen = fshm_writer_attach_gen(w);
    memset(&self->tensor, 0, sizeof self->tensor);
    self->tensor.dtype = FSHM_DTYPE_UINT8;
    self->tensor.ndims = 1;
    return 0;
}

static void clear_views(FshmWriter *self)
{
    for (uint32_t i = 0; i < self->nviews; i++)
        Py_CLEAR(self->views[i].array);
}

static void writer_dealloc(FshmWriter *self)
{
    if (self->w)
        fshm_writer_close(self->w, 1);
    clear_views(self);
    PyMem_Free(self->views);
    Py_XDECREF(self->array_type);
    Py_XDECREF(self->layout_shape);
    Py_XDECREF(self->layout_dtype);
    Py_XDECREF(self->maps);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A wire layout from (dtype code, shape, strides or None, major order), or -1 with the
 * exception set. */
static int parse_tensor(int dtype, PyObject *shape, PyObject *strides, int order, fshm_tensor *t)
{
    memset(t, 0, sizeof *t);
    if (!fshm_dtype_size(dtype)) {
        PyErr_Format(fshm_exc_invalid, "unsupported dtype code %d", dtype);
        return -1;
    }
    t->dtype = (int16_t)dtype;
    t->major_order = (int16_t)order;
    int n = parse_int_tuple(shape, t->dims, FSHM_MAX_DIMS, "shape");
    if (n < 0)
        return -1;
    if (n == 0) {
        PyErr_Format(fshm_exc_invalid, "0-dimensional tensors are not supported; reshape to (1,)");
        return -1;
    }
    t->ndims = (uint8_t)n;
    if (strides != Py_None) {
        int m = parse_int_tuple(strides, t->strides, FSHM_MAX_DIMS, "strides");
        if (m < 0)
            return -1;
        if (m != n) {
            PyErr_Format(fshm_exc_invalid, "strides has %d entries, shape has %d", m, n);
            return -1;
        }
    }
    return 0;
}

static PyObject *writer_set_tensor(FshmWriter *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"dtype", "shape", "strides", "major_order", NULL};
    int dtype, order = FSHM_ORDER_ROW;
    PyObject *shape, *strides = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO|Oi", kwlist, &dtype, &shape, &strides, &order))
        return NULL;
    fshm_tensor t;
    if (parse_tensor(dtype, shape, strides, order, &t))
        return NULL;
    self->tensor = t;
    Py_RETURN_NONE;
}

/* set_layout(array_type, dtype, shape, np_dtype): the stream's fixed layout, made the
 * current one (as set_tensor) and the one loan_array() lends; np_dtype and shape are what
 * array_type(shape, np_dtype, buffer, offset) gets for a slot's array. */
static PyObject *writer_set_layout(FshmWriter *self, PyObject *args)
{
    PyObject *atype, *shape, *npdt;
    int dtype;
    if (!PyArg_ParseTuple(args, "OiO!O", &atype, &dtype, &PyTuple_Type, &shape, &npdt))
        return NULL;
    if (!PyCallable_Check(atype))
        return PyErr_Format(PyExc_TypeError, "array_type must be callable (numpy.ndarray)");
    fshm_tensor t;
    if (parse_tensor(dtype, shape, Py_None, FSHM_ORDER_ROW, &t))
        return NULL;
    size_t bytes = fshm_dtype_size(dtype);
    for (int i = 0; i < t.ndims; i++) {
        if (t.dims[i] && bytes > SIZE_MAX / (size_t)t.dims[i])
            return PyErr_Format(fshm_exc_invalid, "a frame of this shape does not fit in memory");
        bytes *= (size_t)t.dims[i];
    }
    self->tensor = self->layout = t;
    self->layout_bytes = bytes;
    Py_XSETREF(self->array_type, Py_NewRef(atype));
    Py_XSETREF(self->layout_shape, Py_NewRef(shape));
    Py_XSETREF(self->layout_dtype, Py_NewRef(npdt));
    clear_views(self);
    Py_RETURN_NONE;
}

/* fshm_writer_loan under the guard, without the GIL when the loan may first have to
 * re-attach through the driver (a round trip); marks the loan outstanding. */
static int loan_slot(FshmWriter *self, fshm_writer *w, size_t nbytes, fshm_loan *l)
{
    int rc;
    if (fshm_writer_lease_ok(w)) {
        rc = fshm_writer_loan(w, nbytes, l);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = fshm_writer_loan(w, nbytes, l);
        Py_END_ALLOW_THREADS
    }
    if (rc == 0) {
        self->loan_bytes = nbytes;
        self->loaned = 1;
    }
    return rc;
}

static size_t loan_offset(fshm_writer *w, const fshm_loan *l)
{
    return (size_t)((uint8_t *)l->data - (uint8_t *)fshm_map_base(fshm_writer_pool_map(w, l->pool_index)));
}

static PyObject *writer_loan(FshmWriter *self, PyObject *arg)
{
    CHECK_OPEN(self);
    Py_ssize_t nbytes = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (nbytes < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(fshm_exc_invalid, "nbytes must be >= 0");
        return NULL;
    }
    fshm_loan l;
    ENTER(self, w);
    int rc = loan_slot(self, w, (size_t)nbytes, &l);
    if (rc) {
        LEAVE(self);
        return fshm_raise(rc);
    }
    PyObject *res = NULL;
    if (refresh_maps(self) == 0)
        res = Py_BuildValue("(InKI)", (unsigned)l.pool_index, (Py_ssize_t)loan_offset(w, &l),
                            (unsigned long long)l.seq, (unsigned)self->gen);
    LEAVE(self);
    return res;
}

/* loan_array(): loan() of a frame of the fixed layout (set_layout), as the writable array
 * over its slot. The slot's array is cached: a producer's per-frame loan is one call that
 * builds nothing once every slot has been lent. */
static PyObject *writer_loan_array(FshmWriter *self, PyObject *unused)
{
    CHECK_OPEN(self);
    if (!self->array_type)
        return fshm_raise_invalid("loan_array() needs a fixed layout (set_layout)");
    fshm_loan l;
    ENTER(self, w);
    self->tensor = self->layout;
    int rc = loan_slot(self, w, self->layout_bytes, &l);
    if (rc) {
        LEAVE(self);
        return fshm_raise(rc);
    }
    if (refresh_maps(self) < 0) {
        LEAVE(self);
        return NULL;
    }
    if (self->views_gen != self->gen) {   /* re-attached through the driver: new pools */
        clear_views(self);
        self->views_gen = self->gen;
    }
    if (l.slot >= self->nviews) {
        uint32_t n = fshm_writer_nslots(w);
        if (n <= l.slot)
            n = l.slot + 1;
        loan_view *v = PyMem_Realloc(self->views, (size_t)n * sizeof *v);
        if (!v) {
            LEAVE(self);
            return PyErr_NoMemory();
        }
        memset(v + self->nviews, 0, (size_t)(n - self->nviews) * sizeof *v);
        self->views = v;
        self->nviews = n;
    }
    loan_view *e = &self->views[l.slot];
    size_t off = loan_offset(w, &l);
    if (e->array && e->pool == l.pool_index && e->offset == off) {
        PyObject *a = Py_NewRef(e->array);
        LEAVE(self);
        return a;
    }
    PyObject *map = Py_NewRef(PyTuple_GET_ITEM(self->maps, l.pool_index));
    uint32_t gen = self->gen;
    LEAVE(self);
    /* Built outside the guard: array_type is Python code. The loan stays outstanding if
     * this fails; the next loan replaces it, as after any loan that is not committed. */
    PyObject *offobj = PyLong_FromSize_t(off), *a = NULL;
    if (offobj) {
        PyObject *argv[4] = {self->layout_shape, self->layout_dtype, map, offobj};
        a = PyObject_Vectorcall(self->array_type, argv, 4, NULL);
        Py_DECREF(offobj);
    }
    Py_DECREF(map);
    /* Cached only while nothing changed meanwhile: a close() from another thread let go
     * of the cache, and a cached array would keep the pool mapped. */
    if (a && self->w && self->views_gen == gen && l.slot < self->nviews) {
        e = &self->views[l.slot];
        Py_XSETREF(e->array, Py_NewRef(a));
        e->pool = l.pool_index;
        e->offset = off;
    }
    return a;
}

static int opt_u64(PyObject *o, unsigned long long *out)
{
    if (!o || o == Py_None)
        return 0;
    *out = PyLong_AsUnsignedLongLong(o);
    return *out == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 1;
}

static PyObject *writer_commit(FshmWriter *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_OPEN(self);
    unsigned long long ts = 0, ref = 0;
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "commit(timestamp_ns=None, ref_seq=None)");
        return NULL;
    }
    if (nargs >= 1 && opt_u64(args[0], &ts) < 0)
        return NULL;
    int has_ref = nargs >= 2 ? opt_u64(args[1], &ref) : 0;
    if (has_ref < 0)
        return NULL;
    ENTER(self, w);
    if (!self->loaned) {
        LEAVE(self);
        return fshm_raise_invalid("commit() without a loan(): nothing to commit");
    }
    if (has_ref)
        fshm_writer_set_ref(w, ref);
    int rc = fshm_writer_commit(w, &self->tensor, self->loan_bytes, ts);
    uint64_t seq = fshm_writer_next_seq(w) - 1;
    if (rc == 0)
        self->loaned = 0;
    LEAVE(self);
    if (rc)
        return fshm_raise(rc);
    return PyLong_FromUnsignedLongLong(seq);
}

/* One copy of buf (C-contiguous, already checked against the layout) into the next slot,
 * committed with self->tensor; releases buf. The new seq, or NULL with the exception set. */
static PyObject *publish_buffer(FshmWriter *self, Py_buffer *buf, unsigned long long ts,
                                int has_ref, unsigned long long ref)
{
    fshm_writer *w = fshm_guard_open(&self->guard, (void *const *)&self->w, "Writer");
    if (!w) {
        PyBuffer_Release(buf);
        return NULL;
    }
    int rc;
    if (has_ref)
        fshm_writer_set_ref(w, ref);
    self->loaned = 0;
    if (buf->len >= 65536 || !fshm_writer_lease_ok(w)) {
        /* Big copies, and loans that must re-attach through the driver first, run without
         * the GIL so other threads (a camera, a UI) keep going. */
        Py_BEGIN_ALLOW_THREADS
        rc = fshm_writer_publish(w, buf->buf, (size_t)buf->len, &self->tensor, ts);
        Py_END_ALLOW_THREADS
    } else {
        rc = fshm_writer_publish(w, buf->buf, (size_t)buf->len, &self->tensor, ts);
    }
    uint64_t seq = fshm_writer_next_seq(w) - 1;
    LEAVE(self);
    PyBuffer_Release(buf);
    if (rc)
        return fshm_raise(rc);
    return PyLong_FromUnsignedLongLong(seq);
}

static PyObject *writer_publish(FshmWriter *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"data", "timestamp_ns", "ref_seq", NULL};
    PyObject *data, *refobj = Py_None;
    unsigned long long ts = 0, ref = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|KO", kwlist, &data, &ts, &refobj))
        return NULL;
    CHECK_OPEN(self);
    int has_ref = opt_u64(refobj, &ref);
    if (has_ref < 0)
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(data, &buf, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    return publish_buffer(self, &buf, ts, has_ref, ref);
}

/* The wire dtype of a buffer's struct-module format when it is one little-endian or
 * native item of a type the wire carries (what numpy exports for those dtypes), else
 * FSHM_DTYPE_UNKNOWN. */
static int format_dtype(const char *fmt, Py_ssize_t itemsize)
{
    if (!fmt)
        return itemsize == 1 ? FSHM_DTYPE_UINT8 : FSHM_DTYPE_UNKNOWN;   /* 'B' by default */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (*fmt == '@' || *fmt == '=' || *fmt == '<')
#else
    if (*fmt == '@' || *fmt == '=')
#endif
        fmt++;
    if (!fmt[0] || fmt[1])
        return FSHM_DTYPE_UNKNOWN;
    static const int uints[] = {FSHM_DTYPE_UINT8, FSHM_DTYPE_UINT16, 0, FSHM_DTYPE_UINT32,
                                0, 0, 0, FSHM_DTYPE_UINT64};
    static const int ints[] = {FSHM_DTYPE_INT8, FSHM_DTYPE_INT16, 0, FSHM_DTYPE_INT32,
                               0, 0, 0, FSHM_DTYPE_INT64};
    char c = fmt[0];
    if (c == '?')
        return itemsize == 1 ? FSHM_DTYPE_BOOLEAN : FSHM_DTYPE_UNKNOWN;
    if (c == 'f')
        return itemsize == 4 ? FSHM_DTYPE_FLOAT32 : FSHM_DTYPE_UNKNOWN;
    if (c == 'd')
        return itemsize == 8 ? FSHM_DTYPE_FLOAT64 : FSHM_DTYPE_UNKNOWN;
    if (itemsize < 1 || itemsize > 8)
        return FSHM_DTYPE_UNKNOWN;
    if (strchr("BHILQN", c))
        return uints[itemsize - 1];
    if (strchr("bhilqn", c))
        return ints[itemsize - 1];
    return FSHM_DTYPE_UNKNOWN;
}

/* publish() for the common case, without Python in between: `data` exports a C-contiguous
 * buffer of exactly the layout set last (set_tensor: dtype and shape, default strides).
 * Anything else (another shape or dtype, a non-contiguous or big-endian array, a list)
 * publishes nothing and returns None, and frameshm.Writer.publish takes its full path. */
static PyObject *writer_publish_exact(FshmWriter *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "publish_exact(data, timestamp_ns=None, ref_seq=None)");
        return NULL;
    }
    CHECK_OPEN(self);
    unsigned long long ts = 0, ref = 0;
    /* Arguments this path does not take as they are (a numpy integer) go the full way too,
     * which converts or rejects them as publish() always has. */
    int has_ts = nargs >= 2 ? opt_u64(args[1], &ts) : 0;
    int has_ref = nargs >= 3 ? opt_u64(args[2], &ref) : 0;
    const fshm_tensor *t = &self->tensor;
    Py_buffer buf;
    if (has_ts < 0 || has_ref < 0 || !t->ndims ||
        PyObject_GetBuffer(args[0], &buf, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int same = buf.ndim == t->ndims && t->major_order == FSHM_ORDER_ROW &&
               format_dtype(buf.format, buf.itemsize) == t->dtype && PyBuffer_IsContiguous(&buf, 'C');
    for (int i = 0; same && i < t->ndims; i++)
        same = buf.shape[i] == t->dims[i] && t->strides[i] == 0;
    if (!same) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
    }
    return publish_buffer(self, &buf, ts, has_ref, ref);
}

static PyObject *writer_skip_to(FshmWriter *self, PyObject *arg)
{
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    ENTER(self, w);
    if (self->loaned) {
        LEAVE(self);
        return fshm_raise_invalid("skip_to() with a loan outstanding: commit() it first");
    }
    int rc = fshm_writer_skip_to(w, seq);
    LEAVE(self);
    if (rc)
        return fshm_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *writer_heartbeat(FshmWriter *self, PyObject *unused)
{
    ENTER(self, w);
    fshm_writer_heartbeat(w);
    LEAVE(self);
    Py_RETURN_NONE;
}

static PyObject *writer_close(FshmWriter *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"unlink", NULL};
    int unlink_files = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &unlink_files))
        return NULL;
    if (self->w) {
        /* Waits for a publish in progress on another thread. */
        if (fshm_guard_enter(&self->guard) < 0)
            return NULL;
        fshm_writer *w = self->w;
        self->w = NULL;
        fshm_guard_leave(&self->guard);
        if (w) {
            Py_BEGIN_ALLOW_THREADS
            fshm_writer_close(w, unlink_files);
            Py_END_ALLOW_THREADS
        }
    }
    Py_CLEAR(self->maps);   /* views handed out keep their own references */
    clear_views(self);
    Py_RETURN_NONE;
}

static PyObject *writer_pool_info(FshmWriter *self, PyObject *unused)
{
    uint32_t strides[FSHM_MAX_POOLS];
    uint16_t ids[FSHM_MAX_POOLS];
    ENTER(self, w);
    unsigned n = fshm_writer_npools(w);
    for (unsigned i = 0; i < n && i < FSHM_MAX_POOLS; i++)
        fshm_writer_pool_base(w, i, NULL, &strides[i], &ids[i]);
    LEAVE(self);
    PyObject *res = PyList_New(n);
    for (unsigned i = 0; res && i < n; i++) {
        uint32_t stride = strides[i];
        uint16_t id = ids[i];
        PyObject *t = Py_BuildValue("(Ik)", (unsigned)id, (unsigned long)stride);
        if (!t) {
            Py_CLEAR(res);
            break;
        }
        PyList_SET_ITEM(res, i, t);
    }
    return res;
}

static PyObject *writer_control(FshmWriter *self, PyObject *index)
{
    unsigned i;
    if (fshm_parse_control(index, NULL, &i, NULL))
        return NULL;
    ENTER(self, w);
    int v = fshm_writer_control(w, i);
    LEAVE(self);
    return v < 0 ? fshm_raise(v) : PyLong_FromLong(v);
}

static PyObject *writer_set_control(FshmWriter *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_control(index, value)");
        return NULL;
    }
    unsigned i;
    uint8_t v;
    if (fshm_parse_control(args[0], args[1], &i, &v))
        return NULL;
    ENTER(self, w);
    int rc = fshm_writer_set_control(w, i, v);
    LEAVE(self);
    if (rc)
        return fshm_raise(rc);
    Py_RETURN_NONE;
}

#define WGET(fn, T, conv, expr)                                                                  \
    static PyObject *fn(FshmWriter *self, void *c)                                               \
    {                                                                                            \
        ENTER(self, w);                                                                          \
        T v = expr;                                                                              \
        LEAVE(self);                                                                             \
        return conv(v);                                                                          \
    }
WGET(writer_epoch, uint64_t, PyLong_FromUnsignedLongLong, fshm_writer_epoch(w))
WGET(writer_stream_id, uint32_t, PyLong_FromUnsignedLong, fshm_writer_stream_id(w))
WGET(writer_nslots, uint32_t, PyLong_FromUnsignedLong, fshm_writer_nslots(w))
WGET(writer_next_seq, uint64_t, PyLong_FromUnsignedLongLong, fshm_writer_next_seq(w))
WGET(writer_lease_id, uint64_t, PyLong_FromUnsignedLongLong, fshm_writer_lease_id(w))

static PyObject *writer_maps(FshmWriter *self, void *c)
{
    ENTER(self, w);
    (void)w;
    int rc = refresh_maps(self);
    PyObject *maps = rc ? NULL : Py_NewRef(self->maps);
    LEAVE(self);
    return maps;
}

static PyObject *writer_closed(FshmWriter *self, void *c) { return PyBool_FromLong(self->w == NULL); }

static PyMethodDef writer_methods[] = {
    {"set_tensor", (PyCFunction)(void (*)(void))writer_set_tensor, METH_VARARGS | METH_KEYWORDS,
     "set_tensor(dtype, shape, strides=None, major_order=1): layout for commit/publish"},
    {"set_layout", (PyCFunction)writer_set_layout, METH_VARARGS,
     "set_layout(array_type, dtype, shape, np_dtype): the fixed layout, for loan_array()"},
    {"loan", (PyCFunction)writer_loan, METH_O, "loan(nbytes) -> (pool_index, offset, seq)"},
    {"loan_array", (PyCFunction)writer_loan_array, METH_NOARGS,
     "loan_array() -> the writable array over the next slot, in the fixed layout"},
    {"commit", (PyCFunction)(void (*)(void))writer_commit, METH_FASTCALL,
     "commit(timestamp_ns=None, ref_seq=None) -> seq"},
    {"publish", (PyCFunction)(void (*)(void))writer_publish, METH_VARARGS | METH_KEYWORDS,
     "publish(data, timestamp_ns=0, ref_seq=None) -> seq: one copy of a C-contiguous buffer"},
    {"publish_exact", (PyCFunction)(void (*)(void))writer_publish_exact, METH_FASTCALL,
     "publish_exact(data, timestamp_ns=None, ref_seq=None) -> seq, or None (nothing published)\n"
     "when data is not a C-contiguous buffer of exactly the layout set last"},
    {"skip_to", (PyCFunction)writer_skip_to, METH_O,
     "skip_to(seq): the next frame gets sequence number seq (>= next_seq)"},
    {"heartbeat", (PyCFunction)writer_heartbeat, METH_NOARGS, "refresh liveness while idle"},
    {"close", (PyCFunction)(void (*)(void))writer_close, METH_VARARGS | METH_KEYWORDS,
     "close(unlink=True)"},
    {"pool_info", (PyCFunction)writer_pool_info, METH_NOARGS, "[(pool_id, stride_bytes), ...]"},
    {"control", (PyCFunction)writer_control, METH_O, "control(index) -> control byte (0..255)"},
    {"set_control", (PyCFunction)(void (*)(void))writer_set_control, METH_FASTCALL,
     "set_control(index, value): sets a control byte"},
    {NULL},
};

static PyGetSetDef writer_getset[] = {
    {"epoch", (getter)writer_epoch, NULL, NULL, NULL},
    {"stream_id", (getter)writer_stream_id, NULL, NULL, NULL},
    {"nslots", (getter)writer_nslots, NULL, NULL, NULL},
    {"next_seq", (getter)writer_next_seq, NULL, NULL, NULL},
    {"lease_id", (getter)writer_lease_id, NULL, "driver lease id (0 without a driver)", NULL},
    {"mappings", (getter)writer_maps, NULL, "tuple of pool Mappings", NULL},
    {"closed", (getter)writer_closed, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject FshmWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "frameshm._core.Writer",
    .tp_basicsize = sizeof(FshmWriter),
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Low-level stream producer; use frameshm.Writer.",
    .tp_methods = writer_methods,
    .tp_getset = writer_getset,
    .tp_init = (initproc)writer_init,
    .tp_new = PyType_GenericNew,
};
