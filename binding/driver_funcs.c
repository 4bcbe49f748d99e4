/* Module functions for the driver (frameshm.driver): provisioning a stream's regions,
 * removing them, reading the current epoch, and the footprint arithmetic. The driver's
 * event loop is Python; everything that touches shared memory is the C core. */
#include "binding.h"

#include <unistd.h>

/* (stream_id, *, name, base_dir, namespace) shared by the three address-taking functions. */
static int build_addr(unsigned long stream_id, PyObject *name, PyObject *base, PyObject *ns,
                      fshm_stream_addr *a)
{
    if (fshm_parse_addr(name, stream_id, base, ns, a))
        return -1;
    if (!a->stream_id && !a->name) {
        fshm_raise_invalid("a stream needs a non-zero stream_id or a name");
        return -1;
    }
    return 0;
}

/* The (stream_id, *, name, base_dir, namespace) argument list itself. */
static int parse_stream_args(PyObject *args, PyObject *kw, fshm_stream_addr *a)
{
    static char *kwlist[] = {"stream_id", "name", "base_dir", "namespace", NULL};
    unsigned long sid = 0;
    PyObject *name = Py_None, *base = Py_None, *ns = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "k|$OOO", kwlist, &sid, &name, &base, &ns))
        return -1;
    return build_addr(sid, name, base, ns, a);
}

static int parse_pools(PyObject *pools, fshm_profile *p)
{
    PyObject *seq = PySequence_Fast(pools, "pools must be a sequence of (pool_id, stride_bytes)");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > FSHM_MAX_POOLS) {
        Py_DECREF(seq);
        PyErr_Format(fshm_exc_invalid, "a profile has 1 to %d payload pools, not %zd", FSHM_MAX_POOLS,
                     n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        unsigned long id, stride;
        if (!PyArg_ParseTuple(item, "kk;each pool is a (pool_id, stride_bytes) pair", &id, &stride)) {
            Py_DECREF(seq);
            return -1;
        }
        if (id > UINT16_MAX || stride > UINT32_MAX) {
            Py_DECREF(seq);
            PyErr_Format(fshm_exc_invalid, "pool (%lu, %lu): pool_id must fit in 16 bits and "
                         "stride_bytes in 32", id, stride);
            return -1;
        }
        p->pool_id[i] = (uint16_t)id;
        p->stride_bytes[i] = (uint32_t)stride;
    }
    p->npools = (uint32_t)n;
    Py_DECREF(seq);
    return 0;
}

static PyObject *grant_dict(const fshm_grant *g)
{
    PyObject *pools = PyList_New(0);
    if (!pools)
        return NULL;
    for (uint32_t i = 0; i < g->npools; i++) {
        PyObject *d = Py_BuildValue("{s:I,s:k,s:k,s:s}", "pool_id", (unsigned)g->pools[i].pool_id,
                                    "nslots", (unsigned long)g->pools[i].nslots, "stride_bytes",
                                    (unsigned long)g->pools[i].stride_bytes, "uri", g->pools[i].uri);
        if (!d || PyList_Append(pools, d)) {
            Py_XDECREF(d);
            Py_DECREF(pools);
            return NULL;
        }
        Py_DECREF(d);
    }
    PyObject *res = Py_BuildValue("{s:K,s:k,s:k,s:k,s:I,s:I,s:s,s:O}", "epoch",
                                  (unsigned long long)g->epoch, "stream_id",
                                  (unsigned long)g->stream_id, "layout_version",
                                  (unsigned long)g->layout_version, "header_nslots",
                                  (unsigned long)g->header_nslots, "header_slot_bytes",
                                  (unsigned)g->header_slot_bytes, "max_dims", (unsigned)g->max_dims,
                                  "header_uri", g->header_uri, "pools", pools);
    Py_DECREF(pools);
    return res;
}

/* sealed: the memfd transport (fshm_provision_epoch_sealed); the dict then also has
 * "ctl_fd" (the stream's control region, the one passed in or a new one) and
 * "region_fds" (header ring, then the pools in grant order), owned by the caller. */
