/* frameshm's exception hierarchy, created here in C (frameshm._core) so that the binding
 * imports no Python module: frameshm.errors and the device modules re-export these
 * classes. Every class derives from FrameshmError and, where one fits, from the builtin
 * category users catch (TimeoutError, FileNotFoundError, PermissionError, ...). */
#include "binding.h"

/* Parent names refer to classes earlier in the table (NULL ends the list). `module` is
 * where the class is documented and exported: pickle looks the class up there by name. */
typedef struct {
    const char *module;
    const char *name;
    const char *parents[3];
    PyObject **builtin[2];   /* builtin bases, after the frameshm parents */
    const char *doc;
} exc_spec;

static const exc_spec specs[] = {
    {"frameshm", "FrameshmError", {NULL}, {NULL}, "Base class of every frameshm error."},
    {"frameshm", "InvalidArgument", {"FrameshmError"}, {&PyExc_ValueError},
     "A bad name, shape, dtype, size or option (nothing was created or changed)."},
    {"frameshm", "StreamNotFound", {"FrameshmError"}, {&PyExc_FileNotFoundError},
     "No stream of that name/id exists in the base directory and namespace."},
    {"frameshm", "StreamBusy", {"FrameshmError"}, {NULL},
     "The stream already has a live producer (one producer per stream)."},
    {"frameshm", "CorruptStream", {"FrameshmError"}, {NULL},
     "Shared memory failed validation (bad magic, sizes, header fields, paths)."},
    {"frameshm", "FrameTooLarge", {"FrameshmError"}, {&PyExc_ValueError},
     "The frame is larger than every payload pool of the stream; it was dropped."},
    {"frameshm", "ResourceLimit", {"FrameshmError"}, {&PyExc_OSError},
     "A system limit was hit: /dev/shm full, message-queue limits, file limits."},
    {"frameshm", "PermissionDenied", {"FrameshmError"}, {&PyExc_PermissionError},
     "The operating system refused access (file modes, owner, driver policy)."},
    {"frameshm", "Timeout", {"FrameshmError"}, {&PyExc_TimeoutError},
     "No frame arrived in time. The message says whether the producer is alive."},
    {"frameshm", "ProducerDead", {"Timeout"}, {NULL},
     "No frame arrived in time and the producer process is gone (crashed or killed)."},
    {"frameshm", "Overrun", {"FrameshmError"}, {NULL},
     "The producer overwrote the frame while it was being copied, every time tried."},
    {"frameshm", "StreamClosed", {"FrameshmError"}, {&PyExc_ValueError},
     "Operation on a closed Reader, Writer or camera."},
    {"frameshm", "InvalidState", {"FrameshmError"}, {&PyExc_RuntimeError},
     "The object cannot do that now: not started, or used from two threads at once."},
    {"frameshm", "DriverUnavailable", {"FrameshmError"}, {&PyExc_ConnectionError},
     "No frameshm driver answers on the control socket (driver model)."},
    {"frameshm", "DriverRejected", {"FrameshmError"}, {NULL},
     "The driver refused the attach; the message carries its response code and reason\n"
     "(e.g. a second producer, REQUIRE_EXISTING on a missing stream, a profile that does not\n"
     "fit in shared memory, a peer the policy does not allow)."},
    {"frameshm", "LeaseLost", {"FrameshmError"}, {NULL},
     "The driver ended this client's lease (detached, expired, revoked, driver shut down\n"
     "or gone). Writers re-attach by themselves and raise this only when that fails;\n"
     "readers raise it only when opened with ``lease_events=True``."},
    /* capture devices */
    {"frameshm.camera", "CameraError", {"FrameshmError"}, {NULL},
     "Base class of the camera errors."},
    {"frameshm.camera", "DeviceNotFound", {"CameraError"}, {&PyExc_FileNotFoundError},
     "No device at that path (unplugged, or never there)."},
    {"frameshm.camera", "DevicePermissionError", {"CameraError"}, {&PyExc_PermissionError},
     "The device exists but this user may not open it (``video`` group, udev rules)."},
    {"frameshm.camera", "DeviceBusy", {"CameraError"}, {&PyExc_OSError},
     "Another process is capturing from the device (EBUSY)."},
    {"frameshm.camera", "DeviceGone", {"CameraError"}, {&PyExc_OSError},
     "The device disappeared (ENODEV): unplugged or its driver reset. Close the camera and\n"
     "open it again once it is back."},
    {"frameshm.camera", "UnsupportedFormat", {"CameraError", "InvalidArgument"}, {NULL},
     "The device cannot deliver that format, size or conversion (the message lists what\n"
     "it offers)."},
    {"frameshm.camera", "NotACamera", {"CameraError"}, {&PyExc_ValueError},
     "The path is not a V4L2 video capture device."},
    {"frameshm.camera", "V4L2Unavailable", {"CameraError"}, {NULL},
     "frameshm was built without libv4l2 (apt-get install libv4l-dev, then reinstall)."},
    {"frameshm.camera", "BuffersExhausted", {"CameraError"}, {NULL},
     "Every driver buffer is held by frames not released (or by live views of them)."},
    {"frameshm.gige", "GigEUnavailable", {"CameraError"}, {NULL},
     "frameshm was built without Aravis (apt-get install libaravis-dev libusb-1.0-0-dev,\n"
     "then reinstall)."},
    {"frameshm.gige", "AravisError", {"CameraError"}, {NULL},
     "An Aravis error with no better category (its message is Aravis')."},
    /* virtual camera */
    {"frameshm.virtualcam", "PipeWireUnavailable", {"FrameshmError"}, {NULL},
     "frameshm was built without PipeWire (apt-get install libpipewire-0.3-dev, then\n"
     "reinstall frameshm)."},
    {"frameshm.virtualcam", "PipeWireError", {"FrameshmError"}, {&PyExc_ConnectionError},
     "PipeWire failed: no daemon to connect to, the connection was lost, or the node\n"
     "failed."},
    {"frameshm.virtualcam", "UnsupportedStream", {"InvalidArgument"}, {NULL},
     "The stream's frames cannot be served as a video format (see frameshm.virtualcam)."},
};
#define NSPECS (sizeof specs / sizeof specs[0])

