/* Inspection and cleanup of streams (behind the CLI's `frameshm ls` and `frameshm gc`). */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fshm_internal.h"

int fshm_stream_info_get(const fshm_stream_addr *addr, fshm_stream_info *out)
{
    memset(out, 0, sizeof *out);
    fshm_paths p;
    int rc = fshm_resolve(addr, 0, &p);
    if (rc)
        return rc;
    fshm_ctl_handle h;
    if ((rc = fshm_ctl_open(&p, 0, &h)))
        return rc;
    fshm_ctl *c = h.ctl;
    snprintf(out->name, sizeof out->name, "%s", c->name);
    out->stream_id = c->stream_id;
    out->epoch = LOAD_ACQ(&c->epoch);
    out->producer_state = fshm_ctl_producer_state(c, &out->producer_pid);
    out->latest_seq = LOAD_ACQ(&c->latest_seq);
    out->frames = LOAD_RLX(&c->frames);
    out->drops_nopool = LOAD_RLX(&c->drops_nopool);
    out->desc_sent = LOAD_RLX(&c->desc_sent);
    out->desc_dropped = LOAD_RLX(&c->desc_dropped);
    out->pruned = LOAD_RLX(&c->pruned);
    out->activity_ns = LOAD_RLX(&c->activity_ns);
    for (unsigned i = 0; i < FSHM_CONTROL_BYTES; i++)
        out->control[i] = LOAD_ACQ(&c->control[i]);
    out->driver_managed = (LOAD_ACQ(&c->flags) & CTL_FLAG_DRIVER) != 0;
    fshm_announce a;
    if (out->epoch && fshm_ctl_read_announce(c, &a) == 0) {
        out->nslots = a.header_nslots;
        out->npools = a.npools;
        for (uint32_t i = 0; i < a.npools; i++)
            out->pool_stride[i] = a.pools[i].stride_bytes;
    }
    for (unsigned i = 0; i < FSHM_MAX_CONSUMERS; i++) {
        fshm_ctl_consumer *e = ctl_consumer(c, i);
        if (LOAD_ACQ(&e->state) != CONS_ACTIVE)
            continue;
        fshm_consumer_info *ci = &out->consumers[out->nconsumers++];
        memcpy(ci->name, e->name, sizeof ci->name - 1);
        memcpy(ci->queue, e->queue, sizeof ci->queue - 1);
        ci->pid = (int64_t)LOAD_RLX(&e->pid);
        ci->alive = fshm_pid_alive(ci->pid, LOAD_RLX(&e->pid_start));
        ci->process_all = LOAD_RLX(&e->flags) & 1;
        ci->last_seq = LOAD_RLX(&e->last_seq);
        ci->delivered = LOAD_RLX(&e->delivered);
        ci->queue_full = LOAD_RLX(&e->queue_full);
        ci->max_rate_hz = LOAD_RLX(&e->max_rate_hz);
    }
    fshm_ctl_close(&h);
    return 0;
}

/* A driver's stream belongs to the driver while it runs (it recreates what is missing
 * and removes its streams itself); its pid is in the superblocks it writes. */
static int driver_alive(const fshm_ctl *c, const fshm_paths *p)
{
    if (!(LOAD_ACQ(&c->flags) & CTL_FLAG_DRIVER))
        return 0;
    fshm_announce a;
    int fd;
    size_t size;
    uint8_t sb[FSHM_SUPERBLOCK_SIZE];
    if (fshm_ctl_read_announce(c, &a) != 0 || fshm_uri_open(a.header_uri, p->base, 0, &fd, &size) != 0)
        return 0;
    ssize_t n = pread(fd, sb, sizeof sb, 0);
    close(fd);
    return n == (ssize_t)sizeof sb && fshm_pid_alive((int64_t)ld64(sb + SB_PID), 0);
}

/* A stream is removed with everything in it, and its namespace and user directories too
 * when it was their last. */
static void remove_stream(const fshm_paths *p, int dry_run, fshm_gc_stream_report *out, int reason)
{
    out->removed = 1;
    out->reason = reason;
    if (!dry_run)
        fshm_remove_stream_dir(p);
}

