/* What every extension module of the binding shares (compiled into each of them): the
 * mapping of frameshm's negative codes to the exception classes (created in C by
 * frameshm._core, errors.c), argument parsing, and waiting without the GIL. */
#include "binding.h"

#include <limits.h>
#include <sched.h>
#include <time.h>

PyObject *fshm_exc_invalid, *fshm_exc_state;

static PyObject *exc_base, *exc_invalid, *exc_notfound, *exc_busy, *exc_corrupt, *exc_toolarge,
    *exc_limit, *exc_timeout, *exc_dead, *exc_overrun, *exc_closed, *exc_nodriver, *exc_rejected,
    *exc_lease, *exc_perm, *exc_state;

static PyObject *exc_source;   /* the module holding the classes (frameshm._core) */

int fshm_binding_init_errors(PyObject *source)
{
    struct { PyObject **slot; const char *name; } names[] = {
        {&exc_base, "FrameshmError"},   {&exc_invalid, "InvalidArgument"},
        {&exc_notfound, "StreamNotFound"}, {&exc_busy, "StreamBusy"},
        {&exc_corrupt, "CorruptStream"}, {&exc_toolarge, "FrameTooLarge"},
        {&exc_limit, "ResourceLimit"},  {&exc_timeout, "Timeout"},
        {&exc_dead, "ProducerDead"},    {&exc_overrun, "Overrun"},
        {&exc_closed, "StreamClosed"},
        {&exc_nodriver, "DriverUnavailable"}, {&exc_rejected, "DriverRejected"},
        {&exc_lease, "LeaseLost"}, {&exc_perm, "PermissionDenied"}, {&exc_state, "InvalidState"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        Py_XDECREF(*names[i].slot);
        *names[i].slot = PyObject_GetAttrString(source, names[i].name);
        if (!*names[i].slot)
            return -1;
    }
    Py_XINCREF(source);
    Py_XSETREF(exc_source, source);
    fshm_exc_invalid = exc_invalid;
    fshm_exc_state = exc_state;
    return 0;
}

PyObject *fshm_exc_class(const char *name)
{
    return exc_source ? PyObject_GetAttrString(exc_source, name) : NULL;
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
    case -EACCES: case -EPERM: exc = exc_perm; break;
    default: exc = exc_base; break;
    }
    if (PyType_IsSubtype((PyTypeObject *)exc, (PyTypeObject *)PyExc_OSError)) {
        /* frameshm's own codes (<= -1000) carry the system errno behind them separately */
        int e = code <= -1000 ? fshm_last_errno() : -code;
        if (code == FSHM_E_PRODUCER_DEAD)
            e = ETIMEDOUT;
        if (e == 0) {   /* a limit of frameshm's own (64 consumers): no "[Errno 0]" */
            PyErr_SetString(exc, msg);
            return NULL;
        }
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
        *path_out = fshm_cstr(driver, "driver (the path of the driver's socket)");
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

const char *fshm_cstr(PyObject *o, const char *what)
{
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a str, not %.50s", what, Py_TYPE(o)->tp_name);
        return NULL;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s && (Py_ssize_t)strlen(s) != n) {
        /* C would see only the part before the NUL: another name than the caller's */
        PyErr_Format(exc_invalid, "%s %R contains a NUL character", what, o);
        return NULL;
    }
    return s;
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
    if ((t == -1.0 && PyErr_Occurred()) || t < 0 || t != t) {
        /* The one error for every bad timeout, a string as much as a negative number. */
        PyErr_Clear();
        PyErr_Format(exc_invalid, "timeout must be None or seconds >= 0, not %R", obj);
        return -1;
    }
    *out = t > 9.2e9 ? -1 : (int64_t)(t * 1e9);
    return 0;
}

int fshm_parse_control(PyObject *index, PyObject *value, unsigned *index_out, uint8_t *value_out)
{
    long i = PyLong_AsLong(index);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0 || i > (long)UINT_MAX) {
        PyErr_Format(exc_invalid, "control byte %ld does not exist (0..%d)", i, FSHM_CONTROL_BYTES - 1);
        return -1;
    }
    *index_out = (unsigned)i;
    if (!value)
        return 0;
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > 255) {
        PyErr_Format(exc_invalid, "a control byte holds 0..255, not %ld", v);
        return -1;
    }
    *value_out = (uint8_t)v;
    return 0;
}

static void guard_backoff(unsigned i)
{
    if (i < 16) {
        sched_yield();
    } else {
        /* Held across a blocking slice: sleep, but wake often enough to take it soon. */
        struct timespec ts = {0, i < 64 ? 20000 : 200000};
        nanosleep(&ts, NULL);
    }
}

