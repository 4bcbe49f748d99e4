/* Error codes and per-thread messages. */
#include <stdarg.h>
#include <stdio.h>

#include "fshm_internal.h"

static _Thread_local char last_error[512];
static _Thread_local int last_errno;

int fshm_set_error(int code, const char *fmt, ...)
{
    /* Formatting into a scratch buffer lets a message wrap the previous one
     * (fshm_set_error(..., "context: %s", fshm_last_error())). */
    char buf[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    memcpy(last_error, buf, sizeof buf);
    last_errno = code < 0 && code > -1000 ? -code : 0;
    return code;
}

int fshm_config_copy(void *out, size_t out_size, const void *in, size_t min_size, const char *what)
{
    memset(out, 0, out_size);
    if (!in)
        return fshm_set_error(-EINVAL, "no %s given", what);
    uint32_t size;
    memcpy(&size, in, sizeof size);   /* every config struct starts with its struct_size */
    if (size == 0)
        return fshm_set_error(-EINVAL, "%s.struct_size is 0: initialise the struct with its _INIT "
                              "macro (or set struct_size = sizeof it)", what);
    if (size < min_size)
        return fshm_set_error(-EINVAL, "%s.struct_size %u is smaller than any version of the "
                              "struct (%zu)", what, size, min_size);
    /* A caller built against newer headers may pass a larger struct: its extra fields are
     * unknown to this library and ignored. */
    memcpy(out, in, size < out_size ? size : out_size);
    memcpy(out, &(uint32_t){(uint32_t)out_size}, sizeof(uint32_t));
    return 0;
}

int fshm_version(int *major, int *minor, int *patch)
{
    if (major)
        *major = FSHM_VERSION_MAJOR;
    if (minor)
        *minor = FSHM_VERSION_MINOR;
    if (patch)
        *patch = FSHM_VERSION_PATCH;
    return FSHM_VERSION;
}

const char *fshm_version_string(void) { return FSHM_VERSION_STRING; }

void fshm_note_errno(int e) { last_errno = e; }
int fshm_last_errno(void) { return last_errno; }

const char *fshm_last_error(void)
{
    return last_error[0] ? last_error : "no error";
}

const char *fshm_strerror(int code)
{
    switch (code) {
    case 0: return "success";
    case FSHM_E_CORRUPT: return "corrupt shared memory";
    case FSHM_E_PRODUCER_DEAD: return "producer is dead";
    case FSHM_E_NOPOOL: return "frame larger than every payload pool";
    case FSHM_E_LIMIT: return "system limit reached";
    case FSHM_E_COLLISION: return "stream id collision";
    case FSHM_E_OVERRUN: return "overrun by the producer";
    case FSHM_E_CLOSED: return "closed";
    case FSHM_E_LEASE: return "lease lost";
    case FSHM_E_REJECTED: return "refused by the driver";
    case FSHM_E_NODRIVER: return "no driver";
    default: return code < 0 && code > -4096 ? strerror(-code) : "unknown error";
    }
}
