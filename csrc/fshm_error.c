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
