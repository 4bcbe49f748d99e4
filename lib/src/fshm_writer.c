/* The producer side of a stream: attaching to an epoch (created here through
 * fshm_provision.c, or granted by a driver; either way mapped the same), loan/commit
 * (spec §8.3) and descriptor fan-out. The producer never blocks on a consumer. */
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fshm_writer_impl.h"

#define PRUNE_INTERVAL_NS 500000000ull

/* Whether the driver moved the stream past our epoch. Sealed, only the driver's word
 * counts (our lease and the announces on our socket): every consumer can write the
 * control region, and none may make the producer drop frames or re-attach (each attach
 * is a new epoch for everyone). With files it is the control region's epoch word. */
int fshm_writer_moved_on(const fshm_writer *w)
{
    if (!w->driver_mode)
        return 0;
    if (w->sealed)
        return !w->lease || fshm_lease_announced_epoch(w->lease) != w->epoch ||
               fshm_lease_state(w->lease, NULL) != FSHM_LEASE_ACTIVE;
    return LOAD_ACQ(&w->ctl->epoch) != w->epoch;
}

static void release_regions(fshm_writer *w)
{
    fshm_writer_set_ticking(w, 0);
    for (unsigned i = 0; i < w->npools; i++)
        if (w->pools[i].map) {
            fshm_map_unref(w->pools[i].map);
            w->pools[i].map = NULL;
        }
    if (w->ring)
        fshm_map_unref(w->ring);
    w->ring = NULL;
}

static void drop_driver_attachment(fshm_writer *w)
{
    for (unsigned i = 0; i < FSHM_MAX_CONSUMERS; i++)
        if (w->cons[i].open) {
            mq_close(w->cons[i].q);
            w->cons[i].open = 0;
        }
    w->nqueued = 0;
    release_regions(w);
    fshm_ctl_close(&w->ch);
    w->ctl = NULL;
    if (w->lock_fd >= 0)
        close(w->lock_fd);
    w->lock_fd = -1;
}

static int map_sealed(fshm_lease *l, unsigned i, uint64_t size, fshm_map **out)
{
    int fd = fshm_lease_take_fd(l, i);
    int rc = size > SIZE_MAX ? fshm_set_error(-EFBIG, "region too large")
                             : fshm_sealed_map(fd, (size_t)size, 1, "region", out);
    if (fd >= 0)
        close(fd);   /* the mapping keeps the memory */
    return rc;
}

/* Maps the regions of a granted epoch (the driver's, or one this writer just created)
 * and checks each superblock against the grant. */
