/* Shared declarations of the frameshm._core binding (one C file per Python type). */
#ifndef FSHM_BINDING_H
#define FSHM_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <frameshm/frameshm.h>
#include <stdatomic.h>

/* Python 3.9 (the oldest supported) has no Py_NewRef/Py_XNewRef (3.10). */
#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *fshm_py_newref(PyObject *o)
{
    Py_INCREF(o);
    return o;
}
static inline PyObject *fshm_py_xnewref(PyObject *o)
{
    Py_XINCREF(o);
    return o;
}
#define Py_NewRef(o) fshm_py_newref((PyObject *)(o))
#define Py_XNewRef(o) fshm_py_xnewref((PyObject *)(o))
#endif

extern PyTypeObject FshmMappingType;
extern PyTypeObject FshmWriterType;
extern PyTypeObject FshmReaderType;
extern PyTypeObject FshmFrameType;
/* InvalidArgument (a ValueError), InvalidState (a RuntimeError) */
extern PyObject *fshm_exc_invalid, *fshm_exc_state;
extern PyTypeObject FshmCameraType;

typedef struct {
    PyObject_HEAD
    fshm_map *map;
    Py_ssize_t exports;
} FshmMapping;

/* Wraps a mapping (takes a new fshm reference). */
PyObject *fshm_mapping_new(fshm_map *m);

/* ---- frames (frame_type.c) ---- */
/* frameshm._core.Frame (frame_type.c); dlpack.c exports its bytes. */
typedef struct {
    PyObject_HEAD
    PyObject *buffer;    /* Mapping of the frame's pool (views keep the region mapped through
                          * it), or the private bytearray of a read_copy() */
    PyObject *reader;    /* the _core.Reader that read it */
    PyObject *ring;      /* Mapping of its epoch's header ring: valid() re-checks the slot there */
    PyObject *shape, *strides;   /* tuples of ints, possibly shared with other frames */
    PyObject *dtype;     /* the Reader's dtypes[code], or the code without a table */
    PyObject *ref_seq;   /* int, or None when the producer set none */
    PyObject *array;     /* frameshm.Frame.array's cache: frames are immutable, so one view */
    Py_ssize_t offset;   /* of the frame's bytes in buffer */
    Py_ssize_t nbytes;
    unsigned long long seq, epoch, timestamp_ns, publish_ns, skipped;
    unsigned int slot;
    unsigned short pool_id;
    int code;            /* enum fshm_dtype */
    /* What a buffer export of the frame points its shape and strides at (frame_buffer.c). */
    Py_ssize_t view_shape[FSHM_MAX_DIMS], view_strides[FSHM_MAX_DIMS];
} FshmFrame;
/* A frame's shape and byte strides, as its tuples give them, checked to lie within its
 * bytes: what both its buffer export (frame_buffer.c) and its DLPack export describe. */
typedef struct {
    int ndim;
    size_t item;
    int64_t dims[FSHM_MAX_DIMS];
    int64_t byte_strides[FSHM_MAX_DIMS];
    uint64_t count;    /* elements */
    uint64_t extent;   /* bytes from the first element to the end of the last */
} fshm_frame_layout;
/* 0, or -1 with BufferError set when the layout cannot be exported or runs past the
 * frame's bytes. item: bytes per element. */
int fshm_frame_layout_read(FshmFrame *f, size_t item, fshm_frame_layout *l);
/* Where a frame's bytes are, checked to lie within its buffer (frame_buffer.c). */
typedef struct {
    const unsigned char *data;   /* the frame's first byte */
    fshm_map *map;               /* its pool mapping, NULL for a private buffer */
    Py_buffer view;              /* held for a private buffer */
    int has_view;
} fshm_frame_source;
/* 0, or -1 with an exception set; a 0 is paired with fshm_frame_source_close. */
int fshm_frame_source_open(FshmFrame *f, fshm_frame_source *src);
void fshm_frame_source_close(fshm_frame_source *src);
/* Frame's buffer protocol (frame_buffer.c): read-only, typed, shaped. */
extern PyBufferProcs fshm_frame_as_buffer;
/* 1 if the frame's slot still holds it (seqlock re-check in its own ring mapping: needs no
 * Reader, so any thread may ask, also after close), 0 if overwritten. */
int fshm_frame_check_valid(FshmFrame *self);
/* Frame.__dlpack__ and Frame.__dlpack_device__ (dlpack.c). */
PyObject *fshm_frame_dlpack(FshmFrame *self, PyObject *args, PyObject *kw);
PyObject *fshm_frame_dlpack_device(FshmFrame *self, PyObject *unused);
/* How a Reader makes its frames: the class (NULL = _core.Frame), the dtype table and the
 * last frame's shape/strides tuples, which frames of the same layout share. Zeroed = no
 * class or table set. */
/* One array over a slot's bytes, which the slot's later frames view instead of building
 * their own: keyed by everything the array was built from (held, so no key is recycled). */
