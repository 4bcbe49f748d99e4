/* The producer's state, shared by the producer (fshm_writer.c) and the per-process
 * registry of open writers with its liveness ticker (fshm_liveness.c). */
#ifndef FSHM_WRITER_IMPL_H
#define FSHM_WRITER_IMPL_H

#include "fshm_internal.h"

typedef struct writer_pool {
    fshm_map *map;
    uint32_t stride;
    uint16_t id;
} writer_pool;

typedef struct writer_consumer {
    mqd_t q;
    int open;
    uint64_t pid;
    uint64_t min_interval_ns;  /* from the consumer's max_rate_hz; 0 = every frame */
    uint64_t next_send_ns;
    int bell;                  /* CONS_FLAG_DOORBELL: woken only while its bell is raised */
    int due;                   /* its bell said BELL_QUEUE: one descriptor to wake it */
    char queue[32];
} writer_consumer;

struct fshm_writer {
    fshm_paths paths;
    fshm_ctl_handle ch;
    fshm_ctl *ctl;
    uint64_t epoch;
    char epoch_dir[FSHM_PATH_MAX + 32];
    fshm_map *ring;
    uint32_t nslots;
    uint32_t npools;
    writer_pool pools[FSHM_MAX_POOLS];
    uint64_t next_seq;
    int loan_active;
    fshm_loan loan;
    uint64_t ref_plus1;      /* applied to the next commit, then cleared */
    uint32_t known_gen;
    int wake_no_queue;       /* a queueless consumer without a doorbell: futex-wake every commit */
    uint32_t nbells;         /* queueless consumers with a doorbell: entries in bells[] */
    uint8_t bells[FSHM_MAX_CONSUMERS];
    /* Entries of cons[] that were open at the last refresh, in order: commit sends to these
     * instead of scanning all FSHM_MAX_CONSUMERS (4 KiB) per frame. */
    uint32_t nqueued;
    uint8_t queued[FSHM_MAX_CONSUMERS];
    uint32_t nqbells;        /* consumers with a queue and a doorbell (open or not): entries in qbells[] */
    uint8_t qbells[FSHM_MAX_CONSUMERS];
    _Static_assert(FSHM_MAX_CONSUMERS <= 256, "bells[] and queued[] hold consumer indices in a byte");
    uint64_t futex_wakes;    /* FUTEX_WAKEs issued (the tests count them) */
    uint32_t fill_threads;   /* threads that copy a big publish() (1 = the caller alone) */
    int fill_failed;         /* no helper thread could be started: fill alone from now on */
    fshm_fill_team *fill;    /* started by the first big publish(); NULL until then */
    uint64_t next_prune_ns;
    uint64_t start_ns;
    writer_consumer cons[FSHM_MAX_CONSUMERS];
    fshm_writer *next_live;  /* registry of open writers, for fork handling and liveness */
    int tracked;             /* under live_mu: in live_writers */
    int ticking;             /* under live_mu: the liveness ticker may refresh our regions */
    int lock_fd;             /* holds the producer flock; never mmapped (fshm_liveness.c) */
    /* driver model */
    fshm_lease *lease;       /* NULL: we own the regions ourselves */
    fshm_lease_config lease_cfg;
    char driver_path[108];
    char base_dir[FSHM_PATH_MAX];
    uint32_t attach_gen;     /* bumped whenever the regions were re-mapped (reattach) */
    int driver_mode;
    int sealed;              /* the driver's memfd transport: regions came as descriptors */
};

/* fshm_writer.c: whether the driver moved the stream past our epoch. */
int fshm_writer_moved_on(const fshm_writer *w);

/* fshm_liveness.c: adds w to the registry of open writers (starting the ticker) or
 * removes it; lets the ticker refresh w's mapped regions or stops it; stores now into
 * the activity_timestamp_ns of every region w has mapped. */
void fshm_writer_track(fshm_writer *w, int add);
void fshm_writer_set_ticking(fshm_writer *w, int on);
void fshm_writer_refresh_activity(fshm_writer *w, uint64_t now);

#endif
