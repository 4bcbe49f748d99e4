/* The consumer's waits: frames by seq from the header ring with a doorbell sleep (on the
 * queue, or on the control region's futex without one), or a descriptor per frame from
 * the queue (a rate-capped or sealed reader); drain to the newest frame, process-all with
 * overrun accounting, predictive spinning, and the lock-free peek. Registration, epoch mapping
 * and the seqlock read itself live in fshm_reader.c. */
#include <sched.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "fshm_reader_impl.h"

#define WAIT_SLICE_NS 100000000ull     /* longest single blocking receive */
#define NO_QUEUE_SLICE_NS 10000000ull  /* longest futex sleep of a reader without a queue */

static void note_drop(fshm_reader *r, int rc)
{
    if (rc == FSHM_E_CORRUPT) {
        r->drops++;
        r->corrupt_seen = 1;
        snprintf(r->corrupt_msg, sizeof r->corrupt_msg, "%s", fshm_last_error());
    }
}

static void took(fshm_reader *r, fshm_frame *f)
{
    /* Before the first frame, count from registration: frames committed since then
     * that we never got were lost to us too. */
    uint64_t from = r->last_plus1 ? r->last_plus1 : r->start_seq;
    f->skipped = f->seq > from ? f->seq - from : 0;
    /* The producer's commit clock is steadier than our own arrival times (which carry
     * our scheduling noise), so the spin window is predicted from it; only consecutive
     * frames measure the producer's period. */
    uint64_t commit_ns = LOAD_RLX(&r->ctl->activity_ns);
    if (r->last_arrival_ns && r->last_plus1 && f->skipped == 0 && commit_ns > r->last_arrival_ns) {
        uint64_t d = commit_ns - r->last_arrival_ns;
        if (d < 1000000000ull)
            r->interval_ns = r->interval_ns ? r->interval_ns - r->interval_ns / 8 + d / 8 : d;
    }
    r->last_arrival_ns = commit_ns;
    r->last_plus1 = f->seq + 1;
    if (r->no_queue && r->max_rate_hz) {
        /* The producer's slack for queued consumers: 10% under the period. */
        uint64_t iv = 1000000000ull / r->max_rate_hz;
        r->next_due_ns = fshm_now_ns() + iv - iv / 10;
    }
    /* Read-only (sealed): progress is ours to know; the table shows none. */
    if (r->entry >= 0 && !fshm_reader_ctl_ro(r))
        STORE_RLX(&ctl_consumer(r->ctl, (unsigned)r->entry)->last_seq, f->seq + 1);
}

/* Our entry's `sleeping` word when the producer wakes us only on request (we registered
 * it with CONS_FLAG_DOORBELL and can write it); NULL: it wakes us on every commit. */
static uint32_t *doorbell(fshm_reader *r)
{
    if (r->entry < 0 || fshm_reader_ctl_ro(r))
        return NULL;
    fshm_ctl_consumer *e = ctl_consumer(r->ctl, (unsigned)r->entry);
    return LOAD_RLX(&e->flags) & CONS_FLAG_DOORBELL ? &e->sleeping : NULL;
}

/* One receive from our queue, waiting at most slice_ns (0: not at all): the message's
 * length, -ETIMEDOUT when none came, -EINTR, or another error (set). */
static ssize_t queue_receive(fshm_reader *r, uint8_t msg[64], uint64_t slice_ns)
{
    struct timespec ts = {0, 0};   /* an absolute time long past: do not wait */
    if (slice_ns) {
        clock_gettime(CLOCK_REALTIME, &ts);   /* mq_timedreceive wants CLOCK_REALTIME */
        uint64_t ns = (uint64_t)ts.tv_nsec + slice_ns;
        ts.tv_sec += (time_t)(ns / 1000000000ull);
        ts.tv_nsec = (long)(ns % 1000000000ull);
    }
    ssize_t n = mq_timedreceive(r->q, (char *)msg, 64, NULL, &ts);
    if (n >= 0)
        return n;
    if (errno == ETIMEDOUT || errno == EAGAIN)
        return -ETIMEDOUT;
    if (errno == EINTR)
        return -EINTR;
    return fshm_set_error(-errno, "receiving from queue %s: %s", r->queue, strerror(errno));
}

/* Whether a received message is a descriptor of the epoch we have mapped, after following
 * the stream to the epoch it names; one that is not (malformed, another stream, an epoch
 * we cannot follow) is counted as a drop, as the spec asks. */
