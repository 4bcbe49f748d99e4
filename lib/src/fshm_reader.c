/* The consumer side of a stream: registration, descriptor queue, epoch remapping and
 * the seqlock read (spec §8.3 consumer steps, §15.21 validation rules). The waits are in
 * fshm_reader_wait.c. */
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fshm_reader_impl.h"

#define ENV_CHECK_NS 100000000ull      /* re-stat control file / epoch at most this often */

void fshm_reader_unmap(fshm_reader *r)
{
    for (unsigned i = 0; i < r->npools; i++)
        fshm_map_unref(r->pools[i].map);
    if (r->ring)
        fshm_map_unref(r->ring);
    r->ring = NULL;
    r->npools = 0;
    r->epoch = 0;
}


/* Maps the regions of the control region's current epoch (spec §15.21 M0 → M1). */
/* Driver model: the epoch our lease granted must be mapped as granted. The regions come
 * from the control region's announce (which follows later epochs too); a driver whose
 * grant and announce disagree (another slot count, pool or URI, e.g. hugepage-backed) is
 * not followed half-way. */
static int grant_mismatch(const fshm_reader *r, const fshm_announce *a)
{
    const fshm_grant *g = &r->grant;
    if (!r->driver_mode || !r->lease || g->epoch != a->epoch)
        return 0;
    const char *what = NULL;
    if (g->header_nslots != a->header_nslots)
        what = "header slot count";
    else if (g->npools != a->npools)
        what = "pool count";
    else if (strncmp(g->header_uri, a->header_uri, sizeof a->header_uri) != 0)
        what = "header ring URI";
    for (unsigned i = 0; !what && i < g->npools; i++) {
        const fshm_grant_pool *gp = &g->pools[i];
        unsigned j = 0;
        while (j < a->npools && a->pools[j].pool_id != gp->pool_id)
            j++;
        if (j == a->npools)
            what = "pool ids";
        else if (a->pools[j].stride_bytes != gp->stride_bytes || a->pools[j].nslots != gp->nslots)
            what = "pool stride or slot count";
        else if (strncmp(a->pools[j].uri, gp->uri, sizeof a->pools[j].uri) != 0)
            what = "pool URI";
    }
    if (!what)
        return 0;
    return fshm_set_error(FSHM_E_CORRUPT, "stream %u epoch %llu: the driver's grant and the "
                          "stream's announce differ in the %s (grant: %u slots, %u pools, %s)",
                          g->stream_id, (unsigned long long)g->epoch, what, g->header_nslots,
                          g->npools, g->header_uri);
}

static int lease_attach(fshm_reader *r);

/* Sealed transport: the regions of epoch e come only as descriptors with a lease that
 * grants e. Ours may name an older epoch (the driver moved on) or have handed them over
 * already (mapped, then dropped with a replaced control region): attach anew. */
static int sealed_lease_for(fshm_reader *r, uint64_t e)
{
    if (r->lease && r->grant.epoch >= e && fshm_lease_nfds(r->lease) > 1 &&
        fshm_lease_has_fd(r->lease, 1))
        return 0;
    if (r->lease)
        fshm_lease_close(r->lease, 1);
    r->lease = NULL;
    if (lease_attach(r)) {
        r->next_lease_try_ns = fshm_now_ns() + LEASE_RETRY_NS;
        return -EAGAIN;   /* lease_check retries */
    }
    if (r->grant.epoch < e || !r->sealed)
        return fshm_set_error(-EAGAIN, "stream %u: the driver granted epoch %llu after "
                              "announcing %llu", r->grant.stream_id,
                              (unsigned long long)r->grant.epoch, (unsigned long long)e);
    return 0;
}

/* Sealed: the epoch and its regions are what the driver granted (the announce is built
 * from the grant, the control region's copy is not read). */
