/* GigE Vision capture module (devices/fshm_gige.c) against Aravis' in-process fake camera
 * (Fake_1: no network): open/info, format negotiation and its errors, the known Mono8
 * pattern pixel(x, y) = (x + y + frame_id) % 255, consecutive frame ids, one-copy reads,
 * capture straight into a stream, wait/flush, rate control, lost-frame counting.
 *
 * The lost-frame accounting (fshm_gige_loss: frame ids across the 16-bit wrap, incomplete
 * buffers carrying stale ids, frames that never reached a buffer) is pure and tested in
 * both builds, against a simulated camera.
 *
 * Built twice: test_gige (only when pkg-config finds aravis-0.8) and test_gige_nolib
 * (FSHM_GIGE_TEST_NOLIB: the module compiled without Aravis, which must say so). */
#include "fshm_test_util.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "fshm_gige.h"

#define MS 1000000ll
#define SEC 1000000000ll

/* ---- lost-frame accounting (no camera) ---- */

/* The GigE Vision 16-bit block id after id: 65535 -> 1, 0 is never used. */
static uint64_t next16(uint64_t id) { return id == 0xffff ? 1 : id + 1; }

/* Frames strictly between a and b by walking the ids one by one (the oracle). */
static int64_t walk_between(uint64_t a, uint64_t b, int64_t limit)
{
    int64_t n = 0;
    for (uint64_t id = next16(a); id != b; id = next16(id))
        if (++n > limit)
            return -1;
    return n;
}

static void test_ids_between_across_the_wrap(void **state)
{
    (void)state;
    static const struct { uint64_t prev, id; int64_t between; } cases[] = {
        {1, 2, 0}, {1, 5, 3}, {65534, 65535, 0},
        {65535, 1, 0},           /* the wrap skips 0 */
        {65534, 1, 1},           /* 65535 missing */
        {65535, 2, 1},           /* 1 missing */
        {65533, 3, 4},           /* 65534, 65535, 1, 2 */
        {65401, 31, 164},        /* the ids of issue 13's failing run */
        {1, 32769, 32767},       /* the longest step taken */
        {1, 32770, -1},          /* longer: ids restarted */
        {65535, 32768, 32767},
        {65400, 65400, -1},      /* the same id again */
        {100, 50, -1},           /* a step back (a stale or restarted id) */
        {1, 65535, -1},          /* one step back across the wrap */
        {0, 5, -1}, {5, 0, -1},  /* 0 is not a frame id */
        {65535, 65536, 0},       /* 64-bit extended ids do not wrap */
        {70000, 70003, 2},
        {70000, 5, -1},
        {70000, 70000 + 32769, -1},
        {(1ull << 40), (1ull << 40) + 1, 0},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int64_t got = fshm_gige_ids_between(cases[k].prev, cases[k].id);
        if (got != cases[k].between)
            fail_msg("between(%llu, %llu) = %lld, expected %lld", (unsigned long long)cases[k].prev,
                     (unsigned long long)cases[k].id, (long long)got, (long long)cases[k].between);
    }
    /* every pair around the wrap against the walk */
    for (uint64_t a = 65000; a != 600; a = next16(a))
        for (uint64_t b = 64900; b != 700; b = next16(b)) {
            int64_t want = a == b ? -1 : walk_between(a, b, FSHM_GIGE_MAX_ID_STEP - 1);
            int64_t got = fshm_gige_ids_between(a, b);
            if (got != want)
                fail_msg("between(%llu, %llu) = %lld, walk says %lld", (unsigned long long)a,
                         (unsigned long long)b, (long long)got, (long long)want);
        }
}

typedef struct {
    fshm_gige_loss loss;
    uint64_t pending;          /* returns since the last complete frame (lost_before) */
    uint64_t last_delivered;   /* id of the last complete frame */
} loss_run;

