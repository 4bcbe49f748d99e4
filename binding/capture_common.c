/* What the capture types (camera_type.c: V4L2 Camera, gige_type.c: GigECamera) share:
 * the argument handling of read_into() and
 * wait() around each type's blocking call (see fshm_capture_ops in binding.h). */
#include "binding.h"

int fshm_capture_ready(int open, int started, const char *what)
{
    if (!open) {
        fshm_raise_closed(what);
        return -1;
    }
    if (!started) {
        PyErr_Format(fshm_exc_state, "%s is not started", what);
        return -1;
    }
    return 0;
}

int fshm_capture_read_into(void *obj, PyObject *args, PyObject *kw, const fshm_capture_ops *ops,
                           fshm_sliced_fn read, void *info)
{
    static char *kwlist[] = {"out", "timeout", NULL};
    PyObject *out, *tobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O", kwlist, &out, &tobj))
        return -1;
    if (ops->ready(obj) < 0)
        return -1;
    Py_buffer view;
    if (PyObject_GetBuffer(out, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    fshm_capture_dst a = {view.buf, (size_t)view.len, info};
    int rc = ops->run(obj, tobj, read, &a);
    PyBuffer_Release(&view);
    if (rc) {
        if (rc != INT_MIN)
            ops->raise(rc);
        return -1;
    }
    return 0;
}

PyObject *fshm_capture_wait(void *obj, PyObject *args, PyObject *kw, const fshm_capture_ops *ops,
                            fshm_sliced_fn wait)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *tobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O", kwlist, &tobj))
        return NULL;
    if (ops->ready(obj) < 0)
        return NULL;
    int rc = ops->run(obj, tobj, wait, NULL);
    if (rc == INT_MIN)
        return NULL;
    if (rc < 0)
        return ops->raise(rc);
    return PyLong_FromLong(rc);
}