static PyObject *classes[NSPECS];

PyObject *fshm_exc(const char *name)
{
    for (size_t i = 0; i < NSPECS; i++)
        if (classes[i] && strcmp(specs[i].name, name) == 0)
            return classes[i];
    return NULL;
}

static PyObject *create(size_t i)
{
    const exc_spec *s = &specs[i];
    PyObject *bases = PyList_New(0);
    if (!bases)
        return NULL;
    for (int k = 0; k < 3 && s->parents[k]; k++) {
        PyObject *p = fshm_exc(s->parents[k]);
        if (!p || PyList_Append(bases, p)) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_SystemError, "frameshm: exception parent %s not defined",
                             s->parents[k]);
            Py_DECREF(bases);
            return NULL;
        }
    }
    for (int k = 0; k < 2 && s->builtin[k]; k++)
        if (PyList_Append(bases, *s->builtin[k])) {
            Py_DECREF(bases);
            return NULL;
        }
    if (PyList_GET_SIZE(bases) == 0 && PyList_Append(bases, PyExc_Exception)) {
        Py_DECREF(bases);
        return NULL;
    }
    PyObject *tuple = PyList_AsTuple(bases);
    Py_DECREF(bases);
    if (!tuple)
        return NULL;
    char qual[96];
    snprintf(qual, sizeof qual, "%s.%s", s->module, s->name);
    /* PyErr_NewExceptionWithDoc takes a char * doc; it copies it. */
    PyObject *cls = PyErr_NewExceptionWithDoc(qual, (char *)s->doc, tuple, NULL);
    Py_DECREF(tuple);
    return cls;
}

int fshm_errors_create(PyObject *module)
{
    for (size_t i = 0; i < NSPECS; i++) {
        if (!classes[i] && !(classes[i] = create(i)))
            return -1;
        Py_INCREF(classes[i]);
        if (PyModule_AddObject(module, specs[i].name, classes[i])) {
            Py_DECREF(classes[i]);
            return -1;
        }
    }
    return 0;
}