static void pop_incomplete(loss_run *r, uint64_t stale_id)
{
    assert_int_equal(fshm_gige_loss_account(&r->loss, 0, stale_id), 1);
    r->pending++;
}

/* A complete frame: what it reports lost must be exactly the frames since the last one. */
static void pop_complete(loss_run *r, uint64_t id)
{
    r->pending += fshm_gige_loss_account(&r->loss, 1, id);
    if (r->last_delivered) {
        int64_t want = walk_between(r->last_delivered, id, 100000);
        if ((int64_t)r->pending != want)
            fail_msg("frame %llu after %llu: lost_before %llu, %lld frames in between", (unsigned long long)id,
                     (unsigned long long)r->last_delivered, (unsigned long long)r->pending, (long long)want);
    }
    r->pending = 0;
    r->last_delivered = id;
}

static void test_loss_the_failing_run_of_issue_13(void **state)
{
    (void)state;
    /* Buffers whose leader packet was lost come back incomplete with the id of the frame
     * they held before (seen with arv-fake-gv-camera under load): 65412 again after 65428.
     * Counting that id as a frame id re-counted 65413..65427 as gaps. */
    loss_run r = {0};
    for (uint64_t id = 65401; id <= 65414; id++)
        pop_complete(&r, id);
    pop_complete(&r, 65417);          /* 65415, 65416 never arrived */
    pop_incomplete(&r, 65412);        /* 65418, with a stale id */
    pop_complete(&r, 65419);
    pop_incomplete(&r, 65414);        /* 65420 */
    pop_incomplete(&r, 65417);        /* 65421 */
    pop_complete(&r, 65428);          /* 65422..65427 never arrived */
    pop_complete(&r, 65535);          /* 65429..65534 never arrived */
    pop_incomplete(&r, 65419);        /* 1 */
    pop_complete(&r, 3);              /* 2 never arrived */
    pop_incomplete(&r, 0);            /* a buffer never filled before: id 0 */
    pop_complete(&r, 5);
    assert_int_equal(r.loss.incomplete, 5);
    assert_int_equal(r.loss.id_gaps, 2 + 6 + 106 + 1);
    assert_int_equal(r.loss.resyncs, 0);
    /* every frame from the first to the last: delivered, incomplete or an id gap */
    assert_int_equal(14 + 6 + r.loss.incomplete + r.loss.id_gaps, 1 + walk_between(65401, 5, 100000) + 1);
}

/* xorshift64*: reproducible fates without libc's rand state */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static void test_loss_simulated_camera_across_the_wrap(void **state)
{
    (void)state;
    /* A camera numbering frames from 65000 through the wrap; each frame is delivered,
     * returned incomplete (with the stale id of a buffer of a pool of 8, its own id, or 0)
     * or never reaches a buffer. The accounting must find exactly the truth. */
    for (uint64_t seed = 1; seed <= 50; seed++) {
        uint64_t rs = seed * 0x9e3779b97f4a7c15ull;
        uint64_t pool[8] = {0};
        loss_run r = {0};
        uint64_t truth_incomplete = 0, truth_missing = 0, missing_tail = 0, delivered = 0, first = 0, last = 0;
        uint64_t id = 65000;
        for (int k = 0; k < 2000; k++, id = next16(id)) {
            unsigned fate = (unsigned)(rng_next(&rs) % 100);
            unsigned slot = (unsigned)(rng_next(&rs) % 8);
            if (k == 0 || fate < 60) {
                pool[slot] = id;
                pop_complete(&r, id);
                delivered++;
                first = first ? first : id;
                last = id;
                truth_missing += missing_tail;
                missing_tail = 0;
            } else if (fate < 80) {
                uint64_t shown = fate < 70 ? pool[slot] : fate < 75 ? id : 0;
                pop_incomplete(&r, shown);
                truth_incomplete++;
            } else {
                missing_tail++;   /* never reached a buffer: no pop at all */
            }
        }
        /* (frames missing after the last complete one are not known yet) */
        assert_int_equal(r.loss.incomplete, truth_incomplete);
        assert_int_equal(r.loss.id_gaps, truth_missing);
        assert_true(r.loss.id_gaps > 100 && r.loss.incomplete > 100);
        /* first..last: delivered, incomplete in between, or an id gap */
        uint64_t span = (uint64_t)walk_between(first, last, 100000) + 2;
        assert_int_equal(delivered + (r.loss.incomplete - r.pending) + r.loss.id_gaps, span);
        assert_int_equal(r.loss.resyncs, 0);
    }
}

