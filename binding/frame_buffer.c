/* frameshm._core.Frame's bytes: where they are and their layout, both checked (shared
 * with the DLPack export), and the buffer protocol, so memoryview(frame), struct.unpack_from(frame),
 * np.frombuffer, bytes(frame) and socket.send(frame) take the frame's bytes in shared
 * memory with no array object built per frame. */
#include "binding.h"

int fshm_frame_layout_read(FshmFrame *f, size_t item, fshm_frame_layout *l)
{
    memset(l, 0, sizeof *l);
    l->item = item;
    if (!item || !f->shape || !f->strides || !PyTuple_Check(f->shape) ||
        !PyTuple_Check(f->strides) || PyTuple_GET_SIZE(f->shape) != PyTuple_GET_SIZE(f->strides) ||
        PyTuple_GET_SIZE(f->shape) < 1 || PyTuple_GET_SIZE(f->shape) > FSHM_MAX_DIMS) {
        PyErr_SetString(PyExc_BufferError, "the frame's shape and strides do not describe a tensor");
        return -1;
    }
    l->ndim = (int)PyTuple_GET_SIZE(f->shape);
    uint64_t count = 1, extent = l->item;
    for (int i = 0; i < l->ndim; i++) {
        long long d = PyLong_AsLongLong(PyTuple_GET_ITEM(f->shape, i));
        long long s = PyLong_AsLongLong(PyTuple_GET_ITEM(f->strides, i));
        if ((d == -1 || s == -1) && PyErr_Occurred())
            return -1;
        if (d < 0 || d > INT32_MAX || s < 0 || s > INT32_MAX) {
            PyErr_Format(PyExc_BufferError, "dimension %d: size %lld, stride %lld out of range",
                         i, d, s);
            return -1;
        }
        l->dims[i] = d;
        l->byte_strides[i] = s;
        uint64_t step;
        if (__builtin_mul_overflow(count, (uint64_t)d, &count) ||
            (d > 1 && (__builtin_mul_overflow((uint64_t)(d - 1), (uint64_t)s, &step) ||
                       __builtin_add_overflow(extent, step, &extent)))) {
            PyErr_SetString(PyExc_BufferError, "the frame's layout overflows");
            return -1;
        }
    }
    if (!count)
        extent = 0;
    l->count = count;
    l->extent = extent;
    /* The Reader checked the layout against the slot; an export must not trust that a
     * consumer reading it cannot run past the frame, so check again against its bytes. */
    if (f->offset < 0 || f->nbytes < 0 || extent > (uint64_t)f->nbytes ||
        count > (uint64_t)f->nbytes / l->item) {
        PyErr_Format(PyExc_BufferError, "the frame's layout spans %llu bytes of %zd",
                     (unsigned long long)extent, f->nbytes);
        return -1;
    }
    return 0;
}

int fshm_frame_source_open(FshmFrame *f, fshm_frame_source *src)
{
    memset(src, 0, sizeof *src);
    size_t size;
    const unsigned char *base;
    if (Py_TYPE(f->buffer) == &FshmMappingType) {
        src->map = ((FshmMapping *)f->buffer)->map;
        base = fshm_map_base(src->map);
        size = fshm_map_size(src->map);
    } else {
        /* a read_copy() frame: its own bytearray */
        if (PyObject_GetBuffer(f->buffer, &src->view, PyBUF_SIMPLE) < 0)
            return -1;
        src->has_view = 1;
        base = src->view.buf;
        size = (size_t)src->view.len;
    }
    if ((size_t)f->offset > size || (size_t)f->nbytes > size - (size_t)f->offset) {
        PyErr_Format(PyExc_BufferError, "the frame's %zd bytes at offset %zd run past its "
                     "buffer of %zu bytes", f->nbytes, f->offset, size);
        fshm_frame_source_close(src);
        return -1;
    }
    src->data = base + f->offset;
    return 0;
}

void fshm_frame_source_close(fshm_frame_source *src)
{
    if (src->has_view)
        PyBuffer_Release(&src->view);
    src->has_view = 0;
}

/* struct-module formats, native: the wire format is little-endian and so are the hosts
 * the library builds on (fshm_internal.h asserts it), and memoryview only indexes native
 * single-character formats. Opaque bytes read as unsigned bytes, as Frame.array shows them. */
