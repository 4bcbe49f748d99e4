/* frameshm._core.GigECamera: a GigE Vision camera through Aravis (devices/fshm_gige.h).
 *
 * One-copy delivery only: read_into(out) copies the next complete frame from the Aravis
 * buffer pool straight into `out` (a loaned stream slot) and gives the buffer back at
 * once, so no Aravis memory is ever exported to Python. Waits release the GIL and run in
 * slices so that Ctrl-C is handled (a liveness probe of a silent camera may hold a slice
 * for a few seconds: Aravis' GVCP retries). */
#include "binding.h"

#include "fshm_gige.h"

/* Enters the camera's guard for a call into cam (binding.h): false with StreamClosed set if
 * another thread closed it meanwhile, or InvalidState for a re-entrant call. */
#define GUARD_CAM(self) fshm_guard_open(&(self)->guard, (void *const *)&(self)->cam, "GigECamera")

typedef struct {
    PyObject_HEAD
    fshm_gige_cam *cam;
    int started;
    fshm_guard guard;    /* held by every call into cam (binding.h) */
    unsigned long long timeouts;  /* reads that timed out (whole Python-level timeouts) */
    PyObject *id;
} FshmGigECamera;

/* ---- errors: camera classes of frameshm._core (errors.c) ---- */

static PyObject *gige_raise(int code)
{
    const char *name = NULL;
    int oserr = 0;
    switch (code) {
    case -ENOENT: name = "DeviceNotFound"; oserr = ENOENT; break;
    case -EACCES: case -EPERM: name = "DevicePermissionError"; oserr = EACCES; break;
    case -EBUSY: name = "DeviceBusy"; oserr = EBUSY; break;
    case -ENODEV: case -ENXIO: name = "DeviceGone"; oserr = ENODEV; break;
    case FSHM_E_GIGE_UNSUPPORTED: name = "UnsupportedFormat"; break;
    case FSHM_E_GIGE_NOLIB: name = "GigEUnavailable"; break;
    case FSHM_E_GIGE_ARAVIS: name = "AravisError"; break;
    case -EIO: name = "AravisError"; break;
    default: return fshm_raise(code);
    }
    return fshm_raise_named(name, oserr);
}

#define CHECK_CAM(self)                                                                          \
    if (!(self)->cam)                                                                            \
        return fshm_raise_closed("GigECamera");

/* fshm_capture_ops.ready: open and started */
static int gige_ready(void *obj)
{
    FshmGigECamera *self = obj;
    return fshm_capture_ready(self->cam != NULL, self->started, "GigECamera");
}

#define CHECK_STARTED(self)                                                                      \
    if (gige_ready(self) < 0)                                                                    \
        return NULL;

static int gige_init(FshmGigECamera *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"id", NULL};
    const char *id;
    if (self->cam) {
        PyErr_SetString(fshm_exc_state, "GigECamera already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s", kwlist, &id))
        return -1;
    fshm_gige_cam *cam = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_gige_open(id, &cam);
    Py_END_ALLOW_THREADS
    if (rc) {
        gige_raise(rc);
        return -1;
    }
    self->cam = cam;
    self->id = PyUnicode_FromString(id);
    return self->id ? 0 : -1;
}

static void gige_final_close(FshmGigECamera *self, int allow_threads)
{
    fshm_gige_cam *c = self->cam;
    if (!c)
        return;
    self->cam = NULL;
    self->started = 0;
    if (allow_threads) {
        Py_BEGIN_ALLOW_THREADS
        fshm_gige_close(c);
        Py_END_ALLOW_THREADS
    } else {
        fshm_gige_close(c);
    }
}

static void gige_dealloc(FshmGigECamera *self)
{
    gige_final_close(self, 1);
    Py_XDECREF(self->id);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *gige_start(FshmGigECamera *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"pixel_format", "width", "height", "x", "y", "fps", "packet_size", "buffers", NULL};
    const char *pf = NULL;
    unsigned int w = 0, h = 0, x = 0, y = 0, pkt = 0, nbuf = 0;
    double fps = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|zIIIIdII", kwlist, &pf, &w, &h, &x, &y, &fps, &pkt, &nbuf))
        return NULL;
    CHECK_CAM(self);
    fshm_gige_request rq = {pf, x, y, w, h, fps, pkt, nbuf};
    int rc;
    if (!GUARD_CAM(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_gige_start(self->cam, &rq);
    Py_END_ALLOW_THREADS
    fshm_guard_leave(&self->guard);
    if (rc)
        return gige_raise(rc);
    self->started = 1;
    Py_RETURN_NONE;
}

static PyObject *gige_info(FshmGigECamera *self, PyObject *unused)
{
    CHECK_CAM(self);
    fshm_gige_info i;
    fshm_gige_get_info(self->cam, &i);
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s,s:s,s:s}", "id", i.id, "device_id", i.device_id, "vendor", i.vendor,
                         "model", i.model, "serial", i.serial, "protocol", i.protocol, "address", i.address);
}