static void test_loss_restart_and_first_frames(void **state)
{
    (void)state;
    fshm_gige_loss l = {0};
    /* incomplete buffers before any complete frame: lost, but no gap can be known */
    assert_int_equal(fshm_gige_loss_account(&l, 0, 0), 1);
    assert_int_equal(fshm_gige_loss_account(&l, 0, 123), 1);
    assert_int_equal(fshm_gige_loss_account(&l, 1, 500), 0);
    assert_int_equal(fshm_gige_loss_account(&l, 1, 503), 2);
    /* the camera restarted its counter: neither the step back nor the step after counts */
    assert_int_equal(fshm_gige_loss_account(&l, 1, 7), 0);
    assert_int_equal(fshm_gige_loss_account(&l, 1, 8), 0);
    assert_int_equal(fshm_gige_loss_account(&l, 1, 8 + 40000), 0);
    assert_int_equal(l.resyncs, 2);
    /* a complete frame with no id: the next one starts afresh */
    assert_int_equal(fshm_gige_loss_account(&l, 1, 0), 0);
    assert_int_equal(fshm_gige_loss_account(&l, 1, 60000), 0);
    /* more incomplete buffers than ids in between (cannot happen in order): no negative gap */
    assert_int_equal(fshm_gige_loss_account(&l, 0, 1), 1);
    assert_int_equal(fshm_gige_loss_account(&l, 0, 1), 1);
    assert_int_equal(fshm_gige_loss_account(&l, 1, 60002), 0);
    assert_int_equal(l.id_gaps, 2);
    assert_int_equal(l.incomplete, 4);
    assert_int_equal(l.incomplete_run, 0);
}

#define LOSS_TESTS                                                       \
    cmocka_unit_test(test_ids_between_across_the_wrap),                  \
    cmocka_unit_test(test_loss_the_failing_run_of_issue_13),             \
    cmocka_unit_test(test_loss_simulated_camera_across_the_wrap),        \
    cmocka_unit_test(test_loss_restart_and_first_frames)

#ifdef FSHM_GIGE_TEST_NOLIB

static void test_nolib_says_how_to_get_aravis(void **state)
{
    (void)state;
    assert_int_equal(fshm_gige_have_aravis(), 0);
    fshm_gige_cam *c = (fshm_gige_cam *)1;
    assert_int_equal(fshm_gige_open("Fake_1", &c), FSHM_E_GIGE_NOLIB);
    assert_null(c);
    assert_string_equal(fshm_last_error(), "frameshm was built without Aravis: apt-get install libaravis-dev "
                                           "libusb-1.0-0-dev and reinstall");
    fshm_gige_request rq = {0};
    assert_int_equal(fshm_gige_start(NULL, &rq), FSHM_E_GIGE_NOLIB);
    assert_int_equal(fshm_gige_read_into(NULL, 0, NULL, 0, NULL), FSHM_E_GIGE_NOLIB);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_nolib_says_how_to_get_aravis), LOSS_TESTS};
    return cmocka_run_group_tests_name("gige_nolib", tests, NULL, NULL);
}

#else

static fshm_gige_cam *start_fake(const char *pf, uint32_t w, uint32_t h, double fps, uint32_t nbuf)
{
    fshm_gige_cam *c = NULL;
    int rc = fshm_gige_open("Fake_1", &c);
    if (rc)
        fail_msg("open Fake_1: %d %s", rc, fshm_last_error());
    fshm_gige_request rq = {pf, 0, 0, w, h, fps, 0, nbuf};
    rc = fshm_gige_start(c, &rq);
    if (rc)
        fail_msg("start: %d %s", rc, fshm_last_error());
    return c;
}

