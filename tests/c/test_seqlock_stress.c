/* Seqlock stress: one writer thread publishing 4 KiB frames as fast as it can into a
 * 1-slot and a 4-slot ring, and deliberately slow reader threads that take the newest
 * frame (fshm_reader_peek_latest), read it byte by byte while accumulating a checksum,
 * then ask fshm_frame_valid(). Every read that valid() accepts must be intact: no torn
 * frame may ever be accepted. Rejections must happen too, or the test proved nothing.
 *
 * Frame layout (64-bit little-endian words): w[0] = seq, w[i] = mix(seq, i) for
 * 1 <= i < N-1, w[N-1] = checksum of w[0..N-2]. */
#include "fshm_test_util.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define FRAME_BYTES 4096u
#define NWORDS (FRAME_BYTES / 8u)

#define SEC_NS 1000000000ull

static inline uint64_t mix(uint64_t seq, uint64_t i)
{
    uint64_t x = seq * 0x9E3779B97F4A7C15ull + (i + 1) * 0xD1B54A32D192ED03ull;
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    return x;
}

static inline uint64_t csum_step(uint64_t c, uint64_t word, uint64_t i)
{
    c ^= word + i;
    c = (c << 23) | (c >> 41);
    return c * 0x94D049BB133111EBull;
}

#define CSUM_INIT 0x6A09E667F3BCC909ull

typedef struct writer_ctx {
    fshm_writer *w;
    atomic_int stop;
    atomic_uint_fast64_t frames;
    int error;
} writer_ctx;

typedef struct reader_ctx {
    fshm_reader *r;
    atomic_int *stop;
    unsigned id;
    atomic_uint_fast64_t reads;          /* payload reads (accepted + rejected) */
    atomic_uint_fast64_t accepted;
    atomic_uint_fast64_t rejected;
    uint64_t torn_accepted;              /* accepted by valid() yet inconsistent: must stay 0 */
    uint64_t torn_rejected;              /* rejected and indeed inconsistent */
    uint64_t no_frame;                   /* peek found no readable newest frame */
    uint64_t copies_ok, copies_overrun;  /* fshm_frame_copy path */
    int error;
    char error_msg[256];
} reader_ctx;

static void *writer_main(void *arg)
{
    writer_ctx *c = arg;
    fshm_tensor t = tu_u8_tensor(FRAME_BYTES);
    while (!atomic_load_explicit(&c->stop, memory_order_relaxed)) {
        fshm_loan l;
        int rc = fshm_writer_loan(c->w, FRAME_BYTES, &l);
        if (rc) {
            c->error = rc;
            break;
        }
        /* Written in place, word by word, straight into the shared slot. */
        uint64_t *p = l.data;
        uint64_t sum = CSUM_INIT;
        p[0] = l.seq;
        sum = csum_step(sum, l.seq, 0);
        for (uint64_t i = 1; i < NWORDS - 1; i++) {
            uint64_t v = mix(l.seq, i);
            p[i] = v;
            sum = csum_step(sum, v, i);
        }
        p[NWORDS - 1] = sum;
        if ((rc = fshm_writer_commit(c->w, &t, FRAME_BYTES, 0))) {
            c->error = rc;
            break;
        }
        atomic_fetch_add_explicit(&c->frames, 1, memory_order_relaxed);
    }
    return NULL;
}

/* 1 if buf holds exactly frame `seq`. */
static int frame_consistent(const uint8_t *buf, uint64_t seq, uint64_t running_sum)
{
    uint64_t w[NWORDS];
    memcpy(w, buf, sizeof w);
    if (w[0] != seq || w[NWORDS - 1] != running_sum)
        return 0;
    for (uint64_t i = 1; i < NWORDS - 1; i++)
        if (w[i] != mix(seq, i))
            return 0;
    return 1;
}

