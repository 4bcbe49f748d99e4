/* The consumer's doorbell. Every reader that writes its own entry takes its frames from
 * the header ring by seq while it keeps up, and the producer wakes it only while it sleeps
 * (its entry's `sleeping` raised), where the bell says it sleeps: on latest_seq's futex
 * (queueless readers, and queued ones while the producer says it answers so), or on its
 * queue (one descriptor). No system call per frame on either side while it keeps up;
 * exactly one wake per sleep; no lost wake-up when the commit and the sleep race, either
 * way; a rate-capped reader still gets a descriptor per frame (its share),
 * and an entry without the doorbell (an older library's) gets every frame's descriptor,
 * which a doorbell reader copes with (the queue-full count shows it, nothing is lost). */
#include "fshm_test_util.h"
#include "fshm_reader_impl.h"
#include "fshm_writer_impl.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define MS 1000000ll
#define SEC 1000000000ll

/* Descriptors waiting in the reader's queue. */
static long queued(fshm_reader *r)
{
    struct mq_attr a;
    assert_int_equal(mq_getattr(r->q, &a), 0);
    return a.mq_curmsgs;
}

static fshm_ctl_consumer *entry_of(fshm_reader *r)
{
    assert_true(r->entry >= 0);
    return ctl_consumer(r->ctl, (unsigned)r->entry);
}

typedef struct sleeper {
    fshm_reader *r;
    fshm_frame f;
    int rc;
} sleeper;

static void *sleeper_main(void *arg)
{
    sleeper *s = arg;
    s->rc = fshm_reader_wait_next(s->r, 30 * SEC, &s->f);
    return NULL;
}

static void expect_next(fshm_reader *r, uint64_t seq)
{
    fshm_frame f = tu_frame_zero();
    int rc = fshm_reader_wait_next(r, 5 * SEC, &f);
    if (rc)
        fail_msg("wait_next for seq %llu: %d (%s)", (unsigned long long)seq, rc, fshm_last_error());
    assert_int_equal(f.seq, seq);
    assert_int_equal(f.skipped, 0);
    assert_true(f.publish_ns >= f.timestamp_ns);   /* from the slot: no descriptor named it */
    assert_true(tu_check(f.data, f.nbytes, f.seq));
}

/* Starts a thread asleep in wait_next on r and returns once its bell is up. */
static pthread_t start_sleeper(sleeper *s, fshm_reader *r)
{
    *s = (sleeper){.r = r, .f = tu_frame_zero(), .rc = 1};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, sleeper_main, s), 0);
    fshm_ctl_consumer *e = entry_of(r);
    for (int i = 0; i < 10000 && !LOAD_ACQ(&e->sleeping); i++)
        tu_sleep_ms(1);
    return t;
}

/* Puts a thread to sleep in wait_next on r, checks that its bell says `bell`, commits a
 * frame and checks that the sleeper took it (seq `want`) with no wake-up missed. */
static void wake_sleeper(fshm_writer *w, fshm_reader *r, uint32_t bell, uint64_t want)
{
    sleeper s;
    pthread_t t = start_sleeper(&s, r);
    assert_int_equal(LOAD_ACQ(&entry_of(r)->sleeping), bell);
    uint64_t missed = r->missed_wakes;
    assert_int_equal(tu_publish(w, 16), 0);
    pthread_join(t, NULL);
    assert_int_equal(s.rc, 0);
    assert_int_equal(s.f.seq, want);
    assert_int_equal(r->missed_wakes, missed);
}

/* A queued reader whose producer answers its bell with a FUTEX_WAKE (bells_epoch names
 * the epoch): keeping up costs no system call, a sleep costs one FUTEX_WAKE, and nothing
 * goes through its queue. */
