/* frameshm._virtualcam: the PipeWire virtual camera, its own extension module so that a
 * process that only moves frames never loads libpipewire. */
#include "binding.h"

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "frameshm._virtualcam", "A frameshm stream as a PipeWire camera.", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__virtualcam(void)
{
    if (fshm_binding_init_from_core())
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m && fshm_virtualcam_types_ready(m)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