static void announce_from_grant(const fshm_grant *g, fshm_announce *a)
{
    memset(a, 0, sizeof *a);
    a->epoch = g->epoch;
    a->header_nslots = g->header_nslots;
    a->npools = g->npools;
    snprintf(a->header_uri, sizeof a->header_uri, "%s", g->header_uri);
    for (unsigned i = 0; i < g->npools && i < FSHM_MAX_POOLS; i++) {
        a->pools[i].pool_id = g->pools[i].pool_id;
        a->pools[i].nslots = g->pools[i].nslots;
        a->pools[i].stride_bytes = g->pools[i].stride_bytes;
        snprintf(a->pools[i].uri, sizeof a->pools[i].uri, "%s", g->pools[i].uri);
    }
}

/* A region of the announce being mapped: sealed, the lease's descriptor (ring 1, the
 * grant's pool i at 2 + i; the announce is then the grant's own), else the URI's file. */
static int map_region(fshm_reader *r, const char *uri, int fd_index, uint64_t size, fshm_map **out)
{
    if (!r->sealed)
        return fshm_uri_map(uri, r->paths.base, 0, out);
    int fd = fshm_lease_take_fd(r->lease, (unsigned)fd_index);
    int rc = fd_index < 0 || size > SIZE_MAX
                 ? fshm_set_error(FSHM_E_CORRUPT, "the driver's grant lacks region %s", uri)
                 : fshm_sealed_map(fd, (size_t)size, 0, "region", out);
    if (fd >= 0)
        close(fd);   /* the mapping keeps the memory */
    return rc;
}

static int grant_pool_index(const fshm_grant *g, uint16_t pool_id)
{
    for (unsigned i = 0; i < g->npools; i++)
        if (g->pools[i].pool_id == pool_id)
            return 2 + (int)i;
    return -1;
}

static int sync_epoch(fshm_reader *r)
{
    fshm_announce a;
    int rc;
    if (r->sealed) {
        /* The driver's word, never the control region's: any consumer can write that,
         * and must not make the others remap or re-attach. */
        if (!r->lease)
            return 0;   /* lease_check attaches again */
        uint64_t e = fshm_lease_announced_epoch(r->lease);
        if (e < r->grant.epoch)
            e = r->grant.epoch;
        if (e == r->epoch || e == 0)
            return 0;
        if ((rc = sealed_lease_for(r, e)))
            return rc;
        if (r->grant.epoch == r->epoch)
            return 0;
        announce_from_grant(&r->grant, &a);
    } else {
        uint64_t e = LOAD_ACQ(&r->ctl->epoch);
        if (e == r->epoch || e == 0)
            return 0;
        if ((rc = fshm_ctl_read_announce(r->ctl, &a)))
            return rc;
        if (a.epoch != e)
            return fshm_set_error(-EAGAIN, "announce for epoch %llu not written yet",
                                  (unsigned long long)e);
        if ((rc = grant_mismatch(r, &a)))
            return rc;
    }
    uint64_t e = a.epoch;
    fshm_map *ring = NULL;
    reader_pool pools[FSHM_MAX_POOLS];
    memset(pools, 0, sizeof pools);
    unsigned np = 0;
    if ((rc = map_region(r, a.header_uri, 1, FSHM_SUPERBLOCK_SIZE +
                         (uint64_t)a.header_nslots * FSHM_SLOT_BYTES, &ring)))
        goto fail;
    if ((rc = fshm_superblock_check(ring->base, ring->size, e, r->paths.stream_id,
                                    FSHM_REGION_HEADER_RING, 0, a.header_nslots, FSHM_SLOT_BYTES,
                                    FSHM_SLOT_BYTES)))
        goto fail;
    for (; np < a.npools; np++) {
        if ((rc = map_region(r, a.pools[np].uri, grant_pool_index(&r->grant, a.pools[np].pool_id),
                             FSHM_SUPERBLOCK_SIZE + (uint64_t)a.header_nslots * a.pools[np].stride_bytes,
                             &pools[np].map)))
            goto fail;
        pools[np].stride = a.pools[np].stride_bytes;
        pools[np].id = a.pools[np].pool_id;
        if ((rc = fshm_superblock_check(pools[np].map->base, pools[np].map->size, e,
                                        r->paths.stream_id, FSHM_REGION_PAYLOAD_POOL, pools[np].id,
                                        a.header_nslots, pools[np].stride, pools[np].stride))) {
            np++;
            goto fail;
        }
    }
    /* Old mappings go only now: frames handed out earlier hold their own references. */
    fshm_reader_unmap(r);
    r->ring = ring;
    r->nslots = a.header_nslots;
    r->npools = np;
    memcpy(r->pools, pools, sizeof pools);
    r->epoch = e;
    return 0;
fail:
    for (unsigned i = 0; i < np; i++)
        if (pools[i].map)
            fshm_map_unref(pools[i].map);
    if (ring)
        fshm_map_unref(ring);
    return rc;
}

