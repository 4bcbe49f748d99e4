/* The control region: frameshm's own per-stream file holding what the wire spec leaves
 * to implementations (announce, consumer table, liveness, control bytes, counters). */
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fshm_internal.h"

static uint32_t random_u32(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    static _Thread_local uint32_t state;
    state ^= (uint32_t)ts.tv_nsec ^ ((uint32_t)getpid() << 16) ^ (uint32_t)(uintptr_t)&ts;
    state = state * 1664525u + 1013904223u;
    return state ^ (state >> 16);
}

static int map_ctl_fd(int fd, const fshm_paths *p, fshm_ctl_handle *h)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return fshm_set_error(-errno, "cannot stat %s: %s", p->ctl, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return fshm_set_error(FSHM_E_CORRUPT, "%s is not a regular file", p->ctl);
    if ((size_t)st.st_size != FSHM_CTL_BYTES)
        return fshm_set_error(FSHM_E_CORRUPT, "control region %s is %lld bytes, expected %u", p->ctl,
                              (long long)st.st_size, FSHM_CTL_BYTES);
    /* A read-only descriptor (a sealed consumer's: the driver writes its entry) maps
     * read-only: nothing this process does can write the region others read. */
    int acc = fcntl(fd, F_GETFL);
    int writable = acc >= 0 && (acc & O_ACCMODE) == O_RDWR;
    int rc = fshm_map_create(fd, FSHM_CTL_BYTES, writable, 0, &h->map);
    if (rc)
        return rc;
    h->fd = fd;
    h->ctl = (fshm_ctl *)h->map->base;
    h->dev = st.st_dev;
    h->ino = st.st_ino;
    rc = fshm_ctl_validate(h->ctl, FSHM_CTL_BYTES, p);
    if (rc) {
        fshm_map_unref(h->map);
        h->map = NULL;
        h->ctl = NULL;
        h->fd = -1;   /* the caller still owns fd: a later fshm_ctl_close must not close it */
    }
    return rc;
}

int fshm_ctl_map_fd(int fd, const fshm_paths *p, fshm_ctl_handle *h)
{
    memset(h, 0, sizeof *h);
    h->fd = -1;
    return map_ctl_fd(fd, p, h);
}

void fshm_ctl_init(fshm_ctl *c, const fshm_paths *p)
{
    c->magic = FSHM_CTL_MAGIC;
    c->version = FSHM_CTL_VERSION;
    c->stream_id = p->stream_id;
    snprintf(c->name, sizeof c->name, "%s", p->name);
}

/* Creates a fully initialised control file under a temporary name and links it into
 * place, so no process ever sees a half-written one. Returns 1 if another process won. */
static int create_ctl(const fshm_paths *p)
{
    char tmp[FSHM_PATH_MAX + 32];
    snprintf(tmp, sizeof tmp, "%s/.ctl.%d.%08x", p->stream_dir, (int)getpid(), random_u32());
    int fd, rc = fshm_create_file(tmp, FSHM_CTL_BYTES, 0600, &fd);
    if (rc)
        return rc;
    fshm_map *m;
    rc = fshm_map_create(fd, FSHM_CTL_BYTES, 1, 1, &m);
    if (rc) {
        close(fd);
        unlink(tmp);
        return rc;
    }
    fshm_ctl_init((fshm_ctl *)m->base, p);
    fshm_map_unref(m);
    close(fd);
    rc = link(tmp, p->ctl) == 0 ? 0 : (errno == EEXIST ? 1 : -errno);
    if (rc < 0)
        fshm_set_error(rc, "cannot create control region %s: %s", p->ctl, strerror(-rc));
    unlink(tmp);
    return rc;
}

