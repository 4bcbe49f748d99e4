/* frameshm._core module: exception mapping and module-level functions. */
#include "binding.h"

#include <limits.h>

PyObject *fshm_exc_invalid;

static PyObject *exc_base, *exc_invalid, *exc_notfound, *exc_busy, *exc_corrupt, *exc_toolarge,
    *exc_limit, *exc_timeout, *exc_dead, *exc_overrun, *exc_closed, *exc_nodriver, *exc_rejected,
    *exc_lease;

int fshm_binding_init_errors(void)
{
    PyObject *mod = PyImport_ImportModule("frameshm.errors");
    if (!mod)
        return -1;
    struct { PyObject **slot; const char *name; } names[] = {
        {&exc_base, "FrameshmError"},   {&exc_invalid, "InvalidArgument"},
        {&exc_notfound, "StreamNotFound"}, {&exc_busy, "StreamBusy"},
        {&exc_corrupt, "CorruptStream"}, {&exc_toolarge, "FrameTooLarge"},
        {&exc_limit, "ResourceLimit"},  {&exc_timeout, "Timeout"},
        {&exc_dead, "ProducerDead"},    {&exc_overrun, "Overrun"},
        {&exc_closed, "StreamClosed"},
        {&exc_nodriver, "DriverUnavailable"}, {&exc_rejected, "DriverRejected"},
        {&exc_lease, "LeaseLost"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyObject_GetAttrString(mod, names[i].name);
        if (!*names[i].slot) {
            Py_DECREF(mod);
            return -1;
        }
    }
    Py_DECREF(mod);
    fshm_exc_invalid = exc_invalid;
    return 0;
}

PyObject *fshm_raise(int code)
{
    const char *msg = fshm_last_error();
    PyObject *exc;
    switch (code) {
    case -EINVAL: case FSHM_E_COLLISION: case -ENAMETOOLONG: exc = exc_invalid; break;
    case -ENOENT: exc = exc_notfound; break;
    case -EBUSY: exc = exc_busy; break;
    case FSHM_E_CORRUPT: exc = exc_corrupt; break;
    case FSHM_E_NOPOOL: exc = exc_toolarge; break;
    case FSHM_E_LIMIT: case -ENOSPC: case -ENOMEM: case -EMFILE: case -ENFILE: case -EDQUOT:
        exc = exc_limit; break;
    case -ETIMEDOUT: exc = exc_timeout; break;
    case FSHM_E_PRODUCER_DEAD: exc = exc_dead; break;
    case FSHM_E_OVERRUN: exc = exc_overrun; break;
    case FSHM_E_CLOSED: exc = exc_closed; break;
    case FSHM_E_NODRIVER: exc = exc_nodriver; break;
    case FSHM_E_REJECTED: exc = exc_rejected; break;
    case FSHM_E_LEASE: exc = exc_lease; break;
    case -EACCES: case -EPERM:
        PyErr_SetString(PyExc_PermissionError, msg);
        return NULL;
    default: exc = exc_base; break;
    }
    if (PyType_IsSubtype((PyTypeObject *)exc, (PyTypeObject *)PyExc_OSError)) {
        /* frameshm's own codes (<= -1000) carry the system errno behind them separately */
        int e = code <= -1000 ? fshm_last_errno() : -code;
        if (code == FSHM_E_PRODUCER_DEAD)
            e = ETIMEDOUT;
        PyObject *v = Py_BuildValue("(is)", e, msg);
        if (v) {
            PyErr_SetObject(exc, v);
            Py_DECREF(v);
        }
    } else {
        PyErr_SetString(exc, msg);
    }
    return NULL;
}

int fshm_parse_driver(PyObject *driver, PyObject *mode, unsigned long client_id,
                      const char **path_out, int *mode_out, uint32_t *client_out)
{
    *path_out = NULL;
    *mode_out = 0;
    *client_out = 0;
    if (driver && driver != Py_None) {
        if (!PyUnicode_Check(driver)) {
            PyErr_SetString(PyExc_TypeError, "driver must be the path of the driver's socket (str)");
            return -1;
        }
        *path_out = PyUnicode_AsUTF8(driver);
        if (!*path_out)
            return -1;
        if (!**path_out) {
            PyErr_SetString(exc_invalid, "driver socket path is empty");
            return -1;
        }
    }
    if (mode && mode != Py_None) {
        const char *m = PyUnicode_Check(mode) ? PyUnicode_AsUTF8(mode) : NULL;
        if (m && strcmp(m, "require_existing") == 0)
            *mode_out = FSHM_REQUIRE_EXISTING;
        else if (m && strcmp(m, "existing_or_create") == 0)
            *mode_out = FSHM_EXISTING_OR_CREATE;
        else {
            if (!PyErr_Occurred())
                PyErr_SetString(exc_invalid, "publish_mode must be 'existing_or_create' or "
                                             "'require_existing'");
            return -1;
        }
        if (!*path_out) {
            PyErr_SetString(exc_invalid, "publish_mode only applies with driver=");
            return -1;
        }
    }
    if (client_id > UINT32_MAX) {
        PyErr_SetString(exc_invalid, "client_id must fit in 32 bits");
        return -1;
    }
    *client_out = (uint32_t)client_id;
    return 0;
}

PyObject *fshm_raise_invalid(const char *msg)
{
    PyErr_SetString(exc_invalid, msg);
    return NULL;
}

PyObject *fshm_raise_closed(const char *what)
{
    PyErr_Format(exc_closed, "operation on a closed %s", what);
    return NULL;
}

int fshm_parse_timeout(PyObject *obj, int64_t *out)
{
    if (!obj || obj == Py_None) {
        *out = -1;
        return 0;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (t < 0 || t != t) {
        PyErr_SetString(exc_invalid, "timeout must be None or a non-negative number of seconds");
        return -1;
    }
    *out = t > 9.2e9 ? -1 : (int64_t)(t * 1e9);
    return 0;
}

int fshm_parse_mode(PyObject *v, uint8_t *out)
{
    long m = v ? PyLong_AsLong(v) : -1;
    if (m == -1 && PyErr_Occurred())
        return -1;
    if (m < 0 || m > 255) {
        PyErr_SetString(exc_invalid, "mode is a byte (0..255)");
        return -1;
    }
    *out = (uint8_t)m;
    return 0;
}

int fshm_run_sliced(void *obj, int *busy, const char *what, PyObject *tobj, fshm_sliced_fn fn,
                    void *arg, int64_t *timeout_out)
{
    int64_t timeout;
    if (fshm_parse_timeout(tobj, &timeout))
        return INT_MIN;
    *timeout_out = timeout;
    if (*busy) {
        PyErr_Format(PyExc_RuntimeError, "%s used from two threads at once", what);
        return INT_MIN;
    }
    uint64_t deadline = timeout < 0 ? 0 : fshm_now_ns() + (uint64_t)timeout;
    int rc;
    *busy = 1;
    for (;;) {
        int64_t left = timeout;
        if (timeout >= 0) {
            uint64_t now = fshm_now_ns();
            left = now >= deadline ? 0 : (int64_t)(deadline - now);
        }
        int64_t slice = left < 0 || left > FSHM_SLICE_NS ? FSHM_SLICE_NS : left;
        Py_BEGIN_ALLOW_THREADS
        rc = fn(obj, slice, arg);
        Py_END_ALLOW_THREADS
        if (rc == -ETIMEDOUT && (left < 0 || fshm_now_ns() < deadline))
            rc = -EINTR;   /* only a slice ran out */
        if (rc != -EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            *busy = 0;
            return INT_MIN;
        }
    }
    *busy = 0;
    return rc;
}

static const char *opt_str(PyObject *o, const char *what)
{
    if (!o || o == Py_None)
        return NULL;
    if (PyUnicode_Check(o))
        return PyUnicode_AsUTF8(o);
    PyErr_Format(PyExc_TypeError, "%s must be a str, not %.50s", what, Py_TYPE(o)->tp_name);
    return NULL;
}

int fshm_parse_addr(PyObject *name, unsigned long stream_id, PyObject *base_dir, PyObject *ns,
                    fshm_stream_addr *addr)
{
    memset(addr, 0, sizeof *addr);
    addr->name = opt_str(name, "name");
    addr->base_dir = opt_str(base_dir, "base_dir");
    addr->ns = opt_str(ns, "namespace");
    if (PyErr_Occurred())
        return -1;
    if (stream_id > UINT32_MAX) {
        PyErr_SetString(exc_invalid, "stream_id must fit in 32 bits");
        return -1;
    }
    addr->stream_id = (uint32_t)stream_id;
    return 0;
}

/* ---- module functions ---- */

static PyObject *consumer_dict(const fshm_consumer_info *c)
{
    return Py_BuildValue("{s:s,s:s,s:L,s:O,s:O,s:K,s:K,s:K,s:k}", "name", c->name, "queue", c->queue,
                         "pid", (long long)c->pid, "alive", c->alive ? Py_True : Py_False,
                         "process_all", c->process_all ? Py_True : Py_False, "last_seq_plus1",
                         (unsigned long long)c->last_seq, "delivered",
                         (unsigned long long)c->delivered, "queue_full",
                         (unsigned long long)c->queue_full, "max_rate_hz",
                         (unsigned long)c->max_rate_hz);
}

/* (name=None, *, stream_id=0, base_dir=None, namespace=None) -> address */
static int parse_addr_args(PyObject *args, PyObject *kw, fshm_stream_addr *a)
{
    static char *kwlist[] = {"name", "stream_id", "base_dir", "namespace", NULL};
    PyObject *name = Py_None, *base = Py_None, *ns = Py_None;
    unsigned long sid = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$kOO", kwlist, &name, &sid, &base, &ns))
        return -1;
    return fshm_parse_addr(name, sid, base, ns, a);
}

static PyObject *mod_stream_info(PyObject *self, PyObject *args, PyObject *kw)
{
    fshm_stream_addr a;
    if (parse_addr_args(args, kw, &a))
        return NULL;
    fshm_stream_info *info = PyMem_Malloc(sizeof *info);
    if (!info)
        return PyErr_NoMemory();
    int rc = fshm_stream_info_get(&a, info);
    if (rc) {
        PyMem_Free(info);
        return fshm_raise(rc);
    }
    static const char *states[] = {"none", "alive", "dead", "closed"};
    PyObject *cons = PyList_New(0), *pools = PyList_New(0);
    for (uint32_t i = 0; cons && i < info->nconsumers; i++) {
        PyObject *d = consumer_dict(&info->consumers[i]);
        if (!d || PyList_Append(cons, d)) {
            Py_XDECREF(d);
            Py_CLEAR(cons);
            break;
        }
        Py_DECREF(d);
    }
    for (uint32_t i = 0; pools && i < info->npools; i++) {
        PyObject *v = PyLong_FromUnsignedLong(info->pool_stride[i]);
        if (!v || PyList_Append(pools, v)) {
            Py_XDECREF(v);
            Py_CLEAR(pools);
            break;
        }
        Py_DECREF(v);
    }
    PyObject *res = NULL;
    if (cons && pools)
        res = Py_BuildValue(
            "{s:s,s:k,s:K,s:s,s:L,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:i,s:O,s:k,s:O,s:O}", "name", info->name,
            "stream_id", (unsigned long)info->stream_id, "epoch", (unsigned long long)info->epoch,
            "producer", states[info->producer_state & 3], "producer_pid",
            (long long)info->producer_pid, "latest_seq_plus1", (unsigned long long)info->latest_seq,
            "frames", (unsigned long long)info->frames, "drops_nopool",
            (unsigned long long)info->drops_nopool, "descriptors_sent",
            (unsigned long long)info->desc_sent, "descriptors_dropped",
            (unsigned long long)info->desc_dropped, "consumers_pruned",
            (unsigned long long)info->pruned, "activity_ns", (unsigned long long)info->activity_ns,
            "mode", (int)info->mode, "driver_managed", info->driver_managed ? Py_True : Py_False,
            "nslots", (unsigned long)info->nslots, "pool_strides", pools,
            "consumers", cons);
    Py_XDECREF(cons);
    Py_XDECREF(pools);
    PyMem_Free(info);
    return res;
}

static PyObject *mod_stream_gc(PyObject *self, PyObject *args, PyObject *kw)
{
    fshm_stream_addr a;
    if (parse_addr_args(args, kw, &a))
        return NULL;
    int rc = fshm_stream_gc(&a);
    if (rc < 0)
        return fshm_raise(rc);
    return PyBool_FromLong(rc);
}

static PyObject *mod_namespace_dir(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"base_dir", "namespace", NULL};
    PyObject *base = Py_None, *ns = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO", kwlist, &base, &ns))
        return NULL;
    fshm_stream_addr a;
    if (fshm_parse_addr(Py_None, 0, base, ns, &a))
        return NULL;
    char out[1024];
    int rc = fshm_namespace_dir(a.base_dir, a.ns, out, sizeof out);
    if (rc)
        return fshm_raise(rc);
    return PyUnicode_DecodeFSDefault(out);
}

static PyObject *mod_stream_id_for_name(PyObject *self, PyObject *arg)
{
    const char *n = PyUnicode_AsUTF8(arg);
    if (!n)
        return NULL;
    int rc = fshm_validate_name(n, "stream");
    if (rc)
        return fshm_raise(rc);
    return PyLong_FromUnsignedLong(fshm_stream_id_for_name(n));
}

static PyObject *mod_now_ns(PyObject *self, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(fshm_now_ns());
}

static PyMethodDef module_methods[] = {
    {"stream_info", (PyCFunction)(void (*)(void))mod_stream_info, METH_VARARGS | METH_KEYWORDS,
     "stream_info(name=None, *, stream_id=0, base_dir=None, namespace=None) -> dict"},
    {"stream_gc", (PyCFunction)(void (*)(void))mod_stream_gc, METH_VARARGS | METH_KEYWORDS,
     "stream_gc(name=None, *, stream_id=0, base_dir=None, namespace=None) -> bool removed"},
    {"namespace_dir", (PyCFunction)(void (*)(void))mod_namespace_dir, METH_VARARGS | METH_KEYWORDS,
     "namespace_dir(base_dir=None, namespace=None) -> str"},
    {"stream_id_for_name", mod_stream_id_for_name, METH_O, "stream_id_for_name(name) -> int"},
    {"now_ns", mod_now_ns, METH_NOARGS, "CLOCK_MONOTONIC in nanoseconds"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "frameshm._core", "frameshm C core binding.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__core(void)
{
    if (fshm_binding_init_errors())
        return NULL;
    if (PyType_Ready(&FshmMappingType) < 0 || PyType_Ready(&FshmWriterType) < 0 ||
        PyType_Ready(&FshmReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    Py_INCREF(&FshmMappingType);
    Py_INCREF(&FshmWriterType);
    Py_INCREF(&FshmReaderType);
    if (PyModule_AddObject(m, "Mapping", (PyObject *)&FshmMappingType) ||
        PyModule_AddObject(m, "Writer", (PyObject *)&FshmWriterType) ||
        PyModule_AddObject(m, "Reader", (PyObject *)&FshmReaderType) ||
        PyModule_AddIntConstant(m, "MAX_DIMS", FSHM_MAX_DIMS) ||
        PyModule_AddIntConstant(m, "MAX_POOLS", FSHM_MAX_POOLS) ||
        PyModule_AddIntConstant(m, "MAX_CONSUMERS", FSHM_MAX_CONSUMERS) ||
        PyModule_AddIntConstant(m, "MODE_STANDBY", FSHM_MODE_STANDBY) ||
        PyModule_AddIntConstant(m, "MODE_ALARMED", FSHM_MODE_ALARMED) ||
        fshm_camera_types_ready(m) || fshm_gige_types_ready(m) || fshm_add_driver_funcs(m)) {
        Py_DECREF(m);
        return NULL;
    }
    if (fshm_virtualcam_types_ready(m)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
