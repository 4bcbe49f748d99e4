/* Foreign mode: reading a stream that another implementation of the wire spec writes,
 * without a frameshm control region (docs/wire-format.md §9).
 *
 * Such a producer announces its regions on its own control plane (Aeron in the
 * references), which frameshm does not speak. What it shares with us is the spec's
 * canonical layout (§15.21a.3: <stream_id>/<epoch>/header.ring and <pool_id>.pool) and
 * the regions themselves. So the newest epoch directory stands in for the announce
 * (the superblocks must then agree with it and with each other), the header ring's
 * commit words stand in for descriptors and latest_seq (we follow the ring by seq), and
 * activity_timestamp_ns stands in for the control region's liveness. Everything read
 * from these files is validated as in the announced case: they are as hostile as any
 * shared memory. */
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fshm_reader_impl.h"

#define SCAN_NS 100000000ull          /* look for a newer epoch at most this often */
/* §15.14: a producer whose activity is older than 3-5 announce periods (1 s by §15.11)
 * is dead; the upper end, so a loaded machine does not declare a live one dead. */
#define STALE_NS 5000000000ull
#define SPIN_POLLS 64                 /* commit-word polls before the first sleep */
#define SLEEP_MIN_NS 50000ull         /* then sleeps doubling from 50 us ... */
#define SLEEP_MAX_NS 2000000ull       /* ... to 2 ms: the added latency is at most that */

