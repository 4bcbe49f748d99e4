/* The consumer's state, shared by the frameshm-stream reader (fshm_reader.c) and the
 * foreign-stream follower (fshm_foreign.c), which maps and reads the same way but finds
 * its regions and frames without a frameshm control region. */
#ifndef FSHM_READER_IMPL_H
#define FSHM_READER_IMPL_H

#include <sched.h>

#include "fshm_internal.h"

#define LEASE_RETRY_NS 200000000ull   /* a driver-mode reader retries an unreachable driver */

typedef struct reader_pool {
    fshm_map *map;
    uint32_t stride;
    uint16_t id;
} reader_pool;

struct fshm_reader {
    fshm_paths paths;
    fshm_ctl_handle ch;
    fshm_ctl *ctl;
    char consumer[FSHM_CONSUMER_NAME_MAX + 1];
    char queue[32];
    mqd_t q;
    int entry;               /* consumer-table index, -1 for a passive reader */
    int passive;             /* no queue, no registration: peek and mode only */
    int no_queue;            /* registered, but the system had no queue left for us: waits
                              * watch latest_seq (futex) and pace max_rate_hz themselves */
    uint64_t next_due_ns;    /* no_queue with max_rate_hz: earliest next frame */
    uint32_t max_rate_hz;    /* producer throttles our descriptors; 0 = every frame */
    uint64_t epoch;          /* mapped epoch, 0 = unmapped */
    fshm_map *ring;
    uint32_t nslots;
    uint32_t npools;
    reader_pool pools[FSHM_MAX_POOLS];
    uint64_t last_plus1;     /* newest seq returned + 1 */
    /* The newest frame wait_latest dropped as corrupt (seq + 1), and the epoch and
     * attachment it was in: later waits skip it instead of counting it again. */
    uint64_t corrupt_plus1, corrupt_epoch;
    uint32_t corrupt_gen;
    uint64_t start_seq;      /* latest_seq when we registered: frames from here are ours */
    uint64_t overruns;
    uint64_t drops;
    uint64_t next_check_ns;
    int corrupt_seen;
    char corrupt_msg[256];
    int spin;                /* predictive spinning enabled */
    uint64_t last_arrival_ns;  /* producer commit time of the last frame taken */
    uint64_t interval_ns;    /* EWMA of the time between frames this reader saw */
    uint32_t attach_gen;     /* bumped when a new control region is attached */
    /* adaptive spinning (fshm_reader_wait.c): off while the stream's consumers and its
     * producer outnumber our CPUs, and for a while after spins that did not pay off */
    int spin_cpus;           /* CPUs we may run on, 0 = not counted yet */
    cpu_set_t spin_mask;     /* which ones (empty: unknown) */
    uint32_t spin_gen;       /* consumers_gen + 1 when the consumers were counted, 0 = never */
    int spin_consumers;
    int spin_crowded;        /* the last answer of spin_crowded */
    uint16_t spin_tries, spin_hits;   /* this round of windows */
    uint32_t spin_rest;      /* frames to wait without spinning before the next round */
    uint32_t burst_span_ns;  /* a fast stream's poll before sleeping; 0 = not set yet */
    uint64_t sleeps, missed_wakes;   /* doorbell sleeps; those that ran out their slice
                                      * with a frame there to take (the tests count them) */
    fshm_window_fn window_fn;   /* fshm_reader_on_window */
    void *window_arg;
    /* driver model */
    int driver_mode;
    int lease_events;        /* report a lost lease instead of silently re-attaching */
    fshm_lease *lease;       /* NULL while the driver is unreachable */
    fshm_lease_config lease_cfg;
    char driver_path[108];
    char base_dir[FSHM_PATH_MAX];
    uint64_t next_lease_try_ns;
    int lease_reported;      /* lease_events: the loss was reported once already */
    fshm_grant grant;        /* the lease's grant: the epoch it names must be announced as granted */
    int sealed;              /* the driver passes sealed memfds: regions come with the lease */
    int new_ctl_fd;          /* sealed: the control region of the newest lease, until mapped */
    uint64_t next_register_ns;  /* sealed, read-only control region: after a refused
                                 * registration, the earliest next request to the driver */
    /* foreign mode (no control region; see fshm_foreign.c) */
    int foreign;
    uint64_t follow;         /* next seq to look for in the mapped ring */
    uint64_t sb_pid, sb_start;   /* the mapped epoch's producer, as its superblock names it */
};

/* The seq a process-all wait takes next: the one after the last returned, and none
 * committed before the reader registered (a late joiner gets no history). */
static inline uint64_t fshm_reader_next_wanted(const fshm_reader *r)
{
    return r->last_plus1 > r->start_seq ? r->last_plus1 : r->start_seq;
}

/* Sealed transport: the control region came read-only (the driver writes our entry,
 * sets control bytes for us): nothing may be stored through r->ctl. */
static inline int fshm_reader_ctl_ro(const fshm_reader *r)
{
    return r->ch.map && !r->ch.map->writable;
}

/* Whether the producer sends us a descriptor for every frame: a queued reader that it
 * paces (max_rate_hz) or whose entry the driver wrote (no doorbell there). Every other
 * reader takes frames from the header ring by seq and is woken through its doorbell: by
 * a futex wake without a queue, by one descriptor in its queue with one. */
static inline int fshm_reader_desc_per_frame(const fshm_reader *r)
{
    return !r->no_queue && (!fshm_ctl_doorbell_for(0, r->max_rate_hz) || fshm_reader_ctl_ro(r));
}

/* Drops the mapped epoch (frames handed out keep their own references). */
void fshm_reader_unmap(fshm_reader *r);
/* The seqlock read of frame `seq` from the mapped epoch: 0, -EAGAIN when the slot no
 * longer (or not yet) holds it, FSHM_E_CORRUPT when the header fails validation. */
int fshm_reader_read_frame(fshm_reader *r, uint64_t seq, fshm_frame *f);
/* Notices a replaced control region or a lost registration and follows the producer's
 * epoch; rate-limited unless force. */
int fshm_reader_check_environment(fshm_reader *r, int force);
/* The same with the caller's clock reading `now` (a wait's start), saving a second one. */
int fshm_reader_check_environment_at(fshm_reader *r, int force, uint64_t now);

/* ---- foreign mode (fshm_foreign.c) ---- */
int fshm_foreign_open(fshm_reader *r);
/* next: process-all (wait_next) rather than newest (wait_latest). */
int fshm_foreign_wait(fshm_reader *r, int64_t timeout_ns, int next, fshm_frame *f);
int fshm_foreign_peek(fshm_reader *r, fshm_frame *f);
int fshm_foreign_producer_state(fshm_reader *r, int64_t *pid);

#endif
