/* C side of bench/peers.py: the futex-wake floor and frameshm through its public C API,
 * between two processes (fork), each run fresh.
 *
 *   peers_c futex60  N        one-way futex wake at 60 Hz: the producer stores t0, bumps a
 *                             shared word and FUTEX_WAKEs; the consumer blocked in
 *                             FUTEX_WAIT records now - t0.
 *   peers_c futexpp  N        futex ping-pong; half round trip (round trip / 2).
 *   peers_c view60   N [ring] 1080p RGB at 60 Hz: fshm_writer_loan, memcpy 6.2 MB, commit with
 *                             the time after the fill; the consumer blocked in
 *                             fshm_reader_wait_latest records now - timestamp_ns.
 *   peers_c pingpong N [ring] 64 B ping-pong over two streams (wait_next, publish); half
 *                             round trip.
 *   peers_c lossless64 WINDOW_S START_RATE MAX_RATE REFINE MAX_BURST PACE_US SLOTS [ring]
 *                             64 B messages (seq, window, window's first and last seq in the
 *                             payload) published at an offered rate per window of WINDOW_S
 *                             seconds; the consumer (fshm_reader_wait_next) counts the gaps.
 *                             Doubling from START_RATE while lossless, then REFINE bisection
 *                             steps; it sleeps until a batch of PACE_US of schedule (at most
 *                             MAX_BURST/2 messages) is due; run late, it sends at most
 *                             MAX_BURST back to back and its schedule slips, as
 *                             peers_lossless.py's producer; prints the windows as JSON.
 * "ring" opens the readers with no_queue = 1 (Reader(queue=False)). The first WARMUP
 * samples are dropped. Prints one JSON object: median_us, p90_us, n, cpu per sample.
 * FRAMESHM_DIR is honoured (peers.py sets it to a private directory).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <linux/futex.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <frameshm/frameshm.h>

#define WARMUP 30
#define MAXN 100000

typedef struct shared {
    uint32_t ping;   /* futex words; also the ready/go flags of the fshm modes */
    uint32_t pong;
    uint32_t ready;
    uint32_t done;
    int error;
    double cons_cpu;   /* the consumer's CPU seconds in its loop (setup excluded) */
    char msg[200];
    uint64_t t0[MAXN];
    uint64_t lat[MAXN];
} shared;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* Shared (not PRIVATE) futex ops: the words live in a MAP_SHARED mapping across fork. */
static void futex_wait(uint32_t *w, uint32_t expected)
{
    syscall(SYS_futex, w, FUTEX_WAIT, expected, NULL, NULL, 0);
}

static void futex_wake(uint32_t *w)
{
    syscall(SYS_futex, w, FUTEX_WAKE, 1, NULL, NULL, 0);
}

static uint32_t load(uint32_t *w)
{
    return __atomic_load_n(w, __ATOMIC_ACQUIRE);
}

static void store(uint32_t *w, uint32_t v)
{
    __atomic_store_n(w, v, __ATOMIC_RELEASE);
}

/* Waits until *w != old; returns the new value. */
static uint32_t wait_change(uint32_t *w, uint32_t old)
{
    uint32_t v;
    while ((v = load(w)) == old)
        futex_wait(w, old);
    return v;
}

