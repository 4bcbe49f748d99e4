/* frameshm._core: the transport's binding (Writer, Reader, Frame, Mapping, stream inspection,
 * driver provisioning), the exception hierarchy (errors.c) and the V4L2 camera. */
#include "binding.h"

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
    PyObject *cons = PyList_New(0), *pools = PyList_New(0), *control = PyTuple_New(FSHM_CONTROL_BYTES);
    for (unsigned i = 0; control && i < FSHM_CONTROL_BYTES; i++) {
        PyObject *v = PyLong_FromLong(info->control[i]);
        if (!v) {
            Py_CLEAR(control);
            break;
        }
        PyTuple_SET_ITEM(control, i, v);
    }
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
    if (cons && pools && control)
        res = Py_BuildValue(
            "{s:s,s:k,s:K,s:s,s:L,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:O,s:O,s:k,s:O,s:O}", "name", info->name,
            "stream_id", (unsigned long)info->stream_id, "epoch", (unsigned long long)info->epoch,
            "producer", states[info->producer_state & 3], "producer_pid",
            (long long)info->producer_pid, "latest_seq_plus1", (unsigned long long)info->latest_seq,
            "frames", (unsigned long long)info->frames, "drops_nopool",
            (unsigned long long)info->drops_nopool, "descriptors_sent",
            (unsigned long long)info->desc_sent, "descriptors_dropped",
            (unsigned long long)info->desc_dropped, "consumers_pruned",
            (unsigned long long)info->pruned, "activity_ns", (unsigned long long)info->activity_ns,
            "control", control, "driver_managed", info->driver_managed ? Py_True : Py_False,
            "nslots", (unsigned long)info->nslots, "pool_strides", pools,
            "consumers", cons);
    Py_XDECREF(cons);
    Py_XDECREF(pools);
    Py_XDECREF(control);
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

static PyObject *gc_queue_dict(const fshm_gc_queue *q)
{
    return Py_BuildValue("{s:s,s:L,s:k,s:s}", "queue", q->name, "pid", (long long)q->pid,
                         "stream_id", (unsigned long)q->stream_id, "consumer", q->consumer);
}

/* A list of gc_queue_dict()s, or NULL with an exception. */
static PyObject *gc_queue_list(const fshm_gc_queue *qs, size_t n)
{
    PyObject *list = PyList_New(0);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *d = gc_queue_dict(&qs[i]);
        if (!d || PyList_Append(list, d))
            Py_CLEAR(list);
        Py_XDECREF(d);
    }
    return list;
}

static PyObject *mod_stream_gc_report(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "stream_id", "base_dir", "namespace", "dry_run", NULL};
    PyObject *name = Py_None, *base = Py_None, *ns = Py_None;
    unsigned long sid = 0;
    int dry_run = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$kOOp", kwlist, &name, &sid, &base, &ns, &dry_run))
        return NULL;
    fshm_stream_addr a;
    if (fshm_parse_addr(name, sid, base, ns, &a))
        return NULL;
    fshm_gc_stream_report *r = PyMem_Malloc(sizeof *r);
    if (!r)
        return PyErr_NoMemory();
    int rc = fshm_stream_gc_report(&a, dry_run ? FSHM_GC_DRY_RUN : 0, r);
    if (rc < 0) {
        PyMem_Free(r);
        return fshm_raise(rc);
    }
    static const char *reasons[] = {"no stream", "unused", "corrupt", "no control region",
                                    "producer", "consumers", "driver"};
    static const char *states[] = {"none", "alive", "dead", "closed"};
    const char *reason = r->reason >= 0 && r->reason <= FSHM_GC_DRIVER ? reasons[r->reason] : "?";
    PyObject *queues = gc_queue_list(r->queues, r->nqueues), *res = NULL;
    if (queues)
        res = Py_BuildValue("{s:k,s:s,s:O,s:s,s:s,s:L,s:k,s:O}", "stream_id",
                            (unsigned long)r->stream_id, "name", r->name, "removed",
                            r->removed ? Py_True : Py_False, "reason", reason, "producer",
                            states[r->producer_state & 3], "producer_pid", (long long)r->producer_pid,
                            "live_consumers", (unsigned long)r->live_consumers, "queues", queues);
    Py_XDECREF(queues);
    PyMem_Free(r);
    return res;
}