static int descriptor_ours(fshm_reader *r, const uint8_t *msg, size_t n, uint64_t *seq,
                           uint64_t *pub, uint64_t *epoch)
{
    if (fshm_desc_decode(msg, n, r->paths.stream_id, epoch, seq, pub) != 0) {
        r->drops++;
        return 0;
    }
    if (*epoch != r->epoch) {
        fshm_reader_check_environment(r, 1);
        if (*epoch != r->epoch) {
            r->drops++;
            return 0;
        }
    }
    return 1;
}

/* Whether the producer of the stream's current epoch wakes a queued doorbell reader with
 * a FUTEX_WAKE (BELL_FUTEX): one system call wakes every sleeper, where a descriptor each
 * costs the producer an mq_send per sleeper and the sleeper an mq_timedreceive. A
 * producer that does not say so (an older library; the moment between a new epoch and
 * its producer's start) wakes us through our queue. */
static int producer_rings_futex(const fshm_reader *r)
{
    uint64_t e = LOAD_ACQ(&r->ctl->bells_epoch);
    return e != 0 && e == LOAD_ACQ(&r->ctl->epoch);
}

/* One futex sleep on latest_seq after our bell was raised (or, queueless, without one):
 * the kernel compares the word with `latest`, so a commit since we looked means no
 * sleep. */
static int futex_sleep(fshm_reader *r, uint64_t latest, uint64_t slice, int *timed_out)
{
    int rc = fshm_futex_wait(&r->ctl->latest_seq, latest, slice);
    *timed_out = rc == 1;
    return rc < 0 ? rc : 0;
}

/* One sleep of a doorbell reader on its queue, after it raised its bell (BELL_QUEUE): the
 * producer sends a descriptor only to a raised bell, and only to wake us (it names a frame
 * we take from the ring anyway, or one we took already: a bell answered just as we found a
 * frame without sleeping leaves one behind, which costs the next sleep a wake, nothing
 * else). A descriptor of another epoch makes us follow the stream there at once. */
static int queue_sleep(fshm_reader *r, uint64_t latest, uint64_t slice, int *timed_out)
{
    /* The consumer's half of Dekker's pattern: `sleeping` (stored, then a full fence by
     * the caller) before this load of latest_seq. A commit since the caller looked
     * means no sleep; a later one sees the bell and sends. */
    if (LOAD_ACQ(&r->ctl->latest_seq) != latest)
        return 0;
    uint8_t msg[64];
    uint64_t epoch, seq, pub;
    ssize_t n = queue_receive(r, msg, slice);
    *timed_out = n == -ETIMEDOUT;
    if (n == -ETIMEDOUT)
        return 0;
    if (n < 0)
        return (int)n;
    descriptor_ours(r, msg, (size_t)n, &seq, &pub, &epoch);   /* a wake-up either way */
    return 0;
}

/* receive() for a reader the producer wakes through its doorbell (all but those of
 * fshm_reader_desc_per_frame): never a descriptor (0), but the same wake-ups: once the
 * control region shows a seq > *newer_than (and a max_rate_hz reader's turn has come),
 * the stream moved, or the deadline passed. Without a queue it sleeps on latest_seq's
 * futex, each sleep bounded by NO_QUEUE_SLICE_NS so that a producer that does not wake us
 * (an older library) costs latency, never frames. With one, on the futex too while the
 * producer says it answers there (producer_rings_futex), else on the queue (an older
 * producer sends every frame's descriptor there, which wakes us all the more). */
