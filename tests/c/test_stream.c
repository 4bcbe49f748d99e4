/* Writer + reader behaviour, in one process and across fork(): attach order, latest
 * and process-all reads, overruns, timeouts, dead producers, producer exclusivity and
 * restart, consumer-table pruning, corrupt regions, full file systems, cleanup.
 *
 * Children created with fork() never return into cmocka: they use the raw API and
 * report through their exit status or a pipe. */
#include "fshm_test_util.h"
#include "fshm_reader_impl.h"   /* the adaptive-spin tests look at the reader's state */
#include "fshm_writer_impl.h"   /* the burst tests count the producer's futex wakes */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <mqueue.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>


#define MS 1000000ll
#define SEC 1000000000ll

/* ---- helpers ---- */

static void expect_frame(const fshm_frame *f, uint64_t seq, uint64_t epoch, size_t n)
{
    assert_int_equal(f->seq, seq);
    assert_int_equal(f->epoch, epoch);
    assert_int_equal(f->nbytes, n);
    assert_non_null(f->data);
    assert_non_null(f->map);
    assert_int_equal(f->tensor.dtype, FSHM_DTYPE_UINT8);
    assert_int_equal(f->tensor.ndims, 1);
    assert_int_equal(f->tensor.dims[0], (int32_t)n);
    if (!tu_check(f->data, n, seq))
        fail_msg("payload of frame %llu does not hold its pattern", (unsigned long long)seq);
}

static void stream_dir_of(const char *name, char *out, size_t cap)
{
    tu_stream_dir(fshm_stream_id_for_name(name), out, cap);
}

static size_t ring_slot_off(uint32_t idx) { return 64 + (size_t)idx * 256; }

/* Finds the consumer registered by pid through fshm_stream_info_get. */
static int lookup_consumer(const char *name, int64_t pid, char queue[32], int *alive,
                           uint64_t *pruned)
{
    int found = 0;
    fshm_stream_info *info = calloc(1, sizeof *info);
    assert_non_null(info);
    fshm_stream_addr a;
    memset(&a, 0, sizeof a);
    a.name = name;
    int rc = fshm_stream_info_get(&a, info);
    if (rc)
        fail_msg("fshm_stream_info_get: %d %s", rc, fshm_last_error());
    for (uint32_t i = 0; i < info->nconsumers && i < FSHM_MAX_CONSUMERS; i++)
        if (info->consumers[i].pid == pid) {
            memcpy(queue, info->consumers[i].queue, 32);
            *alive = info->consumers[i].alive;
            found = 1;
        }
    *pruned = info->pruned;
    free(info);
    return found;
}

static int queue_exists(const char *q)
{
    mqd_t d = mq_open(q, O_RDONLY | O_NONBLOCK);
    if (d == (mqd_t)-1) {
        assert_int_equal(errno, ENOENT);
        return 0;
    }
    mq_close(d);
    return 1;
}

static void region_of(const char *name, uint64_t epoch, const char *file, char *out, size_t cap)
{
    tu_region_path(fshm_stream_id_for_name(name), epoch, file, out, cap);
}

/* Removes whatever a killed child producer left of a stream. */
static void reclaim_stream(const char *name)
{
    fshm_writer *w = tu_writer(name, 1, 64);
    fshm_writer_close(w, 1);
}

/* Child: writer publishing `count` frames of n bytes (then one every ms when forever),
 * reporting its epoch and the seq of its last initial frame through fd. */
static void __attribute__((noreturn))
child_writer(const char *name, uint32_t nslots, int count, size_t n, int forever, int fd)
{
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = name;
    cfg.nslots = nslots;
    cfg.npools = 1;
    cfg.pool_bytes[0] = 4096;
    fshm_writer *w;
    if (fshm_writer_open(&cfg, &w) != 0)
        _exit(10);
    uint8_t buf[4096];
    fshm_tensor t = tu_u8_tensor((uint32_t)n);
    for (int i = 0; i < count; i++) {
        tu_fill(buf, n, fshm_writer_next_seq(w));
        if (fshm_writer_publish(w, buf, n, &t, 0) != 0)
            _exit(11);
    }
    uint64_t msg[2] = {fshm_writer_epoch(w), fshm_writer_next_seq(w) - 1};
    tu_signal_ready(fd, msg, sizeof msg);
    for (;;) {
        if (forever) {
            tu_fill(buf, n, fshm_writer_next_seq(w));
            fshm_writer_publish(w, buf, n, &t, 0);
        }
        tu_sleep_ms(1);
    }
}

/* ---- attach order, latest and process-all ---- */

static void test_reader_before_writer(void **state)
{
    (void)state;
    const char *name = "st-before";
    fshm_reader *r = tu_reader(name);
    int64_t pid = -1;
    assert_int_equal(fshm_reader_producer_state(r, &pid), FSHM_PRODUCER_NONE);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(fshm_reader_wait_latest(r, 50 * MS, &f), -ETIMEDOUT);
    assert_int_equal(fshm_reader_wait_next(r, 20 * MS, &f), -ETIMEDOUT);
    assert_int_equal(fshm_reader_peek_latest(r, &f), -EAGAIN);
    assert_int_equal(fshm_reader_epoch(r), 0);

    fshm_writer *w = tu_writer(name, 4, 4096);
    assert_int_equal(fshm_reader_producer_state(r, &pid), FSHM_PRODUCER_ALIVE);
    assert_int_equal(pid, getpid());
    uint64_t before = fshm_now_ns();
    assert_int_equal(tu_publish(w, 1000), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 1000);
    assert_int_equal(f.skipped, 0);
    assert_true(f.publish_ns >= before);   /* the commit time, in the slot */
    assert_true(f.timestamp_ns >= before);
    assert_int_equal(fshm_reader_epoch(r), 1);
    assert_int_equal(fshm_reader_stream_id(r), fshm_writer_stream_id(w));

    /* Second frame through wait_next. */
    assert_int_equal(tu_publish(w, 10), 0);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 1, 1, 10);
    assert_int_equal(f.skipped, 0);

    fshm_reader_close(r);
    fshm_writer_close(w, 1);
    char dir[PATH_MAX];
    stream_dir_of(name, dir, sizeof dir);
    assert_false(tu_path_exists(dir));
}