/* Sealed transport: the newest lease's control region, unless it is the one we map. */
static int ctl_current(fshm_reader *r)
{
    if (!r->sealed)
        return fshm_ctl_same_file(&r->ch, r->paths.ctl);
    if (r->new_ctl_fd < 0)
        return 1;
    struct stat st;
    if (r->ch.map && fstat(r->new_ctl_fd, &st) == 0 && (uint64_t)st.st_dev == r->ch.dev &&
        (uint64_t)st.st_ino == r->ch.ino) {
        close(r->new_ctl_fd);
        r->new_ctl_fd = -1;
        return 1;
    }
    return 0;
}

/* Opens the control region: by path, or (sealed) the newest lease's descriptor. */
static int open_ctl(fshm_reader *r, fshm_ctl_handle *h)
{
    if (!r->sealed)
        /* Under a driver only the driver creates files (spec §2.3). */
        return fshm_ctl_open(&r->paths, !r->driver_mode, h);
    /* Read-only for consumers since the driver writes their entries (a read-write one
     * from an older driver is mapped read-write, and used as before). */
    int rc = fshm_sealed_check(r->new_ctl_fd, FSHM_CTL_BYTES, 0, "control region");
    if (!rc && !(rc = fshm_ctl_map_fd(r->new_ctl_fd, &r->paths, h)))
        r->new_ctl_fd = -1;   /* the handle owns it */
    return rc;
}

/* Sealed transport, read-only control region: the driver writes our entry for us (from
 * our socket's SO_PEERCRED and the lease) and frees it when the lease ends, so no consumer
 * can write another's. Our queue is created first (kept across re-registrations): a kill
 * before the driver names it leaves a queue named for a dead pid, which `frameshm gc`
 * removes; after, the driver frees the entry when our socket closes. */
static int sealed_register(fshm_reader *r)
{
    r->entry = -1;
    if (!r->no_queue && r->q == (mqd_t)-1) {
        int rc = fshm_queue_create(r->queue, &r->q, NULL);
        if (fshm_queue_unavailable(rc)) {
            memset(r->queue, 0, sizeof r->queue);
            r->no_queue = 1;
        } else if (rc) {
            return rc;
        }
    }
    if (!r->lease)
        return -EAGAIN;
    int idx = fshm_lease_register_consumer(r->lease, r->consumer, r->queue,
                                           r->no_queue ? CONS_FLAG_NO_QUEUE : 0, r->max_rate_hz);
    if (idx < 0) {
        /* Ask again in a second, not on every environment check: a refusal (the table
         * or our user's share full) is logged by the driver each time. */
        r->next_register_ns = fshm_now_ns() + 1000000000ull;
        return idx;
    }
    if (idx >= FSHM_MAX_CONSUMERS)
        return fshm_set_error(FSHM_E_CORRUPT, "the driver registered us at entry %d", idx);
    r->entry = idx;
    return 0;
}

