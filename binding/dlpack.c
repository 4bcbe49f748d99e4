/* DLPack export of frames: Frame.__dlpack__ and Frame.__dlpack_device__.
 *
 * What a consumer gets, by what it can be told:
 *   - a DLPack 1.x consumer (max_version >= (1, 0)): the frame's bytes in the pool mapping,
 *     no copy, flagged DLPACK_FLAG_BITMASK_READ_ONLY (the mapping is read-only: a write
 *     would kill the process). The export holds a reference on the mapping (fshm_map_ref),
 *     so the bytes stay mapped until the consumer's deleter runs, whatever happens to the
 *     frame or its Reader; a capsule never consumed releases it when it is destroyed.
 *   - a consumer of an older DLPack (no max_version, or < 1.0): its capsule has no flags
 *     field, so the shared memory is never handed out: it gets a private copy, checked
 *     untorn with the seqlock (copy=False refuses with BufferError).
 *   - copy=True, a layout DLPack cannot express over the mapping (byte strides that are not
 *     a multiple of the element size, misaligned data), or a consumer known to ignore the
 *     read-only flag: a private copy flagged DLPACK_FLAG_BITMASK_IS_COPIED, writable.
 * Producer-side truth only: DLPack cannot stop the producer from reusing the slot, so a
 * zero-copy tensor shows a later frame's bytes once nslots newer frames were published;
 * frame.valid() after use tells, as for frame.array.
 *
 * The deleters take no GIL: they drop a C reference (atomic) and free one block, so a
 * consumer may call them from any thread, even during interpreter shutdown. */
#include "binding.h"

#include <stdlib.h>
#include <string.h>

/* ---- the DLPack ABI (dlpack.h v1.0), declared here: the types keep DLPack's names ---- */

typedef struct {
    uint32_t major, minor;
} DLPackVersion;

enum { kDLCPU = 1 };
typedef struct {
    int32_t device_type;   /* DLDeviceType: a C enum, int-sized on every supported ABI */
    int32_t device_id;
} DLDevice;

enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBool = 6 };
typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;        /* in elements */
    uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

#define DLPACK_FLAG_BITMASK_READ_ONLY (1ull << 0)
#define DLPACK_FLAG_BITMASK_IS_COPIED (1ull << 1)

typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

/* Consumers in other builds read these by offset: the layouts must be dlpack.h's. */
_Static_assert(sizeof(DLDevice) == 8 && sizeof(DLDataType) == 4, "DLPack scalar layout");
#if UINTPTR_MAX == UINT64_MAX
_Static_assert(offsetof(DLTensor, device) == 8 && offsetof(DLTensor, ndim) == 16 &&
                   offsetof(DLTensor, dtype) == 20 && offsetof(DLTensor, shape) == 24 &&
                   offsetof(DLTensor, byte_offset) == 40 && sizeof(DLTensor) == 48,
               "DLTensor layout");
_Static_assert(offsetof(DLManagedTensor, deleter) == 56, "DLManagedTensor layout");
_Static_assert(offsetof(DLManagedTensorVersioned, flags) == 24 &&
                   offsetof(DLManagedTensorVersioned, dl_tensor) == 32,
               "DLManagedTensorVersioned layout");
#endif

/* The version of the versioned capsules made here: everything used is in DLPack 1.0. */
#define EXPORT_MAJOR 1
#define EXPORT_MINOR 0

/* ---- one export: a single block the deleter frees ---- */

typedef struct {
    union {
        DLManagedTensorVersioned versioned;
        DLManagedTensor legacy;
    } m;
    fshm_map *map;    /* the pool mapping a zero-copy export points into; NULL for a copy */
    int64_t shape[FSHM_MAX_DIMS], strides[FSHM_MAX_DIMS];
} dl_export;

/* A copy's bytes follow the header, cache-line aligned like a fresh numpy array. */
#define EXPORT_ALIGN 64
#define EXPORT_HEAD ((sizeof(dl_export) + EXPORT_ALIGN - 1) & ~(size_t)(EXPORT_ALIGN - 1))

