/* frameshm._gige: the GigE Vision camera (Aravis, GLib), its own extension module so that
 * a process that only moves frames never loads Aravis or GLib. */
#include "binding.h"

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "frameshm._gige", "GigE Vision cameras through Aravis.", -1, NULL,
};

PyMODINIT_FUNC PyInit__gige(void)
{
    if (fshm_binding_init_from_core())
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m && fshm_gige_types_ready(m)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