static int attach_ctl(fshm_reader *r)
{
    int rc = open_ctl(r, &r->ch);
    if (rc)
        return rc;
    r->ctl = r->ch.ctl;
    int ro = fshm_reader_ctl_ro(r);
    if (!ro)
        fshm_ctl_prune(r->ctl);   /* read-only: the driver frees what its leases held */
    r->start_seq = LOAD_ACQ(&r->ctl->latest_seq);
    if (r->passive)
        return 0;
    if (ro) {
        if ((rc = sealed_register(r)))
            goto fail;
        return 0;
    }
    /* Slot first, then the queue it names (see fshm_ctl_claim): a kill anywhere in here
     * leaves a slot whose owner is dead, which pruning empties along with its queue. */
    int idx = fshm_ctl_claim(r->ctl, r->consumer, r->max_rate_hz);
    if (idx < 0) {
        rc = idx;
        goto fail;
    }
    char *field = fshm_ctl_queue_field(r->ctl, idx);
    rc = r->no_queue ? 0 : fshm_queue_create(r->queue, &r->q, field);
    if (r->no_queue) {
        memset(field, 0, 32);
    } else if (fshm_queue_unavailable(rc)) {
        /* The system's queue limit (or this user's) is reached, maybe by someone else:
         * go on without a queue rather than fail (waits watch latest_seq instead). */
        memset(field, 0, 32);
        memset(r->queue, 0, sizeof r->queue);
        r->no_queue = 1;
        rc = 0;
    }
    if (rc || (rc = fshm_ctl_activate(r->ctl, idx, r->no_queue, r->max_rate_hz))) {
        fshm_ctl_release(r->ctl, idx, field, 1);
        goto fail;
    }
    r->entry = idx;
    return 0;
fail:
    if (r->q != (mqd_t)-1) {
        mq_close(r->q);
        mq_unlink(r->queue);
        r->q = (mqd_t)-1;
    }
    fshm_ctl_close(&r->ch);
    r->ctl = NULL;
    return rc;
}

/* Driver model: attach a consumer lease and learn where the driver keeps the stream. */
static int lease_attach(fshm_reader *r)
{
    fshm_grant g;
    int rc = fshm_lease_attach(&r->lease_cfg, &r->lease, &g);
    if (rc)
        return rc;
    fshm_paths p;
    int sealed = fshm_lease_nfds(r->lease) > 0;
    if ((rc = fshm_paths_from_grant(r->base_dir, &g, sealed, &p))) {
        fshm_lease_close(r->lease, 1);
        r->lease = NULL;
        return rc;
    }
    r->sealed = sealed;
    if (sealed) {
        if (r->new_ctl_fd >= 0)
            close(r->new_ctl_fd);
        r->new_ctl_fd = fshm_lease_take_fd(r->lease, 0);
    }
    /* If the driver now keeps the stream elsewhere (restarted with another layout),
     * the forced environment check moves us to the new control region. */
    r->paths = p;
    r->grant = g;
    r->lease_reported = 0;
    r->next_check_ns = 0;
    /* Read-only control region: our entry went with the lease the driver replaced; in the
     * same region, register again at once (no frames missed while an epoch turns over).
     * A new region is registered with when it is mapped (fshm_reader_check_environment). */
    if (fshm_reader_ctl_ro(r) && !r->passive) {
        r->entry = -1;
        if (ctl_current(r))
            sealed_register(r);   /* on failure, the next environment check retries */
    }
    return 0;
}

/* Spec §4.7/§4.9: once our lease ends we stop using every region it covered (fail
 * closed) and attach again. Returns 0 with r->lease set, FSHM_E_LEASE to report, or
 * -EAGAIN while the driver cannot be reached. */
static int lease_check(fshm_reader *r)
{
    if (r->lease && fshm_lease_state(r->lease, NULL) == FSHM_LEASE_ACTIVE)
        return 0;
    if (r->lease) {
        char why[200];
        snprintf(why, sizeof why, "%s", fshm_lease_message(r->lease));
        fshm_lease_close(r->lease, 0);
        r->lease = NULL;
        if (fshm_reader_ctl_ro(r))
            r->entry = -1;   /* the driver frees the entries of ended leases */
        fshm_reader_unmap(r);
        r->last_arrival_ns = r->interval_ns = 0;
        r->next_lease_try_ns = 0;
        if (r->lease_events && !r->lease_reported) {
            r->lease_reported = 1;
            return fshm_set_error(FSHM_E_LEASE, "stream %u: %s", r->lease_cfg.stream_id, why);
        }
    }
    uint64_t now = fshm_now_ns();
    if (now < r->next_lease_try_ns)
        return -EAGAIN;
    r->next_lease_try_ns = now + LEASE_RETRY_NS;
    return lease_attach(r) ? -EAGAIN : 0;
}