static PyObject *provision(PyObject *args, PyObject *kw, int sealed)
{
    static char *kwlist[] = {"stream_id", "name", "base_dir", "namespace", "header_nslots", "pools",
                             "file_mode", "gid", "min_epoch", "ctl_fd", NULL};
    unsigned long sid = 0, nslots = 0, mode = 0600;
    long long gid = -1;
    unsigned long long min_epoch = 0;
    int ctl_fd = -1;
    PyObject *name = Py_None, *base = Py_None, *ns = Py_None, *pools = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "k|$OOOkOkLKi", kwlist, &sid, &name, &base, &ns,
                                     &nslots, &pools, &mode, &gid, &min_epoch, &ctl_fd))
        return NULL;
    if (!pools) {
        PyErr_SetString(PyExc_TypeError, "driver_provision() needs pools=[(pool_id, stride_bytes), ...]");
        return NULL;
    }
    if (!sealed && ctl_fd != -1)
        return fshm_raise_invalid("ctl_fd is for driver_provision_sealed()");
    fshm_stream_addr a;
    if (build_addr(sid, name, base, ns, &a))
        return NULL;
    fshm_profile p = FSHM_PROFILE_INIT;
    if (nslots > UINT32_MAX)
        return fshm_raise_invalid("header_nslots must fit in 32 bits");
    p.header_nslots = (uint32_t)nslots;
    if (parse_pools(pools, &p))
        return NULL;
    if (mode > 0777)
        return fshm_raise_invalid("file_mode must be within 0o777");
    p.file_mode = (unsigned)mode;
    p.gid = gid < 0 ? -1 : gid;
    fshm_grant g;
    int rc, fds[1 + FSHM_MAX_POOLS];
    Py_BEGIN_ALLOW_THREADS
    rc = sealed ? fshm_provision_epoch_sealed(&a, &p, (uint64_t)min_epoch, &ctl_fd, &g, fds)
                : fshm_provision_epoch(&a, &p, (uint64_t)min_epoch, &g);
    Py_END_ALLOW_THREADS
    if (rc)
        return fshm_raise(rc);
    PyObject *d = grant_dict(&g);
    if (!sealed)
        return d;
    PyObject *list = d ? PyList_New(0) : NULL, *cfd = NULL;
    for (unsigned i = 0; list && i < 1 + g.npools; i++) {
        PyObject *v = PyLong_FromLong(fds[i]);
        if (!v || PyList_Append(list, v) != 0) {
            Py_XDECREF(v);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(v);
    }
    if (list && (cfd = PyLong_FromLong(ctl_fd)) && PyDict_SetItemString(d, "ctl_fd", cfd) == 0 &&
        PyDict_SetItemString(d, "region_fds", list) == 0) {
        Py_DECREF(cfd);
        Py_DECREF(list);
        return d;
    }
    /* Could not hand them over: nobody else will close them. */
    for (unsigned i = 0; i < 1 + g.npools; i++)
        close(fds[i]);
    Py_XDECREF(cfd);
    Py_XDECREF(list);
    Py_XDECREF(d);
    return NULL;
}

static PyObject *mod_driver_provision(PyObject *self, PyObject *args, PyObject *kw)
{
    return provision(args, kw, 0);
}

static PyObject *mod_driver_provision_sealed(PyObject *self, PyObject *args, PyObject *kw)
{
    return provision(args, kw, 1);
}

static PyObject *mod_driver_remove(PyObject *self, PyObject *args, PyObject *kw)
{
    fshm_stream_addr a;
    if (parse_stream_args(args, kw, &a))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_provision_remove(&a);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return fshm_raise(rc);
    return PyBool_FromLong(rc);
}

static PyObject *mod_driver_current_epoch(PyObject *self, PyObject *args, PyObject *kw)
{
    fshm_stream_addr a;
    if (parse_stream_args(args, kw, &a))
        return NULL;
    uint64_t epoch = 0;
    int rc = fshm_provision_current(&a, &epoch);
    if (rc == -ENOENT)
        return PyLong_FromLong(0);
    if (rc)
        return fshm_raise(rc);
    return PyLong_FromUnsignedLongLong(epoch);
}

static PyObject *mod_profile_footprint(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"header_nslots", "strides", NULL};
    unsigned long nslots;
    PyObject *strides;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "kO", kwlist, &nslots, &strides))
        return NULL;
    if (nslots > UINT32_MAX)
        return fshm_raise_invalid("header_nslots must fit in 32 bits");
    PyObject *seq = PySequence_Fast(strides, "strides must be a sequence of ints");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > FSHM_MAX_POOLS) {
        Py_DECREF(seq);
        PyErr_Format(fshm_exc_invalid, "at most %d payload pools", FSHM_MAX_POOLS);
        return NULL;
    }
    fshm_profile p = FSHM_PROFILE_INIT;
    p.header_nslots = (uint32_t)nslots;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long s = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (s == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (s > UINT32_MAX) {
            Py_DECREF(seq);
            return fshm_raise_invalid("stride_bytes must fit in 32 bits");
        }
        p.stride_bytes[i] = (uint32_t)s;
    }
    Py_DECREF(seq);
    p.npools = (uint32_t)n;
    return PyLong_FromUnsignedLongLong(fshm_profile_footprint(&p));
}

static PyObject *mod_shm_room(PyObject *self, PyObject *arg)
{
    PyObject *bytes;
    if (!PyUnicode_FSConverter(arg, &bytes))
        return NULL;
    uint64_t room = 0, fs_free = 0;
    int rc = fshm_shm_room(PyBytes_AS_STRING(bytes), &room, &fs_free);
    Py_DECREF(bytes);
    if (rc)
        return fshm_raise(rc);
    return Py_BuildValue("(KK)", (unsigned long long)room, (unsigned long long)fs_free);
}

/* The sealed control region's consumer table and control bytes, which only the driver
 * writes (consumers map it read-only; they ask over their lease). */
