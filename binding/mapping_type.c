/* frameshm._core.Mapping: a shared-memory region exported through the buffer protocol.
 * numpy views hold a reference, so the region stays mapped until the last view goes,
 * whatever happens to the Reader/Writer that produced it. */
#include "binding.h"

PyObject *fshm_mapping_new(fshm_map *m)
{
    FshmMapping *self = PyObject_New(FshmMapping, &FshmMappingType);
    if (!self)
        return NULL;
    fshm_map_ref(m);
    self->map = m;
    self->exports = 0;
    return (PyObject *)self;
}

static void mapping_dealloc(FshmMapping *self)
{
    fshm_map_unref(self->map);
    PyObject_Free(self);
}

static int mapping_getbuffer(FshmMapping *self, Py_buffer *view, int flags)
{
    int ro = !fshm_map_writable(self->map);
    if (PyBuffer_FillInfo(view, (PyObject *)self, fshm_map_base(self->map),
                          (Py_ssize_t)fshm_map_size(self->map), ro, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void mapping_releasebuffer(FshmMapping *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

static PyBufferProcs mapping_as_buffer = {
    (getbufferproc)mapping_getbuffer,
    (releasebufferproc)mapping_releasebuffer,
};

static PyObject *mapping_size(FshmMapping *self, void *c) { return PyLong_FromSize_t(fshm_map_size(self->map)); }
static PyObject *mapping_writable(FshmMapping *self, void *c) { return PyBool_FromLong(fshm_map_writable(self->map)); }
static PyObject *mapping_exports(FshmMapping *self, void *c) { return PyLong_FromSsize_t(self->exports); }

static PyGetSetDef mapping_getset[] = {
    {"size", (getter)mapping_size, NULL, "bytes mapped", NULL},
    {"writable", (getter)mapping_writable, NULL, "mapped writable", NULL},
    {"exports", (getter)mapping_exports, NULL, "live buffer exports", NULL},
    {NULL},
};

PyTypeObject FshmMappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "frameshm._core.Mapping",
    .tp_basicsize = sizeof(FshmMapping),
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_as_buffer = &mapping_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A mapped shared-memory region (buffer protocol).",
    .tp_getset = mapping_getset,
};