static void test_reader_after_writer(void **state)
{
    (void)state;
    const char *name = "st-after";
    fshm_writer *w = tu_writer(name, 4, 4096);
    for (int i = 0; i < 3; i++)
        assert_int_equal(tu_publish(w, 100 + i), 0);
    fshm_reader *r = tu_reader(name);
    assert_int_equal(fshm_reader_epoch(r), 1);   /* mapped at open */
    fshm_frame f = tu_frame_zero();
    /* The newest committed frame is there at once, known from the control region. */
    assert_int_equal(fshm_reader_peek_latest(r, &f), 0);
    expect_frame(&f, 2, 1, 102);
    assert_int_equal(fshm_reader_wait_latest(r, 0, &f), 0);
    expect_frame(&f, 2, 1, 102);
    assert_int_equal(f.skipped, 0);
    assert_true(f.publish_ns >= f.timestamp_ns);   /* no descriptor for it: from the slot */
    assert_int_equal(fshm_reader_wait_latest(r, 30 * MS, &f), -ETIMEDOUT);

    assert_int_equal(tu_publish(w, 7), 0);
    assert_int_equal(tu_publish(w, 8), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 4, 1, 8);
    assert_int_equal(f.skipped, 1);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

static void test_wait_latest_reports_skipped(void **state)
{
    (void)state;
    const char *name = "st-latest";
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(tu_publish(w, 64), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 64);
    assert_int_equal(f.skipped, 0);

    for (int i = 0; i < 5; i++)
        assert_int_equal(tu_publish(w, 64 + i), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 5, 1, 68);
    assert_int_equal(f.skipped, 4);
    assert_true(f.publish_ns > 0);

    /* Far more frames than the descriptor queue holds: still the true newest. */
    int n = 3 * fshm_queue_limit() + 5;
    for (int i = 0; i < n; i++)
        assert_int_equal(tu_publish(w, 32), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 5 + (uint64_t)n, 1, 32);
    assert_int_equal(f.skipped, (uint64_t)n - 1);
    /* The queue was drained: nothing newer is pending. */
    assert_int_equal(fshm_reader_wait_latest(r, 30 * MS, &f), -ETIMEDOUT);
    assert_int_equal(fshm_reader_drops(r), 0);
    assert_int_equal(fshm_reader_overruns(r), 0);   /* latest-mode skips are not overruns */
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

static void test_wait_next_in_order(void **state)
{
    (void)state;
    const char *name = "st-next";
    fshm_writer *w = tu_writer(name, 16, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    int n = fshm_queue_limit() < 8 ? fshm_queue_limit() : 8;
    for (int i = 0; i < n; i++)
        assert_int_equal(tu_publish(w, 200 + i), 0);
    for (int i = 0; i < n; i++) {
        assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
        expect_frame(&f, (uint64_t)i, 1, 200 + (size_t)i);
        assert_int_equal(f.skipped, 0);
        assert_true(f.publish_ns > 0);
    }
    assert_int_equal(fshm_reader_wait_next(r, 30 * MS, &f), -ETIMEDOUT);
    /* Interleaved with publishing. */
    for (int i = 0; i < 20; i++) {
        assert_int_equal(tu_publish(w, 50), 0);
        assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
        expect_frame(&f, (uint64_t)(n + i), 1, 50);
        assert_int_equal(f.skipped, 0);
    }
    assert_int_equal(fshm_reader_overruns(r), 0);
    assert_int_equal(fshm_reader_drops(r), 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* The descriptor queue overflowed while the ring still holds every frame, and newer
 * descriptors arrived after the reader had drained the queue: the reader takes the
 * frames the queue lost from the ring, in order, instead of jumping to the newer one. */
static void test_wait_next_queue_overflow_interleaved(void **state)
{
    (void)state;
    const char *name = "st-next-gap";
    int q = fshm_queue_limit();
    if (q >= 30)
        skip();
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    for (int i = 0; i < 30; i++)   /* the queue keeps the first q descriptors */
        assert_int_equal(tu_publish(w, 64), 0);
    for (int i = 0; i < q / 2; i++) {
        assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
        expect_frame(&f, (uint64_t)i, 1, 64);
    }
    for (int i = 0; i < q / 2; i++)   /* room again: these descriptors (30, ...) get in */
        assert_int_equal(tu_publish(w, 64), 0);
    for (int i = q / 2; i < 30 + q / 2; i++) {
        assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
        expect_frame(&f, (uint64_t)i, 1, 64);
        assert_int_equal(f.skipped, 0);
    }
    assert_int_equal(fshm_reader_wait_next(r, 30 * MS, &f), -ETIMEDOUT);
    assert_int_equal(fshm_reader_overruns(r), 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* A relay's numbering: skip_to leaves a gap that readers count as skipped, and never
 * goes back. */
static void test_writer_skip_to(void **state)
{
    (void)state;
    const char *name = "st-skip";
    fshm_writer *w = tu_writer(name, 4, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(tu_publish(w, 64), 0);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 64);
    assert_int_equal(fshm_writer_skip_to(w, 1000), 0);
    assert_int_equal(fshm_writer_next_seq(w), 1000);
    assert_int_equal(tu_publish(w, 64), 0);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 1000, 1, 64);
    assert_int_equal(f.skipped, 999);
    assert_int_equal(fshm_writer_skip_to(w, 1001), 0);   /* the next in line: no gap */
    assert_int_equal(fshm_writer_skip_to(w, 7), -EINVAL);
    assert_int_equal(fshm_writer_next_seq(w), 1001);
    assert_int_equal(tu_publish(w, 64), 0);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 1001, 1, 64);
    assert_int_equal(f.skipped, 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* Lapped process-all reader whose descriptor queue did not overflow. */
static void test_wait_next_overrun_small(void **state)
{
    (void)state;
    const char *name = "st-lap-small";
    if (fshm_queue_limit() < 5)
        skip();
    fshm_writer *w = tu_writer(name, 2, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(tu_publish(w, 64), 0);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 64);
    for (int i = 0; i < 5; i++)   /* seqs 1..5; the 2-slot ring keeps 4 and 5 */
        assert_int_equal(tu_publish(w, 64), 0);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 4, 1, 64);
    assert_int_equal(f.skipped, 3);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 5, 1, 64);
    assert_int_equal(f.skipped, 0);
    assert_int_equal(fshm_reader_overruns(r), 3);
    assert_int_equal(fshm_reader_wait_next(r, 30 * MS, &f), -ETIMEDOUT);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* nslots = 2, 20 frames published before reading: more than the descriptor queue
 * holds (msg_max, 10 by default), so every queued descriptor names an overwritten
 * slot. The reader must still get the frames the ring holds, in order, and count
 * the rest as overruns. */
static void test_wait_next_overrun_lapped(void **state)
{
    (void)state;
    const char *name = "st-lap";
    fshm_writer *w = tu_writer(name, 2, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(tu_publish(w, 64), 0);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 64);
    for (int i = 0; i < 20; i++)   /* seqs 1..20 */
        assert_int_equal(tu_publish(w, 64), 0);
    uint64_t last = 0, skipped = 0;
    int got = 0;
    for (;;) {
        int rc = fshm_reader_wait_next(r, got ? 100 * MS : 1 * SEC, &f);
        if (rc == -ETIMEDOUT && got)
            break;
        if (rc != 0)
            fail_msg("wait_next after being lapped returned %d (%s) instead of the frames "
                     "still in the ring (seqs 19 and 20); overruns so far %llu",
                     rc, fshm_last_error(), (unsigned long long)fshm_reader_overruns(r));
        expect_frame(&f, f.seq, 1, 64);
        assert_true(f.seq > last);
        assert_int_equal(f.skipped, f.seq - last - 1);
        skipped += f.skipped;
        last = f.seq;
        got++;
    }
    assert_int_equal(last, 20);
    assert_true(skipped > 0);
    assert_int_equal(skipped + (uint64_t)got, 20);
    assert_int_equal(fshm_reader_overruns(r), skipped);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* ---- a reader in a second process ---- */

static void test_reader_in_child_process(void **state)
{
    (void)state;
    const char *name = "st-fork-reader";
    fshm_writer *w = tu_writer(name, 8, 4096);
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = tu_fork();
    if (pid == 0) {
        close(p[0]);
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = name;
        rc.consumer = "child";
        fshm_reader *r;
        if (fshm_reader_open(&rc, &r) != 0)
            _exit(10);
        tu_signal_ready(p[1], "R", 1);
        fshm_frame f;
        for (uint64_t i = 0; i < 5; i++) {
            if (fshm_reader_wait_next(r, 5 * SEC, &f) != 0)
                _exit(11);
            if (f.seq != i || f.skipped != 0 || f.nbytes != 300 + i || !tu_check(f.data, f.nbytes, i))
                _exit(12);
        }
        if (fshm_reader_wait_latest(r, 50 * MS, &f) != -ETIMEDOUT)
            _exit(13);
        fshm_reader_close(r);
        _exit(0);
    }
    close(p[1]);
    char c;
    assert_int_equal(tu_wait_ready(p[0], &c, 1, 5000), 0);
    close(p[0]);
    for (int i = 0; i < 5; i++)
        assert_int_equal(tu_publish(w, 300 + (size_t)i), 0);
    assert_int_equal(tu_wait_child(pid, 10000), 0);
    fshm_writer_close(w, 1);
    char dir[PATH_MAX];
    stream_dir_of(name, dir, sizeof dir);
    assert_false(tu_path_exists(dir));
}

/* ---- predictive spin (fshm_reader_config.spin) ---- */

typedef struct paced_writer {
    fshm_writer *w;
    int frames;
    int period_ms;
    int rc;
} paced_writer;

static void *paced_main(void *arg)
{
    paced_writer *p = arg;
    for (int i = 0; i < p->frames && !p->rc; i++) {
        p->rc = tu_publish(p->w, 256);
        tu_sleep_ms(p->period_ms);
    }
    return NULL;
}

/* A steady stream (one frame every 3 ms, above the 2 ms spin threshold) read by a
 * spinning reader: process-all sees every frame in order, latest-mode sees increasing
 * seqs whose skips add up. */
static void test_spin_reader_steady_stream(void **state)
{
    (void)state;
    const char *name = "st-spin";
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = name;
    rc.spin = 1;
    fshm_reader *r;
    assert_int_equal(fshm_reader_open(&rc, &r), 0);
    tu_track(r);
    for (int mode = 0; mode < 2; mode++) {
        paced_writer pw = {.w = w, .frames = 60, .period_ms = 3, .rc = 0};
        uint64_t first = fshm_writer_next_seq(w), last_seq = first + 59;
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, paced_main, &pw), 0);
        uint64_t expect = first, got = 0, skipped = 0;
        fshm_frame f = tu_frame_zero();
        for (;;) {
            int rc2 = mode == 0 ? fshm_reader_wait_next(r, 2 * SEC, &f)
                                : fshm_reader_wait_latest(r, 2 * SEC, &f);
            if (rc2 != 0) {
                pthread_join(t, NULL);
                fail_msg("%s: rc %d (%s) after %llu frames", mode ? "wait_latest" : "wait_next",
                         rc2, fshm_last_error(), (unsigned long long)got);
            }
            expect_frame(&f, f.seq, 1, 256);
            /* In order; any gap is reported as skipped (a reader descheduled for longer
             * than the descriptor queue lasts may lose frames even in process-all mode). */
            assert_true(f.seq >= expect);
            assert_int_equal(f.skipped, f.seq - expect);
            skipped += f.skipped;
            expect = f.seq + 1;
            got++;
            if (f.seq == last_seq)
                break;
        }
        pthread_join(t, NULL);
        assert_int_equal(pw.rc, 0);
        assert_int_equal(got + skipped, 60);
        if (mode == 0 && skipped)
            print_message("    (wait_next lost %llu of 60 frames: host too loaded?)\n",
                          (unsigned long long)skipped);
    }
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* Reads `frames` frames of a paced stream with wait_latest (so predictive spinning runs),
 * calling look(r) after each; the writer thread alternates the two periods. */
typedef struct jitter_writer {
    fshm_writer *w;
    int frames, ms_a, ms_b, rc;
} jitter_writer;

static void *jitter_main(void *arg)
{
    jitter_writer *p = arg;
    for (int i = 0; i < p->frames && !p->rc; i++) {
        p->rc = tu_publish(p->w, 256);
        tu_sleep_ms(i & 1 ? p->ms_b : p->ms_a);
    }
    return NULL;
}

/* A thread running fn(arg), confined to `cpus` (NULL: anywhere). */
static pthread_t start_thread_on(void *(*fn)(void *), void *arg, const cpu_set_t *cpus)
{
    pthread_attr_t a;
    pthread_attr_init(&a);
    if (cpus)
        assert_int_equal(pthread_attr_setaffinity_np(&a, sizeof *cpus, cpus), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, &a, fn, arg), 0);
    pthread_attr_destroy(&a);
    return t;
}

/* writer_cpus: where the writer thread may run (NULL: anywhere). */
static void read_paced_cpus(fshm_writer *w, fshm_reader *r, int frames, int ms_a, int ms_b,
                            const cpu_set_t *writer_cpus, void (*look)(fshm_reader *, void *), void *arg)
{
    jitter_writer jw = {.w = w, .frames = frames, .ms_a = ms_a, .ms_b = ms_b};
    uint64_t last_seq = fshm_writer_next_seq(w) + (uint64_t)frames - 1;
    pthread_t t = start_thread_on(jitter_main, &jw, writer_cpus);
    fshm_frame f = tu_frame_zero();
    do {
        int rc = fshm_reader_wait_latest(r, 5 * SEC, &f);
        if (rc) {
            pthread_join(t, NULL);
            fail_msg("wait_latest: %d (%s)", rc, fshm_last_error());
        }
        if (look)
            look(r, arg);
    } while (f.seq < last_seq);
    pthread_join(t, NULL);
    assert_int_equal(jw.rc, 0);
}

static void read_paced(fshm_writer *w, fshm_reader *r, int frames, int ms_a, int ms_b,
                       void (*look)(fshm_reader *, void *), void *arg)
{
    read_paced_cpus(w, r, frames, ms_a, ms_b, NULL, look, arg);
}

static void open_spinning(const char *name, fshm_reader **r)
{
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = name;
    rc.spin = 1;
    assert_int_equal(fshm_reader_open(&rc, r), 0);
    tu_track(*r);
}

/* The first two CPUs we may run on (fewer on a 1-CPU machine): their count. */
static int first_cpus(int cpus[2])
{
    cpu_set_t all;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    int n = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && n < 2; cpu++)
        if (CPU_ISSET(cpu, &all))
            cpus[n++] = cpu;
    return n;
}

static void pin_self(cpu_set_t *mask, int cpu)
{
    CPU_ZERO(mask);
    CPU_SET(cpu, mask);
    assert_int_equal(sched_setaffinity(0, sizeof *mask, mask), 0);
}

typedef struct spin_seen {
    uint16_t most_tries;
    uint32_t most_rest;
} spin_seen;

static void note_spin(fshm_reader *r, void *arg)
{
    spin_seen *s = arg;
    if (r->spin_tries > s->most_tries)
        s->most_tries = r->spin_tries;
    if (r->spin_rest > s->most_rest)
        s->most_rest = r->spin_rest;
}

/* As read_paced, with the writer thread on CPU wcpu and this thread on rcpu: the reader
 * gives up its spin windows on the producer's CPU (on_producer_cpu), so a test of the
 * spin keeps the two apart. */
static void read_paced_pinned(fshm_writer *w, fshm_reader *r, int frames, int ms_a, int ms_b, int wcpu,
                              int rcpu, void (*look)(fshm_reader *, void *), void *arg)
{
    cpu_set_t all, mine, theirs;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    CPU_ZERO(&theirs);
    CPU_SET(wcpu, &theirs);
    pin_self(&mine, rcpu);
    read_paced_cpus(w, r, frames, ms_a, ms_b, &theirs, look, arg);
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
}

/* As read_paced (periods 3 ms), with the writer thread on CPU wcpu and this thread on rcpu. */
static void read_paced_on(fshm_writer *w, fshm_reader *r, int frames, int wcpu, int rcpu, spin_seen *seen)
{
    read_paced_pinned(w, r, frames, 3, 3, wcpu, rcpu, note_spin, seen);
}

/* Spinning is off while the stream's consumers and producer outnumber the CPUs we may
 * run on (counted from our affinity), and on again once they do not. */
static void test_spin_off_when_consumers_outnumber_cpus(void **state)
{
    (void)state;
    const char *name = "st-spin-crowd";
    cpu_set_t all, one;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    int first = 0;
    while (!CPU_ISSET(first, &all))
        first++;
    CPU_ZERO(&one);
    CPU_SET(first, &one);
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader *r;
    open_spinning(name, &r);
    /* One CPU: this consumer and the producer are two. */
    assert_int_equal(sched_setaffinity(0, sizeof one, &one), 0);
    read_paced(w, r, 12, 3, 3, NULL, NULL);
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
    assert_int_equal(r->spin_cpus, 1);
    assert_int_equal(r->spin_crowded, 1);
    fshm_reader_close(r);
    if (CPU_COUNT(&all) >= 2) {
        open_spinning(name, &r);
        read_paced(w, r, 12, 3, 3, NULL, NULL);
        assert_int_equal(r->spin_crowded, 0);
        /* More consumers than CPUs: the table changed, so it is counted again. */
        fshm_reader *more[2];
        for (int i = 0; i < 2; i++)
            more[i] = tu_reader(name);
        r->spin_cpus = 2;   /* as on a 2-CPU machine, whatever this one has */
        read_paced(w, r, 12, 3, 3, NULL, NULL);
        assert_int_equal(r->spin_crowded, 1);
        for (int i = 0; i < 2; i++)
            fshm_reader_close(more[i]);
        read_paced(w, r, 12, 3, 3, NULL, NULL);
        assert_int_equal(r->spin_crowded, 0);
        fshm_reader_close(r);
    }
    fshm_writer_close(w, 1);
}

static void note_rest(fshm_reader *r, void *arg)
{
    uint32_t *most = arg;
    if (r->spin_rest > *most)
        *most = r->spin_rest;
}

/* Windows that keep missing their frame (a producer that alternates 4 and 12 ms periods,
 * so every frame comes well before or well after the predicted one) stop the spinning
 * for a while; a steady producer's windows keep it on. */
static void test_spin_rests_when_it_does_not_pay_off(void **state)
{
    (void)state;
    const char *name = "st-spin-payoff";
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader *r;
    open_spinning(name, &r);
    r->spin_cpus = 64;   /* never crowded here: only the pay-off rule is under test */
    /* Writer and reader on CPUs of their own: on the writer's CPU no window is tried. */
    int cpus[2];
    if (first_cpus(cpus) < 2) {
        fshm_reader_close(r);
        fshm_writer_close(w, 1);
        skip();
    }
    uint32_t most = 0;
    /* A loaded machine skips windows (the frame is already late: plain blocking), and
     * only windows are scored: give it more rounds rather than a fixed 80 frames. */
    for (int round = 0; round < 6 && most == 0; round++)
        read_paced_pinned(w, r, 80, 4, 12, cpus[0], cpus[1], note_rest, &most);
    assert_true(most > 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* The writer notes the CPU of each loan in the control region (producer_cpu, CPU + 1),
 * and follows a move to another CPU. */
static void test_writer_notes_its_cpu_at_each_loan(void **state)
{
    (void)state;
    const char *name = "st-prod-cpu";
    cpu_set_t all, one;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader *r = tu_reader(name);
    int cpus[2], n = first_cpus(cpus);
    for (int k = 0; k < n; k++) {
        pin_self(&one, cpus[k]);
        fshm_loan l;
        assert_int_equal(fshm_writer_loan(w, 256, &l), 0);
        assert_int_equal(__atomic_load_n(&r->ctl->producer_cpu, __ATOMIC_RELAXED), (uint32_t)cpus[k] + 1);
        fshm_tensor t = {.dtype = FSHM_DTYPE_UINT8, .major_order = FSHM_ORDER_ROW, .ndims = 1};
        t.dims[0] = 256;
        assert_int_equal(fshm_writer_commit(w, &t, 256, 0), 0);
    }
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* A spinning reader on the CPU the producer fills its frames on gives up its window (the
 * spin would only keep the producer off that CPU) and is not scored for it; on another
 * CPU it spins and scores its windows, so the check below can fail. */
static void test_spin_stays_off_the_producers_cpu(void **state)
{
    (void)state;
    const char *name = "st-spin-cpu";
    int cpus[2], n = first_cpus(cpus);
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader *r;
    open_spinning(name, &r);
    r->spin_cpus = 64;   /* never crowded here, though we pin ourselves to one CPU */
    spin_seen same = {0};
    read_paced_on(w, r, 40, cpus[0], cpus[0], &same);
    assert_true(r->interval_ns > 0);   /* the period was known: windows were due */
    assert_int_equal(same.most_tries, 0);
    assert_int_equal(same.most_rest, 0);
    assert_int_equal(r->spin_hits, 0);
    if (n == 2) {
        /* A loaded machine skips windows (the frame already late): give it more rounds. */
        spin_seen apart = {0};
        for (int round = 0; round < 6 && !apart.most_tries && !apart.most_rest; round++)
            read_paced_on(w, r, 40, cpus[0], cpus[1], &apart);
        assert_true(apart.most_tries > 0 || apart.most_rest > 0);
    }
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* A consumer pinned to one CPU, its producer on another: they do not share a CPU, so its
 * windows are tried (before, one CPU of our own counted as crowded by the producer, and a
 * pinned consumer never spun); pinned to the producer's CPU, it is crowded. */
static void test_spin_pinned_apart_from_the_producer(void **state)
{
    (void)state;
    const char *name = "st-spin-pinned";
    int cpus[2];
    if (first_cpus(cpus) < 2)
        skip();
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader *r;
    open_spinning(name, &r);
    spin_seen apart = {0};
    for (int round = 0; round < 6 && !apart.most_tries && !apart.most_rest; round++)
        read_paced_on(w, r, 40, cpus[0], cpus[1], &apart);
    assert_int_equal(r->spin_cpus, 1);
    assert_int_equal(r->spin_crowded, 0);
    assert_true(apart.most_tries > 0 || apart.most_rest > 0);
    fshm_reader_close(r);
    open_spinning(name, &r);
    spin_seen same = {0};
    read_paced_on(w, r, 20, cpus[0], cpus[0], &same);
    assert_int_equal(r->spin_cpus, 1);
    assert_int_equal(r->spin_crowded, 1);
    assert_int_equal(same.most_tries, 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* What the window hook saw, and where the reader was put back between frames. */
typedef struct window_seen {
    int producer_cpu, calls, with_prev, prev_right, off_producer, mask_restored;
    uint64_t last_seq;   /* the frame the reader returned last */
    cpu_set_t both;
} window_seen;

static void on_window(void *arg, const fshm_frame *prev)
{
    window_seen *s = arg;
    s->calls++;
    if (prev) {
        s->with_prev++;
        s->prev_right += prev->seq == s->last_seq && prev->nbytes == 256;
    }
    s->off_producer += sched_getcpu() != s->producer_cpu;
    cpu_set_t now;
    s->mask_restored += sched_getaffinity(0, sizeof now, &now) == 0 && CPU_EQUAL(&now, &s->both);
}

/* After each frame: back onto the producer's CPU, with both CPUs allowed again, so that
 * the next window opens there (pinning moves us; widening the mask does not). */
static void back_on_producer_cpu(fshm_reader *r, void *arg)
{
    window_seen *s = arg;
    cpu_set_t one;
    s->last_seq = r->last_plus1 - 1;
    pin_self(&one, s->producer_cpu);
    assert_int_equal(sched_setaffinity(0, sizeof s->both, &s->both), 0);
}

/* A window that opens on the producer's CPU moves the reader off it, with the caller's
 * affinity as it was, and then calls the window hook with the frame the reader returned
 * last. Before the move existed the reader blocked there and the hook never ran. */
static void test_window_moves_off_the_producers_cpu_and_calls_the_hook(void **state)
{
    (void)state;
    const char *name = "st-spin-window";
    int cpus[2];
    if (first_cpus(cpus) < 2) {
        print_message("    (one CPU: nothing to move to)\n");
        return;
    }
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader *r;
    open_spinning(name, &r);
    r->spin_cpus = 64;   /* never crowded: the test is about placement */
    cpu_set_t all;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    window_seen s = {.producer_cpu = cpus[0]};
    CPU_ZERO(&s.both);
    CPU_SET(cpus[0], &s.both);
    CPU_SET(cpus[1], &s.both);
    assert_int_equal(sched_setaffinity(0, sizeof s.both, &s.both), 0);
    fshm_reader_on_window(r, on_window, &s);
    cpu_set_t theirs;
    CPU_ZERO(&theirs);
    CPU_SET(cpus[0], &theirs);
    /* A loaded machine skips windows (the frame already late): give it more rounds. */
    for (int round = 0; round < 6 && s.calls < 10; round++)
        read_paced_cpus(w, r, 40, 3, 3, &theirs, back_on_producer_cpu, &s);
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
    print_message("    (%d windows: %d off the producer's CPU, %d with the previous frame)\n", s.calls,
                  s.off_producer, s.with_prev);
    assert_true(s.calls >= 10);
    assert_int_equal(s.mask_restored, s.calls);
    assert_int_equal(s.prev_right, s.with_prev);
    assert_true(s.with_prev * 10 >= s.calls * 9);     /* 8 slots: the last frame is still there */
    assert_true(s.off_producer * 10 >= s.calls * 9);  /* allowing for a rebalance in between */
    /* No hook, no call; and spin = 0 never calls it. */
    fshm_reader_on_window(r, NULL, NULL);
    int before = s.calls;
    read_paced(w, r, 20, 3, 3, NULL, NULL);
    assert_int_equal(s.calls, before);
    fshm_reader_close(r);
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = name;
    rc.spin = 0;
    assert_int_equal(fshm_reader_open(&rc, &r), 0);
    tu_track(r);
    fshm_reader_on_window(r, on_window, &s);
    read_paced(w, r, 20, 3, 3, NULL, NULL);
    assert_int_equal(s.calls, before);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* After each frame: two polls (timeout 0) that found nothing must leave the spin's score
 * and rest as they were; counts the polls that did not. */
static void polls_leave_spin_alone(fshm_reader *r, void *arg)
{
    int *scored = arg;
    fshm_frame f = tu_frame_zero();
    for (int i = 0; i < 2; i++) {
        uint16_t tries = r->spin_tries, hits = r->spin_hits;
        uint32_t rest = r->spin_rest;
        int rc = i ? fshm_reader_wait_latest(r, 0, &f) : fshm_reader_wait_next(r, 0, &f);
        if (rc != 0 && (r->spin_tries != tries || r->spin_hits != hits || r->spin_rest != rest))
            (*scored)++;
    }
}

/* A poll (timeout 0) is no spin window: polls between frames neither score the spin (a
 * window that cannot wait always misses, and enough misses would make spinning rest) nor
 * use up a rest. A queueless reader reaches the spin code on a poll made early in the
 * frame period; a queued one returns from its queue's timed receive first. */
static void test_spin_not_scored_by_polls(void **state)
{
    (void)state;
    const char *name = "st-spin-poll";
    fshm_writer *w = tu_writer(name, 8, 4096);
    fshm_reader *r = tu_reader_no_queue(name);
    tu_track(r);
    r->spin = 1;
    r->spin_cpus = 64;   /* never crowded here */
    int scored = 0;
    read_paced(w, r, 30, 20, 20, polls_leave_spin_alone, &scored);
    assert_true(r->interval_ns > 0);   /* the period was known: polls reached the spin code */
    assert_int_equal(scored, 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* no_queue = 1: registered without a queue by choice; process-all takes every frame of a
 * paced stream from the ring, in order, woken by the futex; none is sent as a descriptor. */
static void test_no_queue_reader_by_choice(void **state)
{
    (void)state;
    const char *name = "st-noqueue";
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader *r = tu_reader_no_queue(name);
    assert_string_equal(fshm_reader_queue_name(r), "");
    paced_writer pw = {.w = w, .frames = 40, .period_ms = 2, .rc = 0};
    uint64_t first = fshm_writer_next_seq(w);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, paced_main, &pw), 0);
    fshm_frame f = tu_frame_zero();
    for (uint64_t want = first; want < first + 40; want++) {
        int rc2 = fshm_reader_wait_next(r, 10 * SEC, &f);
        if (rc2) {
            pthread_join(t, NULL);
            fail_msg("wait_next: %d (%s)", rc2, fshm_last_error());
        }
        assert_int_equal(f.seq, want);
        assert_int_equal(f.skipped, 0);
        expect_frame(&f, want, 1, 256);
    }
    pthread_join(t, NULL);
    assert_int_equal(pw.rc, 0);
    assert_int_equal(fshm_reader_overruns(r), 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* A producer of 64 B messages in bursts, a short busy gap between bursts (no sleep, so
 * the gaps stay microseconds long). */
typedef struct burst_writer {
    fshm_writer *w;
    int bursts, per_burst, rc;
    uint64_t gap_ns;
} burst_writer;

static void *burst_main(void *arg)
{
    burst_writer *b = arg;
    for (int i = 0; i < b->bursts && !b->rc; i++) {
        for (int k = 0; k < b->per_burst && !b->rc; k++)
            b->rc = tu_publish(b->w, 64);
        for (uint64_t until = tu_now_ns() + b->gap_ns; tu_now_ns() < until;)
            ;
    }
    return NULL;
}

/* Reads a burst_writer's stream to its end, the writer on cpus[0] and us on cpus[1]: the
 * FUTEX_WAKEs the writer made for us and our voluntary context switches (our sleeps). */
static void read_bursts(fshm_writer *w, fshm_reader *r, const int cpus[2], int bursts,
                        uint64_t *wakes, long *sleeps)
{
    cpu_set_t all, one;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    pin_self(&one, cpus[1]);
    burst_writer b = {.w = w, .bursts = bursts, .per_burst = 8, .gap_ns = 1000};
    uint64_t last = fshm_writer_next_seq(w) + (uint64_t)bursts * 8 - 1, wakes0 = w->futex_wakes;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_THREAD, &ru0);
    cpu_set_t theirs;
    CPU_ZERO(&theirs);
    CPU_SET(cpus[0], &theirs);
    pthread_t t = start_thread_on(burst_main, &b, &theirs);
    fshm_frame f = tu_frame_zero();
    do {
        int rc = fshm_reader_wait_next(r, 10 * SEC, &f);
        if (rc) {
            pthread_join(t, NULL);
            fail_msg("wait_next: %d (%s)", rc, fshm_last_error());
        }
    } while (f.seq < last);
    getrusage(RUSAGE_THREAD, &ru1);
    pthread_join(t, NULL);
    assert_int_equal(b.rc, 0);
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
    *wakes = w->futex_wakes - wakes0;
    *sleeps = ru1.ru_nvcsw - ru0.ru_nvcsw;
}

typedef struct blocked_wait {
    fshm_reader *r;
    int latest;           /* wait_latest, else wait_next */
    int rc;
    char error[256];      /* fshm_last_error is per thread */
    atomic_int done;
} blocked_wait;

static void *blocked_wait_main(void *arg)
{
    blocked_wait *b = arg;
    fshm_frame f = tu_frame_zero();
    b->rc = b->latest ? fshm_reader_wait_latest(b->r, 10 * SEC, &f) : fshm_reader_wait_next(b->r, 10 * SEC, &f);
    snprintf(b->error, sizeof b->error, "%s", fshm_last_error());
    atomic_store(&b->done, 1);
    return NULL;
}

static void note_signal(int sig) { (void)sig; }

/* A handler installed without SA_RESTART ends a blocked wait with -EINTR, with a queue
 * (mq_timedreceive) and without one (the futex): the documented way to cancel a wait, and
 * how Python's Ctrl-C ends it at once. The signal is sent until the wait returns, as one
 * that lands before the thread sleeps only runs the handler. */
static void test_signal_ends_a_blocked_wait(void **state)
{
    (void)state;
    const char *name = "st-eintr";
    struct sigaction sa = {.sa_handler = note_signal}, old;
    sigemptyset(&sa.sa_mask);
    assert_int_equal(sigaction(SIGUSR1, &sa, &old), 0);
    fshm_writer *w = tu_writer(name, 64, 4096);
    assert_int_equal(tu_publish(w, 16), 0);
    for (int no_queue = 0; no_queue <= 1; no_queue++)
        for (int latest = 0; latest <= 1; latest++) {
            fshm_reader *r = no_queue ? tu_reader_no_queue(name) : tu_reader(name);
            fshm_frame f = tu_frame_zero();
            assert_int_equal(fshm_reader_wait_latest(r, 5 * SEC, &f), 0);   /* nothing newer after it */
            blocked_wait b = {.r = r, .latest = latest, .rc = 1};
            pthread_t t;
            assert_int_equal(pthread_create(&t, NULL, blocked_wait_main, &b), 0);
            uint64_t t0 = tu_now_ns();
            while (!atomic_load(&b.done) && tu_now_ns() - t0 < 8 * SEC) {
                pthread_kill(t, SIGUSR1);
                tu_sleep_ms(20);
            }
            pthread_join(t, NULL);
            if (b.rc != -EINTR)
                fail_msg("%s, %s: %d (%s) after %.1f s of signals", no_queue ? "no queue" : "queue",
                         latest ? "wait_latest" : "wait_next", b.rc, b.error,
                         (double)(tu_now_ns() - t0) / 1e9);
            fshm_reader_close(r);
        }
    fshm_writer_close(w, 1);
    assert_int_equal(sigaction(SIGUSR1, &old, NULL), 0);
}

/* A queueless reader of a fast stream (a message every microsecond or so, in bursts)
 * that has caught up polls before it sleeps: the producer rings no doorbell for it
 * between bursts. Sleeping there cost the reader a futex sleep and the producer a
 * FUTEX_WAKE per burst, more than the gap; with spin = 0 it still does. A pause longer
 * than the poll shrinks it. */
static void test_fast_stream_reader_polls_between_bursts(void **state)
{
    (void)state;
    const char *name = "st-burst";
    int cpus[2];
    if (first_cpus(cpus) < 2) {
        print_message("    (one CPU: a poll would only keep the producer off it)\n");
        return;
    }
    fshm_writer *w = tu_writer(name, 4096, 4096);
    enum { BURSTS = 2000 };
    uint64_t wakes[2];
    long sleeps[2];
    for (int spin = 0; spin < 2; spin++) {
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = name;
        rc.no_queue = 1;
        rc.spin = spin;
        fshm_reader *r;
        assert_int_equal(fshm_reader_open(&rc, &r), 0);
        tu_track(r);
        read_bursts(w, r, cpus, BURSTS, &wakes[spin], &sleeps[spin]);
        if (spin) {
            /* A pause longer than any poll: each wait that polls in vain halves the
             * poll, down to about what the sleep costs, so a producer that pauses
             * between bursts costs ~4 us of polling per burst, not 20. The stream is
             * made fast and the score fresh here, since a loaded machine's stall of the
             * producer may have taught the reader otherwise by now. */
            cpu_set_t all, one;
            assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
            pin_self(&one, cpus[1]);
            r->interval_ns = 1000;
            r->spin_rest = r->spin_tries = r->spin_hits = 0;
            fshm_frame f = tu_frame_zero();
            for (int k = 0; k < 6; k++)
                assert_int_equal(fshm_reader_wait_next(r, 1000000, &f), -ETIMEDOUT);
            assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
            assert_int_equal(r->burst_span_ns, 4000);
        }
        fshm_reader_close(r);
    }
    print_message("    (%d bursts: %llu doorbells rung and %ld sleeps without the poll, %llu and %ld "
                  "with it)\n", BURSTS, (unsigned long long)wakes[0], sleeps[0],
                  (unsigned long long)wakes[1], sleeps[1]);
    /* A loaded machine descheduling the producer still makes the poller sleep now and
     * then; a sleep per burst is what the poll removes. */
    assert_true(wakes[1] * 4 <= BURSTS);
    fshm_writer_close(w, 1);
}

typedef struct replier {
    fshm_reader *r;     /* requests */
    fshm_writer *w;     /* replies */
    int rounds, rc;
    long sleeps;
} replier;

static long thread_sleeps(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return ru.ru_nvcsw;
}

static void *replier_main(void *arg)
{
    replier *p = arg;
    fshm_frame f = tu_frame_zero();
    long s0 = 0;
    for (int i = 0; i < p->rounds && !p->rc; i++) {
        if (i == 20)
            s0 = thread_sleeps();   /* as the requester: after 20 rounds */
        if (!(p->rc = fshm_reader_wait_next(p->r, 10 * SEC, &f)))
            p->rc = tu_publish(p->w, 64);
    }
    p->sleeps = thread_sleeps() - s0;
    return NULL;
}

/* Both sides' sleeps over `rounds` exchanges between this thread (requests, on cpus[0])
 * and a replier thread (replies, on cpus[1]), the first 20 exchanges not counted. */
static long exchange_sleeps(const int cpus[2], int no_queue, int spin, int rounds)
{
    fshm_writer *wq = tu_writer("st-request", 64, 4096), *wp = tu_writer("st-reply", 64, 4096);
    fshm_reader *rs[2];
    const char *names[2] = {"st-request", "st-reply"};
    for (int k = 0; k < 2; k++) {
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = names[k];
        rc.no_queue = no_queue;
        rc.spin = spin;
        assert_int_equal(fshm_reader_open(&rc, &rs[k]), 0);
        tu_track(rs[k]);
    }
    cpu_set_t all, one, theirs;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    pin_self(&one, cpus[0]);
    CPU_ZERO(&theirs);
    CPU_SET(cpus[1], &theirs);
    replier p = {.r = rs[0], .w = wp, .rounds = rounds + 20};
    pthread_t t = start_thread_on(replier_main, &p, &theirs);
    fshm_frame f = tu_frame_zero();
    long s0 = 0;
    for (int i = 0; i < rounds + 20; i++) {
        if (i == 2)
            rs[0]->interval_ns = rs[1]->interval_ns = 10000;   /* read once by now */
        if (i == 20)
            s0 = thread_sleeps();
        int rc = tu_publish(wq, 64);
        if (!rc)
            rc = fshm_reader_wait_next(rs[1], 10 * SEC, &f);
        if (rc) {
            pthread_join(t, NULL);
            fail_msg("round %d: %d (%s)", i, rc, fshm_last_error());
        }
    }
    long mine = thread_sleeps() - s0;
    pthread_join(t, NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
    fshm_reader_close(rs[0]);
    fshm_reader_close(rs[1]);
    fshm_writer_close(wq, 1);
    fshm_writer_close(wp, 1);
    return mine + p.sleeps;
}

/* Two threads exchange requests and replies over two streams, each on its own CPU, the
 * way a ping-pong between processes does. The reply comes back in microseconds, but a
 * reader that sleeps makes it 25-35 us on a 2-vCPU VM (a cross-CPU wake-up each way), so
 * each side slept once per message; a spinning reader polls for it instead (the stream
 * counts as fast, a message every 50 us or less), with a queue and without one. The
 * readers' period is set fast at the start, as a slow machine's sleeping exchange could
 * measure more than 50 us and a loaded one's certainly does. */
static void test_request_reply_readers_poll(void **state)
{
    (void)state;
    int cpus[2];
    if (first_cpus(cpus) < 2) {
        print_message("    (one CPU: a poll would only keep the other side off it)\n");
        return;
    }
    enum { ROUNDS = 2000, TRIES = 3 };
    for (int no_queue = 0; no_queue < 2; no_queue++) {
        long without = exchange_sleeps(cpus, no_queue, 0, ROUNDS), with[TRIES];
        /* The poll only pays while each side keeps its CPU: a machine busy enough to
         * deschedule one side for most of an exchange (several busy tasks per CPU) makes
         * the other sleep anyway. So the poll gets up to three tries to show it removes
         * most sleeps; a poll that never works fails all three, whatever the load. */
        int n = 0;
        do
            with[n] = exchange_sleeps(cpus, no_queue, 1, ROUNDS);
        while (with[n++] * 4 > 2 * ROUNDS && n < TRIES);
        char tries[64] = "";
        for (int k = 0; k < n; k++)
            snprintf(tries + strlen(tries), sizeof tries - strlen(tries), "%s%ld", k ? ", " : "", with[k]);
        print_message("    (%s: %d exchanges, both sides' sleeps: %ld without the poll, %s with it)\n",
                      no_queue ? "no queue" : "queue", ROUNDS, without, tries);
        /* Without the poll each side sleeps about once per message. */
        assert_true(with[n - 1] * 4 <= 2 * ROUNDS);
    }
}

/* A big publish() (streaming stores past 1 MiB) from a misaligned source with a length
 * that is not a multiple of 64: every byte arrives. */
static void test_big_publish_copies_every_byte(void **state)
{
    (void)state;
    const char *name = "st-bigfill";
    const size_t n = (2u << 20) + 37, cap = 3u << 20;
    fshm_writer *w = tu_writer(name, 2, (uint32_t)cap);
    fshm_reader *r = tu_reader(name);
    uint8_t *buf = malloc(n + 3);
    assert_non_null(buf);
    fshm_tensor t = tu_u8_tensor((uint32_t)n);
    for (int round = 0; round < 3; round++) {
        for (size_t i = 0; i < n; i++)
            buf[3 + i] = (uint8_t)(i * 31 + (size_t)round);
        assert_int_equal(fshm_writer_publish(w, buf + 3, n, &t, 0), 0);
        fshm_frame f = tu_frame_zero();
        assert_int_equal(fshm_reader_wait_next(r, 5 * SEC, &f), 0);
        assert_int_equal(f.nbytes, n);
        assert_memory_equal(f.data, buf + 3, n);
        assert_true(fshm_frame_valid(r, &f));
    }
    free(buf);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* ---- timeouts and dead producers ---- */

static void test_timeout_producer_alive(void **state)
{
    (void)state;
    const char *name = "st-timeout";
    fshm_writer *w = tu_writer(name, 4, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(tu_publish(w, 16), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    uint64_t t0 = fshm_now_ns();
    assert_int_equal(fshm_reader_wait_latest(r, 100 * MS, &f), -ETIMEDOUT);
    assert_true(fshm_now_ns() - t0 >= 100 * MS);   /* never returns early */
    assert_non_null(strstr(fshm_last_error(), "alive"));
    assert_int_equal(fshm_reader_wait_next(r, 20 * MS, &f), -ETIMEDOUT);
    assert_int_equal(fshm_reader_wait_latest(r, 0, &f), -ETIMEDOUT);
    assert_int_equal(fshm_reader_peek_latest(r, &f), 0);   /* peek has no "newer" rule */
    assert_int_equal(f.seq, 0);
    /* A cleanly closed producer is not a dead one. */
    fshm_writer_close(w, 1);
    assert_int_equal(fshm_reader_producer_state(r, NULL), FSHM_PRODUCER_CLOSED);
    assert_int_equal(fshm_reader_wait_latest(r, 20 * MS, &f), -ETIMEDOUT);
    fshm_reader_close(r);
    char dir[PATH_MAX];
    stream_dir_of(name, dir, sizeof dir);
    assert_false(tu_path_exists(dir));   /* last one out removes a closed stream */
}

static int proc_state(pid_t pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' ? p[2] : 0;
}

static void test_timeout_producer_dead(void **state)
{
    (void)state;
    const char *name = "st-dead";
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = tu_fork();
    if (pid == 0) {
        close(p[0]);
        child_writer(name, 4, 1, 256, 0, p[1]);
    }
    close(p[1]);
    uint64_t msg[2];
    assert_int_equal(tu_wait_ready(p[0], msg, sizeof msg, 5000), 0);
    close(p[0]);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 256);
    int64_t ppid;
    assert_int_equal(fshm_reader_producer_state(r, &ppid), FSHM_PRODUCER_ALIVE);
    assert_int_equal(ppid, pid);
    assert_int_equal(fshm_reader_wait_latest(r, 30 * MS, &f), -ETIMEDOUT);

    /* Killed but not reaped yet: a zombie is dead too. */
    assert_int_equal(kill(pid, SIGKILL), 0);
    for (int i = 0; i < 2000 && proc_state(pid) != 'Z'; i++)
        tu_sleep_ms(1);
    assert_int_equal(proc_state(pid), 'Z');
    assert_int_equal(fshm_reader_producer_state(r, NULL), FSHM_PRODUCER_DEAD);
    assert_int_equal(fshm_reader_wait_latest(r, 50 * MS, &f), FSHM_E_PRODUCER_DEAD);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_int_equal(fshm_reader_wait_latest(r, 50 * MS, &f), FSHM_E_PRODUCER_DEAD);
    assert_int_equal(fshm_reader_wait_next(r, 20 * MS, &f), FSHM_E_PRODUCER_DEAD);
    assert_non_null(strstr(fshm_last_error(), "dead"));
    /* Whatever the dead producer committed stays readable. */
    assert_int_equal(fshm_reader_peek_latest(r, &f), 0);
    expect_frame(&f, 0, 1, 256);
    fshm_reader_close(r);
    reclaim_stream(name);
}

/* ---- one producer per stream; restarts ---- */

static void test_second_writer_busy(void **state)
{
    (void)state;
    const char *name = "st-busy";
    fshm_writer *w = tu_writer(name, 4, 4096);
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = name;
    cfg.nslots = 8;
    cfg.npools = 1;
    cfg.pool_bytes[0] = 64;
    fshm_writer *w2 = (fshm_writer *)&cfg;
    assert_int_equal(fshm_writer_open(&cfg, &w2), -EBUSY);
    assert_null(w2);
    /* From another process as well (and the failed attempt above did not drop the lock). */
    pid_t pid = tu_fork();
    if (pid == 0) {
        fshm_writer *x;
        _exit(fshm_writer_open(&cfg, &x) == -EBUSY ? 0 : 1);
    }
    assert_int_equal(tu_wait_child(pid, 5000), 0);
    /* The first writer is unaffected. */
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(tu_publish(w, 33), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 33);
    /* Once it is gone, the next producer gets the stream with a new epoch. */
    fshm_writer_close(w, 0);
    assert_int_equal(fshm_writer_open(&cfg, &w2), 0);
    assert_int_equal(fshm_writer_epoch(w2), 2);
    assert_int_equal(tu_publish(w2, 34), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 1, 2, 34);
    fshm_reader_close(r);
    fshm_writer_close(w2, 1);
}

static void test_producer_restart(void **state)
{
    (void)state;
    const char *name = "st-restart";
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = tu_fork();
    if (pid == 0) {
        close(p[0]);
        child_writer(name, 4, 3, 512, 1, p[1]);
    }
    close(p[1]);
    uint64_t msg[2];
    assert_int_equal(tu_wait_ready(p[0], msg, sizeof msg, 5000), 0);
    close(p[0]);
    assert_int_equal(msg[0], 1);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, f.seq, 1, 512);
    assert_true(f.seq >= 2);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);   /* it keeps publishing */
    expect_frame(&f, f.seq, 1, 512);

    tu_kill_child(pid);
    /* Drain what it published before dying; then the reader learns it is dead. */
    int rc;
    uint64_t last = f.seq;
    while ((rc = fshm_reader_wait_latest(r, 50 * MS, &f)) == 0) {
        expect_frame(&f, f.seq, 1, 512);
        last = f.seq;
    }
    assert_int_equal(rc, FSHM_E_PRODUCER_DEAD);

    /* The new producer takes over: epoch 2, stale epoch 1 removed, seqs keep growing. */
    fshm_writer *w = tu_writer(name, 8, 4096);
    assert_int_equal(fshm_writer_epoch(w), 2);
    assert_true(fshm_writer_next_seq(w) > last);
    char path[PATH_MAX + 64];
    region_of(name, 1, "header.ring", path, sizeof path);
    assert_false(tu_path_exists(path));
    region_of(name, 2, "header.ring", path, sizeof path);
    assert_true(tu_path_exists(path));
    int64_t ppid;
    assert_int_equal(fshm_reader_producer_state(r, &ppid), FSHM_PRODUCER_ALIVE);
    assert_int_equal(ppid, getpid());

    uint64_t first2 = fshm_writer_next_seq(w);
    assert_int_equal(tu_publish(w, 1000), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, first2, 2, 1000);   /* remapped: new ring, new pool size */
    assert_int_equal(fshm_reader_epoch(r), 2);
    for (int i = 0; i < 3; i++)
        assert_int_equal(tu_publish(w, 1001 + (size_t)i), 0);
    for (uint64_t i = 0; i < 3; i++) {
        assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
        expect_frame(&f, first2 + 1 + i, 2, 1001 + i);
    }

    /* A clean restart in this process bumps the epoch again. */
    fshm_writer_close(w, 0);
    w = tu_writer(name, 2, 128);
    assert_int_equal(fshm_writer_epoch(w), 3);
    uint64_t s3 = fshm_writer_next_seq(w);
    assert_int_equal(s3, first2 + 4);
    assert_int_equal(tu_publish(w, 100), 0);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, s3, 3, 100);
    assert_int_equal(f.skipped, 0);
    assert_int_equal(fshm_reader_epoch(r), 3);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* ---- consumer table pruning ---- */

static pid_t fork_abandoning_reader(const char *name, char queue[32])
{
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = tu_fork();
    if (pid == 0) {
        close(p[0]);
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = name;
        rc.consumer = "abandoned";
        fshm_reader *r;
        if (fshm_reader_open(&rc, &r) != 0)
            _exit(10);
        char q[32] = {0};
        snprintf(q, sizeof q, "%s", fshm_reader_queue_name(r));
        tu_signal_ready(p[1], q, sizeof q);
        _exit(0);   /* no fshm_reader_close: registration and queue are left behind */
    }
    close(p[1]);
    memset(queue, 0, 32);
    assert_int_equal(tu_wait_ready(p[0], queue, 32, 5000), 0);
    close(p[0]);
    queue[31] = 0;
    tu_track_name(queue);
    assert_int_equal(tu_wait_child(pid, 5000), 0);   /* exited and reaped */
    return pid;
}

static void test_prune_by_writer_housekeeping(void **state)
{
    (void)state;
    const char *name = "st-prune-w";
    fshm_writer *w = tu_writer(name, 4, 4096);
    uint64_t opened = fshm_now_ns();
    char q[32];
    pid_t child = fork_abandoning_reader(name, q);
    char qi[32];
    int alive = -1;
    uint64_t pruned0 = 0, pruned = 0;
    assert_true(lookup_consumer(name, child, qi, &alive, &pruned0));
    assert_string_equal(qi, q);
    assert_int_equal(alive, 0);
    assert_int_equal(strncmp(q, "/fshm-", 6), 0);
    assert_true(queue_exists(q));

    /* Commits for a while: housekeeping runs at least every 0.5 s of commits. */
    int frames = 0;
    while (fshm_now_ns() - opened < 700 * MS || frames < 5) {
        assert_int_equal(tu_publish(w, 64), 0);
        frames++;
        tu_sleep_ms(5);
    }
    assert_false(queue_exists(q));
    assert_false(lookup_consumer(name, child, qi, &alive, &pruned));
    assert_int_equal(pruned, pruned0 + 1);
    fshm_writer_close(w, 1);
    char dir[PATH_MAX];
    stream_dir_of(name, dir, sizeof dir);
    assert_false(tu_path_exists(dir));
}

static void test_prune_by_writer_heartbeat(void **state)
{
    (void)state;
    const char *name = "st-prune-hb";
    fshm_writer *w = tu_writer(name, 4, 4096);
    uint64_t opened = fshm_now_ns();
    char q[32];
    fork_abandoning_reader(name, q);
    assert_true(queue_exists(q));
    while (fshm_now_ns() - opened < 700 * MS) {
        fshm_writer_heartbeat(w);   /* idle producer */
        tu_sleep_ms(10);
    }
    assert_false(queue_exists(q));
    fshm_writer_close(w, 1);
}

static void test_prune_by_new_reader(void **state)
{
    (void)state;
    const char *name = "st-prune-r";
    char q[32];
    pid_t child = fork_abandoning_reader(name, q);
    char qi[32];
    int alive;
    uint64_t pruned0, pruned;
    assert_true(lookup_consumer(name, child, qi, &alive, &pruned0));
    assert_int_equal(alive, 0);
    assert_true(queue_exists(q));
    fshm_reader *r = tu_reader(name);   /* opening prunes the dead entry */
    assert_false(queue_exists(q));
    assert_false(lookup_consumer(name, child, qi, &alive, &pruned));
    assert_int_equal(pruned, pruned0 + 1);
    assert_true(lookup_consumer(name, getpid(), qi, &alive, &pruned));
    assert_string_equal(qi, fshm_reader_queue_name(r));
    assert_int_equal(alive, 1);
    fshm_reader_close(r);
    assert_false(queue_exists(qi));
    /* Nobody ever produced and the last consumer left: the stream is gone. */
    char dir[PATH_MAX];
    stream_dir_of(name, dir, sizeof dir);
    assert_false(tu_path_exists(dir));
}

/* A process killed in the middle of claiming or releasing a consumer entry leaves it
 * naming itself in the state word (kind | pid << 8): pruning reclaims it, with the queue
 * it names, as soon as that pid is dead; a live one's, and an older library's bare
 * transition (no pid), are left alone. */
static void test_prune_reclaims_half_done_transitions(void **state)
{
    (void)state;
    const char *name = "st-prune-half";
    fshm_reader *r = tu_reader(name);
    pid_t dead = tu_dead_pid();
    fshm_stream_addr a = {.name = name};
    fshm_paths p;
    fshm_ctl_handle h;
    assert_int_equal(fshm_resolve(&a, 0, &p), 0);
    assert_int_equal(fshm_ctl_open(&p, 0, &h), 0);
    char q1[32], q2[32];
    snprintf(q1, sizeof q1, "/fshm-%x-1-00aa01", (unsigned)dead);
    snprintf(q2, sizeof q2, "/fshm-%x-1-00aa02", (unsigned)dead);
    struct mq_attr at = {.mq_maxmsg = 1, .mq_msgsize = 64};
    mqd_t m1 = mq_open(q1, O_RDONLY | O_CREAT | O_EXCL, 0600, &at);
    mqd_t m2 = mq_open(q2, O_RDONLY | O_CREAT | O_EXCL, 0600, &at);
    assert_true(m1 != (mqd_t)-1 && m2 != (mqd_t)-1);
    mq_close(m1);
    mq_close(m2);
    fshm_ctl_consumer *e;
    /* 10: killed right after the claiming CAS; 11: after recording and creating its
     * queue; 12: killed while releasing (pid still in the entry) */
    ctl_consumer(h.ctl, 10)->state = CONS_STATE(CONS_CLAIMING, dead);
    e = ctl_consumer(h.ctl, 11);
    e->state = CONS_STATE(CONS_CLAIMING, dead);
    e->pid = (uint64_t)dead;
    snprintf(e->queue, sizeof e->queue, "%s", q1);
    e = ctl_consumer(h.ctl, 12);
    e->state = CONS_STATE(CONS_PRUNING, dead);
    e->pid = (uint64_t)dead;
    snprintf(e->queue, sizeof e->queue, "%s", q2);
    /* 13: a live claimer (us); 14: an older library's claim in progress */
    ctl_consumer(h.ctl, 13)->state = CONS_STATE(CONS_CLAIMING, getpid());
    ctl_consumer(h.ctl, 14)->state = CONS_CLAIMING;
    assert_int_equal(fshm_ctl_prune(h.ctl), 3);
    for (unsigned i = 10; i <= 12; i++) {
        assert_int_equal(ctl_consumer(h.ctl, i)->state, CONS_FREE);
        assert_int_equal(ctl_consumer(h.ctl, i)->pid, 0);
    }
    assert_false(queue_exists(q1));
    assert_false(queue_exists(q2));
    assert_int_equal(ctl_consumer(h.ctl, 13)->state, CONS_STATE(CONS_CLAIMING, getpid()));
    assert_int_equal(ctl_consumer(h.ctl, 14)->state, CONS_CLAIMING);
    /* Our own claim completes or is released like any other. */
    ctl_consumer(h.ctl, 14)->state = CONS_FREE;
    fshm_ctl_release(h.ctl, 13, "", 1);
    assert_int_equal(ctl_consumer(h.ctl, 13)->state, CONS_FREE);
    assert_int_equal(fshm_ctl_live_consumers(h.ctl), 1);   /* the reader */
    fshm_ctl_close(&h);
    fshm_reader_close(r);
}

/* A pruner killed between taking a dead consumer's entry (PRUNING | pruner) and unlinking
 * its queue leaves the entry naming the dead pruner in its state word and the consumer in
 * its pid and queue fields. The next pruner removes that queue with the entry (before,
 * it freed the entry and left the queue, named for neither, where no entry named it:
 * test_crash_lifecycle.py, 1 of ~6 loaded runs). An entry forged the same way around a
 * live consumer's queue still leaves that queue alone: its name carries a live owner. */
static void test_prune_finishes_a_dead_pruners_work(void **state)
{
    (void)state;
    const char *name = "st-prune-pruner";
    fshm_reader *r = tu_reader(name);
    const char *victim = fshm_reader_queue_name(r);
    assert_true(victim[0] != 0 && queue_exists(victim));
    pid_t dead[2] = {tu_dead_pid(), tu_dead_pid()};   /* the consumer; the pruner killed mid-prune */
    fshm_stream_addr a = {.name = name};
    fshm_paths p;
    fshm_ctl_handle h;
    assert_int_equal(fshm_resolve(&a, 0, &p), 0);
    assert_int_equal(fshm_ctl_open(&p, 0, &h), 0);
    char q1[32], q2[32];   /* with a start time, and in the older pid-only form */
    snprintf(q1, sizeof q1, "/fshm-%x-1-00bb01", (unsigned)dead[0]);
    snprintf(q2, sizeof q2, "/fshm-%x-00bb0002", (unsigned)dead[0]);
    struct mq_attr at = {.mq_maxmsg = 1, .mq_msgsize = 64};
    const char *qs[2] = {q1, q2};
    for (int i = 0; i < 2; i++) {
        mqd_t m = mq_open(qs[i], O_RDONLY | O_CREAT | O_EXCL, 0600, &at);
        assert_true(m != (mqd_t)-1);
        mq_close(m);
        /* 30, 31: the dead consumer's active entry, taken by the pruner that died */
        fshm_ctl_consumer *e = ctl_consumer(h.ctl, 30 + (unsigned)i);
        e->pid = (uint64_t)dead[0];
        e->pid_start = 1;
        snprintf(e->queue, sizeof e->queue, "%s", qs[i]);
        e->state = CONS_STATE(CONS_PRUNING, dead[1]);
    }
    /* 32: forged around the live reader's queue: a dead pruner, our pid, a bogus start */
    fshm_ctl_consumer *f = ctl_consumer(h.ctl, 32);
    f->pid = (uint64_t)getpid();
    f->pid_start = 1;
    snprintf(f->queue, sizeof f->queue, "%s", victim);
    f->state = CONS_STATE(CONS_PRUNING, dead[1]);
    assert_int_equal(fshm_ctl_prune(h.ctl), 3);
    for (unsigned i = 30; i <= 32; i++)
        assert_int_equal(ctl_consumer(h.ctl, i)->state, CONS_FREE);
    assert_false(queue_exists(q1));
    assert_false(queue_exists(q2));
    assert_true(queue_exists(victim));
    fshm_ctl_close(&h);
    fshm_reader_close(r);
    assert_false(queue_exists(victim));   /* its owner still removes it */
}

/* Every consumer can write the consumer table: an entry forged with a dead pid and the
 * queue of a live consumer (the reader's) is pruned without removing that queue. */
static void test_prune_leaves_a_queue_a_forged_entry_names(void **state)
{
    (void)state;
    const char *name = "st-prune-forged";
    fshm_reader *r = tu_reader(name);
    const char *victim = fshm_reader_queue_name(r);
    assert_true(victim[0] != 0 && queue_exists(victim));
    pid_t dead = tu_dead_pid();
    fshm_stream_addr a = {.name = name};
    fshm_paths p;
    fshm_ctl_handle h;
    assert_int_equal(fshm_resolve(&a, 0, &p), 0);
    assert_int_equal(fshm_ctl_open(&p, 0, &h), 0);
    fshm_ctl_consumer *e = ctl_consumer(h.ctl, 20);
    e->pid = (uint64_t)dead;
    snprintf(e->queue, sizeof e->queue, "%s", victim);
    e->state = CONS_ACTIVE;
    assert_int_equal(fshm_ctl_prune(h.ctl), 1);
    assert_int_equal(e->state, CONS_FREE);
    assert_true(queue_exists(victim));
    assert_true(fshm_queue_named_for(victim, (uint64_t)getpid()));
    assert_false(fshm_queue_named_for(victim, (uint64_t)dead));
    assert_false(fshm_queue_named_for("/fshm-zz-1", 0));
    fshm_ctl_close(&h);
    fshm_reader_close(r);
    assert_false(queue_exists(victim));   /* its owner still removes it */
}

static void test_consumer_table_full(void **state)
{
    (void)state;
    const char *name = "st-full-table";
    fshm_reader *rs[FSHM_MAX_CONSUMERS];
    int n = 0;
    for (; n < FSHM_MAX_CONSUMERS; n++) {
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = name;
        int rc2 = fshm_reader_open(&rc, &rs[n]);
        if (rc2 == 0)
            tu_track(rs[n]);
        if (rc2 == FSHM_E_LIMIT && n > 8) {   /* mq limits of this host, not the table */
            print_message("    (message-queue limit reached after %d readers)\n", n);
            break;
        }
        assert_int_equal(rc2, 0);
    }
    if (n == FSHM_MAX_CONSUMERS) {
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = name;
        fshm_reader *extra = (fshm_reader *)&rc;
        assert_int_equal(fshm_reader_open(&rc, &extra), FSHM_E_LIMIT);
        assert_null(extra);
    }
    /* Every reader gets the frames. */
    fshm_writer *w = tu_writer(name, 4, 4096);
    assert_int_equal(tu_publish(w, 8), 0);
    for (int i = 0; i < n; i++) {
        fshm_frame f;
        assert_int_equal(fshm_reader_wait_next(rs[i], 2 * SEC, &f), 0);
        expect_frame(&f, 0, 1, 8);
    }
    for (int i = 0; i < n; i++)
        fshm_reader_close(rs[i]);
    fshm_writer_close(w, 1);
}

/* ---- corrupt regions ---- */

static void expect_open_fails(const char *name, int want, const char *what)
{
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = name;
    fshm_reader *r = (fshm_reader *)&rc;
    int got = fshm_reader_open(&rc, &r);
    if (got != want)
        fail_msg("%s: fshm_reader_open returned %d (%s), expected %d", what, got,
                 got ? fshm_last_error() : "ok", want);
    assert_null(r);
}

static void test_corrupt_region_new_reader(void **state)
{
    (void)state;
    const char *name = "st-corrupt-sb";
    fshm_writer *w = tu_writer(name, 4, 4096);
    assert_int_equal(tu_publish(w, 128), 0);
    fshm_reader *old = tu_reader(name);
    char ring[PATH_MAX + 64], pool[PATH_MAX + 64], ctl[PATH_MAX + 32], dir[PATH_MAX];
    region_of(name, 1, "header.ring", ring, sizeof ring);
    region_of(name, 1, "1.pool", pool, sizeof pool);
    stream_dir_of(name, dir, sizeof dir);
    snprintf(ctl, sizeof ctl, "%s/frameshm.ctl", dir);

    static const struct {
        int file;   /* 0 ring, 1 pool, 2 control */
        off_t off;
        uint32_t val;
        size_t len;
        int want;
        const char *what;
    } cases[] = {
        {0, 0, 0x41414141u, 4, FSHM_E_CORRUPT, "header ring magic"},
        {0, 8, 2, 4, FSHM_E_CORRUPT, "header ring layout_version"},
        {0, 12, 9, 1, FSHM_E_CORRUPT, "header ring epoch"},
        {0, 20, 1, 4, FSHM_E_CORRUPT, "header ring stream_id"},
        {0, 24, 2, 2, FSHM_E_CORRUPT, "header ring region_type"},
        {0, 28, 8, 4, FSHM_E_CORRUPT, "header ring nslots"},
        {0, 32, 128, 4, FSHM_E_CORRUPT, "header ring slot_bytes"},
        {1, 0, 0, 1, FSHM_E_CORRUPT, "pool magic"},
        {1, 26, 2, 2, FSHM_E_CORRUPT, "pool pool_id"},
        {1, 36, 8192, 4, FSHM_E_CORRUPT, "pool stride_bytes"},
        {2, 0, 0, 1, FSHM_E_CORRUPT, "control magic"},
        {2, 8, 1, 4, FSHM_E_CORRUPT, "control version"},   /* 1: the mode byte at 64 */
        {2, 200, 3, 4, FSHM_E_CORRUPT, "announce header_nslots"},
        {2, 204, 0, 4, FSHM_E_CORRUPT, "announce npools"},
        {2, 720 + 4, 96, 4, FSHM_E_CORRUPT, "announce pool stride"},
        {2, 720, 0, 2, FSHM_E_CORRUPT, "announce pool id 0"},
        {2, 720 + 16, 'x', 1, FSHM_E_CORRUPT, "announce pool URI scheme"},
        {2, -1, 'x', 1, -ENOENT, "announce header URI names a missing file"},
        {2, 128, 'X', 1, FSHM_E_COLLISION, "control stream name"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *path = cases[i].file == 0 ? ring : cases[i].file == 1 ? pool : ctl;
        off_t off = cases[i].off;
        if (off < 0) {   /* last character of the announced header ring URI */
            size_t len;
            uint8_t *c = tu_read_file(ctl, &len);
            off = 208 + (off_t)strnlen((const char *)c + 208, 512) - 1;
            free(c);
        }
        uint8_t orig[8];
        int fd = open(path, O_RDONLY);
        assert_true(fd >= 0);
        assert_int_equal(pread(fd, orig, cases[i].len, off), (ssize_t)cases[i].len);
        close(fd);
        tu_patch_file(path, off, &cases[i].val, cases[i].len);
        if (cases[i].want == -ENOENT) {
            /* A region that does not exist (yet) is "nothing to read", not an error. */
            fshm_reader *r = tu_reader(name);
            fshm_frame f;
            assert_int_equal(fshm_reader_epoch(r), 0);
            assert_int_equal(fshm_reader_peek_latest(r, &f), -EAGAIN);
            fshm_reader_close(r);
        } else {
            expect_open_fails(name, cases[i].want, cases[i].what);
        }
        tu_patch_file(path, off, orig, cases[i].len);   /* restore */
        /* Restored: a fresh reader works again. */
        fshm_reader *r = tu_reader(name);
        fshm_frame f;
        assert_int_equal(fshm_reader_peek_latest(r, &f), 0);
        expect_frame(&f, 0, 1, 128);
        fshm_reader_close(r);
    }
    /* The reader that was attached all along keeps working. */
    assert_int_equal(tu_publish(w, 129), 0);
    fshm_frame f;
    assert_int_equal(fshm_reader_wait_latest(old, 2 * SEC, &f), 0);
    expect_frame(&f, 1, 1, 129);
    fshm_reader_close(old);
    fshm_writer_close(w, 1);
}

static void patch_ring_byte(const char *name, uint32_t slot, size_t off, uint8_t v)
{
    char ring[PATH_MAX + 64];
    region_of(name, 1, "header.ring", ring, sizeof ring);
    tu_patch_file(ring, (off_t)(ring_slot_off(slot) + off), &v, 1);
}

static void test_corrupt_slot_dropped(void **state)
{
    (void)state;
    const char *name = "st-corrupt-slot";
    fshm_writer *w = tu_writer(name, 4, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(tu_publish(w, 100), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 100);

    /* seq 1 committed, then its ndims flipped to 0. */
    assert_int_equal(tu_publish(w, 101), 0);
    patch_ring_byte(name, 1, 72 + 4, 0);
    assert_int_equal(fshm_reader_peek_latest(r, &f), FSHM_E_CORRUPT);
    uint64_t drops = fshm_reader_drops(r);
    assert_int_equal(fshm_reader_wait_latest(r, 150 * MS, &f), FSHM_E_CORRUPT);
    assert_true(fshm_reader_drops(r) > drops);
    assert_non_null(strstr(fshm_last_error(), "ndims"));
    /* Still the newest frame: the next call drops it again (or just times out). */
    int rc = fshm_reader_wait_latest(r, 30 * MS, &f);
    assert_true(rc == FSHM_E_CORRUPT || rc == -ETIMEDOUT);

    /* The stream carries on with the next good frame. */
    assert_int_equal(tu_publish(w, 102), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 2, 1, 102);
    assert_int_equal(f.skipped, 1);

    /* A corrupt frame followed by a good one: wait_latest returns the good one. */
    assert_int_equal(tu_publish(w, 103), 0);
    patch_ring_byte(name, 3, 72 + 4, 0);
    assert_int_equal(tu_publish(w, 104), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 4, 1, 104);

    /* Process-all: the corrupt frame is dropped and shows up as skipped. */
    assert_int_equal(tu_publish(w, 105), 0);   /* seq 5, slot 1 */
    patch_ring_byte(name, 1, 72 + 4, 0);
    assert_int_equal(tu_publish(w, 106), 0);   /* seq 6 */
    drops = fshm_reader_drops(r);
    assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
    expect_frame(&f, 6, 1, 106);
    assert_int_equal(f.skipped, 1);
    assert_int_equal(fshm_reader_drops(r), drops + 1);
    /* Only a corrupt frame pending: timeout reports the corruption. */
    assert_int_equal(tu_publish(w, 107), 0);   /* seq 7, slot 3 */
    patch_ring_byte(name, 3, 72 + 4, 9);
    assert_int_equal(fshm_reader_wait_next(r, 100 * MS, &f), FSHM_E_CORRUPT);
    /* Other header fields. */
    static const struct { size_t off; uint8_t v; } bad[] = {
        {12, 2},         /* payload_slot != slot index */
        {16, 7},         /* pool_id never announced */
        {8 + 3, 0x10},   /* values_len > pool stride */
        {18, 1},         /* payload_offset */
        {60, 0},         /* headerBytes length */
        {66, 0},         /* templateId */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t seq = fshm_writer_next_seq(w);
        assert_int_equal(tu_publish(w, 110), 0);
        patch_ring_byte(name, (uint32_t)(seq & 3), bad[i].off, bad[i].v);
        int rc = fshm_reader_wait_latest(r, 100 * MS, &f);
        if (rc != FSHM_E_CORRUPT)
            fail_msg("corruption #%zu: wait_latest returned %d", i, rc);
    }
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* Random garbage in committed slot headers: the reader may refuse a frame, never crash
 * or hand out one that points outside its pool. */
static void test_corrupt_slot_fuzz(void **state)
{
    (void)state;
    const char *name = "st-fuzz";
    fshm_writer *w = tu_writer(name, 2, 1024);
    fshm_reader *r = tu_reader(name);
    char ring[PATH_MAX + 64];
    region_of(name, 1, "header.ring", ring, sizeof ring);
    int fd = open(ring, O_RDWR);
    assert_true(fd >= 0);
    uint8_t *map = mmap(NULL, 64 + 2 * 256, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    assert_true(map != MAP_FAILED);
    close(fd);
    uint64_t rng = 0x2545F4914F6CDD1Dull;
    int accepted = 0, refused = 0;
    for (int it = 0; it < 4000; it++) {
        fshm_tensor t;
        memset(&t, 0, sizeof t);
        t.dtype = FSHM_DTYPE_UINT16;
        t.ndims = 2;
        t.dims[0] = 8;
        t.dims[1] = 16;
        uint8_t buf[256];
        memset(buf, it & 0xFF, sizeof buf);
        uint64_t seq = fshm_writer_next_seq(w);
        assert_int_equal(fshm_writer_publish(w, buf, sizeof buf, &t, 0), 0);
        uint8_t *slot = map + ring_slot_off((uint32_t)(seq & 1));
        int flips = 1 + (int)(rng % 4);
        for (int k = 0; k < flips; k++) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            /* Mostly the fields that matter, sometimes anywhere (incl. seq_commit). */
            size_t off = (rng >> 8) % 8 == 0 ? (rng >> 16) % 256 : 8 + (rng >> 16) % 140;
            slot[off] = (uint8_t)(rng >> 40);
        }
        fshm_frame f = tu_frame_zero();
        int rc = (it & 1) ? fshm_reader_peek_latest(r, &f) : fshm_reader_wait_latest(r, 0, &f);
        if (rc == 0) {
            accepted++;
            assert_true(f.nbytes <= 1024);
            uint8_t *base = fshm_map_base(f.map);
            size_t size = fshm_map_size(f.map);
            assert_true((const uint8_t *)f.data >= base + 64);
            assert_true((const uint8_t *)f.data + f.nbytes <= base + size);
            assert_int_equal(fshm_tensor_check(&f.tensor, f.nbytes, 1, NULL), 0);
            volatile uint8_t sink = 0;
            for (size_t i = 0; i < f.nbytes; i++)
                sink ^= ((const uint8_t *)f.data)[i];
            (void)sink;
        } else if (rc == FSHM_E_CORRUPT || rc == -EAGAIN || rc == -ETIMEDOUT ||
                   rc == FSHM_E_OVERRUN) {
            refused++;
        } else {
            fail_msg("iteration %d: unexpected rc %d (%s)", it, rc, fshm_last_error());
        }
    }
    print_message("    fuzz: %d frames accepted, %d refused\n", accepted, refused);
    assert_true(refused > 0);
    munmap(map, 64 + 2 * 256);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* ---- frames outliving reads, copies, modes ---- */

static void test_frame_copy_and_map_ref(void **state)
{
    (void)state;
    const char *name = "st-copy";
    fshm_writer *w = tu_writer(name, 1, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(tu_publish(w, 3000), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 3000);
    assert_int_equal(fshm_frame_valid(r, &f), 1);
    uint8_t dst[4096];
    assert_int_equal(fshm_frame_copy(r, &f, dst, 2999), -EINVAL);
    assert_int_equal(fshm_frame_copy(r, &f, dst, sizeof dst), 0);
    assert_true(tu_check(dst, 3000, 0));
    /* Overwritten (single slot): no longer valid, and a copy is refused. */
    assert_int_equal(tu_publish(w, 3000), 0);
    assert_int_equal(fshm_frame_valid(r, &f), 0);
    assert_int_equal(fshm_frame_copy(r, &f, dst, sizeof dst), FSHM_E_OVERRUN);
    /* A referenced mapping outlives the reader. */
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    fshm_map *m = f.map;
    fshm_map_ref(m);
    fshm_reader_close(r);
    assert_false(fshm_map_writable(m));
    assert_true(tu_check(f.data, 3000, 1));
    fshm_map_unref(m);
    fshm_writer_close(w, 1);
}

/* The control bytes: carried, never interpreted; shared by the writer and every reader;
 * at offset 120 of the control region; kept across a producer restart. */
static void test_control_bytes(void **state)
{
    (void)state;
    const char *name = "st-control";
    fshm_writer *w = tu_writer(name, 1, 64);
    fshm_reader *r = tu_reader(name);
    for (unsigned i = 0; i < FSHM_CONTROL_BYTES; i++) {
        assert_int_equal(fshm_writer_control(w, i), 0);
        assert_int_equal(fshm_reader_control(r, i), 0);
    }
    /* Every value round-trips and each byte is its own. */
    for (unsigned i = 0; i < FSHM_CONTROL_BYTES; i++)
        assert_int_equal(fshm_writer_set_control(w, i, (uint8_t)(255 - 31 * i)), 0);
    for (unsigned i = 0; i < FSHM_CONTROL_BYTES; i++)
        assert_int_equal(fshm_reader_control(r, i), 255 - 31 * i);
    assert_int_equal(fshm_reader_set_control(r, 3, 7), 0);
    for (unsigned i = 0; i < FSHM_CONTROL_BYTES; i++)
        assert_int_equal(fshm_writer_control(w, i), i == 3 ? 7 : 255 - 31 * i);

    fshm_stream_addr a = {.name = name};
    fshm_stream_info info;
    assert_int_equal(fshm_stream_info_get(&a, &info), 0);
    for (unsigned i = 0; i < FSHM_CONTROL_BYTES; i++)
        assert_int_equal(info.control[i], i == 3 ? 7 : 255 - 31 * i);
    fshm_paths p;
    assert_int_equal(fshm_resolve(&a, 0, &p), 0);
    size_t len;
    uint8_t *ctl = tu_read_file(p.ctl, &len);
    assert_int_equal(len, FSHM_CTL_BYTES);
    assert_int_equal(tu_le32(ctl + 8), 2);   /* control region version */
    assert_int_equal(ctl[64], 0);            /* version 1's mode byte, now reserved */
    for (unsigned i = 0; i < FSHM_CONTROL_BYTES; i++)
        assert_int_equal(ctl[120 + i], i == 3 ? 7 : 255 - 31 * i);
    free(ctl);

    for (unsigned bad = FSHM_CONTROL_BYTES; bad < FSHM_CONTROL_BYTES + 2; bad++) {
        assert_int_equal(fshm_writer_control(w, bad), -EINVAL);
        assert_non_null(strstr(fshm_last_error(), "control byte"));
        assert_int_equal(fshm_writer_set_control(w, bad, 1), -EINVAL);
        assert_int_equal(fshm_reader_control(r, bad), -EINVAL);
        assert_int_equal(fshm_reader_set_control(r, bad, 1), -EINVAL);
    }

    /* A restarted producer finds them as they were (the reader keeps the region). */
    fshm_writer_close(w, 1);
    w = tu_writer(name, 1, 64);
    assert_int_equal(fshm_writer_control(w, 3), 7);
    assert_int_equal(fshm_writer_control(w, 0), 255);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

static void test_close_cleanup(void **state)
{
    (void)state;
    const char *name = "st-cleanup";
    char dir[PATH_MAX], ctl[PATH_MAX + 32], ring[PATH_MAX + 64];
    stream_dir_of(name, dir, sizeof dir);
    snprintf(ctl, sizeof ctl, "%s/frameshm.ctl", dir);
    /* No consumer: close(unlink) removes everything. */
    fshm_writer *w = tu_writer(name, 2, 64);
    uint64_t first = fshm_writer_epoch(w);
    region_of(name, first, "header.ring", ring, sizeof ring);
    assert_true(tu_path_exists(ring));
    fshm_writer_close(w, 1);
    assert_false(tu_path_exists(dir));
    /* A live consumer keeps the control region (its registration); it removes it last. */
    w = tu_writer(name, 2, 64);
    /* The stream was removed, yet its epochs go on (spec §15.2): never an epoch again. */
    assert_int_equal(fshm_writer_epoch(w), first + 1);
    region_of(name, first + 1, "header.ring", ring, sizeof ring);
    fshm_reader *r = tu_reader(name);
    fshm_writer_close(w, 1);
    assert_false(tu_path_exists(ring));
    assert_true(tu_path_exists(ctl));
    assert_int_equal(tu_count_files_v(dir, 0), 1);
    fshm_reader_close(r);
    assert_false(tu_path_exists(dir));
    /* close(keep): files stay for the next producer. */
    w = tu_writer(name, 2, 64);
    assert_int_equal(fshm_writer_epoch(w), first + 2);
    region_of(name, first + 2, "header.ring", ring, sizeof ring);
    fshm_writer_close(w, 0);
    assert_true(tu_path_exists(ring));
    reclaim_stream(name);
    assert_false(tu_path_exists(dir));
}

/* ---- streams replaced or removed under a live reader ---- */

/* The stream is removed (e.g. by an external clean-up) and created anew by another
 * producer: seqs restart at 0 in the new control region. A reader that follows it
 * must deliver the new stream's frames, not wait until the new seqs pass the old ones. */
static void test_stream_recreated_under_reader(void **state)
{
    (void)state;
    const char *name = "st-recreate";
    char dir[PATH_MAX];
    stream_dir_of(name, dir, sizeof dir);
    fshm_writer *w = tu_writer(name, 4, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_frame f = tu_frame_zero();
    for (int i = 0; i < 6; i++)
        assert_int_equal(tu_publish(w, 64), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 5, 1, 64);
    fshm_writer_close(w, 1);
    tu_rmtree(dir);   /* the whole stream goes away */

    w = tu_writer(name, 4, 4096);   /* a new stream under the same name */
    assert_int_equal(fshm_writer_epoch(w), 2);   /* its epochs go on from the removed one's */
    for (int i = 0; i < 3; i++)
        assert_int_equal(tu_publish(w, 100), 0);   /* seqs 0..2 */
    int rc = fshm_reader_wait_latest(r, 1 * SEC, &f);
    if (rc != 0)
        fail_msg("reader did not deliver the re-created stream's newest frame (seq 2): rc %d "
                 "(%s)", rc, fshm_last_error());
    expect_frame(&f, 2, 2, 100);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* The stream directory disappears under a live reader and is not re-created: the
 * reader may report an error but must not crash. Run in a child so that a crash is
 * reported instead of taking the test binary down. */
static void test_stream_dir_removed_under_reader(void **state)
{
    (void)state;
    const char *name = "st-rmdir";
    char dir[PATH_MAX];
    stream_dir_of(name, dir, sizeof dir);
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = tu_fork();
    if (pid == 0) {
        close(p[0]);
        fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
        wc.addr.name = name;
        wc.nslots = 2;
        wc.npools = 1;
        wc.pool_bytes[0] = 64;
        fshm_writer *w;
        if (fshm_writer_open(&wc, &w))
            _exit(10);
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = name;
        fshm_reader *r;
        if (fshm_reader_open(&rc, &r))
            _exit(11);
        char q[32] = {0};
        snprintf(q, sizeof q, "%s", fshm_reader_queue_name(r));
        tu_signal_ready(p[1], q, sizeof q);
        uint8_t buf[64] = {0};
        fshm_tensor t = tu_u8_tensor(64);
        fshm_frame f;
        if (fshm_writer_publish(w, buf, 64, &t, 0) || fshm_reader_wait_latest(r, SEC, &f))
            _exit(12);
        tu_rmtree(dir);
        /* Each of these may fail; none may crash. */
        (void)fshm_reader_peek_latest(r, &f);
        (void)fshm_reader_wait_latest(r, 150 * MS, &f);
        (void)fshm_reader_wait_next(r, 150 * MS, &f);
        (void)fshm_reader_producer_state(r, NULL);
        (void)fshm_reader_control(r, 0);
        (void)fshm_reader_set_control(r, 0, 1);
        fshm_writer_publish(w, buf, 64, &t, 0);
        fshm_reader_close(r);
        fshm_writer_close(w, 1);
        _exit(0);
    }
    close(p[1]);
    char q[32] = {0};
    int ready = tu_wait_ready(p[0], q, sizeof q, 5000);
    close(p[0]);
    q[31] = 0;
    tu_track_name(q);
    int st = tu_wait_child(pid, 10000);
    tu_rmtree(dir);
    assert_int_equal(ready, 0);
    if (st >= 128)
        fail_msg("the reader crashed with signal %d after its stream directory was removed",
                 st - 128);
    assert_int_equal(st, 0);
}

/* ---- producer exclusivity vs. fork ---- */

/* A producer that fork()ed a helper (no exec, e.g. multiprocessing's fork start method)
 * and then died: the stream's producer is dead, so a new producer must be able to take
 * the stream over even while the helper lives on. */
static void test_dead_producer_forked_helper(void **state)
{
    (void)state;
    const char *name = "st-fork-helper";
    pid_t test_pid = getpid();
    int p[2];
    assert_int_equal(pipe(p), 0);
    /* The helper outlives its parent: adopt it so that it can be reaped here. */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    pid_t prod = tu_fork();
    if (prod == 0) {
        close(p[0]);
        fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
        wc.addr.name = name;
        wc.nslots = 2;
        wc.npools = 1;
        wc.pool_bytes[0] = 64;
        fshm_writer *w;
        if (fshm_writer_open(&wc, &w))
            _exit(10);
        pid_t helper = fork();
        if (helper == 0) {
            /* Does nothing with the stream; lives while the test binary does (60 s max). */
            alarm(60);
            while (kill(test_pid, 0) == 0)
                tu_sleep_ms(20);
            _exit(0);
        }
        int32_t h = (int32_t)helper;
        tu_signal_ready(p[1], &h, sizeof h);
        for (;;)
            pause();
    }
    close(p[1]);
    int32_t helper = 0;
    int ready = tu_wait_ready(p[0], &helper, sizeof helper, 5000);
    close(p[0]);
    tu_kill_child(prod);
    assert_int_equal(ready, 0);
    assert_true(helper > 0);
    fshm_reader *r = tu_reader(name);
    assert_int_equal(fshm_reader_producer_state(r, NULL), FSHM_PRODUCER_DEAD);
    fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
    wc.addr.name = name;
    wc.nslots = 2;
    wc.npools = 1;
    wc.pool_bytes[0] = 64;
    fshm_writer *w = NULL;
    int rc = fshm_writer_open(&wc, &w);
    char msg[600];
    snprintf(msg, sizeof msg, "%s", rc ? fshm_last_error() : "");
    kill(helper, SIGKILL);
    waitpid(helper, NULL, 0);
    prctl(PR_SET_CHILD_SUBREAPER, 0);
    if (rc == -EBUSY) {
        /* Once the helper is gone the stream can be taken over. */
        for (int i = 0; i < 200 && rc == -EBUSY; i++) {
            tu_sleep_ms(5);
            rc = fshm_writer_open(&wc, &w);
        }
        if (w)
            fshm_writer_close(w, 1);
        fshm_reader_close(r);
        fail_msg("producer pid %d is dead, yet fshm_writer_open returned -EBUSY (\"%s\") "
                 "while a fork()ed child of it was alive: the child inherited the producer "
                 "lock (once that child was killed, the open returned %d)",
                 (int)prod, msg, rc);
    }
    assert_int_equal(rc, 0);
    assert_int_equal(fshm_writer_epoch(w), 2);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* ---- addressing ---- */

/* A stream created with a name and an explicit id, opened by its id alone
 * (fshm_stream_addr.name == NULL: "NULL when addressed by stream_id only"). */
static void test_address_by_stream_id_only(void **state)
{
    (void)state;
    fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
    wc.addr.name = "st-by-id";
    wc.addr.stream_id = 4242;
    wc.nslots = 2;
    wc.npools = 1;
    wc.pool_bytes[0] = 64;
    fshm_writer *w;
    assert_int_equal(fshm_writer_open(&wc, &w), 0);
    assert_int_equal(fshm_writer_stream_id(w), 4242);
    assert_int_equal(tu_publish(w, 16), 0);
    /* Same name, same id: fine. Another name on the same id: a collision. */
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr = wc.addr;
    fshm_reader *r;
    assert_int_equal(fshm_reader_open(&rc, &r), 0);
    tu_track(r);
    fshm_reader_close(r);
    rc.addr.name = "st-other";
    assert_int_equal(fshm_reader_open(&rc, &r), FSHM_E_COLLISION);
    /* By id alone. */
    rc.addr.name = NULL;
    int got = fshm_reader_open(&rc, &r);
    if (got != 0) {
        fshm_writer_close(w, 1);
        fail_msg("opening stream id 4242 (created as 'st-by-id') by its id alone: %d (%s)",
                 got, fshm_last_error());
    }
    tu_track(r);
    fshm_frame f;
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 16);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* Two names whose ids collide: the second one is refused, not mixed in. */
static void test_stream_id_hash_collision(void **state)
{
    (void)state;
    /* Find two names with the same id (birthday bound: ~2^16 random names). */
    enum { N = 400000 };
    uint64_t *xs = malloc(sizeof(uint64_t) * N);
    uint32_t *ids = malloc(sizeof(uint32_t) * N);
    uint32_t cap = 1u << 20, *slots = calloc(cap, sizeof *slots);
    assert_true(xs && ids && slots);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    int64_t a = -1, b = -1;
    char name[32];
    for (uint32_t i = 0; i < N && a < 0; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        xs[i] = x;
        snprintf(name, sizeof name, "n%016llx", (unsigned long long)x);
        uint32_t id = ids[i] = fshm_stream_id_for_name(name);
        for (uint32_t h = (id * 2654435761u) >> 12;; h = (h + 1) & (cap - 1)) {
            if (!slots[h]) {
                slots[h] = i + 1;
                break;
            }
            if (ids[slots[h] - 1] == id) {
                a = slots[h] - 1;
                b = i;
                break;
            }
        }
    }
    char n1[32], n2[32];
    if (a >= 0) {
        snprintf(n1, sizeof n1, "n%016llx", (unsigned long long)xs[a]);
        snprintf(n2, sizeof n2, "n%016llx", (unsigned long long)xs[b]);
    }
    free(slots);
    free(ids);
    free(xs);
    if (a < 0)
        skip();
    assert_int_equal(fshm_stream_id_for_name(n1), fshm_stream_id_for_name(n2));
    fshm_writer *w = tu_writer(n1, 1, 64);
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = n2;
    fshm_reader *r = (fshm_reader *)&rc;
    assert_int_equal(fshm_reader_open(&rc, &r), FSHM_E_COLLISION);
    assert_null(r);
    fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
    wc.addr.name = n2;
    wc.nslots = 1;
    wc.npools = 1;
    wc.pool_bytes[0] = 64;
    fshm_writer *w2 = (fshm_writer *)&wc;
    assert_int_equal(fshm_writer_open(&wc, &w2), FSHM_E_COLLISION);
    assert_null(w2);
    /* With an explicit id the second stream lives elsewhere. */
    wc.addr.stream_id = 77;
    assert_int_equal(fshm_writer_open(&wc, &w2), 0);
    fshm_writer_close(w2, 1);
    fshm_writer_close(w, 1);
}

/* ---- inspection API ---- */

static void test_stream_info_api(void **state)
{
    (void)state;
    const char *name = "st-info";
    fshm_writer *w = tu_writer(name, 4, 1000);
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = name;
    rc.consumer = "viewer";
    fshm_reader *r;
    assert_int_equal(fshm_reader_open(&rc, &r), 0);
    tu_track(r);
    for (int i = 0; i < 3; i++)
        assert_int_equal(tu_publish(w, 10), 0);
    fshm_stream_info *info = calloc(1, sizeof *info);
    assert_non_null(info);
    assert_int_equal(fshm_stream_info_get(&rc.addr, info), 0);
    assert_string_equal(info->name, name);
    assert_int_equal(info->stream_id, fshm_stream_id_for_name(name));
    assert_int_equal(info->epoch, 1);
    assert_int_equal(info->producer_state, FSHM_PRODUCER_ALIVE);
    assert_int_equal(info->producer_pid, getpid());
    assert_int_equal(info->latest_seq, 3);
    assert_int_equal(info->frames, 3);
    assert_int_equal(info->nslots, 4);
    assert_int_equal(info->npools, 1);
    assert_int_equal(info->pool_stride[0], 1024);
    assert_int_equal(info->nconsumers, 1);
    assert_string_equal(info->consumers[0].name, "viewer");
    assert_string_equal(info->consumers[0].queue, fshm_reader_queue_name(r));
    assert_int_equal(info->consumers[0].pid, getpid());
    assert_int_equal(info->consumers[0].alive, 1);
    /* It never slept, so no descriptor was sent: it takes its frames from the ring. */
    assert_int_equal(info->consumers[0].delivered, 0);
    free(info);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

static void test_stream_gc_api(void **state)
{
    (void)state;
    const char *name = "st-gc";
    fshm_stream_addr a;
    memset(&a, 0, sizeof a);
    a.name = name;
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = tu_fork();
    if (pid == 0) {
        close(p[0]);
        child_writer(name, 2, 1, 64, 0, p[1]);
    }
    close(p[1]);
    uint64_t msg[2];
    assert_int_equal(tu_wait_ready(p[0], msg, sizeof msg, 5000), 0);
    close(p[0]);
    assert_int_equal(fshm_stream_gc(&a), 0);   /* producer alive: kept */
    tu_kill_child(pid);
    char q[32];
    fork_abandoning_reader(name, q);
    assert_true(queue_exists(q));
    assert_int_equal(fshm_stream_gc(&a), 1);   /* dead producer, no live consumer */
    assert_false(queue_exists(q));
    char dir[PATH_MAX];
    stream_dir_of(name, dir, sizeof dir);
    assert_false(tu_path_exists(dir));
}

/* A queue name records its owner: the pid and start time of the process that made it. */
static void test_queue_names_carry_their_owner(void **state)
{
    (void)state;
    fshm_reader *r = tu_reader("st-qname");
    int64_t pid = 0;
    uint64_t start = 0;
    assert_int_equal(fshm_queue_owner(fshm_reader_queue_name(r), &pid, &start), 0);
    assert_int_equal(pid, getpid());
    assert_int_equal(start, fshm_self_start_time());
    fshm_reader_close(r);

    assert_int_equal(fshm_queue_owner("fshm-1a2b-5c81c-0f9e8d", &pid, &start), 0);   /* as listed */
    assert_int_equal(pid, 0x1a2b);
    assert_int_equal(start, 0x5c81c);
    assert_int_equal(fshm_queue_owner("/fshm-399-fb1aaf0f", &pid, &start), 0);   /* older names */
    assert_int_equal(pid, 0x399);
    assert_int_equal(start, 0);
    static const char *not_ours[] = {
        "/fshm-wakebench-123", "/fshm-0-fb1aaf0f", "/fshm-399-fb1aaf0", "/fshm-399-fb1aaf0f0",
        "/fshm-399-5c81c-0f9e8", "/fshm-399-5c81c-0f9e8d7", "/fshm-399-0-0f9e8d", "/fshm-399-5C81C-0f9e8d",
        "/fshm-399-5c81c-0f9e8d-1", "/fshm--5c81c-0f9e8d", "/fshm-123456789-5c81c-0f9e8d", "/other-1-fb1aaf0f",
        "fshm-80000000-5c81c-0f9e8d", "/fshm-399",
    };
    for (size_t i = 0; i < sizeof not_ours / sizeof not_ours[0]; i++)
        if (fshm_queue_owner(not_ours[i], &pid, &start) != -1)
            fail_msg("%s parsed as a frameshm queue name", not_ours[i]);
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp((const char *)a, (const char *)b);
}

/* Each queue a process creates gets a name of its own, even when the previous one was
 * just unlinked (consumers opened and closed in a loop): a repeated name would let a
 * stale descriptor sender reach the wrong consumer. */
static void test_queue_names_never_repeat_in_a_process(void **state)
{
    (void)state;
    enum { N = 16384 };   /* a random 24-bit suffix would repeat ~8 times */
    static char names[N][32];
    for (int i = 0; i < N; i++) {
        mqd_t q;
        assert_int_equal(fshm_queue_create(names[i], &q, NULL), 0);
        mq_close(q);
        assert_int_equal(mq_unlink(names[i]), 0);
    }
    qsort(names, N, 32, cmp_name);
    for (int i = 1; i < N; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            fail_msg("queue name %s handed out twice", names[i]);
}

static int gc_lists(const fshm_gc_stream_report *g, const char *queue, int64_t pid, const char *consumer)
{
    for (uint32_t i = 0; i < g->nqueues; i++)
        if (strcmp(g->queues[i].name, queue) == 0 && g->queues[i].pid == pid &&
            strcmp(g->queues[i].consumer, consumer) == 0 && g->queues[i].stream_id == g->stream_id)
            return 1;
    return 0;
}

/* fshm_stream_gc_report: per stream what went (or, dry run, would), and why. */
static void test_stream_gc_report(void **state)
{
    (void)state;
    fshm_stream_addr a;
    memset(&a, 0, sizeof a);
    a.name = "st-gcr";
    fshm_gc_stream_report *g = malloc(sizeof *g);
    assert_non_null(g);

    /* Kept while its producer lives; a dead consumer's queue goes all the same. */
    fshm_writer *w = tu_writer(a.name, 2, 64);
    char q[32];
    pid_t dead = fork_abandoning_reader(a.name, q);
    assert_int_equal(fshm_stream_gc_report(&a, FSHM_GC_DRY_RUN, g), 0);
    assert_int_equal(g->reason, FSHM_GC_PRODUCER);
    assert_int_equal(g->producer_state, FSHM_PRODUCER_ALIVE);
    assert_int_equal(g->producer_pid, getpid());
    assert_string_equal(g->name, a.name);
    assert_int_equal(g->stream_id, fshm_stream_id_for_name(a.name));
    assert_int_equal(g->nqueues, 1);
    assert_true(gc_lists(g, q, dead, "abandoned"));
    assert_true(queue_exists(q));   /* dry run */
    assert_int_equal(fshm_stream_gc_report(&a, 0, g), 0);
    assert_int_equal(g->reason, FSHM_GC_PRODUCER);
    assert_true(gc_lists(g, q, dead, "abandoned"));
    assert_false(queue_exists(q));
    assert_int_equal(fshm_stream_gc_report(&a, 0, g), 0);
    assert_int_equal(g->nqueues, 0);

    /* A live consumer keeps a stream whose producer is gone. */
    fshm_writer_close(w, 0);
    fshm_reader *r = tu_reader(a.name);
    assert_int_equal(fshm_stream_gc_report(&a, 0, g), 0);
    assert_int_equal(g->reason, FSHM_GC_CONSUMERS);
    assert_int_equal(g->producer_state, FSHM_PRODUCER_CLOSED);
    assert_int_equal(g->live_consumers, 1);
    fshm_reader_close(r);   /* the last one out of a closed stream removes it */
    char dir[PATH_MAX];
    stream_dir_of(a.name, dir, sizeof dir);
    assert_false(tu_path_exists(dir));
    assert_int_equal(fshm_stream_gc_report(&a, 0, g), 0);
    assert_int_equal(g->reason, FSHM_GC_NO_STREAM);

    /* A dead producer and a dead consumer: removed, and the directories above with it. */
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t prod = tu_fork();
    if (prod == 0) {
        close(p[0]);
        child_writer(a.name, 2, 1, 64, 0, p[1]);
    }
    close(p[1]);
    uint64_t msg[2];
    assert_int_equal(tu_wait_ready(p[0], msg, sizeof msg, 5000), 0);
    close(p[0]);
    tu_kill_child(prod);
    dead = fork_abandoning_reader(a.name, q);
    assert_int_equal(fshm_stream_gc_report(&a, FSHM_GC_DRY_RUN, g), 1);
    assert_int_equal(g->removed, 1);
    assert_int_equal(g->reason, FSHM_GC_UNUSED);
    assert_int_equal(g->producer_state, FSHM_PRODUCER_DEAD);
    assert_int_equal(g->producer_pid, prod);
    assert_true(gc_lists(g, q, dead, "abandoned"));
    assert_true(tu_path_exists(dir) && queue_exists(q));   /* dry run */
    assert_int_equal(fshm_stream_gc_report(&a, 0, g), 1);
    assert_int_equal(g->reason, FSHM_GC_UNUSED);
    assert_true(gc_lists(g, q, dead, "abandoned"));
    assert_false(tu_path_exists(dir));
    assert_false(queue_exists(q));
    char user[PATH_MAX];
    tu_user_dir(user, sizeof user);
    assert_true(tu_gone(user));   /* it was the last stream of the namespace */

    /* Leftovers without a control region. */
    fshm_paths paths;
    assert_int_equal(fshm_resolve(&a, 1, &paths), 0);
    assert_int_equal(fshm_stream_gc_report(&a, FSHM_GC_DRY_RUN, g), 1);
    assert_int_equal(g->reason, FSHM_GC_NO_CONTROL);
    assert_true(tu_path_exists(dir));
    assert_int_equal(fshm_stream_gc_report(&a, 0, g), 1);
    assert_true(tu_gone(user));
    free(g);
}

/* fshm_queue_gc runs in a child with a private mqueue file system mounted (the queues are
 * the same: the IPC namespace is not changed). Exit codes of the child: 0 passed, 77 no
 * privilege to mount one (skip), anything else the check that failed. */
static int queue_gc_child(void)
{
    if (unshare(CLONE_NEWNS) != 0)
        return 77;
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        return 77;
    char mnt[] = "/tmp/fshm-ctest-mq-XXXXXX";
    if (!mkdtemp(mnt))
        return 2;
    int rc = 0;
    if (mount("none", mnt, "mqueue", 0, NULL) != 0) {
        rmdir(mnt);
        return 77;
    }
    pid_t gone = fork();   /* a pid that is dead once reaped */
    if (gone == 0)
        _exit(0);
    waitpid(gone, NULL, 0);
    unsigned long long start = fshm_self_start_time();
    char names[6][40];
    snprintf(names[0], 40, "/fshm-%x-%llx-a1b2c3", (unsigned)getpid(), start);       /* mine: kept */
    snprintf(names[1], 40, "/fshm-%x-%llx-a1b2c3", (unsigned)getpid(), start + 1);   /* reused pid */
    snprintf(names[2], 40, "/fshm-%x-a1b2c3d4", (unsigned)getpid());                  /* old, alive */
    snprintf(names[3], 40, "/fshm-%x-%llx-a1b2c3", (unsigned)gone, start);           /* dead */
    snprintf(names[4], 40, "/fshm-%x-a1b2c3d4", (unsigned)gone);                      /* old, dead */
    snprintf(names[5], 40, "/fshm-wakebench-%d", (int)getpid());                      /* not ours */
    static const int goes[6] = {0, 1, 0, 1, 1, 0};
    struct mq_attr attr = {.mq_maxmsg = 1, .mq_msgsize = 64};
    for (int i = 0; i < 6; i++) {
        mqd_t d = mq_open(names[i], O_RDONLY | O_CREAT | O_EXCL, 0600, &attr);
        if (d == (mqd_t)-1)
            rc = 3;
        else
            mq_close(d);
    }
    fshm_gc_queue found[512];
    for (int dry = 1; rc == 0 && dry >= 0; dry--) {
        size_t n = 0;
        if (fshm_queue_gc(dry ? FSHM_GC_DRY_RUN : 0, found, 512, &n) != 0 || n > 512) {
            rc = 4;
            break;
        }
        for (int i = 0; i < 6 && rc == 0; i++) {
            int listed = 0;
            for (size_t k = 0; k < n; k++)
                if (strcmp(found[k].name, names[i]) == 0 && found[k].stream_id == 0)
                    listed = found[k].pid == (i == 1 ? getpid() : gone) ? 1 : -1;
            mqd_t d = mq_open(names[i], O_RDONLY);
            int exists = d != (mqd_t)-1;
            if (exists)
                mq_close(d);
            if (listed != goes[i])
                rc = 10 + i;
            else if (exists != (dry || !goes[i]))
                rc = 20 + i;
        }
    }
    for (int i = 0; i < 6; i++)
        mq_unlink(names[i]);
    umount2(mnt, MNT_DETACH);
    rmdir(mnt);
    return rc;
}

static void test_queue_gc(void **state)
{
    (void)state;
    pid_t pid = tu_fork();
    if (pid == 0)
        _exit(queue_gc_child());
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    if (WEXITSTATUS(st) == 77)
        skip();   /* no CAP_SYS_ADMIN to mount a private mqueue file system */
    if (WEXITSTATUS(st) != 0)
        fail_msg("fshm_queue_gc check %d failed (see queue_gc_child)", WEXITSTATUS(st));
}

/* Every clean close of a namespace's last stream removes the namespace and user
 * directories, while other processes create streams in them: no open may fail for it. */
static int open_close_loop(const char *name, int rounds)
{
    for (int i = 0; i < rounds; i++) {
        fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
        cfg.addr.name = name;
        cfg.nslots = 1;
        cfg.npools = 1;
        cfg.pool_bytes[0] = 64;
        fshm_writer *w;
        if (fshm_writer_open(&cfg, &w) != 0) {
            fprintf(stderr, "%s round %d: %s\n", name, i, fshm_last_error());
            return 1;
        }
        fshm_writer_close(w, 1);
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = name;
        rc.passive = 1;
        fshm_reader *r;
        if (fshm_reader_open(&rc, &r) != 0) {
            fprintf(stderr, "%s round %d (reader): %s\n", name, i, fshm_last_error());
            return 1;
        }
        fshm_reader_close(r);
    }
    return 0;
}

static void test_namespace_dirs_race_with_new_streams(void **state)
{
    (void)state;
    enum { ROUNDS = 200 };
    pid_t pid = tu_fork();
    if (pid == 0)
        _exit(open_close_loop("st-race-a", ROUNDS));
    int mine = open_close_loop("st-race-b", ROUNDS);
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_int_equal(mine, 0);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char user[PATH_MAX];
    tu_user_dir(user, sizeof user);
    assert_true(tu_gone(user));
}

/* ---- a full base directory ---- */

static char tmpfs_dir[PATH_MAX];

static int teardown_tmpfs(void **state)
{
    (void)state;
    tu_tmpfs_unmount(tmpfs_dir);
    return 0;
}

static void test_full_base_dir(void **state)
{
    (void)state;
    if (tu_tmpfs_mount("1m", tmpfs_dir) != 0)
        skip();
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = "st-enospc";
    cfg.addr.base_dir = tmpfs_dir;
    cfg.nslots = 4;
    cfg.npools = 1;
    cfg.pool_bytes[0] = 1 << 20;   /* 4 MiB of pool in a 1 MiB file system */
    fshm_writer *w = (fshm_writer *)&cfg;
    int rc = fshm_writer_open(&cfg, &w);
    assert_int_equal(rc, -ENOSPC);
    assert_null(w);
    assert_non_null(strstr(fshm_last_error(), "not enough shared memory"));
    int left = tu_count_files(tmpfs_dir);
    if (left)
        fail_msg("fshm_writer_open failed with ENOSPC but left %d file(s) in %s", left,
                 tmpfs_dir);
    /* The space was given back: a stream that fits works, and leaves nothing either. */
    cfg.pool_bytes[0] = 4096;
    assert_int_equal(fshm_writer_open(&cfg, &w), 0);
    fshm_reader_config rcfg = FSHM_READER_CONFIG_INIT;
    rcfg.addr = cfg.addr;
    fshm_reader *r;
    assert_int_equal(fshm_reader_open(&rcfg, &r), 0);
    tu_track(r);
    uint8_t buf[4096];
    tu_fill(buf, sizeof buf, 0);
    fshm_tensor t = tu_u8_tensor(sizeof buf);
    assert_int_equal(fshm_writer_publish(w, buf, sizeof buf, &t, 0), 0);
    fshm_frame f;
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    expect_frame(&f, 0, 1, 4096);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
    /* Only the epoch ledger stays (docs/wire-format.md §1): one line, not a region. */
    assert_int_equal(tu_count_files(tmpfs_dir), 1);
    char u[PATH_MAX], ledger[2 * PATH_MAX];
    tu_user_dir(u, sizeof u);   /* .../tensorpool-<user>: the ledger is per user too */
    snprintf(ledger, sizeof ledger, "%s/.frameshm-epochs-%s/default/%u", tmpfs_dir,
             strrchr(u, '/') + 1 + strlen("tensorpool-"), fshm_stream_id_for_name("st-enospc"));
    assert_true(tu_path_exists(ledger));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reader_before_writer),
        cmocka_unit_test(test_reader_after_writer),
        cmocka_unit_test(test_wait_latest_reports_skipped),
        cmocka_unit_test(test_wait_next_in_order),
        cmocka_unit_test(test_writer_skip_to),
        cmocka_unit_test(test_wait_next_queue_overflow_interleaved),
        cmocka_unit_test(test_wait_next_overrun_small),
        cmocka_unit_test(test_wait_next_overrun_lapped),
        cmocka_unit_test(test_reader_in_child_process),
        cmocka_unit_test(test_spin_reader_steady_stream),
        cmocka_unit_test(test_spin_off_when_consumers_outnumber_cpus),
        cmocka_unit_test(test_spin_rests_when_it_does_not_pay_off),
        cmocka_unit_test(test_writer_notes_its_cpu_at_each_loan),
        cmocka_unit_test(test_spin_stays_off_the_producers_cpu),
        cmocka_unit_test(test_spin_pinned_apart_from_the_producer),
        cmocka_unit_test(test_window_moves_off_the_producers_cpu_and_calls_the_hook),
        cmocka_unit_test(test_spin_not_scored_by_polls),
        cmocka_unit_test(test_no_queue_reader_by_choice),
        cmocka_unit_test(test_fast_stream_reader_polls_between_bursts),
        cmocka_unit_test(test_signal_ends_a_blocked_wait),
        cmocka_unit_test(test_request_reply_readers_poll),
        cmocka_unit_test(test_big_publish_copies_every_byte),
        cmocka_unit_test(test_timeout_producer_alive),
        cmocka_unit_test(test_timeout_producer_dead),
        cmocka_unit_test(test_second_writer_busy),
        cmocka_unit_test(test_producer_restart),
        cmocka_unit_test(test_prune_by_writer_housekeeping),
        cmocka_unit_test(test_prune_by_writer_heartbeat),
        cmocka_unit_test(test_prune_by_new_reader),
        cmocka_unit_test(test_prune_reclaims_half_done_transitions),
        cmocka_unit_test(test_prune_finishes_a_dead_pruners_work),
        cmocka_unit_test(test_prune_leaves_a_queue_a_forged_entry_names),
        cmocka_unit_test(test_consumer_table_full),
        cmocka_unit_test(test_corrupt_region_new_reader),
        cmocka_unit_test(test_corrupt_slot_dropped),
        cmocka_unit_test(test_corrupt_slot_fuzz),
        cmocka_unit_test(test_frame_copy_and_map_ref),
        cmocka_unit_test(test_control_bytes),
        cmocka_unit_test(test_close_cleanup),
        cmocka_unit_test(test_stream_recreated_under_reader),
        cmocka_unit_test(test_stream_dir_removed_under_reader),
        cmocka_unit_test(test_dead_producer_forked_helper),
        cmocka_unit_test(test_address_by_stream_id_only),
        cmocka_unit_test(test_stream_id_hash_collision),
        cmocka_unit_test(test_stream_info_api),
        cmocka_unit_test(test_stream_gc_api),
        cmocka_unit_test(test_queue_names_carry_their_owner),
        cmocka_unit_test(test_queue_names_never_repeat_in_a_process),
        cmocka_unit_test(test_stream_gc_report),
        cmocka_unit_test(test_queue_gc),
        cmocka_unit_test(test_namespace_dirs_race_with_new_streams),
        cmocka_unit_test_teardown(test_full_base_dir, teardown_tmpfs),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