static PyObject *gige_format(FshmGigECamera *self, PyObject *unused)
{
    CHECK_STARTED(self);
    fshm_gige_format f;
    fshm_gige_get_format(self->cam, &f);
    PyObject *shape = PyTuple_New(f.tensor.ndims);
    if (!shape)
        return NULL;
    for (int i = 0; i < f.tensor.ndims; i++)
        PyTuple_SET_ITEM(shape, i, PyLong_FromLong(f.tensor.dims[i]));
    return Py_BuildValue("{s:s,s:k,s:k,s:k,s:k,s:k,s:k,s:d,s:O,s:k,s:k,s:k,s:k,s:i,s:N}", "pixel_format",
                         f.pixel_format, "pixel_format_code", (unsigned long)f.pixel_format_code, "bits_per_pixel",
                         (unsigned long)f.bits_per_pixel, "x", (unsigned long)f.x, "y", (unsigned long)f.y, "width",
                         (unsigned long)f.width, "height", (unsigned long)f.height, "fps", f.fps,
                         "frame_rate_available", f.frame_rate_available ? Py_True : Py_False, "packet_size",
                         (unsigned long)f.packet_size, "payload", (unsigned long)f.payload, "frame_bytes",
                         (unsigned long)f.frame_bytes, "buffers", (unsigned long)f.nbuffers, "dtype",
                         (int)f.tensor.dtype, "shape", shape);
}

static PyObject *gige_stats(FshmGigECamera *self, PyObject *unused)
{
    CHECK_CAM(self);
    fshm_gige_stats s;
    fshm_gige_get_stats(self->cam, &s);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "delivered", (unsigned long long)s.delivered,
                         "lost", (unsigned long long)s.lost, "id_gaps", (unsigned long long)s.id_gaps, "incomplete",
                         (unsigned long long)s.incomplete, "underruns", (unsigned long long)s.underruns, "flushed",
                         (unsigned long long)s.flushed, "timeouts", self->timeouts, "resent_packets",
                         (unsigned long long)s.resent_packets, "missing_packets",
                         (unsigned long long)s.missing_packets);
}

/* Blocking call without the GIL, in slices (Python signal handlers run in between). */
static int run_blocking(void *obj, PyObject *tobj, fshm_sliced_fn fn, void *arg)
{
    FshmGigECamera *self = obj;
    int64_t timeout;
    int rc = fshm_run_sliced(self, &self->guard, (void *const *)&self->cam, "GigECamera", tobj, 0, fn, arg, &timeout);
    if (rc == -ETIMEDOUT) {
        self->timeouts++;
        fshm_set_error(-ETIMEDOUT, "no frame from GigE camera %s within %.3f s", PyUnicode_AsUTF8(self->id),
                       (double)timeout / 1e9);
    }
    return rc;
}

static const fshm_capture_ops gige_ops = {gige_ready, run_blocking, gige_raise};

static int do_read_into(void *obj, int64_t t, void *arg)
{
    FshmGigECamera *self = obj;
    fshm_capture_dst *a = arg;
    return fshm_gige_read_into(self->cam, t, a->dst, a->cap, a->info);
}

static PyObject *gige_read_into(FshmGigECamera *self, PyObject *args, PyObject *kw)
{
    fshm_gige_frame info = {0};
    if (fshm_capture_read_into(self, args, kw, &gige_ops, do_read_into, &info) < 0)
        return NULL;
    /* (timestamp_ns, frame_id, nbytes, lost_before, camera_timestamp) */
    return Py_BuildValue("(KKnkK)", (unsigned long long)info.timestamp_ns, (unsigned long long)info.frame_id,
                         (Py_ssize_t)info.bytes, (unsigned long)info.lost_before,
                         (unsigned long long)info.camera_timestamp);
}

static int do_wait(void *obj, int64_t t, void *arg)
{
    FshmGigECamera *self = obj;
    (void)arg;
    return fshm_gige_wait(self->cam, t);
}

static PyObject *gige_wait(FshmGigECamera *self, PyObject *args, PyObject *kw)
{
    return fshm_capture_wait(self, args, kw, &gige_ops, do_wait);
}

static PyObject *gige_flush(FshmGigECamera *self, PyObject *arg)
{
    CHECK_STARTED(self);
    unsigned long long age = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (!GUARD_CAM(self))
        return NULL;
    int rc = fshm_gige_flush(self->cam, age);
    fshm_guard_leave(&self->guard);
    if (rc < 0)
        return gige_raise(rc);
    return PyLong_FromLong(rc);
}

