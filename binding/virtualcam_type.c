/* frameshm._core.VirtualCamera: a frameshm stream served as a PipeWire camera node
 * (devices/fshm_pwcam.h). The node runs on the core's own threads; Python only waits for
 * its events (GIL released, in slices so that Ctrl-C gets through) and reads counters. */
#include "binding.h"

#include "fshm_pwcam.h"

typedef struct {
    PyObject_HEAD
    fshm_pwcam *cam;
    fshm_guard guard;    /* held by every call into cam (binding.h) */
} FshmVirtualCamera;

/* Virtual-camera classes of frameshm._core (errors.c); the rest through fshm_raise. */
static PyObject *vcam_raise(int code)
{
    const char *name;
    switch (code) {
    case FSHM_E_PW_NOLIB: name = "PipeWireUnavailable"; break;
    case FSHM_E_PW: name = "PipeWireError"; break;
    case FSHM_E_PW_UNSUPPORTED: name = "UnsupportedStream"; break;
    default: return fshm_raise(code);
    }
    return fshm_raise_named(name, 0);
}

static int vcam_init(FshmVirtualCamera *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"stream", "node_name", "description", "format", "width", "height",
                             "fps_num", "fps_den", "learn_timeout", "buffers", "consumer", "remote",
                             "base_dir", "namespace", "stream_id", "driver", NULL};
    PyObject *stream, *base = Py_None, *ns = Py_None, *tobj = Py_None, *driver = Py_None;
    const char *node_name = NULL, *desc = NULL, *format = NULL, *consumer = NULL, *remote = NULL;
    unsigned long sid = 0;
    unsigned int w = 0, h = 0, num = 0, den = 0, nbuf = 0;
    if (self->cam) {
        PyErr_SetString(fshm_exc_state, "VirtualCamera already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$zzzIIIIOIzzOOkO", kwlist, &stream, &node_name, &desc,
                                     &format, &w, &h, &num, &den, &tobj, &nbuf, &consumer, &remote,
                                     &base, &ns, &sid, &driver))
        return -1;
    fshm_pwcam_config cfg = {0};
    int pmode;
    uint32_t client;
    if (fshm_parse_addr(stream, sid, base, ns, &cfg.addr) || fshm_parse_timeout(tobj, &cfg.learn_timeout_ns) ||
        fshm_parse_driver(driver, Py_None, 0, &cfg.driver, &pmode, &client))
        return -1;
    cfg.node_name = node_name;
    cfg.description = desc;
    cfg.format = format;
    cfg.width = w, cfg.height = h, cfg.fps_num = num, cfg.fps_den = den;
    cfg.buffers = nbuf;
    cfg.consumer = consumer;
    cfg.remote = remote;
    fshm_pwcam *cam = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_pwcam_open(&cfg, &cam);
    Py_END_ALLOW_THREADS
    if (rc) {
        vcam_raise(rc);
        return -1;
    }
    self->cam = cam;
    return 0;
}

static void vcam_final_close(FshmVirtualCamera *self)
{
    fshm_pwcam *c = self->cam;
    if (!c)
        return;
    self->cam = NULL;
    Py_BEGIN_ALLOW_THREADS
    fshm_pwcam_close(c);
    Py_END_ALLOW_THREADS
}