static int pattern_errors(const uint8_t *p, uint32_t w, uint32_t h, uint64_t id)
{
    int bad = 0;
    for (uint32_t y = 0; y < h; y++)
        for (uint32_t x = 0; x < w; x++)
            bad += p[(size_t)y * w + x] != (uint8_t)((x + y + id) % 255);
    return bad;
}

static void test_open_info_and_format(void **state)
{
    (void)state;
    assert_int_equal(fshm_gige_have_aravis(), 1);
    fshm_gige_cam *c = start_fake("Mono8", 640, 480, 100, 0);
    fshm_gige_info i;
    fshm_gige_get_info(c, &i);
    assert_string_equal(i.id, "Fake_1");
    assert_string_equal(i.protocol, "Fake");
    assert_string_equal(i.serial, "1");
    fshm_gige_format f;
    fshm_gige_get_format(c, &f);
    assert_string_equal(f.pixel_format, "Mono8");
    assert_int_equal(f.width, 640);
    assert_int_equal(f.height, 480);
    assert_int_equal(f.bits_per_pixel, 8);
    assert_int_equal(f.frame_bytes, 640 * 480);
    assert_true(f.payload >= f.frame_bytes);
    assert_int_equal(f.nbuffers, FSHM_GIGE_DEFAULT_BUFFERS);
    assert_int_equal(f.frame_rate_available, 1);
    assert_true(f.fps > 99 && f.fps < 101);
    assert_int_equal(f.packet_size, 0);   /* not GigE */
    assert_int_equal(f.tensor.dtype, FSHM_DTYPE_UINT8);
    assert_int_equal(f.tensor.ndims, 2);
    assert_int_equal(f.tensor.dims[0], 480);
    assert_int_equal(f.tensor.dims[1], 640);
    fshm_gige_close(c);

    c = start_fake("RGB8", 64, 48, 100, 2);
    fshm_gige_get_format(c, &f);
    assert_int_equal(f.tensor.ndims, 3);
    assert_int_equal(f.tensor.dims[2], 3);
    assert_int_equal(f.frame_bytes, 64 * 48 * 3);
    fshm_gige_close(c);
    c = start_fake("Mono16", 64, 48, 100, 2);
    fshm_gige_get_format(c, &f);
    assert_int_equal(f.tensor.dtype, FSHM_DTYPE_UINT16);
    assert_int_equal(f.frame_bytes, 64 * 48 * 2);
    fshm_gige_close(c);
}

static void test_errors(void **state)
{
    (void)state;
    fshm_gige_cam *c = NULL;
    assert_int_equal(fshm_gige_open("", &c), -EINVAL);
    assert_null(c);
    /* No lookup of a missing camera by name: that is Aravis' discovery, which broadcasts on
     * every interface (tests/python/test_gige.py checks -ENOENT by IP on loopback). */
    assert_int_equal(fshm_gige_open("Fake_1", &c), 0);
    fshm_gige_request rq = {"NoSuchFormat", 0, 0, 64, 48, 10, 0, 0};
    assert_int_equal(fshm_gige_start(c, &rq), FSHM_E_GIGE_UNSUPPORTED);
    assert_non_null(strstr(fshm_last_error(), "offers: "));
    assert_non_null(strstr(fshm_last_error(), "Mono8"));
    fshm_gige_request big = {"Mono8", 0, 0, 64, 100000, 10, 0, 0};
    assert_int_equal(fshm_gige_start(c, &big), FSHM_E_GIGE_UNSUPPORTED);
    fshm_gige_request half = {"Mono8", 0, 0, 64, 0, 10, 0, 0};
    assert_int_equal(fshm_gige_start(c, &half), -EINVAL);
    fshm_gige_request pkt = {"Mono8", 0, 0, 64, 48, 10, 1400, 0};
    assert_int_equal(fshm_gige_start(c, &pkt), -EINVAL);   /* packet size: GigE only */
    fshm_gige_request many = {"Mono8", 0, 0, 64, 48, 10, 0, FSHM_GIGE_MAX_BUFFERS + 1};
    assert_int_equal(fshm_gige_start(c, &many), -EINVAL);
    uint8_t buf[16];
    assert_int_equal(fshm_gige_read_into(c, 0, buf, sizeof buf, NULL), -EINVAL);   /* not started */
    fshm_gige_request ok = {"Mono8", 0, 0, 64, 48, 100, 0, 2};
    assert_int_equal(fshm_gige_start(c, &ok), 0);
    assert_int_equal(fshm_gige_read_into(c, SEC, buf, sizeof buf, NULL), -EINVAL);   /* too small */
    assert_int_equal(fshm_gige_probe(c), 0);
    assert_int_equal(fshm_gige_gone(c), 0);
    fshm_gige_close(c);
}