typedef struct {
    PyObject *buffer, *shape, *strides, *dtype;
    Py_ssize_t offset;
    PyObject *array;     /* NULL = free entry */
} fshm_slot_view;
/* One entry per ring slot (direct-mapped by slot index), up to this many: a round-robin
 * cache smaller than the ring missed on every frame of a ring read in order. */
#define FSHM_SLOT_VIEWS_MAX 1024
typedef struct {
    PyTypeObject *type;
    PyObject *dtypes;            /* tuple indexed by dtype code, or NULL: dtype = the code */
    PyObject *shape, *strides;
    uint8_t ndims;
    int32_t layout_dims[FSHM_MAX_DIMS], layout_strides[FSHM_MAX_DIMS];   /* what they hold */
    PyObject *array_type;        /* Frame.array's factory (numpy.ndarray), or NULL: no .array */
    fshm_slot_view *views;       /* nviews entries (a power of two), or NULL */
    unsigned nviews;
} fshm_frame_maker;
/* Sets the class (None = _core.Frame, else a subclass of it), the dtype table (None, or
 * a sequence indexed by dtype code) and the array type (None, or a callable taking
 * (shape, dtype, buffer, offset, strides) positionally). 0, or -1 with an exception set. */
int fshm_frame_maker_set(fshm_frame_maker *fm, PyObject *type, PyObject *dtypes,
                         PyObject *array_type);
void fshm_frame_maker_clear(fshm_frame_maker *fm);
/* Drops the cached slot arrays over `buffer` (NULL: all of them), so they no longer keep
 * its region mapped. */
void fshm_frame_maker_forget(fshm_frame_maker *fm, PyObject *buffer);
/* A new frame for f: its bytes are at `offset` in `buffer` (the Mapping of f->map, or a
 * private copy), `ring` the Mapping of its header ring; it keeps them and reader alive. */
PyObject *fshm_frame_new(fshm_frame_maker *fm, PyObject *reader, PyObject *buffer,
                         PyObject *ring, Py_ssize_t offset, const fshm_frame *f);
/* Readies Frame and adds it and the DTYPE_* codes to the module. */
int fshm_frame_type_ready(PyObject *module);
/* reader_type.c: the handle of a _core.Reader, NULL once it is closed. */
fshm_reader *fshm_reader_handle(PyObject *reader);
/* reader_type.c: how a _core.Reader makes its frames (they ask it for their arrays). */
fshm_frame_maker *fshm_reader_frames(PyObject *reader);

/* Raises the Python exception matching a negative frameshm code; returns NULL. */
PyObject *fshm_raise(int code);
PyObject *fshm_raise_closed(const char *what);
PyObject *fshm_raise_invalid(const char *msg);
/* The UTF-8 of str o (borrowed from o), or NULL with TypeError (not a str) or
 * InvalidArgument (an embedded NUL, which C would silently cut the name at). */
const char *fshm_cstr(PyObject *o, const char *what);
/* Parses an optional timeout in seconds (None = forever) into nanoseconds. */
int fshm_parse_timeout(PyObject *obj, int64_t *out);
/* Parses a stream address from common keyword values. */
int fshm_parse_addr(PyObject *name, unsigned long stream_id, PyObject *base_dir, PyObject *ns,
                    fshm_stream_addr *addr);
/* _core only (errors.c): creates the exception classes and adds them to the module. */
int fshm_errors_create(PyObject *module);
/* Every extension: looks the classes up in `source` (frameshm._core's module object). */
int fshm_binding_init_errors(PyObject *source);
/* Imports frameshm._core (a C module: no cycle) and initialises the classes from it. */
int fshm_binding_init_from_core(void);
/* The class of that name (new reference), or NULL with an exception set. */
PyObject *fshm_exc_class(const char *name);
/* Driver-model keyword values: driver socket path (None = no driver), publish_mode
 * ('existing_or_create' / 'require_existing' / None), client_id (0 = generated). */
int fshm_parse_driver(PyObject *driver, PyObject *mode, unsigned long client_id,
                      const char **path_out, int *mode_out, uint32_t *client_out);
/* Adds the driver's module functions (driver_funcs.c): driver_provision, ... */
int fshm_add_driver_funcs(PyObject *module);
/* Readies Camera and CameraBuffer (camera_type.c) and adds them to the module. */
int fshm_camera_types_ready(PyObject *module);
/* Readies GigECamera (gige_type.c) and adds it (and HAVE_ARAVIS) to frameshm._gige. */
int fshm_gige_types_ready(PyObject *module);
/* Readies VirtualCamera (virtualcam_type.c) and adds it, virtualcam_layout and
 * HAVE_PIPEWIRE to frameshm._virtualcam. */
