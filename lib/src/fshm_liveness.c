/* The per-process registry of open writers and what it is for: the liveness ticker, one
 * thread that keeps every open writer's superblock activity_timestamp_ns fresh (spec
 * §7.1), and the fork handlers that keep the registry, the ticker and the producer locks
 * right in a fork()ed child. The writer itself is fshm_writer.c. */
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include "fshm_writer_impl.h"

/* The producer lock is a flock on an open file description, which a fork()ed child
 * shares (Python's multiprocessing forks by default). Were the child to keep it, a
 * crashed producer's restart would see "busy" for as long as the child lives. So the
 * lock lives on a descriptor of its own — never mmapped, since a mapping inherited by
 * the child would pin the description too — and children close it right after fork. */
static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;
static fshm_writer *live_writers;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void atfork_prepare(void) { pthread_mutex_lock(&live_mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&live_mu); }
/* Spec §7.1/§15.14: the producer refreshes activity_timestamp_ns periodically, frames
 * or not; other implementations unmap a stream whose timestamp went stale (3-5x the
 * announce period). Publishing must stay free of syscalls and timers, and an idle
 * application may never call heartbeat(), so one thread per process does it for every
 * open writer: every LIVENESS_TICK_NS it stores the time into the superblocks of the
 * regions each writer has mapped. It touches nothing else of a writer (no consumer
 * table, no control region: there activity_ns stays "last commit", which readers time
 * frames by), and the writer hands its mappings over under live_mu. It exits when no
 * writer is left. */
#define LIVENESS_TICK_NS 500000000ull
static int ticker_running;   /* under live_mu */
static pthread_cond_t ticker_cv;
static pthread_once_t ticker_cv_once = PTHREAD_ONCE_INIT;

static void ticker_cv_init(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&ticker_cv, &a);
    pthread_condattr_destroy(&a);
}

void fshm_writer_refresh_activity(fshm_writer *w, uint64_t now)
{
    __atomic_store_n((uint64_t *)((uint8_t *)w->ring->base + SB_ACTIVITY_NS), now, __ATOMIC_RELAXED);
    for (unsigned i = 0; i < w->npools; i++)
        __atomic_store_n((uint64_t *)((uint8_t *)w->pools[i].map->base + SB_ACTIVITY_NS), now,
                         __ATOMIC_RELAXED);
}

static void *ticker_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&live_mu);
    while (live_writers) {
        uint64_t now = fshm_now_ns();
        for (fshm_writer *w = live_writers; w; w = w->next_live)
            /* A driver-mode writer whose lease ended (the driver moved the stream on)
             * must not vouch for regions that are no longer its own; ctl stays mapped
             * while ticking (it is closed only after release_regions). */
            if (w->ticking && !fshm_writer_moved_on(w))
                fshm_writer_refresh_activity(w, now);
        uint64_t until = now + LIVENESS_TICK_NS;
        struct timespec ts = {(time_t)(until / 1000000000ull), (long)(until % 1000000000ull)};
        pthread_cond_timedwait(&ticker_cv, &live_mu, &ts);
    }
    ticker_running = 0;
    pthread_mutex_unlock(&live_mu);
    return NULL;
}

/* Under live_mu. A ticker that cannot start leaves liveness to commits and heartbeat(),
 * as before; the next writer to open tries again. */
static void ticker_start_locked(void)
{
    if (ticker_running)
        return;
    pthread_attr_t a;
    pthread_t t;
    sigset_t all, old;
    if (pthread_attr_init(&a) != 0)
        return;
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    /* The application's signal handlers must never run on our thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (pthread_create(&t, &a, ticker_main, NULL) == 0)
        ticker_running = 1;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&a);
}

/* Lets the ticker refresh w's mapped regions (on) or stops it (off) before they are
 * unmapped or replaced. */
void fshm_writer_set_ticking(fshm_writer *w, int on)
{
    pthread_mutex_lock(&live_mu);
    w->ticking = on && w->tracked && w->ring != NULL;
    if (w->ticking)
        fshm_writer_refresh_activity(w, fshm_now_ns());
    pthread_mutex_unlock(&live_mu);
}

static void atfork_child(void)
{
    for (fshm_writer *w = live_writers; w; w = w->next_live) {
        if (w->lock_fd >= 0) {
            close(w->lock_fd);
            w->lock_fd = -1;
        }
        w->ticking = 0;   /* the parent's producer, not ours to vouch for */
        /* The fill team's helpers stayed in the parent; the child's first big publish
         * starts its own. */
        fshm_fill_team_forget(w->fill);
        w->fill = NULL;
        w->fill_failed = 0;
    }
    ticker_running = 0;   /* the thread did not survive the fork */
    ticker_cv_init();     /* nor its wait: start from a fresh condition variable */
    pthread_mutex_unlock(&live_mu);
}
static void atfork_init(void)
{
    pthread_once(&ticker_cv_once, ticker_cv_init);
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

void fshm_writer_track(fshm_writer *w, int add)
{
    pthread_once(&atfork_once, atfork_init);
    pthread_mutex_lock(&live_mu);
    if (add) {
        w->next_live = live_writers;
        live_writers = w;
        w->tracked = 1;
        w->ticking = w->ring != NULL;
        ticker_start_locked();
    } else {
        w->tracked = w->ticking = 0;
        for (fshm_writer **pp = &live_writers; *pp; pp = &(*pp)->next_live)
            if (*pp == w) {
                *pp = w->next_live;
                break;
            }
        if (!live_writers)
            pthread_cond_signal(&ticker_cv);   /* let it exit now rather than on its next tick */
    }
    pthread_mutex_unlock(&live_mu);
}