static double cpu_s(int who)
{
    struct rusage ru;
    getrusage(who, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
           ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
}

static void fail(shared *sh, const char *what)
{
    snprintf(sh->msg, sizeof sh->msg, "%s: %s", what, fshm_last_error());
    sh->error = 1;
    store(&sh->ready, 1);
    futex_wake(&sh->ready);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static char g_stream[2][64];
static double g_loop_cpu0 = -1;   /* the producer's CPU at the start of its loop */

/* CPU per sample counts the loops only: not the forks, opens, pool zero-fills, source fills. */
static void loop_starts(void)
{
    g_loop_cpu0 = cpu_s(RUSAGE_SELF);
}

static void consumer_exit(shared *sh, double c0)
{
    sh->cons_cpu = cpu_s(RUSAGE_SELF) - c0;
    _exit(0);
}

/* The parent's wait for the forked consumer (child pid) to set itself up: 0 once it is
 * ready; -1 if it failed (its message printed, the child killed). */
static int consumer_ready(shared *sh, pid_t pid)
{
    uint32_t v;
    while ((v = load(&sh->ready)) == 0)
        futex_wait(&sh->ready, v);
    if (sh->error) {
        fprintf(stderr, "consumer: %s\n", sh->msg);
        kill(pid, SIGKILL);
        return -1;
    }
    return 0;
}

/* ---- futex floor ---- */

static void futex60_child(shared *sh, long n)
{
    store(&sh->ready, 1);
    futex_wake(&sh->ready);
    double c0 = cpu_s(RUSAGE_SELF);
    uint32_t seen = 0;
    while (seen < (uint32_t)n) {
        uint32_t v = wait_change(&sh->ping, seen);
        uint64_t t1 = now_ns();
        sh->lat[v - 1] = t1 - sh->t0[v - 1];
        seen = v;
    }
    consumer_exit(sh, c0);
}

static void futex60_parent(shared *sh, long n)
{
    uint64_t period = 1000000000ull / 60;
    uint64_t start = now_ns() + period;
    for (long i = 0; i < n; i++) {
        sleep_until(start + (uint64_t)i * period);
        sh->t0[i] = now_ns();
        store(&sh->ping, (uint32_t)i + 1);
        futex_wake(&sh->ping);
    }
}

static void futexpp_child(shared *sh, long n)
{
    store(&sh->ready, 1);
    futex_wake(&sh->ready);
    double c0 = cpu_s(RUSAGE_SELF);
    uint32_t seen = 0;
    while (seen < (uint32_t)n) {
        seen = wait_change(&sh->ping, seen);
        store(&sh->pong, seen);
        futex_wake(&sh->pong);
    }
    consumer_exit(sh, c0);
}

static void futexpp_parent(shared *sh, long n)
{
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        store(&sh->ping, (uint32_t)i + 1);
        futex_wake(&sh->ping);
        wait_change(&sh->pong, (uint32_t)i);
        sh->lat[i] = (now_ns() - t0) / 2;
    }
}

/* ---- frameshm through the public API ---- */

static int open_reader(const char *name, int ring, fshm_reader **r)
{
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = name;
    rc.consumer = "peers-c";
    rc.spin = 1;   /* the Python Reader's default */
    rc.no_queue = ring;
    return fshm_reader_open(&rc, r);
}

static int open_writer(const char *name, uint32_t nslots, uint32_t bytes, fshm_writer **w)
{
    fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
    wc.addr.name = name;
    wc.nslots = nslots;
    wc.npools = 1;
    wc.pool_bytes[0] = bytes;
    return fshm_writer_open(&wc, w);
}

enum { W = 1920, H = 1080, C = 3, FRAME = W * H * C, TINY = 64 };

static void view60_child(shared *sh, long n, int ring)
{
    fshm_reader *r;
    if (open_reader(g_stream[0], ring, &r))
        return fail(sh, "reader_open"), _exit(1);
    store(&sh->ready, 1);
    futex_wake(&sh->ready);
    double c0 = cpu_s(RUSAGE_SELF);
    for (;;) {
        fshm_frame f;
        int e = fshm_reader_wait_latest(r, 250000000, &f);
        uint64_t t1 = now_ns();
        if (e == 0) {
            if (f.seq < (uint64_t)n)
                sh->lat[f.seq] = t1 - f.timestamp_ns;
            if (f.seq >= (uint64_t)n - 1)
                break;
        } else if (e == -ETIMEDOUT || e == FSHM_E_PRODUCER_DEAD) {
            if (load(&sh->done))
                break;
        } else if (e != -EINTR) {
            fail(sh, "wait_latest");
            break;
        }
    }
    sh->cons_cpu = cpu_s(RUSAGE_SELF) - c0;
    fshm_reader_close(r);
    _exit(0);
}

static int view60_parent(shared *sh, long n)
{
    fshm_writer *w;
    if (open_writer(g_stream[0], 4, FRAME, &w))
        return fprintf(stderr, "writer_open: %s\n", fshm_last_error()), -1;
    uint8_t *src = malloc(FRAME);
    if (!src)
        return -1;
    for (size_t i = 0; i < FRAME; i++)
        src[i] = (uint8_t)(i * 2654435761u >> 24);
    fshm_tensor t = {.dtype = FSHM_DTYPE_UINT8, .major_order = FSHM_ORDER_ROW, .ndims = 3};
    t.dims[0] = H, t.dims[1] = W, t.dims[2] = C;
    usleep(200000);   /* the reader maps the new epoch */
    uint64_t period = 1000000000ull / 60;
    uint64_t start = now_ns() + period;
    int rc = 0;
    loop_starts();
    for (long i = 0; i < n; i++) {
        sleep_until(start + (uint64_t)i * period);
        fshm_loan l;
        if (fshm_writer_loan(w, FRAME, &l)) {
            fprintf(stderr, "loan: %s\n", fshm_last_error());
            rc = -1;
            break;
        }
        memcpy(l.data, src, FRAME);
        if (fshm_writer_commit(w, &t, FRAME, now_ns())) {
            fprintf(stderr, "commit: %s\n", fshm_last_error());
            rc = -1;
            break;
        }
    }
    store(&sh->done, 1);
    free(src);
    int st;
    wait(&st);
    fshm_writer_close(w, 1);
    return rc;
}

/* Ping on stream 0 (parent -> child), pong on stream 1. Each side opens its reader, then
 * its writer once the other side's reader exists, so that no frame precedes a reader. */
static void pingpong_child(shared *sh, long n, int ring)
{
    fshm_reader *r;
    fshm_writer *w;
    if (open_reader(g_stream[0], ring, &r))
        return fail(sh, "reader_open"), _exit(1);
    store(&sh->ready, 1);
    futex_wake(&sh->ready);
    wait_change(&sh->pong, 0);   /* parent's reader is open */
    if (open_writer(g_stream[1], 8, TINY, &w))
        return fail(sh, "writer_open"), _exit(1);
    store(&sh->ready, 2);
    futex_wake(&sh->ready);
    fshm_tensor t = {.dtype = FSHM_DTYPE_UINT8, .major_order = FSHM_ORDER_ROW, .ndims = 1};
    t.dims[0] = TINY;
    uint8_t buf[TINY] = {0};
    double c0 = cpu_s(RUSAGE_SELF);
    for (long got = 0; got < n;) {
        fshm_frame f;
        int e = fshm_reader_wait_next(r, 250000000, &f);
        if (e == 0) {
            got++;
            if (fshm_writer_publish(w, buf, sizeof buf, &t, f.timestamp_ns))
                return fail(sh, "publish"), _exit(1);
        } else if (e == -ETIMEDOUT || e == FSHM_E_PRODUCER_DEAD) {
            if (load(&sh->done))
                break;
        } else if (e != -EINTR) {
            fail(sh, "wait_next");
            break;
        }
    }
    sh->cons_cpu = cpu_s(RUSAGE_SELF) - c0;
    fshm_writer_close(w, 1);
    fshm_reader_close(r);
    _exit(0);
}

static int pingpong_parent(shared *sh, long n, int ring)
{
    fshm_reader *r;
    fshm_writer *w;
    if (open_reader(g_stream[1], ring, &r))
        return fprintf(stderr, "reader_open: %s\n", fshm_last_error()), -1;
    store(&sh->pong, 1);
    futex_wake(&sh->pong);
    if (open_writer(g_stream[0], 8, TINY, &w))
        return fprintf(stderr, "writer_open: %s\n", fshm_last_error()), -1;
    uint32_t v;
    while ((v = load(&sh->ready)) != 2 && !sh->error)
        futex_wait(&sh->ready, v);
    if (sh->error)
        return -1;
    usleep(200000);   /* both readers map the writers' epochs */
    fshm_tensor t = {.dtype = FSHM_DTYPE_UINT8, .major_order = FSHM_ORDER_ROW, .ndims = 1};
    t.dims[0] = TINY;
    uint8_t buf[TINY] = {0};
    int rc = 0;
    loop_starts();
    for (long i = 0; i < n && rc == 0; i++) {
        uint64_t t0 = now_ns();
        if (fshm_writer_publish(w, buf, sizeof buf, &t, t0)) {
            fprintf(stderr, "publish: %s\n", fshm_last_error());
            rc = -1;
            break;
        }
        for (;;) {
            fshm_frame f;
            int e = fshm_reader_wait_next(r, 2000000000, &f);
            if (e == 0)
                break;
            if (e != -EINTR) {
                fprintf(stderr, "wait_next: %s\n", fshm_last_error());
                rc = -1;
                break;
            }
        }
        sh->lat[i] = (now_ns() - t0) / 2;
    }
    store(&sh->done, 1);
    int st;
    wait(&st);
    fshm_writer_close(w, 1);
    fshm_reader_close(r);
    return rc;
}

/* ---- lossless64: the highest paced rate a process-all consumer gets with no gap ---- */

#define LL_MAXW 64

typedef struct ll_shared {
    int64_t ended;   /* last window the producer finished sending */
    int64_t acked;   /* last window the consumer closed */
    double cpu0;     /* the consumer's CPU when it became ready */
    int64_t res[LL_MAXW][4];   /* per window: got, lost, bad, consumer CPU (ns) at close */
} ll_shared;

static ll_shared *g_ll;

static int64_t load64(int64_t *w)
{
    return __atomic_load_n(w, __ATOMIC_ACQUIRE);
}

/* Consumer: payload = seq, window, first seq of the window, last seq (uint64 each), as the
 * Python transports. A window closes at its last message, or when, idle, the consumer has
 * seen the producer end it and then found nothing more to read (its tail was lost). */
static void lossless_child(shared *sh, int ring)
{
    ll_shared *ll = g_ll;
    fshm_reader *r;
    if (open_reader(g_stream[0], ring, &r))
        return fail(sh, "reader_open"), _exit(1);
    ll->cpu0 = cpu_s(RUSAGE_SELF);
    store(&sh->ready, 1);
    futex_wake(&sh->ready);
    int64_t win = -1, end_seen = -1;
    int open = 0;
    uint64_t expect = 0, last = 0, got = 0, lost = 0, bad = 0;
#define LL_CLOSE()                                                                          \
    do {                                                                                    \
        ll->res[win][0] = (int64_t)got;                                                     \
        ll->res[win][1] = (int64_t)(lost + (last + 1 > expect ? last + 1 - expect : 0));   \
        ll->res[win][2] = (int64_t)bad;                                                     \
        ll->res[win][3] = (int64_t)(cpu_s(RUSAGE_SELF) * 1e9);                              \
        open = 0;                                                                           \
        __atomic_store_n(&ll->acked, win, __ATOMIC_RELEASE);                                \
    } while (0)
    for (;;) {
        fshm_frame f;
        int e = fshm_reader_wait_next(r, 10000000, &f);
        if (e == 0) {
            uint64_t p[4];
            memcpy(p, f.data, sizeof p);
            if (fshm_frame_valid(r, &f) != 1)
                continue;   /* lapped while we read it in place: its gap counts as lost */
            if ((int64_t)p[1] != win) {
                if (open)
                    LL_CLOSE();
                if (p[1] >= LL_MAXW) {
                    fail(sh, "window out of range");
                    break;
                }
                win = (int64_t)p[1], open = 1, expect = p[2], last = p[3], got = lost = bad = 0;
            }
            if (open && p[0] >= expect) {
                lost += p[0] - expect;
                expect = p[0] + 1;
                got++;
                if (p[0] == last)
                    LL_CLOSE();
            } else {
                bad++;
            }
        } else if (e == -ETIMEDOUT || e == FSHM_E_PRODUCER_DEAD) {
            if (open) {
                if (end_seen == win)
                    LL_CLOSE();
                else if (load64(&ll->ended) >= win)
                    end_seen = win;
            } else if (load(&sh->done)) {
                break;
            }
        } else if (e != -EINTR) {
            fail(sh, "wait_next");
            break;
        }
    }
#undef LL_CLOSE
    sh->cons_cpu = cpu_s(RUSAGE_SELF) - ll->cpu0;
    fshm_reader_close(r);
    _exit(0);
}

typedef struct ll_window {
    long rate, n, max_burst, late, acked;
    double achieved, prod_cpu_us, cons_cpu_us;
    int64_t got, lost, bad;
} ll_window;

static ll_window g_w[LL_MAXW];
static int g_nw;
static uint64_t g_next;

static long g_cap;   /* most messages back to back when run late (0: catch up in full) */
static long g_pace_us;   /* sleep until a batch of this much schedule is due (0: every message) */

static int ll_window_run(fshm_writer *w, long rate, double window_s)
{
    ll_shared *ll = g_ll;
    if (g_nw >= LL_MAXW)
        return -1;
    int k = g_nw++;
    ll_window *x = &g_w[k];
    long n = (long)((double)rate * window_s);
    if (n < 2)
        n = 2;
    uint64_t first = g_next, last = g_next + (uint64_t)n - 1;
    g_next += (uint64_t)n;
    fshm_tensor t = {.dtype = FSHM_DTYPE_UINT8, .major_order = FSHM_ORDER_ROW, .ndims = 1};
    t.dims[0] = TINY;
    uint64_t buf[TINY / 8] = {0};
    buf[1] = (uint64_t)k, buf[2] = first, buf[3] = last;
    /* Sleep until a batch of q messages is due (at most g_pace_us of schedule and half the
     * burst cap): q = 1 sleeps before every message. */
    long q = (long)((unsigned __int128)rate * (uint64_t)g_pace_us / 1000000u);
    if (q > (g_cap ? g_cap / 2 : n))
        q = g_cap ? g_cap / 2 : n;
    if (q < 1)
        q = 1;
    double c0 = cpu_s(RUSAGE_SELF);
    uint64_t t0 = now_ns(), base = t0;
    long i = 0, burst = 0, late = 0;
    while (i < n) {
        long due = (long)((now_ns() - base) * (unsigned __int128)rate / 1000000000u) + 1;
        if (due > n)
            due = n;
        if (g_cap && due - i > g_cap) {   /* run late by the scheduler: the schedule slips */
            late += due - i - g_cap;
            base += (uint64_t)((unsigned __int128)(due - i - g_cap) * 1000000000u / (uint64_t)rate);
            due = i + g_cap;
        }
        if (due - i > burst)
            burst = due - i;
        for (; i < due; i++) {
            buf[0] = first + (uint64_t)i;
            if (fshm_writer_publish(w, buf, sizeof buf, &t, 0))
                return fprintf(stderr, "publish: %s\n", fshm_last_error()), -1;
        }
        if (i < n) {   /* ahead of the schedule: sleep until message i + q - 1 is due */
            long j = i + q < n ? i + q - 1 : n - 1;
            sleep_until(base + (uint64_t)((unsigned __int128)j * 1000000000u / (uint64_t)rate));
        }
    }
    uint64_t t1 = now_ns();
    double cpu = cpu_s(RUSAGE_SELF) - c0;
    __atomic_store_n(&ll->ended, k, __ATOMIC_RELEASE);
    uint64_t until = now_ns() + 2000000000ull;
    while (load64(&ll->acked) < k && now_ns() < until)
        usleep(500);
    x->acked = load64(&ll->acked) >= k;
    x->rate = rate, x->n = n, x->max_burst = burst, x->late = late;
    x->achieved = (double)(n - 1) * 1e9 / (double)(t1 - t0 ? t1 - t0 : 1);
    x->got = ll->res[k][0], x->lost = ll->res[k][1], x->bad = ll->res[k][2];
    x->prod_cpu_us = cpu / (double)n * 1e6;
    double prev = k ? (double)ll->res[k - 1][3] / 1e9 : ll->cpu0;
    x->cons_cpu_us = x->acked ? ((double)ll->res[k][3] / 1e9 - prev) / (double)n * 1e6 : -1;
    return k;
}

/* 0: one of two windows at this rate was lossless, 1: both lost, -1: error */
static int ll_trial(fshm_writer *w, long rate, double window_s)
{
    for (int a = 0; a < 2; a++) {
        int k = ll_window_run(w, rate, window_s);
        if (k < 0)
            return -1;
        ll_window *x = &g_w[k];
        if (x->acked && x->lost == 0 && x->bad == 0 && x->got == x->n)
            return 0;
    }
    return 1;
}

/* One trial at this rate, which becomes best (one of its windows lossless) or fail_rate (both
 * lost): 0 lossless, 1 lossy, -1 error. */
static int ll_step(fshm_writer *w, long rate, double window_s, long *best, long *fail_rate)
{
    int v = ll_trial(w, rate, window_s);
    if (v == 0)
        *best = rate;
    else if (v > 0)
        *fail_rate = rate;
    return v;
}

/* The producer: the same search as peers_lossless.py's lossless_producer. */
static int lossless_parent(shared *sh, double window_s, long start, long max_rate, int refine, uint32_t slots)
{
    fshm_writer *w;
    if (open_writer(g_stream[0], slots, TINY, &w))
        return fprintf(stderr, "writer_open: %s\n", fshm_last_error()), -1;
    usleep(200000);   /* the reader maps the new epoch */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);   /* sleeps end on time (as peers_lossless.py) */
    long best = -1, fail_rate = -1, rate = start;
    int v;
    for (;;) {   /* doubling while lossless */
        if ((v = ll_step(w, rate, window_s, &best, &fail_rate)) < 0)
            goto out;
        if (v > 0 || rate * 2 > max_rate)
            break;
        rate *= 2;
    }
    while (best < 0 && rate > 1000) {   /* even the start rate lost: halve */
        rate /= 2;
        if ((v = ll_step(w, rate, window_s, &best, &fail_rate)) < 0)
            goto out;
    }
    for (int s = 0; s < refine && best > 0 && fail_rate > 0; s++) {
        long mid = (long)(sqrt((double)best * (double)fail_rate) / 100.0 + 0.5) * 100;
        if (mid <= best || mid >= fail_rate)
            break;
        if ((v = ll_step(w, mid, window_s, &best, &fail_rate)) < 0)
            goto out;
    }
    v = 0;
out:
    store(&sh->done, 1);
    int st;
    wait(&st);
    fshm_writer_close(w, 1);
    if (v < 0 || sh->error)
        return fprintf(stderr, "consumer: %s\n", sh->msg), -1;
    printf("{\"mode\": \"lossless64\", \"sent\": %llu, \"best\": ", (unsigned long long)g_next);
    best > 0 ? printf("%ld", best) : printf("null");
    printf(", \"fail\": ");
    fail_rate > 0 ? printf("%ld", fail_rate) : printf("null");
    printf(", \"windows\": [");
    for (int k = 0; k < g_nw; k++) {
        ll_window *x = &g_w[k];
        printf("%s{\"rate\": %ld, \"n\": %ld, \"achieved\": %.1f, \"max_burst\": %ld, \"late\": %ld, \"acked\": %s, "
               "\"got\": %lld, \"lost\": %lld, \"bad\": %lld, \"prod_cpu_us\": %.3f, \"cons_cpu_us\": ",
               k ? ", " : "", x->rate, x->n, x->achieved, x->max_burst, x->late, x->acked ? "true" : "false",
               (long long)x->got, (long long)x->lost, (long long)x->bad, x->prod_cpu_us);
        x->cons_cpu_us >= 0 ? printf("%.3f}", x->cons_cpu_us) : printf("null}");
    }
    printf("]}\n");
    return 0;
}