static PyObject *mod_queue_gc(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"dry_run", NULL};
    int dry_run = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$p", kwlist, &dry_run))
        return NULL;
    /* One entry per queue the system could hold (queues_max, which root may exceed: then
     * the rest are unlinked without being listed, and counted). */
    size_t cap = 4096, n = 0;
    fshm_gc_queue *qs = PyMem_Calloc(cap, sizeof *qs);
    if (!qs)
        return PyErr_NoMemory();
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_queue_gc(dry_run ? FSHM_GC_DRY_RUN : 0, qs, cap, &n);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyMem_Free(qs);
        return fshm_raise(rc);
    }
    PyObject *list = gc_queue_list(qs, n < cap ? n : cap);
    PyMem_Free(qs);
    if (!list)
        return NULL;
    PyObject *res = Py_BuildValue("(Nn)", list, (Py_ssize_t)n);
    return res;
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
    const char *n = fshm_cstr(arg, "stream name");
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
    {"stream_gc_report", (PyCFunction)(void (*)(void))mod_stream_gc_report, METH_VARARGS | METH_KEYWORDS,
     "stream_gc_report(name=None, *, stream_id=0, base_dir=None, namespace=None, dry_run=False) -> dict"},
    {"queue_gc", (PyCFunction)(void (*)(void))mod_queue_gc, METH_VARARGS | METH_KEYWORDS,
     "queue_gc(*, dry_run=False) -> (list of dead consumers' queues, how many there were)"},
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
    if (PyType_Ready(&FshmMappingType) < 0 || PyType_Ready(&FshmWriterType) < 0 ||
        PyType_Ready(&FshmReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    if (fshm_errors_create(m) || fshm_binding_init_errors(m)) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&FshmMappingType);
    Py_INCREF(&FshmWriterType);
    Py_INCREF(&FshmReaderType);
    if (PyModule_AddObject(m, "Mapping", (PyObject *)&FshmMappingType) ||
        PyModule_AddObject(m, "Writer", (PyObject *)&FshmWriterType) ||
        PyModule_AddObject(m, "Reader", (PyObject *)&FshmReaderType) ||
        PyModule_AddIntConstant(m, "MAX_DIMS", FSHM_MAX_DIMS) ||
        PyModule_AddIntConstant(m, "MAX_POOLS", FSHM_MAX_POOLS) ||
        PyModule_AddIntConstant(m, "MAX_NSLOTS", FSHM_MAX_NSLOTS) ||
        PyModule_AddIntConstant(m, "MIN_STRIDE", FSHM_MIN_STRIDE) ||
        PyModule_AddIntConstant(m, "MAX_STRIDE", FSHM_MAX_STRIDE) ||
        PyModule_AddIntConstant(m, "MAX_CONSUMERS", FSHM_MAX_CONSUMERS) ||
        PyModule_AddIntConstant(m, "MAX_FILL_THREADS", FSHM_MAX_FILL_THREADS) ||
        PyModule_AddIntConstant(m, "CONTROL_BYTES", FSHM_CONTROL_BYTES) ||
        PyModule_AddIntConstant(m, "VERSION", fshm_version(NULL, NULL, NULL)) ||
        PyModule_AddStringConstant(m, "VERSION_STRING", fshm_version_string()) ||
        PyModule_AddIntConstant(m, "HEADER_VERSION", FSHM_VERSION) ||
        PyModule_AddStringConstant(m, "HEADER_VERSION_STRING", FSHM_VERSION_STRING) ||
        fshm_frame_type_ready(m) || fshm_camera_types_ready(m) || fshm_add_driver_funcs(m)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
