/* frameshm._core.Frame: one frame handed out by a Reader — its metadata as read-only
 * attributes, the buffer holding its bytes and what valid() needs to re-check its slot.
 *
 * frameshm.Frame subclasses it (the numpy view and copy()); a Reader creates instances of
 * the class it was given directly, so no Python code runs per frame. Per frame the only
 * allocation is the frame object itself: shape and strides tuples are shared with the
 * previous frame of the same layout and the dtype comes from the Reader's table. */
#include "binding.h"

#include <structmember.h>

/* ---- the Reader's frame factory ---- */

int fshm_frame_maker_set(fshm_frame_maker *fm, PyObject *type, PyObject *dtypes,
                         PyObject *array_type)
{
    if (type != Py_None &&
        (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject *)type, &FshmFrameType))) {
        PyErr_SetString(PyExc_TypeError, "frame_type must be frameshm._core.Frame or a subclass");
        return -1;
    }
    if (array_type != Py_None && !PyCallable_Check(array_type)) {
        PyErr_SetString(PyExc_TypeError, "array_type must be callable (numpy.ndarray)");
        return -1;
    }
    PyObject *table = NULL;
    if (dtypes != Py_None) {
        table = PySequence_Tuple(dtypes);
        if (!table)
            return -1;
    }
    fshm_frame_maker_forget(fm, NULL);
    Py_XSETREF(fm->type, type == Py_None ? NULL : (PyTypeObject *)Py_NewRef(type));
    Py_XSETREF(fm->dtypes, table);
    Py_XSETREF(fm->array_type, array_type == Py_None ? NULL : Py_NewRef(array_type));
    return 0;
}

/* Empties an entry before letting go of what it held: a release can run Python code (an
 * array_type's objects), which may fill or grow the cache and so move `v`. */
static void slot_view_clear(fshm_slot_view *v)
{
    fshm_slot_view old = *v;
    memset(v, 0, sizeof *v);
    Py_XDECREF(old.array);
    Py_XDECREF(old.buffer);
    Py_XDECREF(old.shape);
    Py_XDECREF(old.strides);
    Py_XDECREF(old.dtype);
}

void fshm_frame_maker_forget(fshm_frame_maker *fm, PyObject *buffer)
{
    for (unsigned i = 0; i < fm->nviews; i++)
        if (fm->views[i].array && (!buffer || fm->views[i].buffer == buffer))
            slot_view_clear(&fm->views[i]);
}

void fshm_frame_maker_clear(fshm_frame_maker *fm)
{
    fshm_frame_maker_forget(fm, NULL);
    PyMem_Free(fm->views);
    fm->views = NULL;
    fm->nviews = 0;
    Py_CLEAR(fm->type);
    Py_CLEAR(fm->dtypes);
    Py_CLEAR(fm->shape);
    Py_CLEAR(fm->strides);
    Py_CLEAR(fm->array_type);
    fm->ndims = 0;
}

/* The shape and strides tuples of tensor t: the previous frame's when the layout is the
 * same (a stream's frames nearly always are), else new ones that later frames then share. */
static int layout_tuples(fshm_frame_maker *fm, const fshm_tensor *t)
{
    int n = t->ndims;
    if (fm->shape && fm->ndims == n &&
        !memcmp(fm->layout_dims, t->dims, n * sizeof t->dims[0]) &&
        !memcmp(fm->layout_strides, t->strides, n * sizeof t->strides[0]))
        return 0;
    PyObject *shape = PyTuple_New(n), *strides = PyTuple_New(n);
    if (!shape || !strides)
        goto fail;
    for (int i = 0; i < n; i++) {
        PyObject *d = PyLong_FromLong(t->dims[i]), *s = PyLong_FromLong(t->strides[i]);
        if (!d || !s) {
            Py_XDECREF(d);
            Py_XDECREF(s);
            goto fail;
        }
        PyTuple_SET_ITEM(shape, i, d);
        PyTuple_SET_ITEM(strides, i, s);
    }
    Py_XSETREF(fm->shape, shape);
    Py_XSETREF(fm->strides, strides);
    fm->ndims = (uint8_t)n;
    memcpy(fm->layout_dims, t->dims, n * sizeof t->dims[0]);
    memcpy(fm->layout_strides, t->strides, n * sizeof t->strides[0]);
    return 0;
fail:
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    return -1;
}

