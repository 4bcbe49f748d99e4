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
 * "ring" opens the readers with no_queue = 1 (Reader(queue=False)). The first WARMUP
 * samples are dropped. Prints one JSON object: median_us, p90_us, n, cpu per sample.
 * FRAMESHM_DIR is honoured (peers.py sets it to a private directory).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s futex60|futexpp|view60|pingpong N [ring]\n", argv[0]);
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
    uint32_t v;
    while ((v = load(&sh->ready)) == 0)
        futex_wait(&sh->ready, v);
    if (sh->error) {
        fprintf(stderr, "consumer: %s\n", sh->msg);
        kill(pid, SIGKILL);
        return 1;
    }
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