static void *reader_main(void *arg)
{
    reader_ctx *c = arg;
    uint8_t local[FRAME_BYTES];
    uint64_t rng = 0x9E3779B97F4A7C15ull * (c->id + 1);
    uint64_t n = 0;
    while (!atomic_load_explicit(c->stop, memory_order_relaxed)) {
        fshm_frame f;
        int rc = fshm_reader_peek_latest(c->r, &f);
        if (rc == -EAGAIN || rc == FSHM_E_OVERRUN) {
            c->no_frame++;
            continue;
        }
        if (rc != 0 || f.nbytes != FRAME_BYTES) {
            c->error = rc ? rc : -EPROTO;
            snprintf(c->error_msg, sizeof c->error_msg, "peek_latest: %d (%s), nbytes %zu", rc,
                     rc ? fshm_last_error() : "-", rc ? (size_t)0 : f.nbytes);
            break;
        }
        n++;
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        if ((n & 15) == 0) {
            /* The copy API: a successful copy must be intact as well. */
            rc = fshm_frame_copy(c->r, &f, local, sizeof local);
            uint64_t sum = CSUM_INIT;
            const uint64_t *w = (const uint64_t *)local;
            for (uint64_t i = 0; i < NWORDS - 1; i++)
                sum = csum_step(sum, w[i], i);
            int ok = frame_consistent(local, f.seq, sum);
            if (rc == 0) {
                c->copies_ok++;
                atomic_fetch_add_explicit(&c->accepted, 1, memory_order_relaxed);
                if (!ok)
                    c->torn_accepted++;
            } else if (rc == FSHM_E_OVERRUN) {
                c->copies_overrun++;
                atomic_fetch_add_explicit(&c->rejected, 1, memory_order_relaxed);
                if (!ok)
                    c->torn_rejected++;
            } else {
                c->error = rc;
                snprintf(c->error_msg, sizeof c->error_msg, "frame_copy: %d", rc);
                break;
            }
            atomic_fetch_add_explicit(&c->reads, 1, memory_order_relaxed);
            continue;
        }
        /* Deliberately slow: byte by byte through volatile loads, assembling words and
         * folding them into the checksum as they complete, yielding now and then. */
        const volatile uint8_t *src = f.data;
        unsigned yield_at = (rng >> 20) % 4 == 0 ? (unsigned)((rng >> 32) % FRAME_BYTES) : ~0u;
        uint64_t sum = CSUM_INIT, word = 0;
        for (unsigned i = 0; i < FRAME_BYTES; i++) {
            uint8_t b = src[i];
            local[i] = b;
            word |= (uint64_t)b << (8 * (i & 7));
            if ((i & 7) == 7) {
                if (i / 8 < NWORDS - 1)
                    sum = csum_step(sum, word, i / 8);
                word = 0;
            }
            if (i == yield_at)
                sched_yield();
        }
        int ok = frame_consistent(local, f.seq, sum);
        if (fshm_frame_valid(c->r, &f)) {
            atomic_fetch_add_explicit(&c->accepted, 1, memory_order_relaxed);
            if (!ok)
                c->torn_accepted++;
        } else {
            atomic_fetch_add_explicit(&c->rejected, 1, memory_order_relaxed);
            if (!ok)
                c->torn_rejected++;
        }
        atomic_fetch_add_explicit(&c->reads, 1, memory_order_relaxed);
    }
    return NULL;
}

typedef struct totals {
    uint64_t reads, accepted, rejected, torn_accepted, torn_rejected;
} totals;

static totals grand;

/* Runs until target_reads payload reads were made (once both outcomes were seen) or
 * for cap_s seconds, whichever comes first. With one slot most reads collide with the
 * writer and are expensive, so that configuration gets the smaller share. */
