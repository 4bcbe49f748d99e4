/* frameshm._core.Camera (a V4L2 camera, devices/fshm_v4l2.h) and frameshm._core.CameraBuffer
 * (one dequeued driver buffer exported through the buffer protocol).
 *
 * Zero-copy life cycle: a CameraBuffer holds a strong reference to its Camera. The driver
 * buffer is requeued when the buffer object is released (release()) and no export (numpy
 * view) is alive any more, or when the object is deallocated - which cannot happen while
 * a view holds it. So a driver buffer is never requeued while a view of it is alive, and
 * the mappings outlive close(): close() with buffers out stops streaming at once and
 * unmaps when the last one is requeued. Waits release the GIL. */
#include "binding.h"

#include <linux/videodev2.h>

#include "fshm_v4l2.h"

/* Enters the camera's guard for a call into cam (binding.h): false with StreamClosed set if
 * another thread closed it meanwhile, or InvalidState for a re-entrant call. */
#define GUARD_CAM(self) fshm_guard_open(&(self)->guard, (void *const *)&(self)->cam, "Camera")

typedef struct {
    PyObject_HEAD
    fshm_v4l2_cam *cam;
    int started;
    fshm_guard guard;    /* held by every call into cam (binding.h) */
    unsigned outstanding; /* CameraBuffers not yet requeued */
    int closing;         /* close() asked while buffers were out */
    PyObject *path;
} FshmCamera;

typedef struct {
    PyObject_HEAD
    FshmCamera *owner;
    fshm_v4l2_buf b;
    Py_ssize_t exports;
    int released;        /* the application is done: requeue once exports == 0 */
    int requeued;
} FshmCameraBuffer;

/* ---- errors: camera classes of frameshm._core (errors.c) ---- */

static PyObject *camera_raise(int code)
{
    const char *name = NULL;
    int oserr = 0;
    switch (code) {
    case -ENOENT: name = "DeviceNotFound"; oserr = ENOENT; break;
    case -EACCES: case -EPERM: name = "DevicePermissionError"; oserr = EACCES; break;
    case -EBUSY: name = "DeviceBusy"; oserr = EBUSY; break;
    case -ENODEV: case -ENXIO: name = "DeviceGone"; oserr = ENODEV; break;
    case -ENOTTY: name = "NotACamera"; break;
    case FSHM_E_V4L2_UNSUPPORTED: name = "UnsupportedFormat"; break;
    case FSHM_E_V4L2_NOLIB: name = "V4L2Unavailable"; break;
    case FSHM_E_V4L2_NOBUFS: name = "BuffersExhausted"; break;
    default: return fshm_raise(code);
    }
    return fshm_raise_named(name, oserr);
}

#define CHECK_CAM(self)                                                                          \
    if (!(self)->cam || (self)->closing)                                                         \
        return fshm_raise_closed("Camera");

/* fshm_capture_ops.ready: open and started */
static int camera_ready(void *obj)
{
    FshmCamera *self = obj;
    return fshm_capture_ready(self->cam && !self->closing, self->started, "Camera");
}

#define CHECK_STARTED(self)                                                                      \
    if (camera_ready(self) < 0)                                                                  \
        return NULL;

/* ---- Camera ---- */

static int camera_init(FshmCamera *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", NULL};
    PyObject *path;
    if (self->cam) {
        PyErr_SetString(fshm_exc_state, "Camera already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&", kwlist, PyUnicode_FSConverter, &path))
        return -1;
    fshm_v4l2_cam *cam = NULL;
    int rc;
    const char *p = PyBytes_AS_STRING(path);
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_v4l2_open(p, NULL, &cam);
    Py_END_ALLOW_THREADS
    if (rc) {
        Py_DECREF(path);
        camera_raise(rc);
        return -1;
    }
    self->cam = cam;
    self->path = path;
    return 0;
}