static int map_grant(fshm_writer *w, const fshm_grant *g)
{
    /* Sealed transport: the lease holds the regions' descriptors (ring 1, pool i 2 + i). */
    int sealed = w->lease && fshm_lease_nfds(w->lease);
    int rc = sealed ? map_sealed(w->lease, 1, FSHM_SUPERBLOCK_SIZE +
                                               (uint64_t)g->header_nslots * FSHM_SLOT_BYTES, &w->ring)
                    : fshm_uri_map(g->header_uri, w->paths.base, 1, &w->ring);
    if (rc)
        return rc;
    if ((rc = fshm_superblock_check(w->ring->base, w->ring->size, g->epoch, g->stream_id,
                                    FSHM_REGION_HEADER_RING, 0, g->header_nslots, FSHM_SLOT_BYTES,
                                    FSHM_SLOT_BYTES)))
        return rc;
    /* Loans pick the smallest pool that fits: keep them sorted by stride. */
    unsigned order[FSHM_MAX_POOLS];
    for (unsigned i = 0; i < g->npools; i++) {
        unsigned j = i;
        while (j > 0 && g->pools[order[j - 1]].stride_bytes > g->pools[i].stride_bytes) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    for (unsigned k = 0; k < g->npools; k++) {
        const fshm_grant_pool *gp = &g->pools[order[k]];
        writer_pool *pl = &w->pools[k];
        w->npools = k + 1;
        pl->stride = gp->stride_bytes;
        pl->id = gp->pool_id;
        rc = sealed ? map_sealed(w->lease, 2 + order[k], FSHM_SUPERBLOCK_SIZE +
                                     (uint64_t)g->header_nslots * gp->stride_bytes, &pl->map)
                    : fshm_uri_map(gp->uri, w->paths.base, 1, &pl->map);
        if (rc)
            return rc;
        if ((rc = fshm_superblock_check(pl->map->base, pl->map->size, g->epoch, g->stream_id,
                                        FSHM_REGION_PAYLOAD_POOL, pl->id, g->header_nslots,
                                        pl->stride, pl->stride)))
            return rc;
    }
    w->epoch = g->epoch;
    w->nslots = g->header_nslots;
    return 0;
}

/* Takes over the producer fields of the control region for the mapped epoch. */
static void become_producer(fshm_writer *w)
{
    w->start_ns = fshm_now_ns();
    fshm_ctl *c = w->ctl;
    STORE_RLX(&c->producer_pid, (uint64_t)getpid());
    STORE_RLX(&c->producer_start, fshm_self_start_time());
    STORE_RLX(&c->start_ns, w->start_ns);
    STORE_RLX(&c->activity_ns, w->start_ns);
    STORE_REL(&c->state, (uint8_t)CTL_STATE_LIVE);
    /* Queued doorbell consumers may sleep on latest_seq's futex from now on: we answer
     * their BELL_FUTEX (doorbell_rung). */
    STORE_REL(&c->bells_epoch, w->epoch);
    /* Sequence numbers continue across restarts so consumers see them grow. */
    w->next_seq = LOAD_ACQ(&c->latest_seq);
    w->known_gen = LOAD_ACQ(&c->consumers_gen) - 1;   /* force a scan on first commit */
    w->next_prune_ns = w->start_ns + PRUNE_INTERVAL_NS;
    w->loan_active = 0;
}

/* Driver model (spec §2.2): the driver created and initialised every file of the epoch
 * it granted us; we only map them, check them, and take over the producer fields. */
static int attach_via_driver(fshm_writer *w)
{
    fshm_grant g;
    int rc = fshm_lease_attach(&w->lease_cfg, &w->lease, &g);
    if (rc)
        return rc;
    int sealed = fshm_lease_nfds(w->lease) > 0;
    if ((rc = fshm_paths_from_grant(w->base_dir, &g, sealed, &w->paths)))
        goto fail;
    if (sealed) {
        int cfd = fshm_lease_take_fd(w->lease, 0);
        if ((rc = fshm_sealed_check(cfd, FSHM_CTL_BYTES, 1, "control region")) ||
            (rc = fshm_ctl_map_fd(cfd, &w->paths, &w->ch))) {
            if (cfd >= 0)
                close(cfd);
            goto fail;
        }
    } else if ((rc = fshm_ctl_open(&w->paths, 0, &w->ch))) {
        goto fail;
    }
    w->ctl = w->ch.ctl;
    w->sealed = sealed;
    if (!sealed && LOAD_ACQ(&w->ctl->epoch) != g.epoch) {
        rc = fshm_set_error(-EAGAIN, "stream %u moved past epoch %llu while attaching",
                            g.stream_id, (unsigned long long)g.epoch);
        goto fail;
    }
    /* The driver enforces one producer per lease. A shared lock (not exclusive: a
     * stopped producer whose lease expired may still hold one) keeps a non-driver
     * producer, which locks exclusively, out of a driver's stream. */
    /* (A sealed stream has no file another producer could open.) */
    if (!sealed)
        w->lock_fd = open(w->paths.ctl, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (!sealed && (w->lock_fd < 0 || flock(w->lock_fd, LOCK_SH | LOCK_NB) != 0)) {
        rc = fshm_set_error(-EBUSY, "stream %u has a producer that bypasses the driver (pid %llu)",
                            g.stream_id, (unsigned long long)w->ctl->producer_pid);
        goto fail;
    }
    if ((rc = map_grant(w, &g)))
        goto fail;
    w->epoch_dir[0] = 0;   /* not ours to remove */
    become_producer(w);
    w->attach_gen++;
    fshm_writer_set_ticking(w, 1);   /* a re-attach (the first attach is enabled by fshm_writer_track) */
    return 0;
fail:
    drop_driver_attachment(w);
    fshm_lease_close(w->lease, 1);
    w->lease = NULL;
    return rc;
}

int fshm_writer_lease_ok(const fshm_writer *w)
{
    return !w->driver_mode || (w->lease && w->ctl && !fshm_writer_moved_on(w) &&
                               fshm_lease_state(w->lease, NULL) == FSHM_LEASE_ACTIVE);
}

/* Called before each loan: a lease the driver ended (or a driver that went away) means
 * the regions are no longer ours; attach again for a fresh epoch. */
static int check_lease(fshm_writer *w)
{
    if (!w->lease) {   /* lost earlier and not yet regained (e.g. driver restarting) */
        int rc = attach_via_driver(w);
        if (rc)
            return fshm_set_error(FSHM_E_LEASE, "stream %u has no lease: %s", w->lease_cfg.stream_id,
                                  fshm_last_error());
        return 0;
    }
    if (!fshm_writer_moved_on(w) && fshm_lease_state(w->lease, NULL) == FSHM_LEASE_ACTIVE)
        return 0;
    char why[200];
    snprintf(why, sizeof why, "%s", fshm_lease_state(w->lease, NULL) == FSHM_LEASE_ACTIVE
                                        ? "the driver moved the stream to a new epoch"
                                        : fshm_lease_message(w->lease));
    drop_driver_attachment(w);
    fshm_lease_close(w->lease, 0);
    w->lease = NULL;
    int rc = attach_via_driver(w);
    if (rc)
        return fshm_set_error(FSHM_E_LEASE, "stream %u: %s; re-attaching failed: %s",
                              w->lease_cfg.stream_id, why, fshm_last_error());
    return 0;
}

static int writer_open_driver(const fshm_writer_config *cfg, fshm_writer **out)
{
    fshm_writer *w = calloc(1, sizeof *w);
    if (!w)
        return fshm_set_error(-ENOMEM, "out of memory");
    w->ch.fd = -1;
    w->lock_fd = -1;
    uint32_t id = cfg->addr.stream_id;
    if (!id && cfg->addr.name)
        id = fshm_stream_id_for_name(cfg->addr.name);
    snprintf(w->driver_path, sizeof w->driver_path, "%s", cfg->driver);
    snprintf(w->base_dir, sizeof w->base_dir, "%s", cfg->addr.base_dir ? cfg->addr.base_dir : "");
    w->driver_mode = 1;
    w->lease_cfg.struct_size = sizeof w->lease_cfg;
    w->lease_cfg.socket_path = w->driver_path;
    w->lease_cfg.stream_id = id;
    w->lease_cfg.role = FSHM_ROLE_PRODUCER;
    w->lease_cfg.publish_mode = cfg->publish_mode;
    w->lease_cfg.client_id = cfg->client_id ? cfg->client_id : fshm_lease_new_client_id();
    int rc = attach_via_driver(w);
    if (rc) {
        free(w);
        return rc;
    }
    fshm_writer_track(w, 1);
    *out = w;
    return 0;
}

static int writer_open(const fshm_writer_config *cfg, fshm_writer **out);

int fshm_writer_open(const fshm_writer_config *user_cfg, fshm_writer **out)
{
    fshm_writer_config cfg;
    *out = NULL;
    int rc = fshm_config_copy(&cfg, sizeof cfg, user_cfg, offsetof(fshm_writer_config, publish_mode) + sizeof(int), "fshm_writer_config");
    if (rc)
        return rc;
    if (cfg.fill_threads > FSHM_MAX_FILL_THREADS)
        return fshm_set_error(-EINVAL, "fill_threads %u: at most %u threads fill a frame", cfg.fill_threads,
                              FSHM_MAX_FILL_THREADS);
    if ((rc = writer_open(&cfg, out)) == 0)
        (*out)->fill_threads = cfg.fill_threads;   /* used by publish only, never while opening */
    return rc;
}

static int writer_open(const fshm_writer_config *cfg, fshm_writer **out)
{
    *out = NULL;
    if (cfg->driver && *cfg->driver)
        return writer_open_driver(cfg, out);
    fshm_profile prof;
    int rc = fshm_profile_for_pools(cfg->nslots, cfg->npools, cfg->pool_bytes, cfg->file_mode, &prof);
    if (rc)
        return rc;

    fshm_writer *w = calloc(1, sizeof *w);
    if (!w)
        return fshm_set_error(-ENOMEM, "out of memory");
    w->ch.fd = -1;
    w->lock_fd = -1;
    rc = fshm_resolve(&cfg->addr, 1, &w->paths);
    if (rc)
        goto fail;
    for (int attempt = 0;; attempt++) {
        if (attempt > 0 && (rc = fshm_make_stream_dir(&w->paths)))   /* directories again */
            goto fail;
        if ((rc = fshm_ctl_open(&w->paths, 1, &w->ch))) {
            /* The last reader of an idle stream removed its directory under us. */
            if (rc == -ENOENT && attempt < 4)
                continue;
            goto fail;
        }
        w->ctl = w->ch.ctl;
        w->lock_fd = open(w->paths.ctl, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (w->lock_fd < 0) {
            int e = errno;
            fshm_ctl_close(&w->ch);
            w->ctl = NULL;
            if (e == ENOENT && attempt < 4)   /* removed between the two opens: start over */
                continue;
            rc = fshm_set_error(-e, "cannot open %s: %s", w->paths.ctl, strerror(e));
            goto fail;
        }
        int locked = flock(w->lock_fd, LOCK_EX | LOCK_NB) == 0;
        /* A dead producer's freshly fork()ed child holds the lock until its atfork
         * handler has run (see above): give it a moment rather than report "busy". */
        for (int i = 0; !locked && i < 50 && fshm_ctl_producer_state(w->ctl, NULL) != FSHM_PRODUCER_ALIVE; i++) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
            locked = flock(w->lock_fd, LOCK_EX | LOCK_NB) == 0;
        }
        if (!locked) {
            rc = fshm_set_error(-EBUSY, "stream '%s' already has a live producer (pid %llu)",
                                w->paths.name, (unsigned long long)w->ctl->producer_pid);
            goto fail;
        }
        /* The last reader of an idle stream may have removed it between our open and
         * our lock: then start over on a fresh control region. */
        struct stat lst;
        if (fstat(w->lock_fd, &lst) == 0 && (uint64_t)lst.st_dev == w->ch.dev &&
            (uint64_t)lst.st_ino == w->ch.ino && fshm_ctl_same_file(&w->ch, w->paths.ctl))
            break;
        fshm_ctl_close(&w->ch);
        close(w->lock_fd);
        w->lock_fd = -1;
        if (attempt == 4) {
            rc = fshm_set_error(-EAGAIN, "stream '%s' keeps being removed while opening",
                                w->paths.name);
            goto fail;
        }
    }
    if (LOAD_ACQ(&w->ctl->flags) & CTL_FLAG_DRIVER) {
        /* Spec §2.2: only the driver creates or removes this stream's files. */
        rc = fshm_set_error(-EBUSY, "stream '%s' is managed by a frameshm driver: attach through "
                            "the driver's socket", w->paths.name);
        goto fail;
    }
    /* We hold the producer lock, so any epoch directory left here is a dead producer's:
     * it goes before the new one takes its space. */
    fshm_new_epoch e;
    if ((rc = fshm_epoch_create(&w->paths, w->ctl, &prof, 0, 1, &e)))
        goto fail_ctl;
    snprintf(w->epoch_dir, sizeof w->epoch_dir, "%s", e.dir);
    if ((rc = map_grant(w, &e.grant)))
        goto fail_epoch;
    become_producer(w);
    fshm_epoch_publish(&w->paths, w->ctl, &e);
    fshm_writer_track(w, 1);
    *out = w;
    return 0;

fail_epoch:
    release_regions(w);
    fshm_remove_tree(w->epoch_dir);
fail_ctl:
    /* Lose nothing, leave nothing: a control region nobody ever produced into and
     * nobody waits on goes too. */
    if (LOAD_ACQ(&w->ctl->state) == CTL_STATE_NEVER && fshm_ctl_live_consumers(w->ctl) == 0 &&
        fshm_ctl_same_file(&w->ch, w->paths.ctl)) {
        unlink(w->paths.ctl);
        if (rmdir(w->paths.stream_dir) == 0)
            fshm_remove_empty_parents(&w->paths);
    }
fail:
    fshm_ctl_close(&w->ch);
    if (w->lock_fd >= 0)
        close(w->lock_fd);   /* drops the producer lock */
    free(w);
    return rc;
}

/* Whether a consumer with a doorbell is asleep (or about to sleep), and then lowers its
 * bell: the caller wakes it. Dekker's pattern with the consumer (fshm_reader_wait.c,
 * receive_rung): we store latest_seq, then load `sleeping`; it stores `sleeping`, then
 * loads latest_seq (a queueless consumer: the kernel does, in FUTEX_WAIT). With a full
 * fence on each side between the two (ours in commit_checked), at least one of us sees
 * the other's store: either we see it asleep and wake it, or it sees the new seq and does
 * not sleep. A consumer that keeps up never sleeps, so its frames cost neither side a
 * system call. Lowering the bell we answer matters in a burst: the commits that follow
 * while the woken consumer is still being scheduled would otherwise each wake it again,
 * for nobody. A corrupt `sleeping` only costs a spurious wake. Returns the bell's value
 * (BELL_*), 0 if it was not raised. */
static uint32_t bell_answered(uint32_t *sleeping)
{
    return LOAD_RLX(sleeping) ? __atomic_exchange_n(sleeping, 0, __ATOMIC_RELAXED) : 0;
}

/* Answers every raised bell: whether a FUTEX_WAKE is due (one wakes every futex sleeper,
 * queueless or queued), and which queued sleepers want a descriptor instead (`due`: they
 * sleep on their queue, as a queued reader does while bells_epoch is not ours yet). */
static int doorbell_rung(fshm_writer *w)
{
    int rung = 0;
    for (uint32_t k = 0; k < w->nbells; k++) {
        if (bell_answered(&ctl_consumer(w->ctl, w->bells[k])->sleeping))
            rung = 1;
    }
    for (uint32_t k = 0; k < w->nqbells; k++) {
        unsigned i = w->qbells[k];
        uint32_t v = bell_answered(&ctl_consumer(w->ctl, i)->sleeping);
        if (v == BELL_QUEUE && w->cons[i].open)
            w->cons[i].due = 1;
        else if (v)
            rung = 1;   /* a queue we cannot send to: a wake it may not be waiting for */
    }
    return rung;
}

/* After the full fence that follows latest_seq: answers every raised bell, then issues the
 * one FUTEX_WAKE the futex sleepers need, or that is due anyway (`wake`: queueless entries
 * without a doorbell are woken on every commit). The bells are answered even then: a
 * queued sleeper's BELL_QUEUE wants its descriptor, and a lowered bell spares the next
 * commit. */
static void wake_sleepers(fshm_writer *w, int wake)
{
    if (doorbell_rung(w) || wake) {
        fshm_futex_wake(&w->ctl->latest_seq);
        w->futex_wakes++;
    }
}

static void refresh_consumers(fshm_writer *w)
{
    uint32_t gen = LOAD_ACQ(&w->ctl->consumers_gen);
    if (gen == w->known_gen)
        return;
    w->known_gen = gen;
    w->wake_no_queue = 0;
    w->nbells = 0;
    w->nqueued = w->nqbells = 0;
    for (unsigned i = 0; i < FSHM_MAX_CONSUMERS; i++) {
        fshm_ctl_consumer *e = ctl_consumer(w->ctl, i);
        writer_consumer *lc = &w->cons[i];
        int active = LOAD_ACQ(&e->state) == CONS_ACTIVE;
        uint32_t fl = LOAD_RLX(&e->flags);
        if (active && (fl & CONS_FLAG_NO_QUEUE)) {
            if (fl & CONS_FLAG_DOORBELL)
                w->bells[w->nbells++] = (uint8_t)i;
            else
                w->wake_no_queue = 1;
        } else if (active && (fl & CONS_FLAG_DOORBELL)) {
            /* Even one whose queue we cannot open: its futex sleeps need no queue. */
            w->qbells[w->nqbells++] = (uint8_t)i;
        }
        char q[32];
        memcpy(q, e->queue, sizeof q);
        q[31] = 0;
        uint64_t pid = LOAD_RLX(&e->pid);
        if (lc->open && (!active || lc->pid != pid || strcmp(lc->queue, q) != 0)) {
            mq_close(lc->q);
            lc->open = 0;
        }
        /* Only the entry's own queue (named for its pid): the table is writable by every
         * consumer, and a forged entry must not point our descriptors at another's. */
        if (active && !lc->open && !strchr(q + 1, '/') && fshm_queue_named_for(q, pid)) {
            if (fshm_queue_open_send(q, &lc->q) == 0) {
                uint32_t hz = LOAD_RLX(&e->max_rate_hz);
                lc->open = 1;
                lc->pid = pid;
                lc->min_interval_ns = hz ? 1000000000ull / hz : 0;
                lc->next_send_ns = 0;
                lc->due = 0;
                memcpy(lc->queue, q, sizeof q);
            }
        }
        if (lc->open) {
            lc->bell = !!(fl & CONS_FLAG_DOORBELL);
            w->queued[w->nqueued++] = (uint8_t)i;
        }
    }
}

static void housekeeping(fshm_writer *w, uint64_t now)
{
    w->next_prune_ns = now + PRUNE_INTERVAL_NS;
    if (fshm_ctl_prune(w->ctl))
        refresh_consumers(w);
    fshm_writer_refresh_activity(w, now);
}

int fshm_writer_loan(fshm_writer *w, size_t nbytes, fshm_loan *out)
{
    if (w->driver_mode && !w->loan_active) {
        int rc = check_lease(w);
        if (rc)
            return rc;
    }
    unsigned p = 0;
    while (p < w->npools && w->pools[p].stride < nbytes)
        p++;
    if (p == w->npools) {
        ADD_RLX(&w->ctl->drops_nopool, 1);
        w->ref_plus1 = 0;   /* the tag belonged to the dropped frame */
        return fshm_set_error(FSHM_E_NOPOOL,
                              "frame of %zu bytes is larger than the largest payload pool (%u bytes): "
                              "dropped",
                              nbytes, w->pools[w->npools - 1].stride);
    }
    uint64_t seq = w->next_seq;
    uint32_t idx = (uint32_t)(seq & (w->nslots - 1));
    /* A re-loan abandons the previous one: its slot stays in progress (never readable)
     * and its seq is spent, keeping seqs monotonic. */
    if (w->loan_active)
        seq = ++w->next_seq, idx = (uint32_t)(seq & (w->nslots - 1));
    /* Where the fill is about to run, for consumers that spin (fshm_reader_wait.c,
     * on_producer_cpu). Stored only when it changed: the line stays shared with the
     * readers, and this costs a load (sched_getcpu reads the rseq area, no syscall). */
    int cpu = sched_getcpu();
    uint32_t cpu_plus1 = cpu >= 0 ? (uint32_t)cpu + 1 : 0;
    if (LOAD_RLX(&w->ctl->producer_cpu) != cpu_plus1)
        STORE_RLX(&w->ctl->producer_cpu, cpu_plus1);
    uint64_t *commit = slot_commit_word(w->ring->base, idx);
    STORE_RLX(commit, seq << 1);
    /* Orders the in-progress mark before every payload/header store that follows. */
    atomic_thread_fence(memory_order_release);
    writer_pool *pl = &w->pools[p];
    out->data = (uint8_t *)pl->map->base + FSHM_SUPERBLOCK_SIZE + (size_t)idx * pl->stride;
    out->seq = seq;
    out->capacity = pl->stride;
    out->pool_id = pl->id;
    out->pool_index = (uint16_t)p;
    out->slot = idx;
    w->loan = *out;
    w->loan_active = 1;
    return 0;
}

static int commit_checked(fshm_writer *w, const fshm_tensor *full, size_t nbytes, uint64_t timestamp_ns);

int fshm_writer_commit(fshm_writer *w, const fshm_tensor *t, size_t nbytes, uint64_t timestamp_ns)
{
    fshm_tensor full;
    int rc = 0;
    if (!w->loan_active)
        rc = fshm_set_error(-EINVAL, "commit without a loan");
    else if (nbytes > w->loan.capacity)
        rc = fshm_set_error(-EINVAL, "committing %zu bytes into a %u-byte slot", nbytes,
                            w->loan.capacity);
    else
        rc = fshm_tensor_check(t, nbytes, 1, &full);
    if (rc) {
        w->ref_plus1 = 0;
        return rc;
    }
    return commit_checked(w, &full, nbytes, timestamp_ns);
}

/* The commit of the active loan, its nbytes within the loan and its tensor checked and
 * completed (fshm_tensor_check with fill_strides). */
static int commit_checked(fshm_writer *w, const fshm_tensor *full, size_t nbytes, uint64_t timestamp_ns)
{
    uint64_t now = fshm_now_ns();
    uint64_t seq = w->loan.seq;
    if (fshm_writer_moved_on(w)) {
        /* Our lease ended while the frame was being written (e.g. we were stopped past
         * expiry): the stream belongs to another epoch now, whose counters we must not
         * touch. The frame is dropped like any frame nobody reads; the next loan
         * re-attaches (and reports if it cannot). */
        w->loan_active = 0;
        w->ref_plus1 = 0;
        return 0;
    }
    uint8_t *slot = (uint8_t *)w->ring->base + FSHM_SUPERBLOCK_SIZE + (size_t)w->loan.slot * FSHM_SLOT_BYTES;
    fshm_slot_header_write(slot, (uint32_t)nbytes, w->loan.slot, w->loan.pool_id,
                           timestamp_ns ? timestamp_ns : now, full);
    st64(slot + SH_HEADER + 8 + TH_REF_SEQ, w->ref_plus1);
    /* The commit time travels with the frame, so a reader that takes it from the ring
     * by seq (without a descriptor) knows it too. */
    st64(slot + SH_HEADER + 8 + TH_PUBLISH_NS, now);
    w->ref_plus1 = 0;
    STORE_REL((uint64_t *)slot, (seq << 1) | 1);
    w->loan_active = 0;
    w->next_seq = seq + 1;
    fshm_ctl *c = w->ctl;
    STORE_RLX(&c->activity_ns, now);   /* before latest_seq: readers pair the two */
    STORE_REL(&c->latest_seq, seq + 1);
    STORE_RLX(&c->frames, LOAD_RLX(&c->frames) + 1);
    refresh_consumers(w);   /* one load unless the table changed: a new sleeper gets its wake */
    /* Our half of every doorbell (bell_answered): latest_seq above, `sleeping` below. */
    if (w->nbells || w->nqbells)
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    wake_sleepers(w, w->wake_no_queue);

    if (now >= w->next_prune_ns) {
        housekeeping(w, now);
        refresh_consumers(w);
        /* A doorbell consumer the refresh found was not among those answered above. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        wake_sleepers(w, 0);
    }
    uint8_t msg[FSHM_DESC_BYTES];
    fshm_desc_encode(msg, w->paths.stream_id, w->epoch, seq, now);
    uint64_t sent = 0, dropped = 0;
    for (unsigned k = 0; k < w->nqueued; k++) {
        unsigned i = w->queued[k];
        writer_consumer *lc = &w->cons[i];
        if (!lc->open)   /* its queue failed earlier in this generation */
            continue;
        fshm_ctl_consumer *e = ctl_consumer(c, i);
        if (lc->bell) {
            /* It takes its frames from the ring: a descriptor only wakes it from a sleep
             * on its queue. */
            if (!lc->due)
                continue;
            lc->due = 0;
        } else if (lc->min_interval_ns) {
            if (now < lc->next_send_ns)
                continue;   /* rate-limited consumer (spec's max_rate_hz): not its turn */
            /* 10% slack so a request that divides the frame rate is met exactly rather
             * than beating against the frame period. */
            lc->next_send_ns = now + lc->min_interval_ns - lc->min_interval_ns / 10;
        }
        if (mq_send(lc->q, (const char *)msg, sizeof msg, 0) == 0) {
            STORE_RLX(&e->delivered, LOAD_RLX(&e->delivered) + 1);
            sent++;
        } else if (errno == EAGAIN) {
            /* Full queue: a slow or stopped consumer. Count it, never wait. */
            STORE_RLX(&e->queue_full, LOAD_RLX(&e->queue_full) + 1);
            dropped++;
        } else {
            mq_close(lc->q);
            lc->open = 0;
        }
    }
    if (sent)
        STORE_RLX(&c->desc_sent, LOAD_RLX(&c->desc_sent) + sent);
    if (dropped)
        STORE_RLX(&c->desc_dropped, LOAD_RLX(&c->desc_dropped) + dropped);
    return 0;
}

int fshm_writer_publish(fshm_writer *w, const void *src, size_t nbytes, const fshm_tensor *t,
                        uint64_t timestamp_ns)
{
    fshm_loan l;
    fshm_tensor full;
    /* Checked before the loan, so that bad input costs no slot, and only then. */
    int rc = fshm_tensor_check(t, nbytes, 1, &full);
    if (rc) {
        w->ref_plus1 = 0;
        return rc;
    }
    if ((rc = fshm_writer_loan(w, nbytes, &l)))
        return rc;
    if (nbytes < FSHM_FILL_TEAM_MIN) {
        memcpy(l.data, src, nbytes);
        return commit_checked(w, &full, nbytes, timestamp_ns);
    }
    if (w->fill_threads > 1 && !w->fill && !w->fill_failed && fshm_fill_team_start(w->fill_threads, &w->fill))
        w->fill_failed = 1;   /* no threads to be had: fill alone, and do not ask every frame */
    if (w->fill)
        fshm_fill_copy(w->fill, l.data, src, nbytes);
    else if (fshm_fill_ring_warm((size_t)w->nslots * l.capacity))
        memcpy(l.data, src, nbytes);
    else
        fshm_fill_stream(l.data, src, nbytes);
    return commit_checked(w, &full, nbytes, timestamp_ns);
}

void fshm_writer_set_ref(fshm_writer *w, uint64_t ref_seq) { w->ref_plus1 = ref_seq + 1; }

int fshm_writer_skip_to(fshm_writer *w, uint64_t seq)
{
    if (w->loan_active)
        return fshm_set_error(-EINVAL, "skip_to with a loan outstanding: commit it first");
    if (seq < w->next_seq)
        return fshm_set_error(-EINVAL, "skip_to %llu: sequence numbers only go forward (next is %llu)",
                              (unsigned long long)seq, (unsigned long long)w->next_seq);
    /* Only the writer's counter moves: a slot is claimed (marked in progress) by the loan
     * of the frame that gets this seq, so readers never see a number without its frame. */
    w->next_seq = seq;
    return 0;
}

void fshm_writer_heartbeat(fshm_writer *w)
{
    /* A driver-mode writer whose lease ended must not vouch for its successor. */
    if (!w->ctl || fshm_writer_moved_on(w))
        return;
    uint64_t now = fshm_now_ns();
    STORE_RLX(&w->ctl->activity_ns, now);
    if (now >= w->next_prune_ns)
        housekeeping(w, now);
}

static int control_byte(const fshm_writer *w, unsigned index, uint8_t **out)
{
    if (index >= FSHM_CONTROL_BYTES)
        return fshm_set_error(-EINVAL, "control byte %u does not exist (0..%d)", index,
                              FSHM_CONTROL_BYTES - 1);
    if (!w->ctl)
        return fshm_set_error(FSHM_E_LEASE, "stream %u: the writer holds no control region until "
                              "it attaches through the driver again", w->lease_cfg.stream_id);
    *out = &w->ctl->control[index];
    return 0;
}
int fshm_writer_control(const fshm_writer *w, unsigned index)
{
    uint8_t *b = NULL;
    int rc = control_byte(w, index, &b);
    return rc ? rc : LOAD_ACQ(b);
}
int fshm_writer_set_control(fshm_writer *w, unsigned index, uint8_t value)
{
    uint8_t *b = NULL;
    int rc = control_byte(w, index, &b);
    if (!rc)
        STORE_REL(b, value);
    return rc;
}
uint64_t fshm_writer_epoch(const fshm_writer *w) { return w->epoch; }
uint32_t fshm_writer_stream_id(const fshm_writer *w) { return w->paths.stream_id; }
uint32_t fshm_writer_nslots(const fshm_writer *w) { return w->nslots; }
uint32_t fshm_writer_npools(const fshm_writer *w) { return w->npools; }
uint64_t fshm_writer_next_seq(const fshm_writer *w) { return w->next_seq; }
uint32_t fshm_writer_attach_gen(const fshm_writer *w) { return w->attach_gen; }
uint64_t fshm_writer_lease_id(const fshm_writer *w) { return w->lease ? fshm_lease_id(w->lease) : 0; }

void *fshm_writer_pool_base(const fshm_writer *w, unsigned i, size_t *len, uint32_t *stride,
                            uint16_t *pool_id)
{
    if (i >= w->npools)
        return NULL;
    if (len)
        *len = w->pools[i].map->size;
    if (stride)
        *stride = w->pools[i].stride;
    if (pool_id)
        *pool_id = w->pools[i].id;
    return w->pools[i].map->base;
}

fshm_map *fshm_writer_pool_map(const fshm_writer *w, unsigned i)
{
    return i < w->npools ? w->pools[i].map : NULL;
}

void fshm_writer_close(fshm_writer *w, int unlink_files)
{
    if (!w)
        return;
    fshm_writer_track(w, 0);
    fshm_fill_team_stop(w->fill);
    if (w->driver_mode) {
        /* The driver owns the files: mark the stream closed, then detach so it moves the
         * stream to a new epoch; never unlink anything. */
        if (w->ctl)
            STORE_REL(&w->ctl->state, (uint8_t)CTL_STATE_CLOSED);
        drop_driver_attachment(w);
        fshm_lease_close(w->lease, 1);
        free(w);
        return;
    }
    fshm_ctl *c = w->ctl;
    STORE_REL(&c->state, (uint8_t)CTL_STATE_CLOSED);
    for (unsigned i = 0; i < FSHM_MAX_CONSUMERS; i++)
        if (w->cons[i].open)
            mq_close(w->cons[i].q);
    release_regions(w);
    if (unlink_files) {
        fshm_ctl_prune(c);
        fshm_remove_tree(w->epoch_dir);
        /* Live consumers keep the control region: it holds their registration and is
         * where they will see the next producer. The last one out removes it. */
        if (fshm_ctl_live_consumers(c) == 0 && fshm_ctl_same_file(&w->ch, w->paths.ctl)) {
            unlink(w->paths.ctl);
            if (rmdir(w->paths.stream_dir) == 0)
                fshm_remove_empty_parents(&w->paths);
        }
    }
    fshm_ctl_close(&w->ch);
    if (w->lock_fd >= 0)
        close(w->lock_fd);
    free(w);
}