static void test_queued_reader_is_woken_by_futex_only_asleep(void **state)
{
    (void)state;
    const char *name = "db-queue";
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_ctl_consumer *e = entry_of(r);
    assert_int_equal(LOAD_RLX(&e->flags) & (CONS_FLAG_NO_QUEUE | CONS_FLAG_DOORBELL),
                     CONS_FLAG_DOORBELL);
    assert_string_not_equal(fshm_reader_queue_name(r), "");
    assert_int_equal(LOAD_ACQ(&r->ctl->bells_epoch), fshm_writer_epoch(w));

    /* Keeping up: the frames are there when it asks; nothing is sent, nobody woken. */
    uint64_t first = fshm_writer_next_seq(w), wakes = w->futex_wakes;
    for (uint64_t seq = first; seq < first + 50; seq++) {
        assert_int_equal(tu_publish(w, 16), 0);
        expect_next(r, seq);
    }
    assert_int_equal(w->futex_wakes, wakes);
    assert_int_equal(LOAD_RLX(&e->sleeping), 0);

    /* Asleep in wait_next, on the futex: the next commit wakes it with one FUTEX_WAKE. */
    wake_sleeper(w, r, BELL_FUTEX, first + 50);
    assert_int_equal(w->futex_wakes, wakes + 1);
    assert_int_equal(LOAD_RLX(&e->sleeping), 0);

    /* Rung and not yet running (a burst after the first frame): the producer lowered the
     * bell with its wake, so the rest of the burst wakes nobody. */
    STORE_RLX(&e->sleeping, BELL_FUTEX);
    for (int i = 0; i < 4; i++)
        assert_int_equal(tu_publish(w, 16), 0);
    assert_int_equal(w->futex_wakes, wakes + 2);
    assert_int_equal(LOAD_RLX(&e->sleeping), 0);
    for (uint64_t seq = first + 51; seq < first + 55; seq++)
        expect_next(r, seq);
    assert_int_equal(LOAD_RLX(&e->delivered), 0);
    assert_int_equal(queued(r), 0);
    assert_int_equal(LOAD_RLX(&r->ctl->desc_sent), 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* A queued reader whose producer has not said it answers by futex (bells_epoch is not the
 * epoch: an older library, or a new epoch whose producer has not started) sleeps on its
 * queue, and the producer, seeing BELL_QUEUE, sends it exactly one descriptor. */
static void test_queued_reader_sleeps_on_its_queue_otherwise(void **state)
{
    (void)state;
    const char *name = "db-queue2";
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_ctl_consumer *e = entry_of(r);
    STORE_REL(&r->ctl->bells_epoch, 0);
    uint64_t first = fshm_writer_next_seq(w), wakes = w->futex_wakes;
    wake_sleeper(w, r, BELL_QUEUE, first);
    assert_int_equal(LOAD_RLX(&e->delivered), 1);
    assert_int_equal(queued(r), 0);   /* the sleep took it */
    assert_int_equal(w->futex_wakes, wakes);

    /* A burst after a bell rung that way sends one descriptor, lowering the bell. */
    STORE_RLX(&e->sleeping, BELL_QUEUE);
    for (int i = 0; i < 4; i++)
        assert_int_equal(tu_publish(w, 16), 0);
    assert_int_equal(LOAD_RLX(&e->delivered), 2);
    assert_int_equal(LOAD_RLX(&e->sleeping), 0);
    assert_int_equal(queued(r), 1);
    assert_int_equal(w->futex_wakes, wakes);
    for (uint64_t seq = first + 1; seq < first + 5; seq++)
        expect_next(r, seq);
    /* That descriptor named a frame taken already: it costs the next sleep a wake-up,
     * not a frame. */
    fshm_frame f = tu_frame_zero();
    assert_int_equal(fshm_reader_wait_next(r, 30 * MS, &f), -ETIMEDOUT);
    assert_int_equal(queued(r), 0);
    assert_int_equal(fshm_reader_drops(r), 0);

    /* Beside a queueless entry without a doorbell (woken on every commit anyway), the
     * queue sleeper's bell is still answered with its descriptor. */
    fshm_reader *old = tu_reader_no_queue(name);
    fshm_ctl_consumer *oe = entry_of(old);
    __atomic_fetch_and(&oe->flags, ~CONS_FLAG_DOORBELL, __ATOMIC_RELAXED);
    __atomic_fetch_add(&r->ctl->consumers_gen, 1, __ATOMIC_RELEASE);
    wake_sleeper(w, r, BELL_QUEUE, first + 5);
    assert_int_equal(LOAD_RLX(&e->delivered), 3);
    assert_int_equal(w->futex_wakes, wakes + 1);   /* the queueless entry's */
    fshm_reader_close(old);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* The producer answers a queued reader's futex bell even when it cannot open the reader's
 * queue (here: the entry names a queue that is not named for its pid, which a producer
 * refuses): a futex sleep needs no queue. */
static void test_futex_bell_needs_no_queue(void **state)
{
    (void)state;
    const char *name = "db-noq";
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_ctl_consumer *e = entry_of(r);
    memcpy(e->queue, "/fshm-1-00000000", sizeof "/fshm-1-00000000");
    __atomic_fetch_add(&r->ctl->consumers_gen, 1, __ATOMIC_RELEASE);
    uint64_t first = fshm_writer_next_seq(w), wakes = w->futex_wakes;
    assert_int_equal(tu_publish(w, 16), 0);   /* the producer rescans the table */
    expect_next(r, first);
    assert_int_equal(w->nqueued, 0);
    wake_sleeper(w, r, BELL_FUTEX, first + 1);
    assert_int_equal(w->futex_wakes, wakes + 1);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* A queueless consumer with a doorbell costs the producer no FUTEX_WAKE while it keeps up
 * (the frames are there when it asks), gets exactly one when it has gone to sleep, and an
 * entry without the doorbell (an older library's) is woken on every commit. */
static void test_no_queue_doorbell_wakes_only_a_sleeper(void **state)
{
    (void)state;
    const char *name = "db-futex";
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader *r = tu_reader_no_queue(name);
    fshm_ctl_consumer *e = entry_of(r);
    assert_int_equal(LOAD_RLX(&e->flags) & (CONS_FLAG_NO_QUEUE | CONS_FLAG_DOORBELL),
                     CONS_FLAG_NO_QUEUE | CONS_FLAG_DOORBELL);
    fshm_frame f = tu_frame_zero();
    uint64_t first = fshm_writer_next_seq(w), wakes = w->futex_wakes;
    for (uint64_t want = first; want < first + 50; want++) {
        assert_int_equal(tu_publish(w, 16), 0);
        assert_int_equal(fshm_reader_wait_next(r, 5 * SEC, &f), 0);
        assert_int_equal(f.seq, want);
    }
    assert_int_equal(w->futex_wakes, wakes);
    assert_int_equal(LOAD_RLX(&e->sleeping), 0);

    /* Asleep in wait_next: the next commit rings. */
    wake_sleeper(w, r, BELL_FUTEX, first + 50);
    assert_int_equal(w->futex_wakes, wakes + 1);
    assert_int_equal(LOAD_RLX(&e->sleeping), 0);
    /* Rung and not yet running (as when a burst follows the first frame): the producer
     * lowered the bell with its wake, so the rest of the burst rings for nobody. */
    STORE_RLX(&e->sleeping, 1);
    for (int i = 0; i < 4; i++)
        assert_int_equal(tu_publish(w, 16), 0);
    assert_int_equal(w->futex_wakes, wakes + 2);
    assert_int_equal(LOAD_RLX(&e->sleeping), 0);
    for (int i = 0; i < 4; i++)
        assert_int_equal(fshm_reader_wait_next(r, 5 * SEC, &f), 0);

    /* The same entry as an older library writes it: no doorbell, a wake per commit. */
    __atomic_fetch_and(&e->flags, ~CONS_FLAG_DOORBELL, __ATOMIC_RELAXED);
    __atomic_fetch_add(&r->ctl->consumers_gen, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 5; i++)
        assert_int_equal(tu_publish(w, 16), 0);
    assert_int_equal(w->futex_wakes, wakes + 2 + 5);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* The producer paces a rate-capped reader's descriptors, so it has no doorbell: it gets a
 * descriptor for each frame of its share, as before. */
static void test_rate_capped_reader_keeps_a_descriptor_per_frame(void **state)
{
    (void)state;
    const char *name = "db-rate";
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = name;
    rc.max_rate_hz = 1000;
    fshm_reader *r;
    assert_int_equal(fshm_reader_open(&rc, &r), 0);
    tu_track(r);
    fshm_ctl_consumer *e = entry_of(r);
    assert_int_equal(LOAD_RLX(&e->flags) & CONS_FLAG_DOORBELL, 0);
    assert_true(fshm_reader_desc_per_frame(r));
    for (int i = 0; i < 3; i++) {
        assert_int_equal(tu_publish(w, 16), 0);
        tu_sleep_ms(2);   /* past the 1 ms (less 10%) the producer waits between sends */
    }
    assert_int_equal(LOAD_RLX(&e->delivered), 3);
    assert_int_equal(queued(r), 3);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(fshm_reader_wait_latest(r, 5 * SEC, &f), 0);
    assert_int_equal(f.seq, fshm_writer_next_seq(w) - 1);
    assert_int_equal(queued(r), 0);   /* drained to the newest */
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* An entry without the doorbell, as an older library writes it: the producer sends every
 * frame's descriptor. A doorbell reader of such a producer (the same situation, seen from
 * the reader) still takes every frame in order, its queue fills and the producer counts
 * that, never waits; the descriptors left over cost wake-ups, not frames. */
static void test_every_descriptor_to_an_entry_without_doorbell(void **state)
{
    (void)state;
    const char *name = "db-old";
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader *r = tu_reader(name);
    fshm_ctl_consumer *e = entry_of(r);
    __atomic_fetch_and(&e->flags, ~CONS_FLAG_DOORBELL, __ATOMIC_RELAXED);
    __atomic_fetch_add(&r->ctl->consumers_gen, 1, __ATOMIC_RELEASE);
    uint64_t first = fshm_writer_next_seq(w);
    int n = fshm_queue_limit() + 5;
    for (int i = 0; i < n; i++)
        assert_int_equal(tu_publish(w, 16), 0);
    assert_int_equal(LOAD_RLX(&e->delivered), (uint64_t)fshm_queue_limit());
    assert_int_equal(LOAD_RLX(&e->queue_full), 5);
    assert_int_equal(queued(r), fshm_queue_limit());
    for (uint64_t seq = first; seq < first + (uint64_t)n; seq++)
        expect_next(r, seq);
    fshm_frame f = tu_frame_zero();
    assert_int_equal(fshm_reader_wait_next(r, 50 * MS, &f), -ETIMEDOUT);
    assert_int_equal(queued(r), 0);
    assert_int_equal(tu_publish(w, 16), 0);
    expect_next(r, first + (uint64_t)n);
    assert_int_equal(fshm_reader_drops(r), 0);
    assert_int_equal(fshm_reader_overruns(r), 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

/* The race the doorbell's ordering is for: commits landing just as the reader decides to
 * sleep. The producer publishes each frame once the reader took the one before, after a
 * pause of 0 to ~60 us that moves the commit across the reader's poll, its bell and its
 * sleep. A lost wake-up would cost a whole 100 ms slice with the frame there, which the
 * reader counts (missed_wakes); every frame must come, in order. */
typedef struct racer {
    fshm_writer *w;
    atomic_ullong taken;   /* seq + 1 of the frame the reader took last */
    int frames, rc;
} racer;

static void *racer_main(void *arg)
{
    racer *k = arg;
    uint64_t first = fshm_writer_next_seq(k->w);
    uint32_t x = 2463534242u;
    fshm_tensor t = tu_u8_tensor(64);
    for (int i = 0; i < k->frames && !k->rc; i++) {
        uint64_t seq = first + (uint64_t)i;
        /* Filled beforehand, so that only the commit (a few hundred ns) follows the
         * pause: the reader is back in its wait within about a microsecond. */
        fshm_loan l;
        if ((k->rc = fshm_writer_loan(k->w, 64, &l)))
            break;
        tu_fill(l.data, 64, l.seq);
        uint64_t give_up = tu_now_ns() + 10 * SEC;
        while (seq > first && atomic_load(&k->taken) < seq && tu_now_ns() < give_up)
            ;
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        /* A quarter of the frames well after the reader went to sleep; the rest at
         * once, landing across its look at latest_seq and its bell (the reader pauses
         * for a random moment before it waits again). */
        uint64_t pause = i % 4 ? 0 : x % 60000;
        for (uint64_t until = tu_now_ns() + pause; tu_now_ns() < until;)
            ;
        k->rc = fshm_writer_commit(k->w, &t, 64, 0);
    }
    return NULL;
}

static void race(int on_queue)
{
    /* On one CPU the two take turns and the commit never lands in the window: the
     * producer and the reader get a CPU each. */
    cpu_set_t all, mine, theirs;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    int cpus[2], n = 0;
    for (int c = 0; c < CPU_SETSIZE && n < 2; c++)
        if (CPU_ISSET(c, &all))
            cpus[n++] = c;
    if (n < 2)
        skip();
    CPU_ZERO(&mine);
    CPU_SET(cpus[1], &mine);
    CPU_ZERO(&theirs);
    CPU_SET(cpus[0], &theirs);
    assert_int_equal(sched_setaffinity(0, sizeof mine, &mine), 0);
    const char *name = "db-race";
    fshm_writer *w = tu_writer(name, 64, 4096);
    fshm_reader *r = tu_reader(name);
    if (on_queue)
        STORE_REL(&r->ctl->bells_epoch, 0);   /* as under a producer that does not answer by futex */
    racer k = {.w = w, .frames = 20000};
    atomic_init(&k.taken, 0);
    uint64_t first = fshm_writer_next_seq(w);
    uint32_t x = 88675123u;
    pthread_t t;
    pthread_attr_t at;
    assert_int_equal(pthread_attr_init(&at), 0);
    assert_int_equal(pthread_attr_setaffinity_np(&at, sizeof theirs, &theirs), 0);
    assert_int_equal(pthread_create(&t, &at, racer_main, &k), 0);
    pthread_attr_destroy(&at);
    int got = 0;
    for (; got < k.frames && r->missed_wakes == 0; got++) {
        int i = got;
        fshm_frame f = tu_frame_zero();
        int rc = fshm_reader_wait_next(r, 10 * SEC, &f);
        if (rc) {
            pthread_join(t, NULL);
            fail_msg("frame %d: wait_next %d (%s)", i, rc, fshm_last_error());
        }
        assert_int_equal(f.seq, first + (uint64_t)i);
        atomic_store(&k.taken, f.seq + 1);
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        for (uint64_t until = tu_now_ns() + x % 3000; tu_now_ns() < until;)
            ;
    }
    atomic_store(&k.taken, UINT64_MAX);   /* stopped at a missed wake-up: the producer goes on */
    pthread_join(t, NULL);
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
    assert_int_equal(k.rc, 0);
    fshm_ctl_consumer *e = entry_of(r);
    uint64_t wakes = on_queue ? LOAD_RLX(&e->delivered) : w->futex_wakes;
    print_message("%s, %d frames: %llu sleeps, %llu %s, %llu wake-ups missed\n",
                  on_queue ? "on its queue" : "on the futex", got, (unsigned long long)r->sleeps,
                  (unsigned long long)wakes, on_queue ? "descriptors" : "FUTEX_WAKEs",
                  (unsigned long long)r->missed_wakes);
    assert_int_equal(r->missed_wakes, 0);
    /* The race was run: the reader slept often, and each sleep cost at most one wake, of
     * the kind its bell asked for. */
    assert_true(r->sleeps >= 100);
    assert_true(wakes <= r->sleeps);
    assert_int_equal(on_queue ? w->futex_wakes : LOAD_RLX(&e->delivered), 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

static void test_no_wake_up_lost_in_the_race(void **state)
{
    (void)state;
    race(0);
    race(1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_queue_doorbell_wakes_only_a_sleeper),
        cmocka_unit_test(test_queued_reader_is_woken_by_futex_only_asleep),
        cmocka_unit_test(test_queued_reader_sleeps_on_its_queue_otherwise),
        cmocka_unit_test(test_futex_bell_needs_no_queue),
        cmocka_unit_test(test_rate_capped_reader_keeps_a_descriptor_per_frame),
        cmocka_unit_test(test_every_descriptor_to_an_entry_without_doorbell),
        cmocka_unit_test(test_no_wake_up_lost_in_the_race),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
