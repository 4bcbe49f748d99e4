/* Blocking wake-up latency: producer -> consumer process blocked in a wait, one way.
 *
 *   frameshm: the producer takes ts = fshm_now_ns() and calls fshm_writer_publish() of a
 *             small frame carrying ts; a consumer process blocked in
 *             fshm_reader_wait_latest() (cfg.spin = 0 or 1) records fshm_now_ns() - ts
 *             as soon as the call returns the frame.
 *   mqueue:   the raw floor under frameshm's wake-up: the producer mq_send()s ts to a
 *             POSIX message queue; a consumer process blocked in mq_receive() records
 *             now - ts.
 *
 * Paced by the producer with absolute clock_nanosleep(CLOCK_MONOTONIC) at 1 kHz and at
 * 60 Hz. Prints a markdown table (median, p90, p99, max in microseconds); -j writes JSON.
 *
 *   make -C bench run            # build + run with the defaults
 *   ./wake_latency -h
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <mqueue.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <frameshm/frameshm.h>

#ifndef GIT_REV
#define GIT_REV "unknown"
#endif

#define WARMUP 20
#define FRAME_BYTES 64

static char g_base[256];
static char g_mq[64];
static pid_t g_child = -1;
static char g_stream[32];

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

static int rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static void cleanup(void)
{
    if (g_child > 0) {
        kill(g_child, SIGKILL);
        waitpid(g_child, NULL, 0);
        g_child = -1;
    }
    if (g_mq[0]) {
        mq_unlink(g_mq);
        g_mq[0] = 0;
    }
    if (g_base[0]) {
        nftw(g_base, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
        g_base[0] = 0;
    }
}

static void on_signal(int sig)
{
    cleanup();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Shared between the producer (parent) and the consumer (child). */
typedef struct shared {
    volatile int ready;
    volatile int done;         /* producer finished */
    volatile uint64_t last_seq;
    volatile int64_t nsamples;
    volatile int error;
    char msg[256];
    uint64_t lat[];            /* one-way latency per frame index, 0 = not seen */
} shared;

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

typedef struct result {
    const char *name;
    int hz;
    int spin;          /* -1: not frameshm */
    long sent, seen;
    double median, p90, p99, max, min;
} result;

static double pct(const uint64_t *v, long n, double q)
{
    long i = (long)(q * (double)(n - 1) + 0.5);
    return (double)v[i] / 1e3;
}

static void summarize(shared *sh, long total, result *res)
{
    uint64_t *v = malloc(sizeof(uint64_t) * (size_t)total);
    long n = 0;
    for (long i = WARMUP; i < total; i++)
        if (sh->lat[i])
            v[n++] = sh->lat[i];
    qsort(v, (size_t)n, sizeof v[0], cmp_u64);
    res->sent = total - WARMUP;
    res->seen = n;
    if (n) {
        res->median = pct(v, n, 0.5);
        res->p90 = pct(v, n, 0.9);
        res->p99 = pct(v, n, 0.99);
        res->max = (double)v[n - 1] / 1e3;
        res->min = (double)v[0] / 1e3;
    }
    free(v);
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

static int g_pin = 0;

/* ---- frameshm ---- */

static void fshm_consumer(shared *sh, long total, int spin)
{
    pin(g_pin ? 1 : -1);
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = g_stream;
    rc.addr.base_dir = g_base;
    rc.consumer = "wake-bench";
    rc.spin = spin;
    fshm_reader *r;
    int e = fshm_reader_open(&rc, &r);
    if (e) {
        snprintf(sh->msg, sizeof sh->msg, "reader_open: %s", fshm_last_error());
        sh->error = 1;
        sh->ready = 1;
        _exit(1);
    }
    __atomic_store_n(&sh->ready, 1, __ATOMIC_RELEASE);
    for (;;) {
        fshm_frame f;
        memset(&f, 0, sizeof f);
        e = fshm_reader_wait_latest(r, 300000000, &f);
        uint64_t t1 = fshm_now_ns();
        if (e == 0) {
            if (f.seq < (uint64_t)total)
                sh->lat[f.seq] = t1 - f.timestamp_ns;
            if (f.seq >= (uint64_t)total - 1)
                break;
        } else if (e == -ETIMEDOUT || e == FSHM_E_PRODUCER_DEAD) {
            if (sh->done)
                break;
        } else if (e != -EINTR) {
            snprintf(sh->msg, sizeof sh->msg, "wait_latest: %s", fshm_last_error());
            sh->error = 1;
            break;
        }
    }
    fshm_reader_close(r);
    _exit(0);
}

static int run_fshm(shared *sh, long total, int hz, int spin, result *res)
{
    static int ncase;
    snprintf(g_stream, sizeof g_stream, "wake-%d", ncase++);   /* fresh stream: seqs from 0 */
    memset(sh->lat, 0, sizeof(uint64_t) * (size_t)total);
    sh->ready = sh->done = sh->error = 0;
    pid_t pid = fork();
    if (pid < 0)
        return perror("fork"), -1;
    if (pid == 0)
        fshm_consumer(sh, total, spin);
    g_child = pid;
    pin(g_pin ? 0 : -1);
    while (!__atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE))
        usleep(1000);
    fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
    wc.addr.name = g_stream;
    wc.addr.base_dir = g_base;
    wc.nslots = 8;
    wc.npools = 1;
    wc.pool_bytes[0] = FRAME_BYTES;
    fshm_writer *w;
    if (fshm_writer_open(&wc, &w)) {
        fprintf(stderr, "writer_open: %s\n", fshm_last_error());
        return -1;
    }
    fshm_tensor t = {.dtype = FSHM_DTYPE_UINT8, .major_order = FSHM_ORDER_ROW, .ndims = 1};
    t.dims[0] = FRAME_BYTES;
    uint8_t buf[FRAME_BYTES];
    memset(buf, 7, sizeof buf);
    usleep(100000);   /* the reader maps the new epoch */
    uint64_t period = 1000000000ull / (uint64_t)hz;
    uint64_t start = now_ns() + period;
    for (long i = 0; i < total; i++) {
        sleep_until(start + (uint64_t)i * period);
        uint64_t ts = fshm_now_ns();
        if (fshm_writer_publish(w, buf, sizeof buf, &t, ts)) {
            fprintf(stderr, "publish: %s\n", fshm_last_error());
            break;
        }
    }
    sh->done = 1;
    int st;
    waitpid(pid, &st, 0);
    g_child = -1;
    fshm_writer_close(w, 1);
    if (sh->error)
        fprintf(stderr, "consumer: %s\n", sh->msg);
    summarize(sh, total, res);
    return sh->error ? -1 : 0;
}