/* Strict decimal: digits only, no sign, no leading zero, no overflow. */
static int decimal(const char *s, size_t len, uint64_t *out)
{
    if (len == 0 || len > 20 || (s[0] == '0' && len > 1))
        return 0;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

/* The highest epoch directory of the stream (0: none). Only real directories count. */
static uint64_t newest_epoch(const char *stream_dir)
{
    uint64_t best = 0;
    DIR *d = opendir(stream_dir);
    if (!d)
        return 0;
    struct dirent *de;
    struct stat st;
    while ((de = readdir(d))) {
        uint64_t e;
        if (decimal(de->d_name, strlen(de->d_name), &e) && e > best &&
            fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
            best = e;
    }
    closedir(d);
    return best;
}

static int map_path(fshm_reader *r, const char *path, fshm_map **out)
{
    char uri[FSHM_URI_MAX + 16];
    int rc = fshm_uri_format(uri, sizeof uri, path);
    return rc ? rc : fshm_uri_map(uri, r->paths.base, 0, out);
}

/* A region whose producer has created the file but not yet written its superblock
 * (the references ftruncate first, then pwrite the superblock) is "not yet", not
 * corrupt. */
static int not_written_yet(const fshm_map *m)
{
    return m->size < FSHM_SUPERBLOCK_SIZE || ld64((const uint8_t *)m->base + SB_MAGIC) == 0;
}

static uint64_t commit_word(const fshm_reader *r, uint64_t seq)
{
    return LOAD_ACQ(slot_commit_word(r->ring->base, (uint32_t)(seq & (r->nslots - 1))));
}

/* Newest committed seq + 1 in the whole ring (0: nothing committed). O(nslots): used on
 * mapping and when the producer lapped us. */
static uint64_t scan_newest(const fshm_reader *r)
{
    uint64_t best = 0;
    for (uint32_t i = 0; i < r->nslots; i++) {
        uint64_t w = LOAD_ACQ(slot_commit_word(r->ring->base, i));
        if ((w & 1) && (w >> 1) + 1 > best)
            best = (w >> 1) + 1;
    }
    return best;
}

/* Maps epoch e: its ring and every <id>.pool beside it, each superblock checked against
 * the directory it sits in and against the ring. -EAGAIN while the producer is still
 * creating them. */
static int map_epoch(fshm_reader *r, uint64_t e)
{
    char edir[FSHM_PATH_MAX + 32], path[FSHM_PATH_MAX + 64];
    snprintf(edir, sizeof edir, "%s/%llu", r->paths.stream_dir, (unsigned long long)e);
    fshm_map *ring = NULL;
    reader_pool pools[FSHM_MAX_POOLS];
    memset(pools, 0, sizeof pools);
    unsigned np = 0;
    int rc;
    snprintf(path, sizeof path, "%s/header.ring", edir);
    if ((rc = map_path(r, path, &ring)))
        return rc == -ENOENT ? -EAGAIN : rc;
    if (not_written_yet(ring)) {
        rc = -EAGAIN;
        goto fail;
    }
    uint32_t nslots = ld32((const uint8_t *)ring->base + SB_NSLOTS);
    if (!fshm_valid_nslots(nslots)) {
        rc = fshm_set_error(FSHM_E_CORRUPT, "header ring of epoch %llu: nslots %u is not a power "
                            "of two in 1..%u", (unsigned long long)e, nslots, FSHM_MAX_NSLOTS);
        goto fail;
    }
    if ((rc = fshm_superblock_check(ring->base, ring->size, e, r->paths.stream_id,
                                    FSHM_REGION_HEADER_RING, 0, nslots, FSHM_SLOT_BYTES,
                                    FSHM_SLOT_BYTES)))
        goto fail;
    DIR *d = opendir(edir);
    if (!d) {
        rc = -EAGAIN;   /* removed under us: the next scan finds what replaced it */
        goto fail;
    }
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        uint64_t id;
        if (len < 6 || strcmp(de->d_name + len - 5, ".pool") != 0 ||
            !decimal(de->d_name, len - 5, &id))
            continue;
        if (id == 0 || id > UINT16_MAX || np == FSHM_MAX_POOLS) {
            rc = fshm_set_error(FSHM_E_CORRUPT, "epoch %llu: pool file %s is not one frameshm "
                                "maps (ids 1..65535, at most %d pools)", (unsigned long long)e,
                                de->d_name, FSHM_MAX_POOLS);
            break;
        }
        snprintf(path, sizeof path, "%s/%s", edir, de->d_name);
        reader_pool *pl = &pools[np];
        if ((rc = map_path(r, path, &pl->map)))
            break;
        np++;
        if (not_written_yet(pl->map)) {
            rc = -EAGAIN;
            break;
        }
        pl->id = (uint16_t)id;
        pl->stride = ld32((const uint8_t *)pl->map->base + SB_STRIDE_BYTES);
        if ((rc = fshm_superblock_check(pl->map->base, pl->map->size, e, r->paths.stream_id,
                                        FSHM_REGION_PAYLOAD_POOL, pl->id, nslots, pl->stride,
                                        pl->stride)))
            break;
    }
    closedir(d);
    if (!rc && np == 0)
        rc = -EAGAIN;   /* the ring is there, its pools not yet */
    if (rc)
        goto fail;
    fshm_reader_unmap(r);
    r->ring = ring;
    r->nslots = nslots;
    r->npools = np;
    memcpy(r->pools, pools, sizeof pools);
    r->epoch = e;
    r->sb_pid = ld64((const uint8_t *)ring->base + SB_PID);
    r->sb_start = ld64((const uint8_t *)ring->base + SB_START_NS);
    /* A new epoch restarts the seqs (§15.2); frames from here on are ours. */
    r->follow = scan_newest(r);
    r->start_seq = r->follow;
    r->last_plus1 = 0;
    return 0;
fail:
    for (unsigned i = 0; i < np; i++)
        fshm_map_unref(pools[i].map);
    if (ring)
        fshm_map_unref(ring);
    return rc;
}

/* Follows the newest epoch: a higher epoch directory, or a new producer in the mapped
 * one (its superblock names another pid or start time: §15.14 "if pid changes ...
 * unmap"), means remapping. A lower epoch is never taken (§10.1.1). */
static int sync_foreign(fshm_reader *r, int force)
{
    uint64_t now = fshm_now_ns();
    int moved = 0;
    if (r->ring) {
        const uint8_t *b = r->ring->base;
        moved = LOAD_RLX((const uint64_t *)(b + SB_PID)) != r->sb_pid ||
                LOAD_RLX((const uint64_t *)(b + SB_START_NS)) != r->sb_start;
    }
    if (!moved && !force && now < r->next_check_ns)
        return 0;
    r->next_check_ns = now + SCAN_NS;
    uint64_t e = newest_epoch(r->paths.stream_dir);
    if (e == 0 || (e <= r->epoch && !moved))
        return 0;
    if (e < r->epoch)
        e = r->epoch;
    int rc = map_epoch(r, e);
    if (rc == -EAGAIN || rc == -ENOENT)
        return 0;   /* being created or removed: nothing new to read yet */
    if (rc == FSHM_E_CORRUPT) {
        r->corrupt_seen = 1;
        snprintf(r->corrupt_msg, sizeof r->corrupt_msg, "%s", fshm_last_error());
    }
    return rc;
}

/* Newest committed seq + 1, following the ring from where we last looked. */
static uint64_t advance(fshm_reader *r)
{
    for (uint32_t steps = 0; steps <= r->nslots; steps++) {
        uint64_t w = commit_word(r, r->follow);
        if (w == ((r->follow << 1) | 1)) {
            r->follow++;
            continue;
        }
        if ((w >> 1) > r->follow) {   /* the producer lapped us: start from the newest */
            uint64_t n = scan_newest(r);
            if (n > r->follow)
                r->follow = n;
        }
        break;
    }
    return r->follow;
}

static void deliver(fshm_reader *r, fshm_frame *f)
{
    uint64_t from = r->last_plus1 ? r->last_plus1 : r->start_seq;
    f->skipped = f->seq > from ? f->seq - from : 0;
    r->last_plus1 = f->seq + 1;
}

int fshm_foreign_open(fshm_reader *r)
{
    int rc = sync_foreign(r, 1);
    /* Nothing there yet is fine (waits poll for it); a corrupt stream is not. */
    return rc == FSHM_E_CORRUPT ? rc : 0;
}

int fshm_foreign_producer_state(fshm_reader *r, int64_t *pid)
{
    sync_foreign(r, 0);
    if (pid)
        *pid = r->ring ? (int64_t)r->sb_pid : 0;
    if (!r->ring)
        return FSHM_PRODUCER_NONE;
    uint64_t act = LOAD_RLX((const uint64_t *)((const uint8_t *)r->ring->base + SB_ACTIVITY_NS));
    uint64_t now = fshm_now_ns();
    if (act <= now)
        return now - act <= STALE_NS ? FSHM_PRODUCER_ALIVE : FSHM_PRODUCER_DEAD;
    /* Ahead of our CLOCK_MONOTONIC: another clock domain, which we cannot age. The pid
     * is the only other evidence (it may belong to another pid namespace: then we see
     * "dead" only when no such pid exists here either). */
    if (r->sb_pid && r->sb_pid <= (uint64_t)INT32_MAX && kill((pid_t)r->sb_pid, 0) != 0 &&
        errno == ESRCH)
        return FSHM_PRODUCER_DEAD;
    return FSHM_PRODUCER_ALIVE;
}

static int timed_out(fshm_reader *r)
{
    if (r->corrupt_seen)
        return fshm_set_error(FSHM_E_CORRUPT, "foreign stream %u: frames dropped as corrupt: %s",
                              r->paths.stream_id, r->corrupt_msg);
    int64_t pid;
    int st = fshm_foreign_producer_state(r, &pid);
    if (st == FSHM_PRODUCER_NONE)
        return fshm_set_error(-ETIMEDOUT, "foreign stream %u: no epoch under %s yet",
                              r->paths.stream_id, r->paths.stream_dir);
    if (st == FSHM_PRODUCER_DEAD)
        return fshm_set_error(FSHM_E_PRODUCER_DEAD, "foreign stream %u: producer pid %lld is "
                              "dead (its activity_timestamp_ns is stale)", r->paths.stream_id,
                              (long long)pid);
    return fshm_set_error(-ETIMEDOUT, "foreign stream %u: no new frame yet (producer pid %lld "
                          "alive)", r->paths.stream_id, (long long)pid);
}

static void note(fshm_reader *r, int rc)
{
    if (rc == FSHM_E_CORRUPT) {
        r->drops++;
        r->corrupt_seen = 1;
        snprintf(r->corrupt_msg, sizeof r->corrupt_msg, "%s", fshm_last_error());
    }
}

/* Waits by polling the ring's next commit word: a few polls, then sleeps doubling up to
 * SLEEP_MAX_NS. A foreign producer wakes nobody, and inotify does not report writes
 * through a shared mapping, so polling is the only signal there is. */
int fshm_foreign_wait(fshm_reader *r, int64_t timeout_ns, int next, fshm_frame *f)
{
    uint64_t deadline = timeout_ns < 0 ? UINT64_MAX : fshm_now_ns() + (uint64_t)timeout_ns + 1;
    uint64_t sleep_ns = SLEEP_MIN_NS;
    uint64_t floor = r->last_plus1;
    r->corrupt_seen = 0;
    for (unsigned polls = 0;; polls++) {
        int rc = sync_foreign(r, 0);
        if (rc == FSHM_E_CORRUPT)
            return rc;
        if (r->last_plus1 < floor)
            floor = r->last_plus1;   /* remapped: the new epoch's seqs start over */
        if (r->ring) {
            uint64_t newest = advance(r);
            if (!next && newest > floor) {
                rc = fshm_reader_read_frame(r, newest - 1, f);
                if (rc == 0) {
                    deliver(r, f);
                    return 0;
                }
                note(r, rc);
                floor = newest;   /* never spin on a slot being rewritten */
                continue;
            }
            uint64_t s = fshm_reader_next_wanted(r);
            if (next && s < newest) {
                if (newest - s > r->nslots)
                    s = newest - r->nslots;   /* lapped: the oldest the ring still holds */
                rc = fshm_reader_read_frame(r, s, f);
                if (rc == 0) {
                    deliver(r, f);
                    r->overruns += f->skipped;
                    return 0;
                }
                note(r, rc);
                r->last_plus1 = s + 1;   /* overwritten or corrupt: lost to us */
                continue;
            }
        }
        uint64_t now = fshm_now_ns();
        if (now >= deadline)
            return timed_out(r);
        if (polls < SPIN_POLLS) {
            sched_yield();
            continue;
        }
        uint64_t nap = sleep_ns < deadline - now ? sleep_ns : deadline - now;
        struct timespec ts = {(time_t)(nap / 1000000000ull), (long)(nap % 1000000000ull)};
        if (nanosleep(&ts, NULL) != 0 && errno == EINTR)
            return fshm_set_error(-EINTR, "interrupted");
        if (sleep_ns < SLEEP_MAX_NS)
            sleep_ns *= 2;
    }
}

int fshm_foreign_peek(fshm_reader *r, fshm_frame *f)
{
    int rc = sync_foreign(r, 0);
    if (rc == FSHM_E_CORRUPT)
        return rc;
    for (int attempt = 0; r->ring && attempt < 64; attempt++) {
        uint64_t newest = advance(r);
        if (!newest)
            break;
        rc = fshm_reader_read_frame(r, newest - 1, f);
        if (rc == 0) {
            f->skipped = 0;
            return 0;
        }
        if (rc == FSHM_E_CORRUPT) {
            r->drops++;
            return rc;
        }
    }
    if (r->ring && r->follow)
        return fshm_set_error(FSHM_E_OVERRUN, "foreign stream %u: the producer keeps "
                              "overwriting the newest slot", r->paths.stream_id);
    return fshm_set_error(-EAGAIN, "foreign stream %u has no frame yet", r->paths.stream_id);
}