static int lossless_main(int argc, char **argv)
{
    if (argc < 9)
        return fprintf(stderr, "usage: %s lossless64 WINDOW_S START_RATE MAX_RATE REFINE MAX_BURST PACE_US SLOTS [ring]\n",
                       argv[0]), 2;
    double window_s = atof(argv[2]);
    long start = atol(argv[3]), max_rate = atol(argv[4]);
    int refine = atoi(argv[5]);
    g_cap = atol(argv[6]);
    g_pace_us = atol(argv[7]);
    long slots = atol(argv[8]);
    int ring = argc > 9 && strcmp(argv[9], "ring") == 0;
    if (window_s <= 0 || start < 1 || max_rate < start || slots < 1 || slots > 65536)
        return fprintf(stderr, "bad arguments\n"), 2;
    shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    g_ll = mmap(NULL, sizeof *g_ll, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED || g_ll == MAP_FAILED)
        return perror("mmap"), 1;
    g_ll->ended = g_ll->acked = -1;
    snprintf(g_stream[0], sizeof g_stream[0], "peersc-%d-a", (int)getpid());
    pid_t pid = fork();   /* the reader opens first, as in view60 */
    if (pid < 0)
        return perror("fork"), 1;
    if (pid == 0)
        lossless_child(sh, ring);
    if (consumer_ready(sh, pid))
        return 1;
    return lossless_parent(sh, window_s, start, max_rate, refine, (uint32_t)slots) ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "lossless64") == 0)
        return lossless_main(argc, argv);
    if (argc < 3) {
        fprintf(stderr, "usage: %s futex60|futexpp|view60|pingpong N [ring] | lossless64 ...\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    long n = atol(argv[2]) + WARMUP;
    int ring = argc > 3 && strcmp(argv[3], "ring") == 0;
    if (n <= WARMUP || n > MAXN)
        return fprintf(stderr, "N out of range\n"), 2;
    shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED)
        return perror("mmap"), 1;
    snprintf(g_stream[0], sizeof g_stream[0], "peersc-%d-a", (int)getpid());
    snprintf(g_stream[1], sizeof g_stream[1], "peersc-%d-b", (int)getpid());
    int fsh = strcmp(mode, "view60") == 0 || strcmp(mode, "pingpong") == 0;
    if (!fsh && strcmp(mode, "futex60") && strcmp(mode, "futexpp"))
        return fprintf(stderr, "unknown mode %s\n", mode), 2;
    pid_t pid = fork();
    if (pid < 0)
        return perror("fork"), 1;
    if (pid == 0) {
        if (!strcmp(mode, "futex60"))
            futex60_child(sh, n);
        if (!strcmp(mode, "futexpp"))
            futexpp_child(sh, n);
        if (!strcmp(mode, "view60"))
            view60_child(sh, n, ring);
        pingpong_child(sh, n, ring);
    }
    if (consumer_ready(sh, pid))
        return 1;
    loop_starts();   /* the fshm modes restart it after their setup */
    int rc = 0;
    if (!strcmp(mode, "futex60"))
        futex60_parent(sh, n);
    else if (!strcmp(mode, "futexpp"))
        futexpp_parent(sh, n);
    else if (!strcmp(mode, "view60"))
        rc = view60_parent(sh, n);
    else
        rc = pingpong_parent(sh, n, ring);
    double prod = cpu_s(RUSAGE_SELF) - g_loop_cpu0;
    int st;
    waitpid(pid, &st, 0);   /* already reaped by the fshm modes: harmless ECHILD */
    double cons = sh->cons_cpu;
    if (sh->error) {
        fprintf(stderr, "consumer: %s\n", sh->msg);
        return 1;
    }
    if (rc)
        return 1;
    long m = 0;
    for (long i = WARMUP; i < n; i++)
        if (sh->lat[i])
            sh->lat[m++] = sh->lat[i];
    if (m == 0)
        return fprintf(stderr, "no samples\n"), 1;
    qsort(sh->lat, (size_t)m, sizeof sh->lat[0], cmp_u64);
    printf("{\"mode\": \"%s%s\", \"n\": %ld, \"sent\": %ld, \"median_us\": %.2f, \"p90_us\": %.2f, "
           "\"prod_cpu_us\": %.2f, \"cons_cpu_us\": %.2f}\n",
           mode, ring ? "-ring" : "", m, n, (double)sh->lat[m / 2] / 1e3,
           (double)sh->lat[(long)(0.9 * (double)(m - 1))] / 1e3, prod / (double)n * 1e6,
           cons / (double)n * 1e6);
    return 0;
}