static int receive_rung(fshm_reader *r, uint64_t deadline, const uint64_t *newer_than)
{
    uint32_t gen = r->attach_gen;
    /* Without newer_than: any commit after this call wakes us. */
    uint64_t since = LOAD_ACQ(&r->ctl->latest_seq);
    if (!newer_than)
        newer_than = &since;
    while (deadline != 0) {
        uint64_t now = fshm_now_ns();
        if (now >= deadline)
            return 0;
        uint64_t until = deadline, latest = LOAD_ACQ(&r->ctl->latest_seq);
        uint32_t *bell = NULL;
        if (r->max_rate_hz && now < r->next_due_ns) {
            until = r->next_due_ns < deadline ? r->next_due_ns : deadline;   /* a timed sleep */
        } else if (r->epoch && latest > *newer_than) {
            return 0;
        } else {
            bell = doorbell(r);
        }
        uint64_t most = r->no_queue ? NO_QUEUE_SLICE_NS : WAIT_SLICE_NS;
        uint64_t slice = until - now < most ? until - now : most;
        int on_futex = r->no_queue || (bell && producer_rings_futex(r));
        if (bell) {
            /* The other half of the producer's bell_answered(): `sleeping` is visible
             * before our next load of latest_seq (FUTEX_WAIT's own, or queue_sleep's). */
            STORE_RLX(bell, on_futex ? BELL_FUTEX : BELL_QUEUE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        }
        int timed_out = 0;
        int intr = on_futex ? futex_sleep(r, latest, slice, &timed_out)
                            : queue_sleep(r, latest, slice, &timed_out);
        if (bell) {
            STORE_RLX(bell, 0);
            r->sleeps++;
            /* The sleep ran out its slice while a frame was there: a lost wake-up (what
             * the doorbell's ordering rules out; the tests count these). */
            if (timed_out && r->epoch && LOAD_ACQ(&r->ctl->latest_seq) > *newer_than)
                r->missed_wakes++;
        }
        if (intr)
            return intr;
        int rc = fshm_reader_check_environment(r, 0);
        if (rc == FSHM_E_CORRUPT || rc == FSHM_E_LEASE)
            return rc;
        if (r->attach_gen != gen)
            return 0;
    }
    return 0;
}

/* A no_queue reader with max_rate_hz paces itself, as the producer paces queued ones. */
static int rate_due(fshm_reader *r)
{
    return !r->max_rate_hz || (r->no_queue && fshm_now_ns() >= r->next_due_ns);
}

/* One descriptor from the queue: 1 got one, 0 none before the deadline (deadline 0:
 * don't wait), <0 error. With `newer_than` set, also returns 0 as soon as the control
 * region shows a committed seq >= *newer_than that never reached the queue (it was full). */
static int receive(fshm_reader *r, uint64_t deadline, const uint64_t *newer_than, uint64_t *seq,
                   uint64_t *pub, uint64_t *epoch)
{
    uint8_t msg[64];
    uint32_t gen = r->attach_gen;
    if (!fshm_reader_desc_per_frame(r))
        return receive_rung(r, deadline, newer_than);
    for (;;) {
        uint64_t slice = 0;
        if (deadline != 0) {
            uint64_t now = fshm_now_ns();
            if (now >= deadline)
                return 0;
            slice = deadline - now < WAIT_SLICE_NS ? deadline - now : WAIT_SLICE_NS;
        }
        ssize_t n = queue_receive(r, msg, slice);
        if (n == -ETIMEDOUT) {
            if (deadline == 0)
                return 0;
            int rc = fshm_reader_check_environment(r, 0);
            if (rc == FSHM_E_CORRUPT || rc == FSHM_E_LEASE)
                return rc;
            if (r->attach_gen != gen)
                return 0;
            if (newer_than && r->epoch && LOAD_ACQ(&r->ctl->latest_seq) > *newer_than)
                return 0;
            continue;
        }
        if (n < 0)
            return (int)n;
        if (descriptor_ours(r, msg, (size_t)n, seq, pub, epoch))
            return 1;
    }
}

static int timeout_result(fshm_reader *r)
{
    int64_t pid;
    int st = fshm_ctl_producer_state(r->ctl, &pid);
    if (r->driver_mode && !r->lease)
        return fshm_set_error(-ETIMEDOUT, "stream %u: no lease: the driver at %s is unreachable or "
                              "refuses us (retrying every %u ms)", r->lease_cfg.stream_id,
                              r->driver_path, (unsigned)(LEASE_RETRY_NS / 1000000));
    if (r->corrupt_seen)
        return fshm_set_error(FSHM_E_CORRUPT, "stream '%s': frames dropped as corrupt: %s",
                              r->paths.name, r->corrupt_msg);
    if (st == FSHM_PRODUCER_DEAD)
        return fshm_set_error(FSHM_E_PRODUCER_DEAD, "stream '%s': producer pid %lld is dead",
                              r->paths.name, (long long)pid);
    if (st == FSHM_PRODUCER_NONE)
        return fshm_set_error(-ETIMEDOUT, "stream '%s': no producer has attached yet",
                              r->paths.name);
    if (st == FSHM_PRODUCER_CLOSED)
        return fshm_set_error(-ETIMEDOUT, "stream '%s': producer closed the stream", r->paths.name);
    return fshm_set_error(-ETIMEDOUT, "stream '%s': no new frame yet (producer pid %lld alive)",
                          r->paths.name, (long long)pid);
}

#define SPIN_MIN_INTERVAL_NS 2000000ull   /* below 2 ms between frames, blocking keeps up */
#define SPIN_LEAD_MAX_NS 500000ull
#define SPIN_ROUND 16        /* windows judged together */
#define SPIN_REST 64         /* frames without spinning after a round that did not pay off */
#define BURST_MAX_INTERVAL_NS 50000ull  /* a message every 50 us or less: a fast stream */
#define BURST_MIN_NS 4000ull    /* about what a sleep, its wake-up and the FUTEX_WAKE cost */
#define BURST_MAX_NS 20000ull

/* Whether spinning can pay off on this machine: each spinning consumer holds a CPU
 * through its window, and the frame it waits for needs the producer on a CPU too. With
 * more of them than CPUs (8 consumers of one stream on 2 vCPUs) they only delay one
 * another and the producer. The consumers are counted again only when the table changes;
 * the producer counts only while it fills on a CPU we may run on (its loan notes where),
 * so a consumer pinned to a CPU of its own spins. */
static int spin_crowded(fshm_reader *r)
{
    uint32_t gen = LOAD_ACQ(&r->ctl->consumers_gen);
    if (!r->spin_cpus) {
        int n = sched_getaffinity(0, sizeof r->spin_mask, &r->spin_mask) == 0 ? CPU_COUNT(&r->spin_mask) : 0;
        if (n <= 0)
            CPU_ZERO(&r->spin_mask);
        r->spin_cpus = n > 0 ? n : 1;
    }
    if (r->spin_gen != gen + 1) {
        int consumers = 0;
        for (unsigned i = 0; i < FSHM_MAX_CONSUMERS; i++)
            if (CONS_KIND(LOAD_RLX(&ctl_consumer(r->ctl, i)->state)) == CONS_ACTIVE)
                consumers++;
        r->spin_gen = gen + 1;
        r->spin_consumers = consumers;
    }
    /* Where the producer runs matters only when the consumers alone just fit: then its
     * hint (a shared line) is read. */
    if (r->spin_consumers != r->spin_cpus) {
        r->spin_crowded = r->spin_consumers > r->spin_cpus;
        return r->spin_crowded;
    }
    uint32_t p = LOAD_RLX(&r->ctl->producer_cpu);
    r->spin_crowded = !p || p > CPU_SETSIZE || CPU_COUNT(&r->spin_mask) == 0 ||
                      CPU_ISSET((int)p - 1, &r->spin_mask);
    return r->spin_crowded;
}

/* Scores one spin window (hit: the frame came while we polled). A round in which fewer
 * than half the windows caught their frame (a jittery producer, a busy machine) costs
 * CPU for nothing: rest for SPIN_REST frames, then try again. */
static void spin_scored(fshm_reader *r, int hit)
{
    r->spin_tries++;
    r->spin_hits += hit != 0;
    if (r->spin_tries < SPIN_ROUND)
        return;
    if (r->spin_hits * 2 < r->spin_tries)
        r->spin_rest = SPIN_REST;
    r->spin_tries = r->spin_hits = 0;
}

/* Whether we run on the CPU the producer fills its frames on (it notes its CPU at each
 * loan). A spin there takes the CPU from the producer until the scheduler preempts us or
 * the window closes, so the frame we wait for comes after the window, late for both of
 * us. So a window that opens there first moves us (step_off_producer_cpu), and failing
 * that, blocks: the producer finishes and its commit wakes us (20-30 us on a 2-vCPU guest,
 * against 40-100 us after a lost window). The scheduler puts us there often: a wake-up
 * tends to follow its waker. The field is only a hint: a bad value costs a spin, a move or
 * a wake-up, nothing else. */
static int on_producer_cpu(const fshm_reader *r)
{
    uint32_t p = LOAD_RLX(&r->ctl->producer_cpu);
    if (!p)
        return 0;
    int cpu = sched_getcpu();
    return cpu >= 0 && (uint32_t)cpu + 1 == p;
}

/* Moves us off the producer's CPU by leaving it out of our affinity for the moment the
 * move takes: sched_setaffinity migrates the calling thread before it returns, and putting
 * the caller's mask back leaves us where we now are. Without it, blocking is all we can
 * do there, and that keeps us there: the commit's wake-up puts a woken consumer on its
 * waker's CPU, so after one such frame the next window opens on the same CPU again (2-vCPU
 * VM, Python producer: 160-260 of 270 frames, 40-60 us each instead of 5-15). 1 if we
 * moved. Not tried when we may run nowhere else, and a mask the caller changes while we
 * hold ours wins: we never restore over a change. */
static int step_off_producer_cpu(const fshm_reader *r)
{
    uint32_t p = LOAD_RLX(&r->ctl->producer_cpu);
    cpu_set_t mine, others;
    if (!p || p > CPU_SETSIZE || sched_getaffinity(0, sizeof mine, &mine) != 0)
        return 0;
    others = mine;
    CPU_CLR((int)p - 1, &others);
    if (CPU_COUNT(&others) == 0 || CPU_EQUAL(&others, &mine))
        return 0;
    if (sched_setaffinity(0, sizeof others, &others) != 0)
        return 0;
    cpu_set_t now;
    if (sched_getaffinity(0, sizeof now, &now) == 0 && CPU_EQUAL(&now, &others))
        sched_setaffinity(0, sizeof mine, &mine);
    return !on_producer_cpu(r);
}

/* Run just before a spin window: a seqlock read of the frame we returned last, then the
 * caller's hook (fshm_reader_on_window). Over a frame period on a shared host the path a
 * frame takes goes cold (caches, TLB): on the 2-vCPU VMs of docs/benchmarks.md the first
 * read after 16 ms took 18-23 us instead of 0.6-0.9 us. Doing it once here, while the
 * frame is still being filled, keeps that off the frame's latency. The read has no effect
 * on the reader's state; failing (its slot reused) it only skips the hook. */
static void warm_up(fshm_reader *r)
{
    fshm_frame prev;
    const fshm_frame *p = NULL;
    if (r->last_plus1 && fshm_reader_read_frame(r, r->last_plus1 - 1, &prev) == 0)
        p = &prev;
    if (r->window_fn)
        r->window_fn(r->window_arg, p);
}

/* The wait of a fast stream's reader that has caught up (a message every few
 * microseconds, as a rule in bursts, or a reply to a request it just sent on another
 * stream): poll the newest seq for a while before sleeping. Each sleep costs this thread
 * a FUTEX_WAIT and a wake-up (2-5 us on a 2-vCPU VM; 10-15 us when it is a cross-CPU
 * wake), and the producer a FUTEX_WAKE it would not otherwise make (it rings only a
 * sleeper's doorbell): at these rates that is more CPU than the gap itself, on both
 * sides. A request-reply pair whose two readers both sleep sees 25-35 us between
 * messages; once both poll, 1-5 us (hence a fast stream is one of 50 us or less). How long
 * to poll adapts as a spinning lock's spin does: a miss halves the span (down to about
 * the cost of the sleep it failed to avoid), a hit late in the span doubles it, so a
 * producer that pauses between bursts for longer than BURST_MAX_NS (a Python producer
 * pacing with sleeps) costs a few microseconds per burst, not the whole span.
 * Never on the producer's CPU; scored like the windows. 1: a frame newer than `floor`. */
static int burst_poll(fshm_reader *r, uint64_t deadline, uint64_t floor)
{
    if (LOAD_ACQ(&r->ctl->latest_seq) > floor)
        return 1;   /* not a wait: not scored */
    if (on_producer_cpu(r))
        return 0;
    if (!r->burst_span_ns)
        r->burst_span_ns = BURST_MAX_NS;
    uint64_t start = fshm_now_ns(), end = start + r->burst_span_ns;
    if (end > deadline)
        end = deadline;
    for (unsigned i = 1;; i++) {
        cpu_relax();
        if (LOAD_ACQ(&r->ctl->latest_seq) > floor) {
            if ((fshm_now_ns() - start) * 2 > r->burst_span_ns)
                r->burst_span_ns = r->burst_span_ns * 2 > BURST_MAX_NS ? BURST_MAX_NS : r->burst_span_ns * 2;
            spin_scored(r, 1);
            return 1;
        }
        if ((i & 15) == 0 && fshm_now_ns() >= end) {
            r->burst_span_ns = r->burst_span_ns / 2 < BURST_MIN_NS ? BURST_MIN_NS : r->burst_span_ns / 2;
            spin_scored(r, 0);
            return 0;
        }
    }
}

/* Predictive wait: a sleeping consumer takes a cross-CPU wake-up (~25-100 us on a
 * VM) per frame. When frames come at a steady rate, sleep on the queue until just
 * before the next one is due, then poll the control region's latest seq for a short
 * window. Costs at most 2*lead per frame period of CPU (~3% at 60 fps); returns 1 as
 * soon as a frame newer than `floor` is committed, 0 when the window closes. */
static int predictive_wait(fshm_reader *r, uint64_t deadline, uint64_t floor, uint64_t *seq,
                           uint64_t *pub, uint64_t *epoch, int *got_desc)
{
    *got_desc = 0;
    uint64_t iv = r->interval_ns;
    if (r->max_rate_hz)
        return 0;   /* spinning on latest_seq would see every frame, not our share */
    int burst = iv && iv <= BURST_MAX_INTERVAL_NS;
    if (!r->spin || !r->epoch || (iv < SPIN_MIN_INTERVAL_NS && !burst) || !r->last_arrival_ns)
        return 0;
    if (r->spin_rest) {
        r->spin_rest--;
        return 0;
    }
    if (spin_crowded(r))
        return 0;
    if (burst)
        return burst_poll(r, deadline, floor);
    uint64_t lead = iv / 16 < SPIN_LEAD_MAX_NS ? iv / 16 : SPIN_LEAD_MAX_NS;
    uint64_t expected = r->last_arrival_ns + iv;
    uint64_t now = fshm_now_ns();
    if (now + lead > expected + lead)   /* already past the window: plain blocking */
        return 0;
    /* Warmed once per frame: a call that finds the window open (after a descriptor that
     * was not ours to take, say) has warmed already. */
    int warm = 0;
    if (now + lead < expected) {
        uint64_t until = expected - lead < deadline ? expected - lead : deadline;
        int rc = receive(r, until, &floor, seq, pub, epoch);
        if (rc != 0) {
            *got_desc = rc;   /* a descriptor (1) or an error (<0) */
            return rc;
        }
        /* Committed before the window (a doorbell reader's sleep ends without a
         * descriptor): the sleep caught it, not the window, so it is not scored. */
        if (LOAD_ACQ(&r->ctl->latest_seq) > floor)
            return 1;
        warm = until < deadline;
    }
    /* A window opening on the producer's CPU moves us first, and before the warm-up:
     * warming one CPU's caches and then spinning on another would warm nothing. Failing
     * the move, the window is not tried, so not scored. */
    if (LOAD_ACQ(&r->ctl->latest_seq) <= floor) {
        if (on_producer_cpu(r) && !step_off_producer_cpu(r))
            return 0;
        if (warm)
            warm_up(r);
    }
    uint64_t end = expected + lead < deadline ? expected + lead : deadline;
    for (unsigned i = 0;; i++) {
        if (LOAD_ACQ(&r->ctl->latest_seq) > floor) {
            spin_scored(r, 1);
            return 1;
        }
        /* Not scored: the window was not tried. Checked again as we go, since either of
         * us may be moved meanwhile. */
        if ((i & 63) == 0 && on_producer_cpu(r))
            return 0;
        cpu_relax();
        /* No sched_yield() here: under EEVDF a yield hands the CPU to any other runnable
         * task, even a SCHED_IDLE one, and nothing gives it back before that task's slice
         * or the tick ends: beside a busy loop a tenth of the frames came 4 ms late. A
         * producer that shares our CPU waits at most the window (2 * SPIN_LEAD_MAX_NS);
         * the windows it makes miss count against spinning (spin_scored). */
        if ((i & 63) == 0 && fshm_now_ns() >= end) {
            spin_scored(r, 0);
            return 0;
        }
    }
}

static uint64_t deadline_for(int64_t timeout_ns, uint64_t now)
{
    if (timeout_ns < 0)
        return UINT64_MAX;
    return now + (uint64_t)timeout_ns + 1;
}

static int passive_error(fshm_reader *r)
{
    return fshm_set_error(-EINVAL, "reader of '%s' was opened without a queue (passive): it can "
                          "peek and read the newest frame but not wait", r->paths.name);
}

int fshm_reader_wait_latest(fshm_reader *r, int64_t timeout_ns, fshm_frame *f)
{
    if (r->foreign)
        return fshm_foreign_wait(r, timeout_ns, 0, f);
    if (r->passive)
        return passive_error(r);
    uint64_t now = fshm_now_ns();   /* the deadline's and the environment check's */
    uint64_t deadline = deadline_for(timeout_ns, now);
    uint64_t best = 0, best_pub = 0, seq, pub, epoch;
    int have = 0, rc;
    r->corrupt_seen = 0;
    if ((rc = fshm_reader_check_environment_at(r, 0, now)) == FSHM_E_CORRUPT || rc == FSHM_E_LEASE)
        return rc;
    /* After the check: moving to a replaced control region restarts the seqs. */
    uint64_t floor = r->last_plus1;   /* seqs below this were taken or dropped */
    for (;;) {
        /* Drain: keep only the newest descriptor. */
        while ((rc = receive(r, 0, NULL, &seq, &pub, &epoch)) == 1)
            if (!have || seq > best) {
                best = seq, best_pub = pub;
                have = 1;
            }
        if (rc < 0)
            return rc;
        /* The queue may have overflowed: the control region knows the true newest. A
         * rate-limited reader waits for its (throttled) descriptor first, else it would
         * take every frame from here. */
        uint64_t latest = LOAD_ACQ(&r->ctl->latest_seq);
        if (latest && r->epoch && (have || rate_due(r)) && (!have || latest - 1 > best)) {
            best = latest - 1;
            best_pub = 0;
            have = 1;
        }
        if (have && best >= floor) {
            if (r->corrupt_plus1 > best && r->corrupt_epoch == r->epoch && r->corrupt_gen == r->attach_gen) {
                /* Dropped and counted by an earlier call (or an earlier pass of this one):
                 * still the newest, still this wait's answer if nothing newer comes. */
                r->corrupt_seen = 1;
            } else {
                rc = fshm_reader_read_frame(r, best, f);
                if (rc == 0) {
                    if (!f->publish_ns)   /* a producer that does not stamp the slot */
                        f->publish_ns = best_pub;
                    took(r, f);
                    return 0;
                }
                note_drop(r, rc);
                if (rc == FSHM_E_CORRUPT) {
                    r->corrupt_plus1 = best + 1;
                    r->corrupt_epoch = r->epoch;
                    r->corrupt_gen = r->attach_gen;
                }
            }
            floor = best + 1;   /* never spin on a slot being rewritten (spec §15.21 rule 5) */
        }
        have = 0;
        int got_desc = 0;
        /* A poll (timeout 0) neither spins nor scores the spin: its window always misses. */
        rc = timeout_ns ? predictive_wait(r, deadline, floor, &seq, &pub, &epoch, &got_desc) : 0;
        if (rc < 0)
            return rc;
        if (rc == 1 && !got_desc)
            continue;   /* committed: the top of the loop picks it up */
        uint32_t gen = r->attach_gen;
        if (!got_desc)
            rc = receive(r, deadline, r->max_rate_hz && !r->no_queue ? NULL : &floor, &seq, &pub,
                         &epoch);
        if (rc < 0)
            return rc;
        if (r->attach_gen != gen)
            floor = r->last_plus1;
        if (rc == 1) {
            best = seq, best_pub = pub;
            have = 1;
        } else if (fshm_now_ns() >= deadline) {
            return timeout_result(r);
        }
    }
}

/* A queued reader's spin saw the commit: its descriptor follows within microseconds, sent
 * after the commit. The producer counts what its send loop did (desc_sent, desc_dropped
 * when a queue was full) once the loop ends, so we watch those counters in shared memory
 * and ask the queue again only when they move: a zero-timeout receive is a system call,
 * and polling the queue took 12 of them per message on a 100 kHz stream. When they move
 * and the queue is still empty, the descriptor was dropped or is the next loop's: the
 * caller then takes the frame from the ring. 200 us bounds the watch (a producer that
 * stopped between the two). 1: a descriptor; 0: none; <0: an error. */
static int await_descriptor(fshm_reader *r, uint64_t *seq, uint64_t *pub, uint64_t *epoch)
{
    const fshm_ctl *c = r->ctl;
    uint64_t sent = LOAD_RLX(&c->desc_sent), dropped = LOAD_RLX(&c->desc_dropped);
    int rc = receive(r, 0, NULL, seq, pub, epoch);
    if (rc != 0)
        return rc;
    uint64_t until = fshm_now_ns() + 200000;
    for (unsigned i = 1;; i++) {
        cpu_relax();
        if (LOAD_RLX(&c->desc_sent) != sent || LOAD_RLX(&c->desc_dropped) != dropped ||
            ((i & 63) == 0 && fshm_now_ns() >= until))
            return receive(r, 0, NULL, seq, pub, epoch);
    }
}

int fshm_reader_wait_next(fshm_reader *r, int64_t timeout_ns, fshm_frame *f)
{
    if (r->foreign)
        return fshm_foreign_wait(r, timeout_ns, 1, f);
    if (r->passive)
        return passive_error(r);
    uint64_t now = fshm_now_ns();   /* the deadline's and the environment check's */
    uint64_t deadline = deadline_for(timeout_ns, now);
    r->corrupt_seen = 0;
    if (r->entry >= 0 && !fshm_reader_ctl_ro(r)) {   /* informational: `frameshm ls` */
        /* Read first: a locked RMW on the shared entry every call costs more than the flag. */
        uint32_t *flags = &ctl_consumer(r->ctl, (unsigned)r->entry)->flags;
        if (!(LOAD_RLX(flags) & CONS_FLAG_NEXT))
            __atomic_fetch_or(flags, CONS_FLAG_NEXT, __ATOMIC_RELAXED);
    }
    int rc = fshm_reader_check_environment_at(r, 0, now);
    if (rc == FSHM_E_CORRUPT || rc == FSHM_E_LEASE)
        return rc;
    uint64_t next_try = fshm_reader_next_wanted(r);
    for (;;) {
        uint64_t seq, pub, epoch;
        rc = receive(r, 0, NULL, &seq, &pub, &epoch);
        if (rc == 0) {
            int got = 0, p = 0;
            /* A frame after the last one returned is committed already and the queue is
             * empty (a doorbell reader's always is): the reader is behind, or the frame's
             * descriptor was dropped from a full queue (or is a microsecond from being
             * sent). Either way it is taken from the ring below without asking to wait:
             * no spin bookkeeping per message while catching up, and no watch for a
             * descriptor that may never come. */
            uint64_t want = fshm_reader_next_wanted(r);
            if (timeout_ns && !(r->epoch && LOAD_ACQ(&r->ctl->latest_seq) > want))
                p = predictive_wait(r, deadline, r->last_plus1, &seq, &pub, &epoch, &got);
            if (p < 0)
                return p;
            if (got) {
                rc = 1;
            } else if (p == 1 && fshm_reader_desc_per_frame(r)) {
                rc = await_descriptor(r, &seq, &pub, &epoch);
            }
            if (rc == 0) {
                /* Queue empty: descriptors may have been dropped (queue full). The ring
                 * still holds up to nslots frames after the last one returned. */
                uint64_t latest = LOAD_ACQ(&r->ctl->latest_seq);
                if (next_try < fshm_reader_next_wanted(r))
                    next_try = fshm_reader_next_wanted(r);
                if (r->epoch && latest > next_try && rate_due(r)) {
                    uint64_t s = latest - next_try > r->nslots ? latest - r->nslots : next_try;
                    for (; s < latest; s++) {
                        int rr = fshm_reader_read_frame(r, s, f);
                        if (rr == 0) {
                            took(r, f);
                            r->overruns += f->skipped;
                            return 0;
                        }
                        note_drop(r, rr);
                    }
                    next_try = latest;
                }
                rc = receive(r, deadline, &next_try, &seq, &pub, &epoch);
            }
        }
        if (rc < 0)
            return rc;
        if (rc == 0) {
            if (fshm_now_ns() >= deadline)
                return timeout_result(r);
            continue;
        }
        if (seq < r->last_plus1)
            continue;
        uint64_t want = fshm_reader_next_wanted(r);
        if (seq > want && !r->max_rate_hz) {
            /* Descriptors between were dropped (our queue was full) while their frames may
             * still be in the ring: take those first, in order, rather than jump to this
             * one. Its descriptor is spent; the ring scan above finds it again. */
            uint64_t s = seq - want > r->nslots ? seq - r->nslots : want;
            for (; s < seq; s++) {
                /* A slot that fails here counts as overwritten (skipped), not as a drop: a
                 * corrupt one was counted when its own descriptor came, or will be. */
                if (fshm_reader_read_frame(r, s, f) == 0) {
                    took(r, f);
                    r->overruns += f->skipped;
                    return 0;
                }
            }
        }
        rc = fshm_reader_read_frame(r, seq, f);
        if (rc == 0) {
            if (!f->publish_ns)
                f->publish_ns = pub;
            took(r, f);
            r->overruns += f->skipped;
            return 0;
        }
        note_drop(r, rc);   /* overwritten before we got to it: shows up as skipped next time */
    }
}

int fshm_reader_peek_latest(fshm_reader *r, fshm_frame *f)
{
    if (r->foreign)
        return fshm_foreign_peek(r, f);
    int rc = fshm_reader_check_environment(r, 0);
    if (rc && rc != -EAGAIN && rc != -ENOENT)
        return rc;
    for (int attempt = 0; attempt < 64; attempt++) {
        uint64_t latest = LOAD_ACQ(&r->ctl->latest_seq);
        if (!latest || !r->epoch)
            return fshm_set_error(-EAGAIN, "stream '%s' has no frame yet", r->paths.name);
        rc = fshm_reader_read_frame(r, latest - 1, f);
        if (rc == 0) {
            f->skipped = 0;
            return 0;
        }
        if (rc == FSHM_E_CORRUPT) {
            r->drops++;
            return rc;
        }
        if (LOAD_ACQ(&r->ctl->latest_seq) == latest) {
            /* Still the newest yet unreadable: the stream may have moved to another
             * epoch or been replaced. Look once; then it is a slot being rewritten. */
            if (attempt == 0)
                fshm_reader_check_environment(r, 1);
            else
                break;
        }
    }
    return fshm_set_error(FSHM_E_OVERRUN, "stream '%s': the producer keeps overwriting the newest "
                          "slot; use more slots", r->paths.name);
}