static void export_free(dl_export *e)
{
    fshm_map_unref(e->map);   /* NULL-safe; unmaps once the Reader and every export let go */
    free(e);
}

static void versioned_deleter(DLManagedTensorVersioned *t) { export_free(t->manager_ctx); }
static void legacy_deleter(DLManagedTensor *t) { export_free(t->manager_ctx); }

static const char versioned_name[] = "dltensor_versioned";
static const char legacy_name[] = "dltensor";

/* A consumer renames the capsule ("used_...") when it takes ownership; the deleter is then
 * its call. Still under the original name, nobody took it: release it here. */
static void versioned_capsule_destructor(PyObject *cap)
{
    if (PyCapsule_IsValid(cap, versioned_name)) {
        DLManagedTensorVersioned *t = PyCapsule_GetPointer(cap, versioned_name);
        t->deleter(t);
    }
}

static void legacy_capsule_destructor(PyObject *cap)
{
    if (PyCapsule_IsValid(cap, legacy_name)) {
        DLManagedTensor *t = PyCapsule_GetPointer(cap, legacy_name);
        t->deleter(t);
    }
}

/* ---- the frame's layout, checked against its buffer ---- */

/* The shared layout check's result (frame_buffer.c), with the DLPack type of its elements. */
typedef struct {
    fshm_frame_layout t;
    DLDataType dtype;
} dl_layout;

