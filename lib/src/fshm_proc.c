/* Process liveness: a pid alone can be reused, so it is paired with the process
 * start time from /proc/<pid>/stat (field 22). */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "fshm_internal.h"

/* Reads state (field 3) and starttime (field 22); -1 if /proc has no such process. */
static int proc_stat(int64_t pid, char *state, uint64_t *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    /* comm (field 2) may hold spaces and parentheses: fields resume after the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return -1;
    *state = p[2];
    p += 1;   /* at the space before field 3 */
    for (int field = 3; field < 22; field++) {
        p = strchr(p + 1, ' ');
        if (!p)
            return -1;
    }
    *start = strtoull(p + 1, NULL, 10);
    return 0;
}

uint64_t fshm_proc_start_time(int64_t pid)
{
    char state;
    uint64_t start;
    return proc_stat(pid, &state, &start) == 0 ? start : 0;
}

uint64_t fshm_self_start_time(void)
{
    /* One word holds both the pid and its start time's validity so that threads opening
     * handles at once never pair one pid with another's start time; a race only computes
     * the value twice. Recomputed after fork (the pid changes). */
    static uint64_t cached;       /* start time (atomic) */
    static int64_t cached_pid;    /* pid it belongs to, published after `cached` (atomic) */
    int64_t me = getpid();
    if (__atomic_load_n(&cached_pid, __ATOMIC_ACQUIRE) == me)
        return __atomic_load_n(&cached, __ATOMIC_RELAXED);
    uint64_t st = fshm_proc_start_time(me);
    if (st) {
        __atomic_store_n(&cached, st, __ATOMIC_RELAXED);
        __atomic_store_n(&cached_pid, me, __ATOMIC_RELEASE);
    }
    return st;
}

int fshm_pid_alive(int64_t pid, uint64_t start_time)
{
    if (pid <= 0 || pid > INT_MAX)
        return 0;
    if (kill((pid_t)pid, 0) != 0 && errno != EPERM)
        return 0;
    char state;
    uint64_t start;
    if (proc_stat(pid, &state, &start) != 0)
        return 1;   /* no /proc: kill() is all we can know */
    if (state == 'Z' || state == 'X')
        return 0;   /* exited, not yet reaped */
    return start_time == 0 || start == start_time;
}

uint64_t fshm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