static void test_pattern_and_consecutive_ids(void **state)
{
    (void)state;
    fshm_gige_cam *c = start_fake("Mono8", 320, 240, 100, 8);
    uint8_t *buf = malloc(320 * 240);
    uint64_t prev = 0;
    for (int k = 0; k < 20; k++) {
        fshm_gige_frame fi;
        int rc = fshm_gige_read_into(c, 2 * SEC, buf, 320 * 240, &fi);
        if (rc)
            fail_msg("read %d: %d %s", k, rc, fshm_last_error());
        assert_int_equal(fi.bytes, 320 * 240);
        assert_int_equal(pattern_errors(buf, 320, 240, fi.frame_id), 0);
        if (prev)
            assert_int_equal(fi.frame_id, prev + 1);
        prev = fi.frame_id;
        uint64_t now = fshm_now_ns();
        assert_true(fi.timestamp_ns <= now && now - fi.timestamp_ns < 2 * SEC);   /* CLOCK_MONOTONIC */
    }
    fshm_gige_stats s;
    fshm_gige_get_stats(c, &s);
    assert_int_equal(s.delivered, 20);
    assert_int_equal(s.id_gaps, 0);
    assert_int_equal(s.incomplete, 0);
    free(buf);
    fshm_gige_close(c);
}

static void test_capture_into_stream(void **state)
{
    (void)state;
    fshm_gige_cam *c = start_fake("Mono8", 160, 120, 100, 4);
    fshm_writer *w = tu_writer("gige-cap", 4, 160 * 120);
    fshm_reader *r = tu_reader("gige-cap");
    uint64_t seq = 0;
    for (int k = 0; k < 3; k++) {
        fshm_gige_frame fi;
        int rc = fshm_gige_capture(c, w, 2 * SEC, NULL, &seq, &fi);
        if (rc)
            fail_msg("capture: %d %s", rc, fshm_last_error());
        assert_int_equal(seq, (uint64_t)k);
        fshm_frame f;
        assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
        assert_int_equal(f.seq, seq);
        assert_int_equal(f.timestamp_ns, fi.timestamp_ns);
        assert_int_equal(f.tensor.ndims, 2);
        assert_int_equal(f.tensor.dims[0], 120);
        assert_int_equal(f.tensor.dims[1], 160);
        assert_int_equal(pattern_errors(f.data, 160, 120, fi.frame_id), 0);
        assert_true(fshm_frame_valid(r, &f));
    }
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
    fshm_gige_close(c);
}