static void run_config(const char *name, uint32_t nslots, unsigned nreaders,
                       uint64_t target_reads, uint64_t cap_s)
{
    fshm_writer *w = tu_writer(name, nslots, FRAME_BYTES);
    reader_ctx rc[2];
    writer_ctx wc;
    memset(&wc, 0, sizeof wc);
    memset(rc, 0, sizeof rc);
    wc.w = w;
    pthread_t wt, rt[2];
    for (unsigned i = 0; i < nreaders; i++) {
        rc[i].r = tu_reader(name);
        rc[i].stop = &wc.stop;
        rc[i].id = i;
    }
    assert_int_equal(pthread_create(&wt, NULL, writer_main, &wc), 0);
    for (unsigned i = 0; i < nreaders; i++)
        assert_int_equal(pthread_create(&rt[i], NULL, reader_main, &rc[i]), 0);

    uint64_t t0 = tu_now_ns();
    for (;;) {
        tu_sleep_ms(20);
        uint64_t reads = 0, acc = 0, rej = 0;
        int err = wc.error;
        for (unsigned i = 0; i < nreaders; i++) {
            reads += atomic_load_explicit(&rc[i].reads, memory_order_relaxed);
            acc += atomic_load_explicit(&rc[i].accepted, memory_order_relaxed);
            rej += atomic_load_explicit(&rc[i].rejected, memory_order_relaxed);
            err |= rc[i].error;
        }
        if (err || tu_now_ns() - t0 >= cap_s * SEC_NS)
            break;
        if (reads >= target_reads && acc > 0 && rej > 0)
            break;
    }
    atomic_store(&wc.stop, 1);
    pthread_join(wt, NULL);
    for (unsigned i = 0; i < nreaders; i++)
        pthread_join(rt[i], NULL);
    double secs = (double)(tu_now_ns() - t0) / 1e9;

    totals t = {0, 0, 0, 0, 0};
    uint64_t no_frame = 0, copies_ok = 0, copies_overrun = 0;
    for (unsigned i = 0; i < nreaders; i++) {
        t.reads += rc[i].reads;
        t.accepted += rc[i].accepted;
        t.rejected += rc[i].rejected;
        t.torn_accepted += rc[i].torn_accepted;
        t.torn_rejected += rc[i].torn_rejected;
        no_frame += rc[i].no_frame;
        copies_ok += rc[i].copies_ok;
        copies_overrun += rc[i].copies_overrun;
    }
    print_message("    nslots=%u readers=%u: %.1f s, %llu frames written, %llu reads: "
                  "%llu accepted, %llu rejected as torn (%llu of them really inconsistent), "
                  "%llu torn accepted; %llu copies ok / %llu overrun; %llu peeks without a "
                  "readable frame\n",
                  nslots, nreaders, secs, (unsigned long long)wc.frames,
                  (unsigned long long)t.reads, (unsigned long long)t.accepted,
                  (unsigned long long)t.rejected, (unsigned long long)t.torn_rejected,
                  (unsigned long long)t.torn_accepted, (unsigned long long)copies_ok,
                  (unsigned long long)copies_overrun, (unsigned long long)no_frame);
    grand.reads += t.reads;
    grand.accepted += t.accepted;
    grand.rejected += t.rejected;
    grand.torn_accepted += t.torn_accepted;
    grand.torn_rejected += t.torn_rejected;

    for (unsigned i = 0; i < nreaders; i++) {
        if (rc[i].error)
            fail_msg("reader %u failed: %s", i, rc[i].error_msg);
        fshm_reader_close(rc[i].r);
    }
    if (wc.error)
        fail_msg("writer failed: %d", wc.error);
    fshm_writer_close(w, 1);

    assert_int_equal(t.torn_accepted, 0);
    assert_true(t.accepted > 0);
    if (t.rejected == 0)
        fail_msg("no read was rejected with nslots=%u: the stress never collided", nslots);
}

static void test_seqlock_one_slot(void **state)
{
    (void)state;
    run_config("stress-1", 1, 1, 300000, 8);
}

static void test_seqlock_four_slots(void **state)
{
    (void)state;
    run_config("stress-4", 4, 2, 1750000, 17);
}

static void test_seqlock_totals(void **state)
{
    (void)state;
    print_message("    total: %llu reads, %llu accepted, %llu rejected as torn, %llu torn "
                  "accepted\n",
                  (unsigned long long)grand.reads, (unsigned long long)grand.accepted,
                  (unsigned long long)grand.rejected, (unsigned long long)grand.torn_accepted);
    assert_int_equal(grand.torn_accepted, 0);
    assert_true(grand.accepted > 0);
    assert_true(grand.rejected > 0);
    /* The checker itself must be able to see tearing, or "0 torn accepted" is vacuous. */
    assert_true(grand.torn_rejected > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_seqlock_one_slot),
        cmocka_unit_test(test_seqlock_four_slots),
        cmocka_unit_test(test_seqlock_totals),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