/* allow_threads: only from an explicit close(); deallocation paths keep the GIL. */
static void camera_final_close(FshmCamera *self, int allow_threads)
{
    if (self->cam) {
        fshm_v4l2_cam *c = self->cam;
        self->cam = NULL;
        if (allow_threads) {
            Py_BEGIN_ALLOW_THREADS
            fshm_v4l2_close(c);
            Py_END_ALLOW_THREADS
        } else {
            fshm_v4l2_close(c);
        }
    }
}

static void camera_dealloc(FshmCamera *self)
{
    /* Buffers reference the camera: none is outstanding here. */
    camera_final_close(self, 0);
    Py_XDECREF(self->path);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *camera_start(FshmCamera *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fourcc", "width", "height", "fps_num", "fps_den", "buffers", NULL};
    unsigned int fourcc = 0, w = 0, h = 0, num = 0, den = 0, nbuf = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|IIIIII", kwlist, &fourcc, &w, &h, &num, &den, &nbuf))
        return NULL;
    CHECK_CAM(self);
    fshm_v4l2_request rq = {fourcc, w, h, num, den, nbuf};
    int rc;
    if (!GUARD_CAM(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_v4l2_start(self->cam, &rq);
    Py_END_ALLOW_THREADS
    fshm_guard_leave(&self->guard);
    if (rc)
        return camera_raise(rc);
    self->started = 1;
    Py_RETURN_NONE;
}

static PyObject *camera_info(FshmCamera *self, PyObject *unused)
{
    CHECK_CAM(self);
    fshm_v4l2_info i;
    fshm_v4l2_get_info(self->cam, &i);
    return Py_BuildValue("{s:s,s:s,s:s,s:k,s:k,s:s,s:O}", "driver", i.driver, "card", i.card, "bus_info",
                         i.bus_info, "version", (unsigned long)i.version, "capabilities",
                         (unsigned long)i.capabilities, "backend", i.backend ? i.backend : "?",
                         "libv4l2", fshm_v4l2_have_libv4l2() ? Py_True : Py_False);
}

static PyObject *camera_formats(FshmCamera *self, PyObject *unused)
{
    CHECK_CAM(self);
    fshm_v4l2_fmtdesc f[64];
    int n = fshm_v4l2_enum_formats(self->cam, f, 64);
    if (n < 0)
        return camera_raise(n);
    if (n > 64)
        n = 64;
    PyObject *res = PyList_New(n);
    for (int i = 0; res && i < n; i++) {
        PyObject *t = Py_BuildValue("(kkks)", (unsigned long)f[i].fourcc, (unsigned long)f[i].flags,
                                    (unsigned long)f[i].source_fourcc, f[i].description);
        if (!t) {
            Py_CLEAR(res);
            break;
        }
        PyList_SET_ITEM(res, i, t);
    }
    return res;
}

static PyObject *camera_sizes(FshmCamera *self, PyObject *arg)
{
    CHECK_CAM(self);
    unsigned long fourcc = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    fshm_v4l2_frmsize s[64];
    int n = fshm_v4l2_enum_sizes(self->cam, (uint32_t)fourcc, s, 64);
    if (n < 0)
        return camera_raise(n);
    if (n > 64)
        n = 64;
    PyObject *res = PyList_New(n);
    for (int i = 0; res && i < n; i++) {
        PyObject *t = s[i].discrete
                          ? Py_BuildValue("(kk)", (unsigned long)s[i].width, (unsigned long)s[i].height)
                          : Py_BuildValue("(kkkkkk)", (unsigned long)s[i].min_width, (unsigned long)s[i].max_width,
                                          (unsigned long)s[i].step_width, (unsigned long)s[i].min_height,
                                          (unsigned long)s[i].max_height, (unsigned long)s[i].step_height);
        if (!t) {
            Py_CLEAR(res);
            break;
        }
        PyList_SET_ITEM(res, i, t);
    }
    return res;
}

static PyObject *camera_intervals(FshmCamera *self, PyObject *args)
{
    unsigned long fourcc, w, h;
    if (!PyArg_ParseTuple(args, "kkk", &fourcc, &w, &h))
        return NULL;
    CHECK_CAM(self);
    fshm_v4l2_frmival v[64];
    int n = fshm_v4l2_enum_intervals(self->cam, (uint32_t)fourcc, (uint32_t)w, (uint32_t)h, v, 64);
    if (n < 0)
        return camera_raise(n);
    if (n > 64)
        n = 64;
    PyObject *res = PyList_New(n);
    for (int i = 0; res && i < n; i++) {
        PyObject *t = v[i].discrete ? Py_BuildValue("(kk)", (unsigned long)v[i].num, (unsigned long)v[i].den)
                                    : Py_BuildValue("(kkkkkk)", (unsigned long)v[i].num, (unsigned long)v[i].den,
                                                    (unsigned long)v[i].max_num, (unsigned long)v[i].max_den,
                                                    (unsigned long)v[i].step_num, (unsigned long)v[i].step_den);
        if (!t) {
            Py_CLEAR(res);
            break;
        }
        PyList_SET_ITEM(res, i, t);
    }
    return res;
}

static PyObject *camera_format(FshmCamera *self, PyObject *unused)
{
    CHECK_STARTED(self);
    fshm_v4l2_format f;
    fshm_v4l2_get_format(self->cam, &f);
    PyObject *shape = PyTuple_New(f.tensor.ndims);
    if (!shape)
        return NULL;
    for (int i = 0; i < f.tensor.ndims; i++)
        PyTuple_SET_ITEM(shape, i, PyLong_FromLong(f.tensor.dims[i]));
    return Py_BuildValue("{s:k,s:k,s:k,s:k,s:k,s:k,s:k,s:O,s:O,s:(kk),s:(kk),s:k,s:i,s:N}", "fourcc",
                         (unsigned long)f.fourcc, "native_fourcc", (unsigned long)f.native_fourcc, "width",
                         (unsigned long)f.width, "height", (unsigned long)f.height, "bytesperline",
                         (unsigned long)f.bytesperline, "native_bytesperline",
                         (unsigned long)f.native_bytesperline, "frame_bytes", (unsigned long)f.frame_bytes,
                         "converted", f.converted ? Py_True : Py_False, "compressed",
                         f.compressed ? Py_True : Py_False, "device_fps", (unsigned long)f.device_fps_num,
                         (unsigned long)f.device_fps_den, "rate_limit", (unsigned long)f.rate_limit_num,
                         (unsigned long)f.rate_limit_den, "buffers", (unsigned long)f.nbuffers, "dtype",
                         (int)f.tensor.dtype, "shape", shape);
}

static PyObject *camera_stats(FshmCamera *self, PyObject *unused)
{
    CHECK_CAM(self);
    fshm_v4l2_stats s;
    fshm_v4l2_get_stats(self->cam, &s);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:I}", "delivered", (unsigned long long)s.delivered, "flushed",
                         (unsigned long long)s.flushed, "rate_dropped", (unsigned long long)s.rate_dropped,
                         "errors", (unsigned long long)s.errors, "driver_gaps", (unsigned long long)s.driver_gaps,
                         "held", fshm_v4l2_held(self->cam));
}

/* A blocking camera call without the GIL, Ctrl-C-able (fshm_run_sliced). */
static int run_blocking(void *obj, PyObject *tobj, fshm_sliced_fn fn, void *arg)
{
    FshmCamera *self = obj;
    int64_t timeout;
    int rc = fshm_run_sliced(self, &self->guard, (void *const *)&self->cam, "Camera", tobj, 0, fn, arg, &timeout);
    if (rc == -ETIMEDOUT)
        fshm_set_error(-ETIMEDOUT, "no frame from %s within %.3f s", PyBytes_AS_STRING(self->path),
                       (double)timeout / 1e9);
    return rc;
}

static const fshm_capture_ops camera_ops = {camera_ready, run_blocking, camera_raise};

static int do_dequeue(void *obj, int64_t t, void *arg)
{
    FshmCamera *self = obj;
    return fshm_v4l2_dequeue(self->cam, t, arg);
}

static PyTypeObject FshmCameraBufferType;

static PyObject *camera_dequeue(FshmCamera *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *tobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O", kwlist, &tobj))
        return NULL;
    CHECK_STARTED(self);
    /* Allocated first: after the dequeue nothing may fail without requeueing. */
    FshmCameraBuffer *buf = PyObject_New(FshmCameraBuffer, &FshmCameraBufferType);
    if (!buf)
        return NULL;
    buf->owner = NULL;
    buf->exports = 0;
    buf->released = 0;
    buf->requeued = 1;
    int rc = run_blocking(self, tobj, do_dequeue, &buf->b);
    if (rc) {
        Py_DECREF(buf);
        return rc == INT_MIN ? NULL : camera_raise(rc);
    }
    Py_INCREF(self);
    buf->owner = self;
    buf->requeued = 0;
    self->outstanding++;
    return (PyObject *)buf;
}

static int do_read_into(void *obj, int64_t t, void *arg)
{
    FshmCamera *self = obj;
    fshm_capture_dst *a = arg;
    return fshm_v4l2_read_into(self->cam, t, a->dst, a->cap, a->info);
}

static PyObject *camera_read_into(FshmCamera *self, PyObject *args, PyObject *kw)
{
    fshm_v4l2_buf info = {0};
    if (fshm_capture_read_into(self, args, kw, &camera_ops, do_read_into, &info) < 0)
        return NULL;
    /* (timestamp_ns, sequence, bytes, driver_timestamp) */
    return Py_BuildValue("(KknO)", (unsigned long long)info.timestamp_ns, (unsigned long)info.sequence,
                         (Py_ssize_t)info.bytesused, info.driver_timestamp ? Py_True : Py_False);
}

static int do_wait(void *obj, int64_t t, void *arg)
{
    FshmCamera *self = obj;
    (void)arg;
    return fshm_v4l2_wait(self->cam, t);
}

static PyObject *camera_wait(FshmCamera *self, PyObject *args, PyObject *kw)
{
    return fshm_capture_wait(self, args, kw, &camera_ops, do_wait);
}

static PyObject *camera_flush(FshmCamera *self, PyObject *arg)
{
    CHECK_STARTED(self);
    unsigned long long age = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (!GUARD_CAM(self))
        return NULL;
    int rc = fshm_v4l2_flush(self->cam, age);
    fshm_guard_leave(&self->guard);
    if (rc < 0)
        return camera_raise(rc);
    return PyLong_FromLong(rc);
}

static PyObject *camera_set_rate(FshmCamera *self, PyObject *args)
{
    unsigned int num, den;
    if (!PyArg_ParseTuple(args, "II", &num, &den))
        return NULL;
    CHECK_STARTED(self);
    int rc;
    if (!GUARD_CAM(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_v4l2_set_rate(self->cam, num, den);
    Py_END_ALLOW_THREADS
    fshm_guard_leave(&self->guard);
    if (rc < 0)
        return camera_raise(rc);
    return PyBool_FromLong(rc);
}

static PyObject *camera_close(FshmCamera *self, PyObject *unused)
{
    if (!self->cam || self->closing)
        Py_RETURN_NONE;
    /* Waits for a call in progress on another thread (at most a slice of a wait). */
    if (fshm_guard_enter(&self->guard) < 0)
        return NULL;
    if (self->cam && !self->closing) {
        if (self->outstanding) {
            /* Views of driver buffers are alive: stop capturing now, unmap with the last. */
            fshm_v4l2_stop(self->cam);
            self->closing = 1;
        } else {
            camera_final_close(self, 1);
        }
    }
    fshm_guard_leave(&self->guard);
    Py_RETURN_NONE;
}

static PyObject *camera_get_closed(FshmCamera *self, void *c) { return PyBool_FromLong(!self->cam || self->closing); }
static PyObject *camera_get_gone(FshmCamera *self, void *c)
{
    return PyBool_FromLong(self->cam && fshm_v4l2_gone(self->cam));
}
static PyObject *camera_get_outstanding(FshmCamera *self, void *c) { return PyLong_FromUnsignedLong(self->outstanding); }
static PyObject *camera_get_path(FshmCamera *self, void *c)
{
    return self->path ? PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(self->path)) : Py_NewRef(Py_None);
}

static PyMethodDef camera_methods[] = {
    {"start", (PyCFunction)(void (*)(void))camera_start, METH_VARARGS | METH_KEYWORDS,
     "start(fourcc=0, width=0, height=0, fps_num=0, fps_den=0, buffers=0)"},
    {"info", (PyCFunction)camera_info, METH_NOARGS, "driver/card/capabilities dict"},
    {"formats", (PyCFunction)camera_formats, METH_NOARGS, "[(fourcc, flags, source_fourcc, description)]"},
    {"sizes", (PyCFunction)camera_sizes, METH_O, "sizes(fourcc) -> [(w, h) | (minw, maxw, stepw, minh, maxh, steph)]"},
    {"intervals", (PyCFunction)camera_intervals, METH_VARARGS, "intervals(fourcc, w, h) -> [(num, den) | range]"},
    {"format", (PyCFunction)camera_format, METH_NOARGS, "negotiated format dict"},
    {"stats", (PyCFunction)camera_stats, METH_NOARGS, "counters dict"},
    {"dequeue", (PyCFunction)(void (*)(void))camera_dequeue, METH_VARARGS | METH_KEYWORDS,
     "dequeue(timeout=None) -> CameraBuffer (zero-copy)"},
    {"read_into", (PyCFunction)(void (*)(void))camera_read_into, METH_VARARGS | METH_KEYWORDS,
     "read_into(out, timeout=None) -> (timestamp_ns, sequence, nbytes, driver_timestamp)"},
    {"wait", (PyCFunction)(void (*)(void))camera_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=None) -> bytes of the next frame, left ready for delivery"},
    {"flush", (PyCFunction)camera_flush, METH_O, "flush(max_age_ns) -> frames discarded"},
    {"set_rate", (PyCFunction)camera_set_rate, METH_VARARGS, "set_rate(num, den) -> device paces itself"},
    {"close", (PyCFunction)camera_close, METH_NOARGS, "close()"},
    {NULL},
};

static PyGetSetDef camera_getset[] = {
    {"closed", (getter)camera_get_closed, NULL, NULL, NULL},
    {"gone", (getter)camera_get_gone, NULL, "the device reported ENODEV", NULL},
    {"outstanding", (getter)camera_get_outstanding, NULL, "buffers not yet requeued", NULL},
    {"path", (getter)camera_get_path, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject FshmCameraType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "frameshm._core.Camera",
    .tp_basicsize = sizeof(FshmCamera),
    .tp_dealloc = (destructor)camera_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Low-level V4L2 camera; use frameshm.Camera.",
    .tp_methods = camera_methods,
    .tp_getset = camera_getset,
    .tp_init = (initproc)camera_init,
    .tp_new = PyType_GenericNew,
};

/* ---- CameraBuffer ---- */

static void buffer_requeue(FshmCameraBuffer *self)
{
    if (self->requeued)
        return;
    self->requeued = 1;
    FshmCamera *cam = self->owner;
    if (cam && cam->cam) {
        /* Errors (a gone device) leave nothing to do: the buffer is not the driver's. */
        fshm_v4l2_requeue(cam->cam, self->b.index);
        cam->outstanding--;
        if (cam->closing && cam->outstanding == 0)
            camera_final_close(cam, 0);
    }
}

static void buffer_dealloc(FshmCameraBuffer *self)
{
    buffer_requeue(self);   /* exports == 0: views hold a reference to this object */
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

static int buffer_getbuffer(FshmCameraBuffer *self, Py_buffer *view, int flags)
{
    if (self->requeued || self->released) {
        PyErr_SetString(PyExc_BufferError, "camera frame already released (its buffer went back to the driver)");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->b.data, (Py_ssize_t)self->b.bytesused, 1, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void buffer_releasebuffer(FshmCameraBuffer *self, Py_buffer *view)
{
    (void)view;
    if (--self->exports == 0 && self->released)
        buffer_requeue(self);
}

static PyBufferProcs buffer_as_buffer = {
    (getbufferproc)buffer_getbuffer,
    (releasebufferproc)buffer_releasebuffer,
};

static PyObject *buffer_release(FshmCameraBuffer *self, PyObject *unused)
{
    /* True: back with the driver now; False: deferred until the last view is gone. */
    self->released = 1;
    if (self->exports == 0)
        buffer_requeue(self);
    return PyBool_FromLong(self->requeued);
}

#define BGET(fn, expr)                                                                           \
    static PyObject *fn(FshmCameraBuffer *self, void *c) { return expr; }
BGET(buffer_index, PyLong_FromUnsignedLong(self->b.index))
BGET(buffer_ts, PyLong_FromUnsignedLongLong(self->b.timestamp_ns))
BGET(buffer_dq, PyLong_FromUnsignedLongLong(self->b.dequeue_ns))
BGET(buffer_seq, PyLong_FromUnsignedLong(self->b.sequence))
BGET(buffer_nbytes, PyLong_FromSize_t(self->b.bytesused))
BGET(buffer_bpl, PyLong_FromUnsignedLong(self->b.bytesperline))
BGET(buffer_flags, PyLong_FromUnsignedLong(self->b.flags))
BGET(buffer_drv, PyBool_FromLong(self->b.driver_timestamp))
BGET(buffer_exports, PyLong_FromSsize_t(self->exports))
BGET(buffer_released, PyBool_FromLong(self->released || self->requeued))
BGET(buffer_requeued, PyBool_FromLong(self->requeued))

static PyMethodDef buffer_methods[] = {
    {"release", (PyCFunction)buffer_release, METH_NOARGS,
     "release() -> True if requeued now, False if deferred until the views are gone"},
    {NULL},
};

static PyGetSetDef buffer_getset[] = {
    {"index", (getter)buffer_index, NULL, NULL, NULL},
    {"timestamp_ns", (getter)buffer_ts, NULL, "capture time, CLOCK_MONOTONIC", NULL},
    {"dequeue_ns", (getter)buffer_dq, NULL, NULL, NULL},
    {"sequence", (getter)buffer_seq, NULL, "driver frame counter", NULL},
    {"nbytes", (getter)buffer_nbytes, NULL, NULL, NULL},
    {"bytesperline", (getter)buffer_bpl, NULL, NULL, NULL},
    {"flags", (getter)buffer_flags, NULL, "V4L2_BUF_FLAG_*", NULL},
    {"driver_timestamp", (getter)buffer_drv, NULL, NULL, NULL},
    {"exports", (getter)buffer_exports, NULL, "live buffer exports (numpy views)", NULL},
    {"released", (getter)buffer_released, NULL, NULL, NULL},
    {"requeued", (getter)buffer_requeued, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject FshmCameraBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "frameshm._core.CameraBuffer",
    .tp_basicsize = sizeof(FshmCameraBuffer),
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_as_buffer = &buffer_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One dequeued camera buffer (buffer protocol, read-only).",
    .tp_methods = buffer_methods,
    .tp_getset = buffer_getset,
};

int fshm_camera_types_ready(PyObject *module)
{
    if (PyType_Ready(&FshmCameraType) < 0 || PyType_Ready(&FshmCameraBufferType) < 0)
        return -1;
    Py_INCREF(&FshmCameraType);
    if (PyModule_AddObject(module, "Camera", (PyObject *)&FshmCameraType)) {
        Py_DECREF(&FshmCameraType);
        return -1;
    }
    Py_INCREF(&FshmCameraBufferType);
    if (PyModule_AddObject(module, "CameraBuffer", (PyObject *)&FshmCameraBufferType)) {
        Py_DECREF(&FshmCameraBufferType);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "HAVE_LIBV4L2", fshm_v4l2_have_libv4l2()))
        return -1;
    return 0;
}