static void test_wait_then_read_is_the_same_frame_and_flush(void **state)
{
    (void)state;
    fshm_gige_cam *c = start_fake("Mono8", 64, 48, 100, 4);
    uint8_t buf[64 * 48];
    assert_int_equal(fshm_gige_wait(c, 2 * SEC), 64 * 48);
    fshm_gige_frame a, b;
    assert_int_equal(fshm_gige_read_into(c, 0, buf, sizeof buf, &a), 0);   /* already there */
    assert_int_equal(pattern_errors(buf, 64, 48, a.frame_id), 0);
    tu_sleep_ms(400);   /* the pool fills, then the fake has no free buffer */
    int flushed = fshm_gige_flush(c, 100 * MS);
    assert_true(flushed >= 1);
    assert_int_equal(fshm_gige_read_into(c, 2 * SEC, buf, sizeof buf, &b), 0);
    assert_true(fshm_now_ns() - b.timestamp_ns < 300 * MS);
    fshm_gige_stats s;
    fshm_gige_get_stats(c, &s);
    assert_int_equal(s.flushed, (uint64_t)flushed);
    assert_true(s.underruns >= 5);
    /* the fake numbers only the frames it fills: its drops are counted by underruns */
    assert_int_equal(s.lost, s.incomplete + (s.underruns > s.id_gaps ? s.underruns : s.id_gaps));
    fshm_gige_close(c);
}

static void test_rate_control(void **state)
{
    (void)state;
    fshm_gige_cam *c = start_fake("Mono8", 64, 48, 20, 4);
    uint8_t buf[64 * 48];
    assert_int_equal(fshm_gige_read_into(c, 2 * SEC, buf, sizeof buf, NULL), 0);
    fshm_gige_frame a, b;
    assert_int_equal(fshm_gige_read_into(c, 2 * SEC, buf, sizeof buf, &a), 0);
    for (int k = 0; k < 9; k++)
        assert_int_equal(fshm_gige_read_into(c, 2 * SEC, buf, sizeof buf, &b), 0);
    double fps = 9e9 / (double)(b.timestamp_ns - a.timestamp_ns);
    assert_true(fps > 10 && fps < 30);   /* 20 fps; generous for a noisy machine */
    assert_int_equal(fshm_gige_set_rate(c, 100), 1);
    fshm_gige_format f;
    fshm_gige_get_format(c, &f);
    assert_true(f.fps > 99 && f.fps < 101);
    assert_int_equal(fshm_gige_set_rate(c, 0), 1);   /* back to the rate asked at start */
    fshm_gige_get_format(c, &f);
    assert_true(f.fps > 19 && f.fps < 21);
    assert_int_equal(fshm_gige_set_rate(c, -1), -EINVAL);
    fshm_gige_close(c);
}

static void test_timeout_when_stopped(void **state)
{
    (void)state;
    fshm_gige_cam *c = start_fake("Mono8", 64, 48, 1, 2);   /* 1 fps */
    uint8_t buf[64 * 48];
    assert_int_equal(fshm_gige_read_into(c, 3 * SEC, buf, sizeof buf, NULL), 0);
    uint64_t t0 = fshm_now_ns();
    assert_int_equal(fshm_gige_read_into(c, 100 * MS, buf, sizeof buf, NULL), -ETIMEDOUT);
    assert_true(fshm_now_ns() - t0 >= 90 * MS);
    fshm_gige_stats s;
    fshm_gige_get_stats(c, &s);
    assert_int_equal(s.timeouts, 1);
    assert_int_equal(fshm_gige_stop(c), 0);
    assert_int_equal(fshm_gige_read_into(c, 0, buf, sizeof buf, NULL), -EINVAL);
    fshm_gige_close(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_info_and_format),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_pattern_and_consecutive_ids),
        cmocka_unit_test(test_capture_into_stream),
        cmocka_unit_test(test_wait_then_read_is_the_same_frame_and_flush),
        cmocka_unit_test(test_rate_control),
        cmocka_unit_test(test_timeout_when_stopped),
        LOSS_TESTS,
    };
    return cmocka_run_group_tests_name("gige", tests, tu_group_setup, tu_group_teardown);
}

#endif