static int dl_dtype(int code, DLDataType *out)
{
    static const struct { int code; uint8_t dl, bits; } map[] = {
        {FSHM_DTYPE_UINT8, kDLUInt, 8},     {FSHM_DTYPE_INT8, kDLInt, 8},
        {FSHM_DTYPE_UINT16, kDLUInt, 16},   {FSHM_DTYPE_INT16, kDLInt, 16},
        {FSHM_DTYPE_UINT32, kDLUInt, 32},   {FSHM_DTYPE_INT32, kDLInt, 32},
        {FSHM_DTYPE_UINT64, kDLUInt, 64},   {FSHM_DTYPE_INT64, kDLInt, 64},
        {FSHM_DTYPE_FLOAT32, kDLFloat, 32}, {FSHM_DTYPE_FLOAT64, kDLFloat, 64},
        /* DLPack's bool is one byte per element, as the wire format's */
        {FSHM_DTYPE_BOOLEAN, kDLBool, 8},
        /* opaque bytes: what frameshm.Frame.array shows them as */
        {FSHM_DTYPE_BYTES, kDLUInt, 8},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (map[i].code == code) {
            out->code = map[i].dl;
            out->bits = map[i].bits;
            out->lanes = 1;
            return 0;
        }
    return -1;
}

/* The frame's layout as the shared check reads it, with its DLPack type. */
static int read_layout(FshmFrame *f, dl_layout *l)
{
    memset(l, 0, sizeof *l);
    if (dl_dtype(f->code, &l->dtype) < 0) {
        PyErr_Format(PyExc_BufferError, "dtype code %d has no DLPack equivalent", f->code);
        return -1;
    }
    return fshm_frame_layout_read(f, l->dtype.bits / 8, &l->t);
}

/* Why the frame cannot be handed out in place, or NULL when it can. */
static const char *zero_copy_obstacle(const fshm_frame_source *src, const dl_layout *l)
{
    if (!src->map)
        return "the frame's bytes are a private copy, not in shared memory";
    if ((uintptr_t)src->data % l->t.item)
        return "the frame's data is not aligned to its element size";
    for (int i = 0; i < l->t.ndim; i++)
        if (l->t.dims[i] > 1 && l->t.byte_strides[i] % (int64_t)l->t.item)
            return "a byte stride is not a multiple of the element size (DLPack strides "
                   "count elements)";
    return NULL;
}

/* ---- copies ---- */

/* Gathers n elements of `item` bytes, `stride` bytes apart; fixed sizes so that each
 * element is one load and store. */
static unsigned char *gather(unsigned char *dst, const unsigned char *src, int64_t n,
                             int64_t stride, size_t item)
{
#define GATHER(T)                                        \
    for (int64_t j = 0; j < n; j++, dst += sizeof(T))    \
        memcpy(dst, src + j * stride, sizeof(T));        \
    break
    switch (item) {
    case 1: GATHER(uint8_t);
    case 2: GATHER(uint16_t);
    case 4: GATHER(uint32_t);
    case 8: GATHER(uint64_t);
    default:
        for (int64_t j = 0; j < n; j++, dst += item)
            memcpy(dst, src + j * stride, item);
    }
#undef GATHER
    return dst;
}

/* Copies the frame into dst, row-major and compact. The longest innermost run that is
 * contiguous in the source goes in one memcpy (the whole frame, for a compact one); when
 * even the innermost dimension is strided, its elements are gathered. */
static void copy_compact(unsigned char *dst, const unsigned char *src, const dl_layout *l)
{
    if (!l->t.count)
        return;
    size_t run = l->t.item;
    int k = l->t.ndim;
    while (k > 0 && (l->t.dims[k - 1] == 1 || l->t.byte_strides[k - 1] == (int64_t)run))
        run *= (size_t)l->t.dims[--k];
    int inner = run == l->t.item && k > 0;
    int outer = inner ? k - 1 : k;
    int64_t idx[FSHM_MAX_DIMS] = {0};
    for (;;) {
        int64_t off = 0;
        for (int i = 0; i < outer; i++)
            off += idx[i] * l->t.byte_strides[i];
        if (inner) {
            dst = gather(dst, src + off, l->t.dims[k - 1], l->t.byte_strides[k - 1], l->t.item);
        } else {
            memcpy(dst, src + off, run);
            dst += run;
        }
        int i = outer - 1;
        while (i >= 0 && ++idx[i] == l->t.dims[i])
            idx[i--] = 0;
        if (i < 0)
            return;
    }
}

/* Past this many bytes the copy runs without the GIL: other threads go on meanwhile. */
#define COPY_NOGIL_BYTES (256 * 1024)

/* Copies the frame into `dst` and, for a frame in a pool, checks with the seqlock that the
 * producer did not overwrite its slot meanwhile (or before). 0, or -1 with Overrun (torn)
 * or StreamClosed (the Reader is closed: untorn cannot be known) set. */
static int copy_checked(FshmFrame *f, const fshm_frame_source *src, const dl_layout *l,
                        unsigned char *dst)
{
    if (l->t.count * l->t.item >= COPY_NOGIL_BYTES) {
        /* The frame holds its buffer, which keeps the source mapped; the seqlock check
         * below needs the GIL (the Reader's close takes it). */
        Py_BEGIN_ALLOW_THREADS
        copy_compact(dst, src->data, l);
        Py_END_ALLOW_THREADS
    } else {
        copy_compact(dst, src->data, l);
    }
    if (!src->map)
        return 0;   /* a private buffer: nobody else writes it */
    if (fshm_frame_check_valid(f) == 1)
        return 0;
    PyObject *cls = fshm_exc_class("Overrun");
    if (!cls)
        return -1;
    PyErr_Format(cls, "frame %llu was overwritten by the producer before its DLPack copy "
                 "was complete; read a newer frame", f->seq);
    Py_DECREF(cls);
    return -1;
}

/* ---- the capsule ---- */

static PyObject *make_capsule(FshmFrame *f, const fshm_frame_source *src, const dl_layout *l,
                              int versioned, int copy)
{
    size_t data_bytes = copy ? (size_t)(l->t.count * l->t.item) : 0;
    void *mem;
    if (posix_memalign(&mem, EXPORT_ALIGN, EXPORT_HEAD + data_bytes))
        return PyErr_NoMemory();
    dl_export *e = mem;
    memset(e, 0, sizeof *e);
    DLTensor *t = versioned ? &e->m.versioned.dl_tensor : &e->m.legacy.dl_tensor;
    t->device.device_type = kDLCPU;
    t->device.device_id = 0;
    t->ndim = l->t.ndim;
    t->dtype = l->dtype;
    t->shape = e->shape;
    t->strides = e->strides;
    t->byte_offset = 0;
    for (int i = 0; i < l->t.ndim; i++)
        e->shape[i] = l->t.dims[i];
    if (copy) {
        unsigned char *data = (unsigned char *)mem + EXPORT_HEAD;
        if (copy_checked(f, src, l, data) < 0) {
            free(mem);
            return NULL;
        }
        int64_t step = 1;
        for (int i = l->t.ndim - 1; i >= 0; i--) {
            e->strides[i] = step;
            step *= l->t.dims[i] ? l->t.dims[i] : 1;
        }
        t->data = data;
    } else {
        for (int i = 0; i < l->t.ndim; i++)
            /* a dimension of size <= 1 is never stepped over: any stride describes it */
            e->strides[i] = l->t.byte_strides[i] / (int64_t)l->t.item;
        t->data = (void *)src->data;
        e->map = src->map;
        fshm_map_ref(e->map);
    }
    PyObject *cap;
    if (versioned) {
        e->m.versioned.version.major = EXPORT_MAJOR;
        e->m.versioned.version.minor = EXPORT_MINOR;
        e->m.versioned.manager_ctx = e;
        e->m.versioned.deleter = versioned_deleter;
        e->m.versioned.flags = copy ? DLPACK_FLAG_BITMASK_IS_COPIED : DLPACK_FLAG_BITMASK_READ_ONLY;
        cap = PyCapsule_New(&e->m.versioned, versioned_name, versioned_capsule_destructor);
    } else {
        e->m.legacy.manager_ctx = e;
        e->m.legacy.deleter = legacy_deleter;
        cap = PyCapsule_New(&e->m.legacy, legacy_name, legacy_capsule_destructor);
    }
    if (!cap)
        export_free(e);
    return cap;
}

/* ---- arguments ---- */

/* Consumers known to ignore DLPACK_FLAG_BITMASK_READ_ONLY, by the module of the Python
 * function that calls __dlpack__: torch has no read-only tensors, so it hands the user a
 * writable tensor over the read-only mapping and an in-place operation kills the process
 * (SIGSEGV; seen with torch 2.13 and 2.14). Unless they explicitly ask for no copy
 * (copy=False), they get a private copy. A consumer calling from C is not seen here: it
 * gets the zero-copy export and its flag. */
static const char *const read_only_blind[] = {"torch", NULL};

static int consumer_ignores_read_only(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *globals = PyEval_GetFrameGlobals();   /* new reference */
#else
    PyObject *globals = Py_XNewRef(PyEval_GetGlobals());
#endif
    if (!globals)
        return 0;
    int blind = 0;
    PyObject *name = PyDict_Check(globals) ? PyDict_GetItemString(globals, "__name__") : NULL;
    const char *s = name && PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
    if (!s)
        PyErr_Clear();
    for (int i = 0; s && read_only_blind[i]; i++) {
        size_t n = strlen(read_only_blind[i]);
        if (!strncmp(s, read_only_blind[i], n) && (s[n] == '\0' || s[n] == '.'))
            blind = 1;
    }
    Py_DECREF(globals);
    return blind;
}

/* (major, minor) of max_version: 0, or -1 with InvalidArgument set. */
static int parse_version(PyObject *v, long *major)
{
    if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 2 ||
        !PyLong_Check(PyTuple_GET_ITEM(v, 0)) || !PyLong_Check(PyTuple_GET_ITEM(v, 1))) {
        PyErr_Format(fshm_exc_invalid, "max_version must be None or a (major, minor) tuple of "
                     "ints, not %R", v);
        return -1;
    }
    *major = PyLong_AsLong(PyTuple_GET_ITEM(v, 0));
    if (*major == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* dl_device must be None or where frames are: (kDLCPU, 0). */
static int check_device(PyObject *d)
{
    if (d == Py_None)
        return 0;
    if (!PyTuple_Check(d) || PyTuple_GET_SIZE(d) != 2) {
        PyErr_Format(fshm_exc_invalid, "dl_device must be None or a (device_type, device_id) "
                     "tuple, not %R", d);
        return -1;
    }
    long v[2];
    for (int i = 0; i < 2; i++) {
        PyObject *n = PyNumber_Index(PyTuple_GET_ITEM(d, i));   /* an IntEnum is fine */
        if (!n)
            return -1;
        v[i] = PyLong_AsLong(n);
        Py_DECREF(n);
        if (v[i] == -1 && PyErr_Occurred())
            return -1;
    }
    if (v[0] != kDLCPU || v[1] != 0) {
        PyErr_Format(PyExc_BufferError, "frames are in CPU memory (kDLCPU=1, device 0): cannot "
                     "export to device (%ld, %ld); export to the CPU and move the tensor",
                     v[0], v[1]);
        return -1;
    }
    return 0;
}

/* CPU tensors have no stream to synchronise with: None, or -1 ("no synchronisation"). */
static int check_stream(PyObject *s)
{
    if (s == Py_None)
        return 0;
    if (PyLong_Check(s)) {
        int overflow;
        long v = PyLong_AsLongAndOverflow(s, &overflow);
        if (!overflow && v == -1)
            return 0;
        if (v == -1 && PyErr_Occurred())
            return -1;
    }
    PyErr_Format(fshm_exc_invalid, "stream must be None for a CPU tensor (DLPack), not %R", s);
    return -1;
}

PyObject *fshm_frame_dlpack(FshmFrame *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$OOOO:__dlpack__", kwlist, &stream,
                                     &max_version, &dl_device, &copy_obj))
        return NULL;
    if (check_stream(stream) < 0 || check_device(dl_device) < 0)
        return NULL;
    long major = 0;
    if (max_version != Py_None && parse_version(max_version, &major) < 0)
        return NULL;
    /* A consumer on a newer major version still reads 1.x capsules (the spec's rule). */
    int versioned = max_version != Py_None && major >= 1;
    int copy = -1;   /* None: in place if that is safe, else a copy */
    if (copy_obj != Py_None && (copy = PyObject_IsTrue(copy_obj)) < 0)
        return NULL;

    dl_layout l;
    fshm_frame_source src;
    if (read_layout(self, &l) < 0 || fshm_frame_source_open(self, &src) < 0)
        return NULL;
    const char *obstacle = zero_copy_obstacle(&src, &l);
    int do_copy;
    if (!versioned) {
        if (copy == 0) {
            fshm_frame_source_close(&src);
            PyErr_SetString(PyExc_BufferError,
                            "this consumer's DLPack version (< 1.0) has no read-only flag, so "
                            "frameshm does not hand it shared memory: ask max_version=(1, 0) "
                            "or accept a copy");
            return NULL;
        }
        do_copy = 1;
    } else if (copy == 1) {
        do_copy = 1;
    } else if (obstacle) {
        if (copy == 0) {
            fshm_frame_source_close(&src);
            return PyErr_Format(PyExc_BufferError, "cannot export frame %llu without a copy: "
                                "%s", self->seq, obstacle);
        }
        do_copy = 1;
    } else {
        do_copy = copy == -1 && consumer_ignores_read_only();
    }
    PyObject *cap = make_capsule(self, &src, &l, versioned, do_copy);
    fshm_frame_source_close(&src);
    return cap;
}

PyObject *fshm_frame_dlpack_device(FshmFrame *self, PyObject *unused)
{
    return Py_BuildValue("(ii)", kDLCPU, 0);
}