/* Notices a replaced control region (the stream was removed and created anew) or
 * a lost registration, and follows the producer's epoch. */
int fshm_reader_check_environment(fshm_reader *r, int force)
{
    return fshm_reader_check_environment_at(r, force, 0);
}

int fshm_reader_check_environment_at(fshm_reader *r, int force, uint64_t now)
{
    if (r->driver_mode) {
        int rc = lease_check(r);
        if (rc == -EAGAIN)
            return 0;   /* nothing mapped: waits time out, nothing stale is read */
        if (rc)
            return rc;
    }
    if (!now)
        now = fshm_now_ns();
    if (!force && now < r->next_check_ns)
        return sync_epoch(r);
    r->next_check_ns = now + ENV_CHECK_NS;
    int ours = 1;
    if (!r->passive) {
        fshm_ctl_consumer *e = r->entry >= 0 ? ctl_consumer(r->ctl, (unsigned)r->entry) : NULL;
        ours = e && LOAD_ACQ(&e->state) == CONS_ACTIVE && LOAD_RLX(&e->pid) == (uint64_t)getpid() &&
               strncmp(e->queue, r->queue, sizeof e->queue) == 0;
    }
    if (!ctl_current(r) && r->sealed && fshm_reader_ctl_ro(r)) {
        /* A new read-only control region (the driver restarted): the driver registers
         * us in it through the lease that brought it; the old entry went with the old
         * lease. */
        fshm_ctl_handle nh;
        int rc = open_ctl(r, &nh);
        if (rc)
            return rc;
        fshm_ctl_close(&r->ch);
        fshm_reader_unmap(r);
        r->ch = nh;
        r->ctl = nh.ctl;
        r->entry = -1;
        r->last_plus1 = 0;
        r->start_seq = LOAD_ACQ(&nh.ctl->latest_seq);
        r->last_arrival_ns = r->interval_ns = 0;
        r->attach_gen++;
        ours = r->passive;
    }
    if (fshm_reader_ctl_ro(r)) {
        int rc = !ours && now >= r->next_register_ns ? sealed_register(r) : 0;
        return rc && rc != -EAGAIN ? rc : sync_epoch(r);
    }
    if (!ctl_current(r)) {
        fshm_ctl_handle nh;
        int rc = open_ctl(r, &nh);
        if (rc)
            return rc;   /* keep the old mapping: r->ctl stays valid */
        fshm_ctl_prune(nh.ctl);
        int idx = r->passive ? -1 : fshm_ctl_register(nh.ctl, r->consumer, r->queue, r->max_rate_hz,
                                                      r->no_queue);
        if (idx < 0 && !r->passive) {
            fshm_ctl_close(&nh);
            return idx;
        }
        if (ours && !r->passive)
            fshm_ctl_release(r->ctl, r->entry, r->queue, 0);   /* the new slot names the queue */
        fshm_ctl_close(&r->ch);
        fshm_reader_unmap(r);
        r->ch = nh;
        r->ctl = nh.ctl;
        r->entry = idx;
        r->last_plus1 = 0;   /* a new control region: seqs start over */
        r->start_seq = LOAD_ACQ(&nh.ctl->latest_seq);
        r->last_arrival_ns = r->interval_ns = 0;
        r->attach_gen++;
    } else if (!ours) {
        int rc = fshm_ctl_register(r->ctl, r->consumer, r->queue, r->max_rate_hz, r->no_queue);
        if (rc < 0)
            return rc;
        r->entry = rc;
    }
    return sync_epoch(r);
}

static int reader_open(const fshm_reader_config *cfg, fshm_reader **out);

int fshm_reader_open(const fshm_reader_config *user_cfg, fshm_reader **out)
{
    fshm_reader_config cfg;
    *out = NULL;
    int rc = fshm_config_copy(&cfg, sizeof cfg, user_cfg, offsetof(fshm_reader_config, lease_events) + sizeof(int), "fshm_reader_config");
    return rc ? rc : reader_open(&cfg, out);
}