static PyObject *mod_driver_consumer_add(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ctl_fd", "pid", "consumer", "queue", "no_queue", "process_all",
                             "max_rate_hz", NULL};
    int fd, no_queue = 0, process_all = 0;
    long long pid;
    const char *consumer, *queue;
    unsigned long rate = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iLss|ppk", kwlist, &fd, &pid, &consumer, &queue,
                                     &no_queue, &process_all, &rate))
        return NULL;
    if (rate > UINT32_MAX)
        return fshm_raise_invalid("max_rate_hz must fit in 32 bits");
    int rc = fshm_sealed_consumer_add(fd, (int64_t)pid, consumer, queue, no_queue, process_all,
                                      (uint32_t)rate);
    if (rc < 0)
        return fshm_raise(rc);
    return PyLong_FromLong(rc);
}

static PyObject *mod_driver_consumer_remove(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ctl_fd", "index", "pid", "queue", NULL};
    int fd, idx;
    long long pid;
    const char *queue;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiLs", kwlist, &fd, &idx, &pid, &queue))
        return NULL;
    int rc = fshm_sealed_consumer_remove(fd, idx, (int64_t)pid, queue);
    if (rc < 0)
        return fshm_raise(rc);
    return PyBool_FromLong(rc);
}

static PyObject *mod_driver_set_control(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ctl_fd", "index", "value", NULL};
    int fd;
    unsigned int idx, value;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iII", kwlist, &fd, &idx, &value))
        return NULL;
    if (value > 255)
        return fshm_raise_invalid("a control byte is 0..255");
    int rc = fshm_sealed_set_control(fd, idx, (uint8_t)value);
    if (rc < 0)
        return fshm_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *mod_driver_prune(PyObject *self, PyObject *arg)
{
    int fd = PyLong_AsLong(arg) == -1 && PyErr_Occurred() ? -2 : (int)PyLong_AsLong(arg);
    if (fd == -2)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fshm_sealed_prune(fd);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return fshm_raise(rc);
    return PyLong_FromLong(rc);
}

static PyMethodDef driver_methods[] = {
    {"driver_prune", mod_driver_prune, METH_O,
     "driver_prune(ctl_fd) -> int: frees a sealed control region's dead consumers' entries."},
    {"driver_consumer_add", (PyCFunction)(void (*)(void))mod_driver_consumer_add,
     METH_VARARGS | METH_KEYWORDS,
     "driver_consumer_add(ctl_fd, pid, consumer, queue, no_queue=False, process_all=False, "
     "max_rate_hz=0) -> entry index: writes a sealed consumer's entry."},
    {"driver_consumer_remove", (PyCFunction)(void (*)(void))mod_driver_consumer_remove,
     METH_VARARGS | METH_KEYWORDS,
     "driver_consumer_remove(ctl_fd, index, pid, queue) -> bool: frees it if still that consumer's."},
    {"driver_set_control", (PyCFunction)(void (*)(void))mod_driver_set_control,
     METH_VARARGS | METH_KEYWORDS,
     "driver_set_control(ctl_fd, index, value): writes a sealed stream's control byte."},
    {"shm_room", mod_shm_room, METH_O,
     "shm_room(dir) -> (room, fs_free): bytes new regions can take in dir (on tmpfs capped by "
     "the memory available) and the file system's own free space"},
    {"driver_provision", (PyCFunction)(void (*)(void))mod_driver_provision,
     METH_VARARGS | METH_KEYWORDS,
     "driver_provision(stream_id, *, name=None, base_dir=None, namespace=None, header_nslots, "
     "pools, file_mode=0o600, gid=-1, min_epoch=0) -> dict: moves the stream to a new epoch "
     "(driver side; creates and initialises every region file)"},
    {"driver_provision_sealed", (PyCFunction)(void (*)(void))mod_driver_provision_sealed,
     METH_VARARGS | METH_KEYWORDS,
     "driver_provision_sealed(stream_id, *, ..., ctl_fd=-1) -> dict: driver_provision with the "
     "sealed memfd transport; the dict adds ctl_fd and region_fds (header ring, pools), which "
     "the caller owns"},
    {"driver_remove", (PyCFunction)(void (*)(void))mod_driver_remove, METH_VARARGS | METH_KEYWORDS,
     "driver_remove(stream_id, *, name=None, base_dir=None, namespace=None) -> bool removed"},
    {"driver_current_epoch", (PyCFunction)(void (*)(void))mod_driver_current_epoch,
     METH_VARARGS | METH_KEYWORDS,
     "driver_current_epoch(stream_id, *, name=None, base_dir=None, namespace=None) -> int "
     "(0 if the stream has no control region)"},
    {"profile_footprint", (PyCFunction)(void (*)(void))mod_profile_footprint,
     METH_VARARGS | METH_KEYWORDS,
     "profile_footprint(header_nslots, strides) -> int: bytes of every region of one stream"},
    {NULL, NULL, 0, NULL},
};

int fshm_add_driver_funcs(PyObject *m)
{
    return PyModule_AddFunctions(m, driver_methods);
}