/* ---- raw POSIX mqueue ---- */

static void mq_consumer(shared *sh, long total)
{
    pin(g_pin ? 1 : -1);
    mqd_t q = mq_open(g_mq, O_RDONLY);
    if (q == (mqd_t)-1) {
        snprintf(sh->msg, sizeof sh->msg, "mq_open: %s", strerror(errno));
        sh->error = 1;
        sh->ready = 1;
        _exit(1);
    }
    __atomic_store_n(&sh->ready, 1, __ATOMIC_RELEASE);
    for (;;) {
        uint64_t m[8];
        ssize_t n = mq_receive(q, (char *)m, sizeof m, NULL);
        uint64_t t1 = now_ns();
        if (n < 0) {
            if (errno == EINTR)
                continue;
            snprintf(sh->msg, sizeof sh->msg, "mq_receive: %s", strerror(errno));
            sh->error = 1;
            break;
        }
        if (m[0] == UINT64_MAX)
            break;
        if (m[0] < (uint64_t)total)
            sh->lat[m[0]] = t1 - m[1];
    }
    mq_close(q);
    _exit(0);
}

static int run_mq(shared *sh, long total, int hz, result *res)
{
    memset(sh->lat, 0, sizeof(uint64_t) * (size_t)total);
    sh->ready = sh->done = sh->error = 0;
    snprintf(g_mq, sizeof g_mq, "/fshm-wakebench-%d", (int)getpid());
    struct mq_attr attr = {.mq_maxmsg = 8, .mq_msgsize = 64};
    mq_unlink(g_mq);
    mqd_t q = mq_open(g_mq, O_WRONLY | O_CREAT | O_EXCL, 0600, &attr);
    if (q == (mqd_t)-1) {
        attr.mq_maxmsg = 1;
        q = mq_open(g_mq, O_WRONLY | O_CREAT | O_EXCL, 0600, &attr);
    }
    if (q == (mqd_t)-1) {
        fprintf(stderr, "mq_open %s: %s\n", g_mq, strerror(errno));
        g_mq[0] = 0;
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0)
        return perror("fork"), -1;
    if (pid == 0)
        mq_consumer(sh, total);
    g_child = pid;
    pin(g_pin ? 0 : -1);
    while (!__atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE))
        usleep(1000);
    usleep(100000);
    uint64_t period = 1000000000ull / (uint64_t)hz;
    uint64_t start = now_ns() + period;
    for (long i = 0; i < total; i++) {
        sleep_until(start + (uint64_t)i * period);
        uint64_t m[8] = {0};
        m[0] = (uint64_t)i;
        m[1] = now_ns();
        if (mq_send(q, (const char *)m, sizeof m, 0) != 0 && errno != EAGAIN) {
            perror("mq_send");
            break;
        }
    }
    uint64_t end[8] = {UINT64_MAX};
    mq_send(q, (const char *)end, sizeof end, 0);
    sh->done = 1;
    int st;
    waitpid(pid, &st, 0);
    g_child = -1;
    mq_close(q);
    mq_unlink(g_mq);
    g_mq[0] = 0;
    summarize(sh, total, res);
    return sh->error ? -1 : 0;
}

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [-a N1k] [-b N60] [-c cases] [-p] [-j out.json]\n"
            "  -a N   samples at 1 kHz (default 4000, 4 s per case)\n"
            "  -b N   samples at 60 Hz (default 360, 6 s per case)\n"
            "  -c S   cases to run, any of: fshm0 fshm1 mq (comma-separated; default all)\n"
            "  -p     pin the producer to CPU 0 and the consumer to CPU 1\n"
            "  -j F   also write the results as JSON to F\n",
            argv0);
}