static int reader_open(const fshm_reader_config *cfg, fshm_reader **out)
{
    *out = NULL;
    fshm_reader *r = calloc(1, sizeof *r);
    if (!r)
        return fshm_set_error(-ENOMEM, "out of memory");
    r->ch.fd = -1;
    r->new_ctl_fd = -1;
    r->q = (mqd_t)-1;
    r->entry = -1;
    int rc;
    if (cfg->consumer) {
        if ((rc = fshm_validate_name(cfg->consumer, "consumer")))
            goto fail;
        if (strlen(cfg->consumer) > FSHM_CONSUMER_NAME_MAX) {
            rc = fshm_set_error(-EINVAL, "consumer name '%s' is longer than %d characters",
                                cfg->consumer, FSHM_CONSUMER_NAME_MAX);
            goto fail;
        }
        snprintf(r->consumer, sizeof r->consumer, "%s", cfg->consumer);
    } else {
        snprintf(r->consumer, sizeof r->consumer, "pid-%d", (int)getpid());
    }
    r->passive = cfg->passive;
    r->no_queue = cfg->no_queue && !cfg->passive;   /* asked for; else set if none is left */
    r->max_rate_hz = cfg->max_rate_hz;
    if (cfg->foreign) {
        if (cfg->driver && *cfg->driver) {
            rc = fshm_set_error(-EINVAL, "a foreign stream is read without a driver");
            goto fail;
        }
        r->foreign = 1;
        r->passive = 1;   /* nobody to register with, nobody sending descriptors */
        if ((rc = fshm_resolve(&cfg->addr, 0, &r->paths)) || (rc = fshm_foreign_open(r)))
            goto fail;
        *out = r;
        return 0;
    }
    if (cfg->driver && *cfg->driver) {
        r->driver_mode = 1;
        r->lease_events = cfg->lease_events;
        snprintf(r->driver_path, sizeof r->driver_path, "%s", cfg->driver);
        snprintf(r->base_dir, sizeof r->base_dir, "%s", cfg->addr.base_dir ? cfg->addr.base_dir : "");
        r->lease_cfg.struct_size = sizeof r->lease_cfg;
        r->lease_cfg.socket_path = r->driver_path;
        r->lease_cfg.stream_id = cfg->addr.stream_id ? cfg->addr.stream_id
                                 : cfg->addr.name ? fshm_stream_id_for_name(cfg->addr.name) : 0;
        r->lease_cfg.role = FSHM_ROLE_CONSUMER;
        r->lease_cfg.publish_mode = cfg->publish_mode;
        r->lease_cfg.client_id = cfg->client_id ? cfg->client_id : fshm_lease_new_client_id();
        if ((rc = lease_attach(r)))
            goto fail;
    } else if ((rc = fshm_resolve(&cfg->addr, 1, &r->paths))) {
        goto fail;
    }
    if ((rc = attach_ctl(r)))
        goto fail;
    r->next_check_ns = fshm_now_ns() + ENV_CHECK_NS;
    r->spin = cfg->spin;
    rc = sync_epoch(r);
    if (rc == FSHM_E_CORRUPT)
        goto fail;
    /* Any other mapping failure (a dead producer's files gone, announce in flux) only
     * means there is nothing to read yet; the wait loop retries. */
    *out = r;
    return 0;
fail:
    if (!r->ctl && !r->foreign && r->paths.stream_dir[0] && !r->driver_mode &&
        rmdir(r->paths.stream_dir) == 0)
        fshm_remove_empty_parents(&r->paths);   /* only if we left it empty */
    fshm_reader_close(r);
    return rc;
}