static PyObject *gige_set_rate(FshmGigECamera *self, PyObject *arg)
{
    double fps = PyFloat_AsDouble(arg);
    if (fps == -1.0 && PyErr_Occurred())
        return NULL;
    CHECK_STARTED(self);
    int rc;
    if (!GUARD_CAM(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_gige_set_rate(self->cam, fps);
    Py_END_ALLOW_THREADS
    fshm_guard_leave(&self->guard);
    if (rc < 0)
        return gige_raise(rc);
    return PyBool_FromLong(rc);
}

static PyObject *gige_probe(FshmGigECamera *self, PyObject *unused)
{
    CHECK_CAM(self);
    int rc;
    if (!GUARD_CAM(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_gige_probe(self->cam);
    Py_END_ALLOW_THREADS
    fshm_guard_leave(&self->guard);
    if (rc)
        return gige_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *gige_stop(FshmGigECamera *self, PyObject *unused)
{
    CHECK_CAM(self);
    int rc;
    if (!GUARD_CAM(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_gige_stop(self->cam);
    Py_END_ALLOW_THREADS
    self->started = 0;
    fshm_guard_leave(&self->guard);
    if (rc)
        return gige_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *gige_close(FshmGigECamera *self, PyObject *unused)
{
    if (!self->cam)
        Py_RETURN_NONE;
    /* Waits for a call in progress on another thread (at most a slice of a wait). */
    if (fshm_guard_enter(&self->guard) < 0)
        return NULL;
    gige_final_close(self, 1);
    fshm_guard_leave(&self->guard);
    Py_RETURN_NONE;
}

static PyObject *gige_get_closed(FshmGigECamera *self, void *c) { return PyBool_FromLong(!self->cam); }
static PyObject *gige_get_gone(FshmGigECamera *self, void *c) { return PyBool_FromLong(self->cam && fshm_gige_gone(self->cam)); }
static PyObject *gige_get_started(FshmGigECamera *self, void *c) { return PyBool_FromLong(self->cam && self->started); }
static PyObject *gige_get_id(FshmGigECamera *self, void *c) { return Py_NewRef(self->id ? self->id : Py_None); }

static PyMethodDef gige_methods[] = {
    {"start", (PyCFunction)(void (*)(void))gige_start, METH_VARARGS | METH_KEYWORDS,
     "start(pixel_format=None, width=0, height=0, x=0, y=0, fps=0.0, packet_size=0, buffers=0)"},
    {"info", (PyCFunction)gige_info, METH_NOARGS, "id/vendor/model/serial/protocol/address dict"},
    {"format", (PyCFunction)gige_format, METH_NOARGS, "negotiated format dict"},
    {"stats", (PyCFunction)gige_stats, METH_NOARGS, "counters dict (delivered, lost, ...)"},
    {"read_into", (PyCFunction)(void (*)(void))gige_read_into, METH_VARARGS | METH_KEYWORDS,
     "read_into(out, timeout=None) -> (timestamp_ns, frame_id, nbytes, lost_before, camera_timestamp)"},
    {"wait", (PyCFunction)(void (*)(void))gige_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=None) -> bytes of the next frame, left first in line"},
    {"flush", (PyCFunction)gige_flush, METH_O, "flush(max_age_ns) -> frames discarded"},
    {"set_rate", (PyCFunction)gige_set_rate, METH_O, "set_rate(fps) -> the camera paces itself"},
    {"probe", (PyCFunction)gige_probe, METH_NOARGS, "probe(): DeviceGone unless the camera answers and is ours"},
    {"stop", (PyCFunction)gige_stop, METH_NOARGS, "stop(): stops acquisition"},
    {"close", (PyCFunction)gige_close, METH_NOARGS, "close()"},
    {NULL},
};

static PyGetSetDef gige_getset[] = {
    {"closed", (getter)gige_get_closed, NULL, NULL, NULL},
    {"gone", (getter)gige_get_gone, NULL, "control of the camera was lost", NULL},
    {"started", (getter)gige_get_started, NULL, NULL, NULL},
    {"id", (getter)gige_get_id, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject FshmGigECameraType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "frameshm._gige.GigECamera",
    .tp_basicsize = sizeof(FshmGigECamera),
    .tp_dealloc = (destructor)gige_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Low-level GigE Vision camera (Aravis); use frameshm.GigECamera.",
    .tp_methods = gige_methods,
    .tp_getset = gige_getset,
    .tp_init = (initproc)gige_init,
    .tp_new = PyType_GenericNew,
};

int fshm_gige_types_ready(PyObject *module)
{
    if (PyType_Ready(&FshmGigECameraType) < 0)
        return -1;
    Py_INCREF(&FshmGigECameraType);
    if (PyModule_AddObject(module, "GigECamera", (PyObject *)&FshmGigECameraType)) {
        Py_DECREF(&FshmGigECameraType);
        return -1;
    }
    return PyModule_AddIntConstant(module, "HAVE_ARAVIS", fshm_gige_have_aravis());
}