static const char *buffer_format(int code, size_t *item)
{
    static const struct { int code; const char *fmt; size_t item; } map[] = {
        {FSHM_DTYPE_UINT8, "B", 1},   {FSHM_DTYPE_INT8, "b", 1},    {FSHM_DTYPE_UINT16, "H", 2},
        {FSHM_DTYPE_INT16, "h", 2},   {FSHM_DTYPE_UINT32, "I", 4},  {FSHM_DTYPE_INT32, "i", 4},
        {FSHM_DTYPE_UINT64, "Q", 8},  {FSHM_DTYPE_INT64, "q", 8},   {FSHM_DTYPE_FLOAT32, "f", 4},
        {FSHM_DTYPE_FLOAT64, "d", 8}, {FSHM_DTYPE_BOOLEAN, "?", 1}, {FSHM_DTYPE_BYTES, "B", 1},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (map[i].code == code) {
            *item = map[i].item;
            return map[i].fmt;
        }
    return NULL;
}
_Static_assert(sizeof(unsigned int) == 4 && sizeof(unsigned long long) == 8 && sizeof(_Bool) == 1,
               "struct formats I, Q and ? must be 4, 8 and 1 bytes");

/* C (row-major) or Fortran order with the layout's strides; dimensions of 1 (and an empty
 * tensor) do not constrain. */
static int contiguous(const fshm_frame_layout *l, char order)
{
    if (!l->count)
        return 1;
    int64_t want = (int64_t)l->item;
    for (int k = 0; k < l->ndim; k++) {
        int i = order == 'C' ? l->ndim - 1 - k : k;
        if (l->dims[i] > 1 && l->byte_strides[i] != want)
            return 0;
        want *= l->dims[i];
    }
    return 1;
}

/* view->internal holds what keeps the bytes there for the export's life: the pool Mapping
 * (a strong reference, counted in its exports) or, tagged with the low bit, the held
 * export of a read_copy() frame's private buffer (which then cannot be resized). */
#define HELD_BUFFER_TAG ((uintptr_t)1)

static int buffer_error(Py_buffer *view, const char *msg)
{
    view->obj = NULL;
    PyErr_SetString(PyExc_BufferError, msg);
    return -1;
}

static int frame_getbuffer(FshmFrame *self, Py_buffer *view, int flags)
{
    if ((flags & PyBUF_WRITABLE) == PyBUF_WRITABLE)
        return buffer_error(view, "a frame is read-only: copy() gives a writable array");
    size_t item;
    const char *fmt = buffer_format(self->code, &item);
    if (!fmt) {
        view->obj = NULL;
        PyErr_Format(PyExc_BufferError, "dtype code %d has no buffer format", self->code);
        return -1;
    }
    fshm_frame_layout l;
    if (fshm_frame_layout_read(self, item, &l) < 0) {
        view->obj = NULL;
        return -1;
    }
    int c = contiguous(&l, 'C');
    if (!c && !(flags & PyBUF_STRIDES))
        return buffer_error(view, "the frame is not C-contiguous; ask for strides (memoryview does)");
    if (((flags & PyBUF_C_CONTIGUOUS) == PyBUF_C_CONTIGUOUS && !c) ||
        ((flags & PyBUF_F_CONTIGUOUS) == PyBUF_F_CONTIGUOUS && !contiguous(&l, 'F')) ||
        ((flags & PyBUF_ANY_CONTIGUOUS) == PyBUF_ANY_CONTIGUOUS && !c && !contiguous(&l, 'F')))
        return buffer_error(view, "the frame is not contiguous in the order asked for");

    fshm_frame_source src;
    if (!self->buffer || fshm_frame_source_open(self, &src) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_BufferError, "the frame has no bytes");
        view->obj = NULL;
        return -1;
    }
    void *held;
    if (src.has_view) {
        /* Held for the export's life. A bytearray's release only counts its exports, so
         * the held view may move to the heap. */
        Py_buffer *inner = PyMem_Malloc(sizeof *inner);
        if (!inner) {
            fshm_frame_source_close(&src);
            view->obj = NULL;
            PyErr_NoMemory();
            return -1;
        }
        *inner = src.view;
        held = (void *)((uintptr_t)inner | HELD_BUFFER_TAG);
    } else {
        FshmMapping *m = (FshmMapping *)self->buffer;
        Py_INCREF(m);
        m->exports++;
        held = m;
    }
    /* The frame is immutable, so writing the same values again while another export of it
     * is alive changes nothing that export sees. */
    for (int i = 0; i < l.ndim; i++) {
        self->view_shape[i] = (Py_ssize_t)l.dims[i];
        self->view_strides[i] = (Py_ssize_t)l.byte_strides[i];
    }
    view->obj = Py_NewRef(self);
    view->buf = (void *)src.data;
    view->len = (Py_ssize_t)(l.count * l.item);
    view->readonly = 1;
    view->itemsize = (Py_ssize_t)l.item;
    view->format = (flags & PyBUF_FORMAT) ? (char *)fmt : NULL;
    view->ndim = (flags & PyBUF_ND) ? l.ndim : 1;
    view->shape = (flags & PyBUF_ND) ? self->view_shape : NULL;
    view->strides = (flags & PyBUF_STRIDES) == PyBUF_STRIDES ? self->view_strides : NULL;
    view->suboffsets = NULL;
    view->internal = held;
    return 0;
}

static void frame_releasebuffer(FshmFrame *self, Py_buffer *view)
{
    (void)self;
    uintptr_t held = (uintptr_t)view->internal;
    if (held & HELD_BUFFER_TAG) {
        Py_buffer *inner = (Py_buffer *)(held & ~HELD_BUFFER_TAG);
        PyBuffer_Release(inner);
        PyMem_Free(inner);
    } else if (held) {
        FshmMapping *m = (FshmMapping *)held;
        m->exports--;
        Py_DECREF(m);
    }
}

PyBufferProcs fshm_frame_as_buffer = {
    (getbufferproc)frame_getbuffer,
    (releasebufferproc)frame_releasebuffer,
};