PyObject *fshm_frame_new(fshm_frame_maker *fm, PyObject *reader, PyObject *buffer,
                         PyObject *ring, Py_ssize_t offset, const fshm_frame *f)
{
    PyObject *dtype;
    if (!fm->dtypes) {
        dtype = PyLong_FromLong(f->tensor.dtype);
    } else {
        /* The library only hands out frames of known dtypes: a hole is the caller's table. */
        Py_ssize_t code = f->tensor.dtype;
        dtype = code >= 0 && code < PyTuple_GET_SIZE(fm->dtypes)
                    ? PyTuple_GET_ITEM(fm->dtypes, code) : Py_None;
        if (dtype == Py_None)
            return PyErr_Format(fshm_exc_state, "the Reader's dtypes table has no entry for "
                                "dtype code %zd", code);
        Py_INCREF(dtype);
    }
    if (!dtype)
        return NULL;
    PyObject *ref = f->has_ref ? PyLong_FromUnsignedLongLong(f->ref_seq) : Py_NewRef(Py_None);
    if (!ref || layout_tuples(fm, &f->tensor)) {
        Py_DECREF(dtype);
        Py_XDECREF(ref);
        return NULL;
    }
    PyTypeObject *tp = fm->type ? fm->type : &FshmFrameType;
    /* tp_alloc, not the type's call: a subclass adds behaviour, not per-frame state to set up */
    FshmFrame *self = (FshmFrame *)tp->tp_alloc(tp, 0);
    if (!self) {
        Py_DECREF(dtype);
        Py_DECREF(ref);
        return NULL;
    }
    self->buffer = Py_NewRef(buffer);
    self->reader = Py_NewRef(reader);
    self->ring = Py_NewRef(ring);
    self->shape = Py_NewRef(fm->shape);
    self->strides = Py_NewRef(fm->strides);
    self->dtype = dtype;
    self->ref_seq = ref;
    self->offset = offset;
    self->nbytes = (Py_ssize_t)f->nbytes;
    self->seq = f->seq;
    self->epoch = f->epoch;
    self->timestamp_ns = f->timestamp_ns;
    self->publish_ns = f->publish_ns;
    self->skipped = f->skipped;
    self->slot = f->slot;
    self->pool_id = f->pool_id;
    self->code = f->tensor.dtype;
    return (PyObject *)self;
}

/* ---- the type ---- */

/* Garbage-collected only because of the array cache: what a subclass stores there could
 * refer back to the frame. */
static int frame_traverse(FshmFrame *self, visitproc visit, void *arg)
{
    Py_VISIT(self->buffer);
    Py_VISIT(self->reader);
    Py_VISIT(self->ring);
    Py_VISIT(self->shape);
    Py_VISIT(self->strides);
    Py_VISIT(self->dtype);
    Py_VISIT(self->ref_seq);
    Py_VISIT(self->array);
    return 0;
}

static int frame_clear(FshmFrame *self)
{
    Py_CLEAR(self->array);
    Py_CLEAR(self->buffer);
    Py_CLEAR(self->reader);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->shape);
    Py_CLEAR(self->strides);
    Py_CLEAR(self->dtype);
    Py_CLEAR(self->ref_seq);
    return 0;
}

