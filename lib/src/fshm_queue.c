/* POSIX message queues carrying frame descriptors, one queue per consumer. */
#include <ctype.h>
#include <fcntl.h>
#include <mntent.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <linux/futex.h>
#include <sys/random.h>
#include <sys/syscall.h>
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

/* The name's last field: distinct for each queue this process creates (2^24 of them before
 * it repeats), and not guessable by another local user who would like to pre-create it.
 * A counter times an odd constant plus a per-process random offset is a permutation of
 * the 24-bit space, so names never collide within a process the way hashed clock
 * readings did (a test saw two of 310 consecutive queues get the same name). */
static uint32_t queue_suffix(void)
{
    static _Atomic uint32_t counter;
    static _Atomic uint32_t offset;
    static _Atomic int offset_pid;
    int pid = (int)getpid();
    if (atomic_load_explicit(&offset_pid, memory_order_acquire) != pid) {
        /* First use, or a forked child: a fresh offset. Two threads racing here both
         * store a random value; either is fine, names stay unique per (pid, counter). */
        uint32_t r = 0;
        if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            r = (uint32_t)ts.tv_nsec * 2654435761u ^ (uint32_t)pid;
        }
        atomic_store_explicit(&offset, r, memory_order_relaxed);
        atomic_store_explicit(&offset_pid, pid, memory_order_release);
    }
    uint32_t n = atomic_fetch_add_explicit(&counter, 1, memory_order_relaxed);
    return (n * 40503u + atomic_load_explicit(&offset, memory_order_relaxed)) & 0xffffffu;
}

/* The futex word is latest_seq's low half: the wire format is little-endian. */
static uint32_t *futex_word(uint64_t *latest_seq) { return (uint32_t *)(void *)latest_seq; }

void fshm_futex_wake(uint64_t *latest_seq)
{
    syscall(SYS_futex, futex_word(latest_seq), FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

int fshm_futex_wait(uint64_t *latest_seq, uint64_t seen, uint64_t timeout_ns)
{
    struct timespec ts = {(time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull)};
    /* EAGAIN (changed already) and ETIMEDOUT mean: look again. EINTR is the caller's: a
     * handler without SA_RESTART ends a blocked wait, as it ends mq_timedreceive. */
    if (syscall(SYS_futex, futex_word(latest_seq), FUTEX_WAIT, (uint32_t)seen, &ts, NULL, 0) < 0) {
        if (errno == EINTR)
            return -EINTR;
        if (errno == ETIMEDOUT)
            return 1;
    }
    return 0;
}

int fshm_queue_named_for(const char *q, uint64_t pid)
{
    if (strncmp(q, "/fshm-", 6) != 0 || !isxdigit((unsigned char)q[6]))
        return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(q + 6, &end, 16);
    return errno == 0 && *end == '-' && v == pid;
}

int fshm_queue_unavailable(int rc) { return rc == FSHM_E_LIMIT || rc == -ENOSYS; }

int fshm_queue_create(char name[32], mqd_t *out, char *record)
{
    struct mq_attr attr = {.mq_maxmsg = fshm_queue_limit(), .mq_msgsize = 64};
    /* The name carries its owner (pid and start time), so that `frameshm gc` can tell a
     * dead consumer's queue from a live one's even when no consumer table names it any
     * more (its stream was removed, or its control region was corrupt). */
    unsigned pid = (unsigned)getpid();
    unsigned long long start = (unsigned long long)fshm_self_start_time();
    for (int attempt = 0; attempt < 16; attempt++) {
        uint32_t r = queue_suffix();
        int n = start ? snprintf(name, 32, "/fshm-%x-%llx-%06x", pid, start, r) : 32;
        if (n >= 32)   /* no start time, or too long to hold it: the pid alone */
            snprintf(name, 32, "/fshm-%x-%08x", pid, r);
        if (record) {
            /* Named before it exists: a kill from here on leaves a slot that names the
             * queue (or a name nobody created, which unlinking shrugs off). */
            memset(record, 0, 32);
            memcpy(record, name, strlen(name));
            atomic_thread_fence(memory_order_seq_cst);
        }
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

/* min..max lowercase hex digits at s, then '-' or the end: returns where they end. */
static const char *hex_field(const char *s, size_t min, size_t max, uint64_t *v)
{
    size_t n = 0;
    uint64_t x = 0;
    for (; n < max && ((s[n] >= '0' && s[n] <= '9') || (s[n] >= 'a' && s[n] <= 'f')); n++)
        x = x << 4 | (uint64_t)(s[n] <= '9' ? s[n] - '0' : s[n] - 'a' + 10);
    if (n < min || (s[n] != '-' && s[n] != 0))
        return NULL;
    *v = x;
    return s + n;
}

int fshm_queue_owner(const char *name, int64_t *pid, uint64_t *start)
{
    if (name[0] == '/')
        name++;
    if (strncmp(name, "fshm-", 5) != 0)
        return -1;
    uint64_t a, b, c;
    const char *s = hex_field(name + 5, 1, 8, &a);
    if (!s || *s != '-' || a == 0 || a > INT_MAX)
        return -1;
    const char *t = hex_field(s + 1, 1, 16, &b);
    if (!t)
        return -1;
    if (*t == 0) {   /* /fshm-<pid>-<8 hex>: made before names carried the start time */
        if (t - (s + 1) != 8)
            return -1;
        *pid = (int64_t)a;
        *start = 0;
        return 0;
    }
    const char *u = hex_field(t + 1, 6, 6, &c);
    if (!u || *u != 0 || b == 0)
        return -1;
    *pid = (int64_t)a;
    *start = b;
    return 0;
}

int fshm_mqueue_dir(char *out, size_t cap)
{
    /* Queues are listed only through an mqueue file system; where it is mounted is up to
     * the system (/dev/mqueue by convention), so the mount table says. */
    FILE *f = setmntent("/proc/self/mounts", "re");
    if (!f)
        return fshm_set_error(-errno, "cannot read /proc/self/mounts: %s", strerror(errno));
    struct mntent me, *m;
    char buf[4096];
    int found = 0;
    while ((m = getmntent_r(f, &me, buf, sizeof buf))) {
        if (strcmp(m->mnt_type, "mqueue") != 0 || strlen(m->mnt_dir) >= cap)
            continue;
        if (!found || strcmp(m->mnt_dir, "/dev/mqueue") == 0)
            snprintf(out, cap, "%s", m->mnt_dir);
        found = 1;
    }
    endmntent(f);
    if (!found)
        return fshm_set_error(-ENOENT, "no mqueue file system is mounted, so message queues cannot "
                              "be listed (as root: mkdir -p /dev/mqueue && mount -t mqueue none "
                              "/dev/mqueue)");
    return 0;
}
