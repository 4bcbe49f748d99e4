/* Error codes and per-thread messages. */
#include <stdarg.h>
#include <stdio.h>

#include "fshm_internal.h"

static _Thread_local char last_error[512];

int fshm_set_error(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

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
    default: return code < 0 && code > -4096 ? strerror(-code) : "unknown error";
    }
}