int main(int argc, char **argv)
{
    long n1k = 4000, n60 = 360;
    const char *cases = "fshm0,fshm1,mq", *json = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "a:b:c:pj:h")) != -1) {
        switch (opt) {
        case 'a': n1k = atol(optarg); break;
        case 'b': n60 = atol(optarg); break;
        case 'c': cases = optarg; break;
        case 'p': g_pin = 1; break;
        case 'j': json = optarg; break;
        default: usage(argv[0]); return opt == 'h' ? 0 : 2;
        }
    }
    if (n1k < 0 || n60 < 0)
        return usage(argv[0]), 2;
    n1k += WARMUP;
    n60 += WARMUP;
    long maxn = n1k > n60 ? n1k : n60;

    snprintf(g_base, sizeof g_base, "/dev/shm/bench-wake-%d", (int)getpid());
    if (mkdir(g_base, 0700) != 0) {
        fprintf(stderr, "mkdir %s: %s\n", g_base, strerror(errno));
        g_base[0] = 0;
        return 1;
    }
    atexit(cleanup);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGHUP, on_signal);

    shared *sh = mmap(NULL, sizeof(shared) + sizeof(uint64_t) * (size_t)maxn, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED)
        return perror("mmap"), 1;

    struct utsname u;
    uname(&u);
    printf("# wake_latency — nproc=%ld, kernel=%s, core=%s, frame=%d bytes, warmup=%d%s\n\n",
           sysconf(_SC_NPROCESSORS_ONLN), u.release, GIT_REV, FRAME_BYTES, WARMUP,
           g_pin ? ", pinned (producer cpu0, consumer cpu1)" : ", not pinned");
    fflush(stdout);

    result res[16];
    int nres = 0, fail = 0;
    const int rates[2] = {1000, 60};
    for (int ri = 0; ri < 2; ri++) {
        int hz = rates[ri];
        long total = hz == 1000 ? n1k : n60;
        if (total <= WARMUP)
            continue;
        struct { const char *key, *name; int spin; } cs[3] = {
            {"fshm0", "frameshm wait_latest spin=0", 0},
            {"fshm1", "frameshm wait_latest spin=1", 1},
            {"mq", "raw mqueue mq_send -> mq_receive", -1},
        };
        for (int ci = 0; ci < 3; ci++) {
            if (!strstr(cases, cs[ci].key))
                continue;
            result *r = &res[nres];
            memset(r, 0, sizeof *r);
            r->name = cs[ci].name;
            r->hz = hz;
            r->spin = cs[ci].spin;
            int rc = cs[ci].spin >= 0 ? run_fshm(sh, total, hz, cs[ci].spin, r) : run_mq(sh, total, hz, r);
            if (rc)
                fail = 1;
            fprintf(stderr, "  %-34s %5d Hz  median %7.1f us  p99 %8.1f us  (%ld/%ld)\n", r->name, hz,
                    r->median, r->p99, r->seen, r->sent);
            nres++;
        }
    }

    printf("\n| case | rate | frames seen | median µs | p90 µs | p99 µs | max µs | median vs mqueue |\n");
    printf("|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < nres; i++) {
        double base = 0;
        for (int j = 0; j < nres; j++)
            if (res[j].spin < 0 && res[j].hz == res[i].hz)
                base = res[j].median;
        char ratio[32] = "-";
        if (base > 0)
            snprintf(ratio, sizeof ratio, "%.2f×", res[i].median / base);
        printf("| %s | %d Hz | %ld/%ld | %.1f | %.1f | %.1f | %.1f | %s |\n", res[i].name, res[i].hz,
               res[i].seen, res[i].sent, res[i].median, res[i].p90, res[i].p99, res[i].max, ratio);
    }
    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            perror(json);
            fail = 1;
        } else {
            fprintf(f, "{\n  \"benchmark\": \"wake_latency\",\n  \"machine\": {\"nproc\": %ld, \"kernel\": \"%s\", \"git\": \"%s\"},\n"
                       "  \"frame_bytes\": %d, \"warmup\": %d, \"pinned\": %s,\n  \"results\": [\n",
                    sysconf(_SC_NPROCESSORS_ONLN), u.release, GIT_REV, FRAME_BYTES, WARMUP,
                    g_pin ? "true" : "false");
            for (int i = 0; i < nres; i++)
                fprintf(f,
                        "    {\"case\": \"%s\", \"hz\": %d, \"sent\": %ld, \"seen\": %ld, \"median_us\": %.2f, "
                        "\"p90_us\": %.2f, \"p99_us\": %.2f, \"max_us\": %.2f, \"min_us\": %.2f}%s\n",
                        res[i].name, res[i].hz, res[i].sent, res[i].seen, res[i].median, res[i].p90,
                        res[i].p99, res[i].max, res[i].min, i + 1 < nres ? "," : "");
            fprintf(f, "  ]\n}\n");
            fclose(f);
        }
    }
    munmap(sh, sizeof(shared) + sizeof(uint64_t) * (size_t)maxn);
    return fail;
}