int fshm_virtualcam_types_ready(PyObject *module);
/* ---- one handle, several Python threads (common.c) ----
 * A library handle serves one thread at a time (docs/c-api.md), but a Python object may be
 * used from several threads. So every call into a handle runs with the object's guard held:
 * a call from another thread waits for it (without the GIL) instead of racing inside the
 * library. Blocking calls hold it one slice at a time, so nobody waits longer than a slice.
 * Lock order: guard, then GIL - nobody waits for a guard while holding the GIL. */
typedef struct {
    /* A ticket lock, so that callers get their turn in order: a wait that re-enters
     * between two slices queues behind a call that came meanwhile. */
    atomic_uint next;               /* the next ticket to hand out */
    atomic_uint serving;            /* the ticket that holds the guard */
    atomic_ulong owner;             /* thread ident of the holder (re-entry is refused) */
} fshm_guard;
/* With the GIL. 0 with the guard held (the GIL was released while waiting for it), or -1
 * with InvalidState set when this thread holds it already (a re-entrant call, e.g. from a
 * destructor that ran inside one). */
int fshm_guard_enter(fshm_guard *g);
/* Without the GIL: waits for the guard. */
void fshm_guard_enter_nogil(fshm_guard *g);
static inline void fshm_guard_leave(fshm_guard *g)
{
    atomic_store_explicit(&g->owner, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&g->serving, 1, memory_order_release);
}
/* Runs fn(obj, slice_ns, arg) without the GIL in slices of at most slice_ns (0: the default
 * FSHM_SLICE_NS), each with the guard held, so that Python signal handlers (Ctrl-C) run
 * between slices even when the signal went to another thread, and calls from other threads
 * get their turn; -EINTR from fn also just runs the handlers and goes on. *handle is checked
 * after each wait for the guard: a handle closed meanwhile by another thread ends the call
 * with StreamClosed. Returns fn's last code (-ETIMEDOUT once the whole timeout passed), or
 * INT_MIN with a Python exception set. *timeout_out: the parsed timeout (ns, <0 = none). */
#define FSHM_SLICE_NS 200000000ll
typedef int (*fshm_sliced_fn)(void *obj, int64_t slice_ns, void *arg);
int fshm_run_sliced(void *obj, fshm_guard *g, void *const *handle, const char *what,
                    PyObject *tobj, int64_t slice_ns, fshm_sliced_fn fn, void *arg,
                    int64_t *timeout_out);
/* Enters g for a call into *handle: NULL with StreamClosed set once it is closed, or with
 * InvalidState set for a re-entrant call; else the handle, with g held. */
void *fshm_guard_open(fshm_guard *g, void *const *handle, const char *what);
/* Parses a control byte index (the library checks it against FSHM_CONTROL_BYTES) and,
 * when value is not NULL, a control byte value; -1 with an exception set if invalid. */
int fshm_parse_control(PyObject *index, PyObject *value, unsigned *index_out, uint8_t *value_out);

/* ---- capture types (camera_type.c, gige_type.c), shared parts in capture_common.c ---- */
/* What the shared parts need of a capture type. */
typedef struct {
    /* 0 if the camera can deliver frames, else -1 with the exception set (closed, not started) */
    int (*ready)(void *obj);
    /* the type's blocking call: fshm_run_sliced plus its own timeout message (same returns) */
    int (*run)(void *obj, PyObject *tobj, fshm_sliced_fn fn, void *arg);
    /* raises the type's exception for a negative code; returns NULL */
    PyObject *(*raise)(int code);
} fshm_capture_ops;
/* The destination of read_into(), passed as `arg` to the type's sliced read function. */
typedef struct {
    void *dst;
    size_t cap;
    void *info;   /* the type's frame info (fshm_v4l2_buf, fshm_gige_frame) */
} fshm_capture_dst;
/* Raises frameshm's class `name` with fshm_last_error() as the message (and errno `oserr`
 * first when non-zero: an OSError). Returns NULL. */
PyObject *fshm_raise_named(const char *name, int oserr);
/* fshm_capture_ops.ready's answer: -1 with the exception set unless the camera is open
 * (else StreamClosed, via fshm_raise_closed) and started (else RuntimeError "<what> is
 * not started"). */
int fshm_capture_ready(int open, int started, const char *what);
/* read_into(out, timeout=None): parses the arguments, checks ops->ready, takes `out` as a
 * writable C-contiguous buffer and runs read(obj, slice, fshm_capture_dst *) through
 * ops->run; `info` receives the frame info. 0, or -1 with the exception set. */
int fshm_capture_read_into(void *obj, PyObject *args, PyObject *kw, const fshm_capture_ops *ops,
                           fshm_sliced_fn read, void *info);
/* wait(timeout=None) -> bytes of the next frame, through ops->run(wait). */
PyObject *fshm_capture_wait(void *obj, PyObject *args, PyObject *kw, const fshm_capture_ops *ops,
                            fshm_sliced_fn wait);

#endif