int fshm_reader_read_frame(fshm_reader *r, uint64_t seq, fshm_frame *f)
{
    if (!r->epoch)
        return -EAGAIN;
    uint32_t idx = (uint32_t)(seq & (r->nslots - 1));
    uint8_t *slot = (uint8_t *)r->ring->base + FSHM_SUPERBLOCK_SIZE + (size_t)idx * FSHM_SLOT_BYTES;
    uint64_t want = (seq << 1) | 1;
    uint64_t c1 = LOAD_ACQ((uint64_t *)slot);
    if (c1 != want)
        return -EAGAIN;
    uint8_t copy[FSHM_SLOT_BYTES];
    memcpy(copy, slot, sizeof copy);
    atomic_thread_fence(memory_order_acquire);
    if (LOAD_RLX((uint64_t *)slot) != c1)
        return -EAGAIN;
    fshm_slot_view v;
    int rc = fshm_slot_header_decode(copy, &v);
    if (rc)
        return rc;
    if (v.payload_slot != idx)
        return fshm_set_error(FSHM_E_CORRUPT, "slot %u: payload_slot %u must equal the slot index",
                              idx, v.payload_slot);
    reader_pool *pl = NULL;
    for (unsigned i = 0; i < r->npools; i++)
        if (r->pools[i].id == v.pool_id)
            pl = &r->pools[i];
    if (!pl)
        return fshm_set_error(FSHM_E_CORRUPT, "slot %u: pool_id %u was never announced", idx,
                              v.pool_id);
    if (v.values_len > pl->stride)
        return fshm_set_error(FSHM_E_CORRUPT, "slot %u: values_len_bytes %u exceeds pool stride %u",
                              idx, v.values_len, pl->stride);
    f->seq = seq;
    f->epoch = r->epoch;
    f->timestamp_ns = v.timestamp_ns;
    f->data = (uint8_t *)pl->map->base + FSHM_SUPERBLOCK_SIZE + (size_t)idx * pl->stride;
    f->nbytes = v.values_len;
    f->tensor = v.tensor;
    f->map = pl->map;
    f->slot = idx;
    f->pool_id = pl->id;
    uint64_t ref = ld64(copy + SH_HEADER + 8 + TH_REF_SEQ);
    f->has_ref = ref != 0;
    f->ref_seq = ref ? ref - 1 : 0;
    /* Informational only (0 from a producer that does not write it). */
    f->publish_ns = ld64(copy + SH_HEADER + 8 + TH_PUBLISH_NS);
    return 0;
}

int fshm_frame_valid(fshm_reader *r, const fshm_frame *f)
{
    return f->epoch == r->epoch && r->ring && fshm_ring_holds(r->ring, f->slot, f->seq);
}

fshm_map *fshm_reader_ring(const fshm_reader *r)
{
    return r->epoch ? r->ring : NULL;
}

int fshm_ring_holds(const fshm_map *ring, uint32_t slot, uint64_t seq)
{
    if (!ring || ring->size < FSHM_SUPERBLOCK_SIZE ||
        (size_t)slot >= (ring->size - FSHM_SUPERBLOCK_SIZE) / FSHM_SLOT_BYTES)
        return 0;
    atomic_thread_fence(memory_order_acquire);   /* order the caller's reads before the re-check */
    return LOAD_RLX(slot_commit_word(ring->base, slot)) == ((seq << 1) | 1);
}

int fshm_frame_copy(fshm_reader *r, const fshm_frame *f, void *dst, size_t capacity)
{
    if (capacity < f->nbytes)
        return fshm_set_error(-EINVAL, "destination holds %zu bytes, frame has %zu", capacity,
                              f->nbytes);
    memcpy(dst, f->data, f->nbytes);
    if (!fshm_frame_valid(r, f))
        return fshm_set_error(FSHM_E_OVERRUN, "frame %llu was overwritten during the copy",
                              (unsigned long long)f->seq);
    return 0;
}

int fshm_reader_producer_state(fshm_reader *r, int64_t *pid)
{
    if (r->foreign)
        return fshm_foreign_producer_state(r, pid);
    fshm_reader_check_environment(r, 1);
    return fshm_ctl_producer_state(r->ctl, pid);
}

/* Control bytes are read and written through whichever control region is current, so
 * a controller keeps steering a stream that was removed and created anew. */