static void vcam_dealloc(FshmVirtualCamera *self)
{
    vcam_final_close(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static const char *kind_name(int k)
{
    switch (k) {
    case FSHM_PWCAM_EV_READY: return "ready";
    case FSHM_PWCAM_EV_CLIENT_ON: return "client_connected";
    case FSHM_PWCAM_EV_CLIENT_OFF: return "client_disconnected";
    case FSHM_PWCAM_EV_STREAMING: return "streaming";
    case FSHM_PWCAM_EV_IDLE: return "idle";
    case FSHM_PWCAM_EV_PRODUCER_GONE: return "producer_gone";
    case FSHM_PWCAM_EV_PRODUCER_BACK: return "producer_back";
    default: return "warning";
    }
}

typedef struct {
    fshm_pwcam_event ev;
    int failure;   /* the node's fatal error (any code, -ETIMEDOUT included) */
} event_args;

/* Sliced wait: no event in a slice is fshm_run_sliced's -ETIMEDOUT; a failure is handed
 * back apart so that a failure code of -ETIMEDOUT is not taken for a slice ending. */
static int do_next_event(void *obj, int64_t t, void *arg)
{
    event_args *a = arg;
    int rc = fshm_pwcam_next_event(((FshmVirtualCamera *)obj)->cam, t, &a->ev);
    if (rc == 1)
        return 0;
    if (rc == 0)
        return -ETIMEDOUT;
    a->failure = rc;
    return -ECANCELED;
}

static PyObject *vcam_next_event(FshmVirtualCamera *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *tobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O", kwlist, &tobj))
        return NULL;
    if (!self->cam)
        return fshm_raise_closed("VirtualCamera");
    event_args a = {.failure = 0};
    int64_t timeout;
    int rc = fshm_run_sliced(self, &self->guard, (void *const *)&self->cam, "VirtualCamera", tobj, 0, do_next_event, &a, &timeout);
    if (rc == INT_MIN)
        return NULL;
    if (a.failure)
        return vcam_raise(a.failure);
    if (rc == -ETIMEDOUT)
        Py_RETURN_NONE;
    if (rc)
        return vcam_raise(rc);
    fshm_pwcam_event ev = a.ev;
    return Py_BuildValue("{s:s,s:s,s:k,s:k,s:k,s:s}", "kind", kind_name(ev.kind), "message", ev.text,
                         "clients", (unsigned long)ev.clients, "link_id", (unsigned long)ev.link_id,
                         "peer_node_id", (unsigned long)ev.peer_node_id, "peer", ev.peer);
}

static PyObject *vcam_info(FshmVirtualCamera *self, PyObject *unused)
{
    if (!self->cam)
        return fshm_raise_closed("VirtualCamera");
    fshm_pwcam_info i;
    fshm_pwcam_get_info(self->cam, &i);
    PyObject *node_id = i.node_id == 0xffffffffu ? Py_NewRef(Py_None) : PyLong_FromUnsignedLong(i.node_id);
    PyObject *serial = i.serial ? PyLong_FromUnsignedLongLong(i.serial) : Py_NewRef(Py_None);
    return Py_BuildValue(
        "{s:s,s:s,s:s,s:N,s:N,s:O,s:O,s:O,s:s,s:k,s:k,s:k,s:k,s:k,s:k,s:O,s:k,s:K,s:K,s:K,s:K,s:K,s:K,"
        "s:K}",
        "stream", i.stream, "node_name", i.node_name, "description", i.description, "node_id", node_id,
        "serial", serial, "ready", i.ready ? Py_True : Py_False, "failed", i.failed ? Py_True : Py_False,
        "streaming", i.streaming ? Py_True : Py_False, "format", i.layout.format, "width",
        (unsigned long)i.layout.width, "height", (unsigned long)i.layout.height, "stride",
        (unsigned long)i.layout.stride, "frame_bytes", (unsigned long)i.layout.frame_bytes, "fps_num",
        (unsigned long)i.fps_num, "fps_den", (unsigned long)i.fps_den, "fps_measured",
        i.fps_measured ? Py_True : Py_False, "clients", (unsigned long)i.clients, "served",
        (unsigned long long)i.served, "no_buffer", (unsigned long long)i.no_buffer, "torn",
        (unsigned long long)i.torn, "mismatched", (unsigned long long)i.mismatched, "last_seq",
        (unsigned long long)i.last_seq, "last_timestamp_ns", (unsigned long long)i.last_timestamp_ns,
        "events_lost", (unsigned long long)i.events_lost);
}

static PyObject *vcam_close(FshmVirtualCamera *self, PyObject *unused)
{
    if (!self->cam)
        Py_RETURN_NONE;
    /* Waits for a call in progress on another thread (at most a slice of a wait). */
    if (fshm_guard_enter(&self->guard) < 0)
        return NULL;
    vcam_final_close(self);
    fshm_guard_leave(&self->guard);
    Py_RETURN_NONE;
}

static PyObject *vcam_get_closed(FshmVirtualCamera *self, void *c) { return PyBool_FromLong(!self->cam); }

/* layout(shape, dtype_code, format=None, width=0, height=0) -> dict: how frames of that
 * tensor would be served (no PipeWire needed). */
static PyObject *mod_virtualcam_layout(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"shape", "dtype", "format", "width", "height", NULL};
    PyObject *shape;
    int dtype;
    const char *format = NULL;
    unsigned int w = 0, h = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi|zII", kwlist, &shape, &dtype, &format, &w, &h))
        return NULL;
    fshm_tensor t = {0};
    PyObject *seq = PySequence_Fast(shape, "shape must be a sequence of ints");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > FSHM_MAX_DIMS) {
        Py_DECREF(seq);
        return fshm_raise_invalid("shape must have 1..8 dimensions");
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        t.dims[i] = (int32_t)v;
    }
    Py_DECREF(seq);
    t.ndims = (uint8_t)n;
    t.dtype = (int16_t)dtype;
    t.major_order = FSHM_ORDER_ROW;
    fshm_pwcam_layout l;
    int rc = fshm_pwcam_layout_for(&t, format, w, h, &l);
    if (rc)
        return vcam_raise(rc);
    return Py_BuildValue("{s:s,s:k,s:k,s:k,s:k}", "format", l.format, "width", (unsigned long)l.width,
                         "height", (unsigned long)l.height, "stride", (unsigned long)l.stride,
                         "frame_bytes", (unsigned long)l.frame_bytes);
}