int fshm_ctl_open(const fshm_paths *p, int create, fshm_ctl_handle *h)
{
    memset(h, 0, sizeof *h);
    h->fd = -1;
    for (int attempt = 0; attempt < 8; attempt++) {
        int fd = open(p->ctl, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (fd >= 0) {
            int rc = map_ctl_fd(fd, p, h);
            if (rc)
                close(fd);
            return rc;
        }
        if (errno != ENOENT)
            return fshm_set_error(-errno, "cannot open control region %s: %s", p->ctl,
                                  strerror(errno));
        if (!create)
            return fshm_set_error(-ENOENT, "no stream '%s' (id %u) in %s", p->name, p->stream_id,
                                  p->ns_dir);
        int rc = create_ctl(p);
        if (rc < 0)
            return rc;
    }
    return fshm_set_error(-EAGAIN, "control region %s keeps changing", p->ctl);
}

void fshm_ctl_close(fshm_ctl_handle *h)
{
    if (h->map)
        fshm_map_unref(h->map);
    if (h->fd >= 0)
        close(h->fd);
    h->map = NULL;
    h->ctl = NULL;
    h->fd = -1;
}

int fshm_ctl_same_file(const fshm_ctl_handle *h, const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return 0;
    return (uint64_t)st.st_dev == h->dev && (uint64_t)st.st_ino == h->ino;
}

int fshm_ctl_validate(const fshm_ctl *c, size_t map_size, const fshm_paths *p)
{
    if (map_size < FSHM_CTL_BYTES)
        return fshm_set_error(FSHM_E_CORRUPT, "control region too small");
    if (c->magic != FSHM_CTL_MAGIC)
        return fshm_set_error(FSHM_E_CORRUPT, "control region %s has a bad magic number", p->ctl);
    if (c->version != FSHM_CTL_VERSION)
        return fshm_set_error(FSHM_E_CORRUPT, "control region %s has version %u; this build reads %u",
                              p->ctl, c->version, FSHM_CTL_VERSION);
    if (c->stream_id != p->stream_id)
        return fshm_set_error(FSHM_E_CORRUPT, "control region %s is for stream id %u, not %u", p->ctl,
                              c->stream_id, p->stream_id);
    if (memchr(c->name, 0, sizeof c->name) == NULL)
        return fshm_set_error(FSHM_E_CORRUPT, "control region %s: stream name not terminated",
                              p->ctl);
    if (!p->any_name && strcmp(c->name, p->name) != 0)
        return fshm_set_error(FSHM_E_COLLISION,
                              "stream id %u already belongs to stream '%.63s', not '%s': pass another "
                              "stream_id",
                              p->stream_id, c->name, p->name);
    return 0;
}

static int queue_name_ok(const char *q)
{
    if (memchr(q, 0, 32) == NULL || strncmp(q, "/fshm-", 6) != 0)
        return 0;
    return strchr(q + 1, '/') == NULL;
}

/* Who is in charge of a slot in state st, and since when: the consumer of an ACTIVE one;
 * the claimer or releaser a CLAIMING|pid or PRUNING|pid one names (with the start time
 * when the slot's pid field is that same process, filled in right after the claim).
 * 0 for a slot that names nobody (free, or an older library's bare transition). */
static uint64_t slot_owner(const fshm_ctl_consumer *e, uint32_t st, uint64_t *start)
{
    uint64_t pid = LOAD_RLX(&e->pid);
    *start = LOAD_RLX(&e->pid_start);
    uint32_t kind = CONS_KIND(st);
    if (kind == CONS_ACTIVE && CONS_PID(st) == 0)
        return pid;
    if ((kind == CONS_CLAIMING || kind == CONS_PRUNING) && CONS_PID(st) != 0) {
        if (pid != CONS_PID(st))
            *start = 0;   /* pid alone: the claimer died before writing its start time */
        return CONS_PID(st);
    }
    return 0;
}

/* Empties a slot we hold as PRUNING|us: its queue first, so that a kill in the middle
 * leaves a slot still naming it for the next pruner. */
/* owner: the process the slot names. Queue names carry their creator's pid
 * (fshm_queue_create), and only a queue named for the slot's own process is unlinked:
 * a slot forged by another consumer (the control region is writable by all of them)
 * naming a live consumer's queue and a dead pid must not make pruners remove that queue. */
static void slot_free(fshm_ctl *c, fshm_ctl_consumer *e, int unlink_queue, uint64_t owner)
{
    char q[32];
    memcpy(q, e->queue, sizeof q);
    if (unlink_queue && queue_name_ok(q) && fshm_queue_named_for(q, owner))
        mq_unlink(q);
    /* Only now do pid and queue go: a remover killed before this line leaves them for
     * the next pruner (queue_owner), after it the queue is gone already. */
    memset((uint8_t *)e + 4, 0, FSHM_CONSUMER_BYTES - 4);
    STORE_REL(&e->state, CONS_FREE);
    __atomic_fetch_add(&c->consumers_gen, 1, __ATOMIC_RELEASE);
}

/* Whose queue a slot being pruned names, for slot_free: its owner's (slot_owner), except
 * when the slot is a dead remover's. A pruner (another consumer opening or closing, the
 * producer, gc) takes a dead consumer's slot by CAS to PRUNING|pruner, and then unlinks
 * the queue: killed between the two, it leaves a slot whose state word names the dead
 * pruner while its pid and queue fields still name the consumer it was pruning. The next
 * pruner's owner is then that pruner, the queue (named for the consumer) is not named
 * for it, and freeing the slot without unlinking left a queue no entry names, which only
 * a machine-wide `frameshm gc` would find (test_crash_lifecycle.py saw one in ~1200
 * kills under load). So the queue of the entry's own process (the pid field) goes too,
 * but only when the queue's name says its creator is dead: the name carries the
 * creator's pid and start time (fshm_queue_create), which a forged entry cannot change,
 * so a slot forged to name a live consumer's queue still does not get it unlinked
 * (test_prune_leaves_a_queue_a_forged_entry_names). The same covers a sealed driver
 * killed while releasing a dead peer's entry (PRUNING|driver, pid = the peer). */
static uint64_t queue_owner(const char q[32], uint64_t owner, uint64_t pid)
{
    int64_t qpid;
    uint64_t qstart;
    if (pid == 0 || pid == owner || !queue_name_ok(q) || fshm_queue_owner(q, &qpid, &qstart) != 0 ||
        (uint64_t)qpid != pid || fshm_pid_alive(qpid, qstart))
        return owner;
    return pid;
}

static int self_pid_ok(void)
{
    return (uint64_t)getpid() < CONS_PID_LIMIT
               ? 0
               : fshm_set_error(-EOVERFLOW, "pid %d does not fit a consumer slot's state word",
                                (int)getpid());
}

int fshm_ctl_prune_report(fshm_ctl *c, int dry_run, fshm_gc_queue *out, uint32_t *n)
{
    int pruned = 0;
    uint32_t me = (uint32_t)getpid();
    for (unsigned i = 0; i < FSHM_MAX_CONSUMERS; i++) {
        fshm_ctl_consumer *e = ctl_consumer(c, i);
        uint32_t st = LOAD_ACQ(&e->state);
        uint64_t start, owner = slot_owner(e, st, &start);
        if (owner == 0 || fshm_pid_alive((int64_t)owner, start))
            continue;
        if (!dry_run && (me >= CONS_PID_LIMIT ||
                         !__atomic_compare_exchange_n(&e->state, &st, CONS_STATE(CONS_PRUNING, me), 0,
                                                      __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)))
            continue;
        uint64_t pid = LOAD_RLX(&e->pid);
        if (!dry_run && CONS_KIND(st) == CONS_ACTIVE &&
            (pid != owner || LOAD_RLX(&e->pid_start) != start)) {
            /* Freed and taken by a live consumer between our look and the CAS: give it
             * back untouched. */
            STORE_REL(&e->state, st);
            continue;
        }
        char q[32];
        memcpy(q, e->queue, sizeof q);
        if (out && n && *n < FSHM_MAX_CONSUMERS) {
            fshm_gc_queue *g = &out[(*n)++];
            memset(g, 0, sizeof *g);
            if (queue_name_ok(q))
                memcpy(g->name, q, sizeof g->name);
            g->pid = (int64_t)(pid ? pid : owner);
            g->stream_id = LOAD_RLX(&c->stream_id);
            memcpy(g->consumer, e->name, sizeof g->consumer - 1);
            g->consumer[sizeof g->consumer - 1] = 0;
        }
        pruned++;
        if (dry_run)
            continue;
        slot_free(c, e, 1, queue_owner(q, owner, pid));
        ADD_RLX(&c->pruned, 1);
    }
    return pruned;
}

int fshm_ctl_prune(fshm_ctl *c) { return fshm_ctl_prune_report(c, 0, NULL, NULL); }

int fshm_ctl_live_consumers(fshm_ctl *c)
{
    int n = 0;
    for (unsigned i = 0; i < FSHM_MAX_CONSUMERS; i++) {
        /* A live process still claiming its entry counts too: removing the stream under
         * it (gc, or the last one out) would leave it registered in an unlinked file. */
        fshm_ctl_consumer *e = ctl_consumer(c, i);
        uint32_t st = LOAD_ACQ(&e->state);
        uint64_t start, owner = slot_owner(e, st, &start);
        if (owner && CONS_KIND(st) != CONS_PRUNING && fshm_pid_alive((int64_t)owner, start))
            n++;
    }
    return n;
}

int fshm_ctl_claim(fshm_ctl *c, const char *consumer, uint32_t max_rate_hz)
{
    int rc = self_pid_ok();
    if (rc)
        return rc;
    uint32_t me = CONS_STATE(CONS_CLAIMING, (uint32_t)getpid());
    for (unsigned i = 0; i < FSHM_MAX_CONSUMERS; i++) {
        fshm_ctl_consumer *e = ctl_consumer(c, i);
        uint32_t expect = CONS_FREE;
        if (!__atomic_compare_exchange_n(&e->state, &expect, me, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_RELAXED))
            continue;
        /* Ours from here on; the rest only describes us. The start time goes in before
         * the pid: a pruner pairs them only once the pid field names the claimer. */
        STORE_RLX(&e->pid_start, fshm_self_start_time());
        STORE_REL(&e->pid, (uint64_t)getpid());
        e->flags = 0;
        STORE_RLX(&e->sleeping, 0);
        e->attach_ns = fshm_now_ns();
        e->delivered = e->queue_full = e->last_seq = 0;
        e->max_rate_hz = max_rate_hz;
        memset(e->name, 0, sizeof e->name);
        snprintf(e->name, sizeof e->name, "%s", consumer);
        memset(e->queue, 0, sizeof e->queue);
        return (int)i;
    }
    return fshm_set_error(FSHM_E_LIMIT, "stream '%s' already has %d consumers (the most it takes)",
                          c->name, FSHM_MAX_CONSUMERS);
}

char *fshm_ctl_queue_field(fshm_ctl *c, int idx) { return ctl_consumer(c, (unsigned)idx)->queue; }

int fshm_ctl_activate(fshm_ctl *c, int idx, int no_queue, uint32_t max_rate_hz)
{
    fshm_ctl_consumer *e = ctl_consumer(c, (unsigned)idx);
    /* The consumer itself activates its entry, so it can write `sleeping`: doorbell. */
    uint32_t fl = (no_queue ? CONS_FLAG_NO_QUEUE : 0) |
                  (fshm_ctl_doorbell_for(no_queue, max_rate_hz) ? CONS_FLAG_DOORBELL : 0);
    if (fl)
        __atomic_fetch_or(&e->flags, fl, __ATOMIC_RELAXED);
    uint32_t st = CONS_STATE(CONS_CLAIMING, (uint32_t)getpid());
    if (!__atomic_compare_exchange_n(&e->state, &st, CONS_ACTIVE, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_RELAXED))
        return fshm_set_error(-ESTALE, "consumer slot %d was taken from us while being claimed",
                              idx);
    __atomic_fetch_add(&c->consumers_gen, 1, __ATOMIC_RELEASE);
    return 0;
}

int fshm_ctl_register(fshm_ctl *c, const char *consumer, const char *queue, uint32_t max_rate_hz,
                      int no_queue)
{
    int idx = fshm_ctl_claim(c, consumer, max_rate_hz);
    if (idx < 0)
        return idx;
    snprintf(fshm_ctl_queue_field(c, idx), 32, "%s", queue);
    int rc = fshm_ctl_activate(c, idx, no_queue, max_rate_hz);
    return rc ? rc : idx;
}

void fshm_ctl_release(fshm_ctl *c, int idx, const char *queue, int unlink_queue)
{
    if (idx < 0 || idx >= FSHM_MAX_CONSUMERS)
        return;
    fshm_ctl_consumer *e = ctl_consumer(c, (unsigned)idx);
    uint32_t me = (uint32_t)getpid();
    uint32_t st = LOAD_ACQ(&e->state);
    if (me >= CONS_PID_LIMIT || strncmp(e->queue, queue, sizeof e->queue) != 0)
        return;   /* pruned and reused meanwhile: not ours any more */
    if (st != CONS_STATE(CONS_CLAIMING, me) && (st != CONS_ACTIVE || LOAD_RLX(&e->pid) != me))
        return;
    if (!__atomic_compare_exchange_n(&e->state, &st, CONS_STATE(CONS_PRUNING, me), 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return;
    slot_free(c, e, unlink_queue, me);
}

int fshm_ctl_producer_state(const fshm_ctl *c, int64_t *pid)
{
    uint8_t st = LOAD_ACQ(&c->state);
    int64_t p = (int64_t)LOAD_RLX(&c->producer_pid);
    if (pid)
        *pid = p;
    if (st == CTL_STATE_CLOSED)
        return FSHM_PRODUCER_CLOSED;
    if (st != CTL_STATE_LIVE)
        return FSHM_PRODUCER_NONE;
    return fshm_pid_alive(p, LOAD_RLX(&c->producer_start)) ? FSHM_PRODUCER_ALIVE
                                                          : FSHM_PRODUCER_DEAD;
}

/* The announce block is written under its own seqlock so a reader never maps a mix of
 * two epochs' URIs. The caller then publishes the epoch word (release). */
void fshm_ctl_write_announce(fshm_ctl *c, const fshm_announce *a)
{
    uint64_t s = LOAD_RLX(&c->announce_seq);
    STORE_RLX(&c->announce_seq, s + 1);
    atomic_thread_fence(memory_order_release);
    c->announce_epoch = a->epoch;
    c->header_nslots = a->header_nslots;
    c->npools = a->npools;
    memcpy(c->header_uri, a->header_uri, sizeof c->header_uri);
    memcpy(c->pools, a->pools, sizeof c->pools);
    STORE_REL(&c->announce_seq, s + 2);
}

int fshm_ctl_read_announce(const fshm_ctl *c, fshm_announce *a)
{
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint64_t s1 = LOAD_ACQ(&c->announce_seq);
        if (s1 & 1) {
            sched_yield();
            continue;
        }
        a->epoch = c->announce_epoch;
        a->header_nslots = c->header_nslots;
        a->npools = c->npools;
        memcpy(a->header_uri, c->header_uri, sizeof a->header_uri);
        memcpy(a->pools, c->pools, sizeof a->pools);
        atomic_thread_fence(memory_order_acquire);
        if (LOAD_RLX(&c->announce_seq) != s1)
            continue;
        uint32_t n = a->header_nslots;
        if (!fshm_valid_nslots(n))
            return fshm_set_error(FSHM_E_CORRUPT, "announce: header nslots %u is not a power of two "
                                  "in 1..%u", n, FSHM_MAX_NSLOTS);
        if (!fshm_valid_npools(a->npools))
            return fshm_set_error(FSHM_E_CORRUPT, "announce: %u payload pools", a->npools);
        if (memchr(a->header_uri, 0, sizeof a->header_uri) == NULL)
            return fshm_set_error(FSHM_E_CORRUPT, "announce: header URI not terminated");
        for (uint32_t i = 0; i < a->npools; i++) {
            fshm_ctl_pool *pl = &a->pools[i];
            if (memchr(pl->uri, 0, sizeof pl->uri) == NULL)
                return fshm_set_error(FSHM_E_CORRUPT, "announce: pool URI not terminated");
            if (!fshm_valid_stride(pl->stride_bytes))
                return fshm_set_error(FSHM_E_CORRUPT,
                                      "announce: pool %u stride %u is not a power-of-two multiple of %u",
                                      pl->pool_id, pl->stride_bytes, FSHM_MIN_STRIDE);
            if (pl->nslots != n)
                return fshm_set_error(FSHM_E_CORRUPT, "announce: pool %u has %u slots, ring has %u",
                                      pl->pool_id, pl->nslots, n);
            if (pl->pool_id == 0)
                return fshm_set_error(FSHM_E_CORRUPT, "announce: pool id 0 is reserved");
            for (uint32_t j = 0; j < i; j++)
                if (a->pools[j].pool_id == pl->pool_id)
                    return fshm_set_error(FSHM_E_CORRUPT, "announce: duplicate pool id %u",
                                          pl->pool_id);
        }
        return 0;
    }
    return fshm_set_error(-EAGAIN, "announce kept changing while being read");
}

/* ---- the driver's consumer table (sealed transport) ----
 * Under the sealed transport consumers map the control region read-only: the driver
 * writes their entries from what it knows of the peer (SO_PEERCRED pid, the lease) and
 * frees them when the lease ends. The claim names the driver (CLAIMING|driver pid) until
 * the entry is complete, so a driver killed in between leaves a slot pruning reclaims. */
int fshm_ctl_register_peer(fshm_ctl *c, int64_t pid, const char *consumer, const char *queue,
                           uint32_t flags, uint32_t max_rate_hz)
{
    if (pid <= 0 || (uint64_t)pid >= CONS_PID_LIMIT)
        return fshm_set_error(-EINVAL, "pid %lld does not fit a consumer slot", (long long)pid);
    if (flags & ~(uint32_t)(CONS_FLAG_NEXT | CONS_FLAG_NO_QUEUE))
        return fshm_set_error(-EINVAL, "unknown consumer flags 0x%x", flags);
    if (queue[0] ? !queue_name_ok(queue) || !fshm_queue_named_for(queue, (uint64_t)pid)
                 : !(flags & CONS_FLAG_NO_QUEUE))
        return fshm_set_error(-EINVAL, "queue '%.31s' is not one process %lld created", queue,
                              (long long)pid);
    uint64_t start = fshm_proc_start_time(pid);
    if (!start)
        return fshm_set_error(-ESRCH, "process %lld is gone", (long long)pid);
    int idx = fshm_ctl_claim(c, consumer, max_rate_hz);
    if (idx < 0)
        return idx;
    fshm_ctl_consumer *e = ctl_consumer(c, (unsigned)idx);
    STORE_RLX(&e->pid_start, start);
    STORE_REL(&e->pid, (uint64_t)pid);
    snprintf(e->queue, sizeof e->queue, "%s", queue);
    e->flags = flags;
    STORE_REL(&e->state, CONS_ACTIVE);
    __atomic_fetch_add(&c->consumers_gen, 1, __ATOMIC_RELEASE);
    return idx;
}

int fshm_ctl_release_peer(fshm_ctl *c, int idx, int64_t pid, const char *queue)
{
    if (idx < 0 || idx >= FSHM_MAX_CONSUMERS || (uint64_t)getpid() >= CONS_PID_LIMIT)
        return 0;
    fshm_ctl_consumer *e = ctl_consumer(c, (unsigned)idx);
    uint32_t st = LOAD_ACQ(&e->state);
    /* Pruned (the producer saw the consumer die first) and maybe reused: not ours. */
    if (st != CONS_ACTIVE || LOAD_RLX(&e->pid) != (uint64_t)pid ||
        strncmp(e->queue, queue, sizeof e->queue) != 0)
        return 0;
    if (!__atomic_compare_exchange_n(&e->state, &st, CONS_STATE(CONS_PRUNING, (uint32_t)getpid()),
                                     0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return 0;
    /* A dead consumer's queue goes with its entry when we may remove it (same user, or
     * root); another user's is left to its owner's `frameshm gc` (named for a dead pid).
     * A live one's (lease expired while it stalled) stays: it re-registers with it. */
    slot_free(c, e, !fshm_pid_alive(pid, LOAD_RLX(&e->pid_start)), (uint64_t)pid);
    return 1;
}