static int no_control_region(const fshm_reader *r)
{
    return fshm_set_error(-ENOTSUP, "stream %u is foreign (written by another implementation): "
                          "it has no frameshm control region, hence no control bytes",
                          r->paths.stream_id);
}
static int bad_control_index(unsigned index)
{
    return fshm_set_error(-EINVAL, "control byte %u does not exist (0..%d)", index,
                          FSHM_CONTROL_BYTES - 1);
}
int fshm_reader_control(fshm_reader *r, unsigned index)
{
    if (index >= FSHM_CONTROL_BYTES)
        return bad_control_index(index);
    if (r->foreign)
        return no_control_region(r);
    /* Whatever kept us from following (reported by the next wait) leaves the control
     * region we hold, still mapped, as the best answer. */
    fshm_reader_check_environment(r, 0);
    return LOAD_ACQ(&r->ctl->control[index]);
}
int fshm_reader_set_control(fshm_reader *r, unsigned index, uint8_t value)
{
    if (index >= FSHM_CONTROL_BYTES)
        return bad_control_index(index);
    if (r->foreign)
        return no_control_region(r);
    int rc = fshm_reader_check_environment(r, 1);
    if (fshm_reader_ctl_ro(r)) {
        /* Sealed: the driver writes control bytes, for the clients its policy lets
         * (docs/driver.md "Whom the control region trusts"). */
        if (!r->lease)
            return rc ? rc : fshm_set_error(FSHM_E_LEASE, "stream %u: no lease: the driver "
                                            "is unreachable", r->paths.stream_id);
        return fshm_lease_set_control(r->lease, index, value);
    }
    /* Only an error that left us on a replaced control region stops the write. */
    if (rc && !ctl_current(r))
        return rc;
    STORE_REL(&r->ctl->control[index], value);
    return 0;
}
int fshm_reader_lease_ok(const fshm_reader *r)
{
    /* A sealed consumer without its entry asks the driver for one on its next call. */
    if (fshm_reader_ctl_ro(r) && !r->passive && r->entry < 0)
        return 0;
    return !r->driver_mode || (r->lease && fshm_lease_state(r->lease, NULL) == FSHM_LEASE_ACTIVE);
}
uint64_t fshm_reader_epoch(const fshm_reader *r) { return r->epoch; }
uint32_t fshm_reader_stream_id(const fshm_reader *r) { return r->paths.stream_id; }
uint64_t fshm_reader_overruns(const fshm_reader *r) { return r->overruns; }
uint64_t fshm_reader_drops(const fshm_reader *r) { return r->drops; }

void fshm_reader_on_window(fshm_reader *r, fshm_window_fn fn, void *arg)
{
    r->window_fn = fn;
    r->window_arg = arg;
}
const char *fshm_reader_queue_name(const fshm_reader *r) { return r->queue; }

void fshm_reader_close(fshm_reader *r)
{
    if (!r)
        return;
    if (r->q != (mqd_t)-1)
        mq_close(r->q);
    if (r->ctl && fshm_reader_ctl_ro(r)) {
        /* The queue goes (below) before the lease whose end frees our entry. */
    } else if (r->ctl) {
        /* The queue goes before the slot that names it (fshm_ctl_release). */
        fshm_ctl_release(r->ctl, r->entry, r->queue, 1);
        fshm_ctl_prune(r->ctl);   /* nobody else may be left to unlink dead consumers' queues */
        /* Last one out of a stream nobody produces into (never, or closed cleanly)
         * removes it; a dead producer's stream is left for fshm_stream_gc (and to show). */
        int st = fshm_ctl_producer_state(r->ctl, NULL);
        if (!r->driver_mode && !(LOAD_ACQ(&r->ctl->flags) & CTL_FLAG_DRIVER) &&
            (st == FSHM_PRODUCER_NONE || st == FSHM_PRODUCER_CLOSED) &&
            fshm_ctl_live_consumers(r->ctl) == 0 && flock(r->ch.fd, LOCK_EX | LOCK_NB) == 0 &&
            fshm_ctl_same_file(&r->ch, r->paths.ctl)) {
            fshm_remove_stream_dir(&r->paths);
        }
    }
    if (r->q != (mqd_t)-1)
        mq_unlink(r->queue);   /* already gone, unless our slot was pruned and reused */
    fshm_reader_unmap(r);
    fshm_ctl_close(&r->ch);
    if (r->new_ctl_fd >= 0)
        close(r->new_ctl_fd);
    fshm_lease_close(r->lease, 1);
    free(r);
}