static void frame_dealloc(FshmFrame *self)
{
    PyObject_GC_UnTrack(self);
    frame_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

int fshm_frame_check_valid(FshmFrame *self)
{
    if (!self->ring || !PyObject_TypeCheck(self->ring, &FshmMappingType))
        return 0;
    return fshm_ring_holds(((FshmMapping *)self->ring)->map, self->slot, self->seq);
}

static PyObject *frame_valid(FshmFrame *self, PyObject *unused)
{
    return PyBool_FromLong(fshm_frame_check_valid(self) == 1);
}

static PyObject *frame_repr(FshmFrame *self)
{
    return PyUnicode_FromFormat("<%s seq=%llu shape=%R dtype=%R skipped=%llu>",
                                Py_TYPE(self)->tp_name, self->seq, self->shape, self->dtype,
                                self->skipped);
}

/* An array over the frame's bytes, built positionally (ndarray() parses keywords slowly). */
static PyObject *build_array(PyObject *array_type, FshmFrame *self)
{
    PyObject *off = PyLong_FromSsize_t(self->offset);
    if (!off)
        return NULL;
    PyObject *args[] = {self->shape, self->dtype, self->buffer, off, self->strides};
    PyObject *a = PyObject_Vectorcall(array_type, args, 5, NULL);
    Py_DECREF(off);
    return a;
}

/* The cache entry of a slot: grown (rarely, and never past FSHM_SLOT_VIEWS_MAX) to the
 * next power of two above the highest slot seen, so every slot of a ring has its own. */
static fshm_slot_view *slot_entry(fshm_frame_maker *fm, unsigned slot)
{
    if (slot >= fm->nviews && fm->nviews < FSHM_SLOT_VIEWS_MAX) {
        unsigned n = fm->nviews ? fm->nviews : 4;
        while (n <= slot && n < FSHM_SLOT_VIEWS_MAX)
            n *= 2;
        fshm_slot_view *v = PyMem_Realloc(fm->views, n * sizeof *v);
        if (!v) {
            PyErr_NoMemory();
            return NULL;
        }
        memset(v + fm->nviews, 0, (n - fm->nviews) * sizeof *v);
        fm->views = v;
        fm->nviews = n;
    }
    return &fm->views[slot & (fm->nviews - 1)];
}

/* The slot's array from the Reader's cache (built on the first frame in the slot), or NULL
 * with an exception set. Frames of a slot share the array, not the object they hand out. */
static PyObject *slot_array(fshm_frame_maker *fm, FshmFrame *self)
{
    /* Only while the Reader is open: after close() the cache must not keep regions mapped. */
    if (!fshm_reader_handle(self->reader))
        return build_array(fm->array_type, self);
    fshm_slot_view *e = slot_entry(fm, self->slot);
    if (!e)
        return NULL;
    if (e->array && e->buffer == self->buffer && e->offset == self->offset &&
        e->shape == self->shape && e->strides == self->strides && e->dtype == self->dtype)
        return Py_NewRef(e->array);
    PyObject *a = build_array(fm->array_type, self);
    if (!a)
        return NULL;
    /* Looked up again: building may have let another thread run (close the Reader, fill
     * or grow the cache). */
    if (!fshm_reader_handle(self->reader))
        return a;
    if (!(e = slot_entry(fm, self->slot))) {
        Py_DECREF(a);
        return NULL;
    }
    fshm_slot_view old = *e;   /* released only once the entry is whole again (see above) */
    e->buffer = Py_NewRef(self->buffer);
    e->shape = Py_NewRef(self->shape);
    e->strides = Py_NewRef(self->strides);
    e->dtype = Py_NewRef(self->dtype);
    e->offset = self->offset;
    e->array = Py_NewRef(a);
    slot_view_clear(&old);
    return a;
}

static PyObject *frame_array(FshmFrame *self, void *unused)
{
    if (self->array)
        return Py_NewRef(self->array);
    fshm_frame_maker *fm = self->reader ? fshm_reader_frames(self->reader) : NULL;
    if (!fm || !fm->array_type) {
        PyErr_SetString(PyExc_AttributeError, "this frame's Reader was given no array_type");
        return NULL;
    }
    PyObject *a;
    /* Cached only over a mapping: a copy is the frame's own. */
    if (PyObject_TypeCheck(self->buffer, &FshmMappingType)) {
        PyObject *base = slot_array(fm, self);
        if (!base)
            return NULL;
        /* A view of it per frame: whatever a caller sets on its array (shape, dtype) stays
         * off the shared one. */
        static PyObject *view_name;
        if (!view_name && !(view_name = PyUnicode_InternFromString("view"))) {
            Py_DECREF(base);
            return NULL;
        }
        a = PyObject_CallMethodNoArgs(base, view_name);
        Py_DECREF(base);
    } else {
        a = build_array(fm->array_type, self);
    }
    if (!a)
        return NULL;
    Py_XSETREF(self->array, Py_NewRef(a));
    return a;
}

static PyGetSetDef frame_getset[] = {
    {"array", (getter)frame_array, NULL,
     "Read-only numpy view of the frame in shared memory (no copy); a read_copy() frame's "
     "is over its private copy.", NULL},
    {NULL},
};

static PyMethodDef frame_methods[] = {
    {"valid", (PyCFunction)frame_valid, METH_NOARGS,
     "valid() -> bool: True if the slot still holds this frame (seqlock re-check after using "
     "the view); False once the Reader is closed."},
    {"__dlpack__", (PyCFunction)(void (*)(void))fshm_frame_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) -> capsule\n\n"
     "DLPack export. A consumer of DLPack 1.x (max_version >= (1, 0)) gets the frame's bytes\n"
     "in shared memory, flagged read-only, with no copy; older consumers, whose capsules\n"
     "cannot say read-only, get a private copy checked untorn (copy=False refuses), and so\n"
     "does torch, which ignores the flag (unless copy=False). See README's DLPack section\n"
     "for what a zero-copy tensor sees once its slot is reused."},
    {"__dlpack_device__", (PyCFunction)fshm_frame_dlpack_device, METH_NOARGS,
     "__dlpack_device__() -> (1, 0): kDLCPU, device 0."},
    {NULL},
};