int fshm_stream_gc_report(const fshm_stream_addr *addr, unsigned flags, fshm_gc_stream_report *out)
{
    memset(out, 0, sizeof *out);
    int dry_run = (flags & FSHM_GC_DRY_RUN) != 0;
    fshm_paths p;
    int rc = fshm_resolve(addr, 0, &p);
    if (rc)
        return rc;
    out->stream_id = p.stream_id;
    int fd = open(p.ctl, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        struct stat st;
        if (errno == ENOENT && lstat(p.stream_dir, &st) == 0 && S_ISDIR(st.st_mode)) {
            remove_stream(&p, dry_run, out, FSHM_GC_NO_CONTROL);   /* leftovers */
            return 1;
        }
        return errno == ENOENT ? 0 : fshm_set_error(-errno, "%s: %s", p.ctl, strerror(errno));
    }
    /* The producer holds this lock for its whole life: if we get it, none is running. A
     * dry run takes it too (for as long as a real run would): nothing else tells. */
    int locked = flock(fd, LOCK_EX | LOCK_NB) == 0;
    fshm_ctl_handle h;
    rc = fshm_ctl_open(&p, 0, &h);
    if (rc == FSHM_E_CORRUPT && locked) {
        remove_stream(&p, dry_run, out, FSHM_GC_CORRUPT);
        close(fd);
        return 1;
    }
    if (rc) {
        close(fd);
        return rc;
    }
    fshm_ctl *c = h.ctl;
    memcpy(out->name, c->name, sizeof out->name - 1);
    out->producer_state = fshm_ctl_producer_state(c, &out->producer_pid);
    fshm_ctl_prune_report(c, dry_run, out->queues, &out->nqueues);
    out->live_consumers = (uint32_t)fshm_ctl_live_consumers(c);
    if (!locked)
        out->reason = FSHM_GC_PRODUCER;
    else if (out->live_consumers)
        out->reason = FSHM_GC_CONSUMERS;
    else if (driver_alive(c, &p))
        out->reason = FSHM_GC_DRIVER;
    else
        remove_stream(&p, dry_run, out, FSHM_GC_UNUSED);
    fshm_ctl_close(&h);
    close(fd);
    return out->removed;
}

int fshm_stream_gc(const fshm_stream_addr *addr)
{
    fshm_gc_stream_report r;
    return fshm_stream_gc_report(addr, 0, &r);
}

int fshm_queue_gc(unsigned flags, fshm_gc_queue *out, size_t cap, size_t *count)
{
    *count = 0;
    char dir[PATH_MAX];
    int rc = fshm_mqueue_dir(dir, sizeof dir);
    if (rc)
        return rc;
    DIR *d = opendir(dir);
    if (!d)
        return fshm_set_error(-errno, "cannot list message queues in %s: %s", dir, strerror(errno));
    uid_t me = geteuid();
    struct dirent *de;
    while ((de = readdir(d))) {
        int64_t pid;
        uint64_t start;
        struct stat st;
        if (fshm_queue_owner(de->d_name, &pid, &start) != 0 || strlen(de->d_name) > 30 ||
            fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || st.st_uid != me)
            continue;   /* not a frameshm consumer's, or another user's */
        /* Owner alive (pid and, when the name has it, start time): its queue, in use or
         * about to be, whatever the consumer tables say. */
        if (fshm_pid_alive(pid, start))
            continue;
        char name[32];
        snprintf(name, sizeof name, "/%s", de->d_name);
        if (!(flags & FSHM_GC_DRY_RUN) && mq_unlink(name) != 0)
            continue;   /* gone meanwhile (another gc, or a prune) */
        if (*count < cap) {
            fshm_gc_queue *q = &out[*count];
            memset(q, 0, sizeof *q);
            memcpy(q->name, name, sizeof q->name);
            q->pid = pid;
        }
        (*count)++;
    }
    closedir(d);
    return 0;
}
