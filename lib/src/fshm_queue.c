/* POSIX message queues carrying frame descriptors, one queue per consumer. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "fshm_internal.h"

static long read_proc_long(const char *path, long dflt)
{
    FILE *f = fopen(path, "re");
    long v = dflt;
    if (f) {
        if (fscanf(f, "%ld", &v) != 1)
            v = dflt;
        fclose(f);
    }
    return v;
}

int fshm_queue_limit(void)
{
    /* Unprivileged processes cannot exceed msg_max (10 by default); deeper queues buy
     * nothing for drain-to-latest and process-all reports overruns either way. */
    long m = read_proc_long("/proc/sys/fs/mqueue/msg_max", 10);
    if (m > 64)
        m = 64;
    return m < 1 ? 1 : (int)m;
}

static int queue_error_msg(int e, const char *name)
{
    switch (e) {
    case ENOSPC:
        return fshm_set_error(FSHM_E_LIMIT,
                              "cannot create message queue %s: the system-wide limit of %ld queues "
                              "(/proc/sys/fs/mqueue/queues_max) is reached; close readers, or "
                              "garbage-collect dead streams to free their consumers' queues",
                              name, read_proc_long("/proc/sys/fs/mqueue/queues_max", 256));
    case EMFILE:
    case ENFILE:
        return fshm_set_error(FSHM_E_LIMIT,
                              "cannot open message queue %s: too many open queues or files, or "
                              "RLIMIT_MSGQUEUE (bytes of queues per user) exhausted",
                              name);
    case ENOMEM:
        return fshm_set_error(FSHM_E_LIMIT,
                              "cannot create message queue %s: RLIMIT_MSGQUEUE (bytes of queues per "
                              "user) exceeded",
                              name);
    default:
        return fshm_set_error(-e, "message queue %s: %s", name, strerror(e));
    }
}

static int queue_error(int e, const char *name)
{
    int rc = queue_error_msg(e, name);
    fshm_note_errno(e);
    return rc;
}

int fshm_queue_create(char name[32], mqd_t *out)
{
    struct mq_attr attr = {.mq_maxmsg = fshm_queue_limit(), .mq_msgsize = 64};
    for (int attempt = 0; attempt < 16; attempt++) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint32_t r = (uint32_t)ts.tv_nsec * 2654435761u ^ (uint32_t)attempt * 40503u;
        snprintf(name, 32, "/fshm-%x-%08x", (unsigned)getpid(), r);
        mqd_t q = mq_open(name, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600, &attr);
        if (q != (mqd_t)-1) {
            *out = q;
            return 0;
        }
        if (errno == EEXIST)
            continue;
        if (errno == EINVAL && attr.mq_maxmsg > 1) {
            attr.mq_maxmsg /= 2;   /* a tighter msg_max than /proc told us */
            continue;
        }
        return queue_error(errno, name);
    }
    return fshm_set_error(-EEXIST, "could not find a free message queue name");
}

int fshm_queue_open_send(const char *name, mqd_t *out)
{
    mqd_t q = mq_open(name, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (q == (mqd_t)-1)
        return queue_error(errno, name);
    *out = q;
    return 0;
}