#define RO(name, type, field, doc) {name, type, offsetof(FshmFrame, field), READONLY, doc}
static PyMemberDef frame_members[] = {
    RO("seq", T_ULONGLONG, seq, "sequence number within the epoch"),
    RO("epoch", T_ULONGLONG, epoch, "producer epoch the frame belongs to"),
    RO("timestamp_ns", T_ULONGLONG, timestamp_ns, "capture time (CLOCK_MONOTONIC)"),
    RO("publish_ns", T_ULONGLONG, publish_ns, "the producer's commit time (CLOCK_MONOTONIC, from the slot header), 0 if unknown"),
    RO("skipped", T_ULONGLONG, skipped, "frames passed over (wait_latest) or lost (wait_next)"),
    RO("nbytes", T_PYSSIZET, nbytes, "payload bytes"),
    RO("slot", T_UINT, slot, "ring slot that holds the frame"),
    RO("shape", T_OBJECT, shape, "tuple of dimensions"),
    RO("strides", T_OBJECT, strides, "tuple of byte strides"),
    RO("dtype", T_OBJECT, dtype, "element type: the Reader's dtypes[code], else the code"),
    RO("ref_seq", T_OBJECT, ref_seq, "seq of the frame this one was derived from, or None"),
    /* Underscored: not part of frameshm.Frame's public surface, which subclasses this. */
    RO("_buffer", T_OBJECT, buffer, "object exporting the frame's bytes (buffer protocol)"),
    RO("_offset", T_PYSSIZET, offset, "offset of the frame's bytes in _buffer"),
    RO("_pool_id", T_USHORT, pool_id, "payload pool the frame is in"),
    RO("_dtype_code", T_INT, code, "wire dtype code (DTYPE_*)"),
    {"_array", T_OBJECT, offsetof(FshmFrame, array), 0, "frameshm.Frame.array's cache"},
    {NULL},
};
#undef RO

PyTypeObject FshmFrameType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "frameshm._core.Frame",
    .tp_basicsize = sizeof(FshmFrame),
    .tp_dealloc = (destructor)frame_dealloc,
    .tp_repr = (reprfunc)frame_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A frame read by a Reader (metadata, its buffer, valid()); use frameshm.Frame.\n"
              "Only Readers create frames.",
    .tp_traverse = (traverseproc)frame_traverse,
    .tp_clear = (inquiry)frame_clear,
    .tp_methods = frame_methods,
    .tp_members = frame_members,
    .tp_getset = frame_getset,
    .tp_as_buffer = &fshm_frame_as_buffer,
};

int fshm_frame_type_ready(PyObject *module)
{
    if (PyType_Ready(&FshmFrameType) < 0)
        return -1;
    Py_INCREF(&FshmFrameType);
    if (PyModule_AddObject(module, "Frame", (PyObject *)&FshmFrameType)) {
        Py_DECREF(&FshmFrameType);
        return -1;
    }
    static const struct { const char *name; int code; } codes[] = {
        {"DTYPE_UINT8", FSHM_DTYPE_UINT8},     {"DTYPE_INT8", FSHM_DTYPE_INT8},
        {"DTYPE_UINT16", FSHM_DTYPE_UINT16},   {"DTYPE_INT16", FSHM_DTYPE_INT16},
        {"DTYPE_UINT32", FSHM_DTYPE_UINT32},   {"DTYPE_INT32", FSHM_DTYPE_INT32},
        {"DTYPE_UINT64", FSHM_DTYPE_UINT64},   {"DTYPE_INT64", FSHM_DTYPE_INT64},
        {"DTYPE_FLOAT32", FSHM_DTYPE_FLOAT32}, {"DTYPE_FLOAT64", FSHM_DTYPE_FLOAT64},
        {"DTYPE_BOOLEAN", FSHM_DTYPE_BOOLEAN}, {"DTYPE_BYTES", FSHM_DTYPE_BYTES},
    };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (PyModule_AddIntConstant(module, codes[i].name, codes[i].code))
            return -1;
    return 0;
}