/* Takes the guard only if it is free (nobody holds or waits): no ticket is left behind. */
static int guard_try(fshm_guard *g)
{
    unsigned s = atomic_load_explicit(&g->serving, memory_order_relaxed);
    return atomic_compare_exchange_strong_explicit(&g->next, &s, s + 1, memory_order_acquire,
                                                   memory_order_relaxed);
}

static void guard_wait(fshm_guard *g)
{
    unsigned ticket = atomic_fetch_add_explicit(&g->next, 1, memory_order_relaxed);
    for (unsigned i = 0; atomic_load_explicit(&g->serving, memory_order_acquire) != ticket; i++)
        guard_backoff(i);
    atomic_store_explicit(&g->owner, PyThread_get_thread_ident(), memory_order_relaxed);
}

int fshm_guard_enter(fshm_guard *g)
{
    unsigned long me = PyThread_get_thread_ident();
    if (guard_try(g)) {
        atomic_store_explicit(&g->owner, me, memory_order_relaxed);
        return 0;
    }
    if (atomic_load_explicit(&g->owner, memory_order_relaxed) == me) {
        PyErr_SetString(exc_state, "re-entrant call into a frameshm handle from inside one of "
                        "its own calls (a destructor or callback): not supported");
        return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    guard_wait(g);
    Py_END_ALLOW_THREADS
    return 0;
}

void fshm_guard_enter_nogil(fshm_guard *g)
{
    guard_wait(g);
}

void *fshm_guard_open(fshm_guard *g, void *const *handle, const char *what)
{
    if (!*handle) {
        fshm_raise_closed(what);
        return NULL;
    }
    if (fshm_guard_enter(g) < 0)
        return NULL;
    if (!*handle) {   /* closed by another thread while we waited */
        fshm_guard_leave(g);
        fshm_raise_closed(what);
        return NULL;
    }
    return *handle;
}

int fshm_run_sliced(void *obj, fshm_guard *g, void *const *handle, const char *what,
                    PyObject *tobj, int64_t slice_ns, fshm_sliced_fn fn, void *arg,
                    int64_t *timeout_out)
{
    int64_t timeout;
    if (fshm_parse_timeout(tobj, &timeout))
        return INT_MIN;
    *timeout_out = timeout;
    if (slice_ns <= 0)
        slice_ns = FSHM_SLICE_NS;
    if (!*handle) {
        fshm_raise_closed(what);
        return INT_MIN;
    }
    if (atomic_load_explicit(&g->owner, memory_order_relaxed) == PyThread_get_thread_ident()) {
        PyErr_Format(exc_state, "re-entrant blocking call on a %s from inside one of its calls", what);
        return INT_MIN;
    }
    /* One clock read per slice: a frame that is already there costs no second one. */
    uint64_t now = timeout < 0 ? 0 : fshm_now_ns();
    uint64_t deadline = now + (uint64_t)(timeout < 0 ? 0 : timeout);
    int rc, closed = 0;
    for (;;) {
        int64_t left = timeout;
        if (timeout >= 0)
            left = now >= deadline ? 0 : (int64_t)(deadline - now);
        int64_t slice = left < 0 || left > slice_ns ? slice_ns : left;
        Py_BEGIN_ALLOW_THREADS
        fshm_guard_enter_nogil(g);
        if (*handle)
            rc = fn(obj, slice, arg);
        else
            closed = 1;
        fshm_guard_leave(g);
        Py_END_ALLOW_THREADS
        if (closed) {
            PyErr_Format(exc_closed, "%s was closed by another thread during the wait", what);
            return INT_MIN;
        }
        if (rc == -ETIMEDOUT && (left < 0 || fshm_now_ns() < deadline))
            rc = -EINTR;   /* only a slice ran out */
        if (rc != -EINTR)
            break;
        if (PyErr_CheckSignals() < 0)
            return INT_MIN;
        if (timeout >= 0)
            now = fshm_now_ns();
    }
    return rc;
}

static const char *opt_str(PyObject *o, const char *what)
{
    if (!o || o == Py_None)
        return NULL;
    return fshm_cstr(o, what);
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

int fshm_binding_init_from_core(void)
{
    PyObject *core = PyImport_ImportModule("frameshm._core");
    if (!core)
        return -1;
    int rc = fshm_binding_init_errors(core);
    Py_DECREF(core);
    return rc;
}

PyObject *fshm_raise_named(const char *name, int oserr)
{
    PyObject *cls = fshm_exc_class(name);
    if (!cls)
        return NULL;
    const char *msg = fshm_last_error();
    PyObject *args = oserr ? Py_BuildValue("(is)", oserr, msg) : Py_BuildValue("(s)", msg);
    if (args) {
        PyErr_SetObject(cls, args);
        Py_DECREF(args);
    }
    Py_DECREF(cls);
    return NULL;
}