static PyMethodDef vcam_methods[] = {
    {"next_event", (PyCFunction)(void (*)(void))vcam_next_event, METH_VARARGS | METH_KEYWORDS,
     "next_event(timeout=None) -> event dict, or None on timeout; raises the node's fatal error"},
    {"info", (PyCFunction)vcam_info, METH_NOARGS, "node id/serial, served format, counters"},
    {"close", (PyCFunction)vcam_close, METH_NOARGS, "close(): removes the node"},
    {NULL},
};

static PyGetSetDef vcam_getset[] = {
    {"closed", (getter)vcam_get_closed, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject FshmVirtualCameraType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "frameshm._virtualcam.VirtualCamera",
    .tp_basicsize = sizeof(FshmVirtualCamera),
    .tp_dealloc = (destructor)vcam_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Low-level PipeWire virtual camera; use frameshm.VirtualCamera.",
    .tp_methods = vcam_methods,
    .tp_getset = vcam_getset,
    .tp_init = (initproc)vcam_init,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef layout_def = {
    "virtualcam_layout", (PyCFunction)(void (*)(void))mod_virtualcam_layout, METH_VARARGS | METH_KEYWORDS,
    "virtualcam_layout(shape, dtype, format=None, width=0, height=0) -> dict"};

int fshm_virtualcam_types_ready(PyObject *module)
{
    if (PyType_Ready(&FshmVirtualCameraType) < 0)
        return -1;
    Py_INCREF(&FshmVirtualCameraType);
    if (PyModule_AddObject(module, "VirtualCamera", (PyObject *)&FshmVirtualCameraType)) {
        Py_DECREF(&FshmVirtualCameraType);
        return -1;
    }
    PyObject *f = PyCFunction_NewEx(&layout_def, NULL, NULL);
    if (!f || PyModule_AddObject(module, "virtualcam_layout", f)) {
        Py_XDECREF(f);
        return -1;
    }
    return PyModule_AddIntConstant(module, "HAVE_PIPEWIRE", fshm_pwcam_have_pipewire());
}
