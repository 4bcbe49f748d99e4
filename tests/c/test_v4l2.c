/* V4L2 capture module (devices/fshm_v4l2.c) against the deterministic fake device of
 * fake_v4l2.c: negotiation, zero-copy and one-copy delivery, capture into a stream,
 * padded rows, buffer grants, EBUSY, ENODEV mid-stream and reconnect, frame-rate control
 * (device and software), flush, errored buffers, conversions, the test-backend hook.
 *
 * The fake timestamps frame k at STREAMON + k * interval exactly, so intervals and
 * decimation are checked exactly, whatever the machine's load.
 *
 * Built twice: test_v4l2 (with libv4l2 when pkg-config finds it) and test_v4l2_nolib
 * (FSHM_V4L2_TEST_NOLIB: the module compiled without libv4l2). */
#include "fshm_test_util.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <linux/videodev2.h>

#include "fake_v4l2.h"
#include "fshm_v4l2.h"

#define MS 1000000ll
#define SEC 1000000000ll
#define YUYV FSHM_FOURCC('Y', 'U', 'Y', 'V')
#define GREY FSHM_FOURCC('G', 'R', 'E', 'Y')
#define RGB3 FSHM_FOURCC('R', 'G', 'B', '3')
#define BGR3 FSHM_FOURCC('B', 'G', 'R', '3')

static const fshm_v4l2_backend *fake(void) { return fshm_v4l2_test_backend(); }

static void configure(const char *spec)
{
    fake_v4l2_reset();
    assert_int_equal(fake_v4l2_configure(spec), 0);
}

static fshm_v4l2_cam *open_cam(const char *path)
{
    fshm_v4l2_cam *c = NULL;
    int rc = fshm_v4l2_open(path, fake(), &c);
    if (rc)
        fail_msg("open %s: %d %s", path, rc, fshm_last_error());
    return c;
}

static fshm_v4l2_cam *start_cam(const char *path, uint32_t fourcc, uint32_t w, uint32_t h, uint32_t fps,
                                uint32_t nbuf)
{
    fshm_v4l2_cam *c = open_cam(path);
    fshm_v4l2_request rq = {fourcc, w, h, fps, fps ? 1 : 0, nbuf};
    int rc = fshm_v4l2_start(c, &rq);
    if (rc)
        fail_msg("start %s: %d %s", path, rc, fshm_last_error());
    return c;
}

/* Checks a packed frame (rows of row bytes) against the fake's pattern for counter n. */
static void check_pattern(const uint8_t *p, uint32_t row, uint32_t rows, size_t bpl, uint32_t n)
{
    uint32_t got;
    memcpy(&got, p, 4);
    assert_int_equal(got, n);
    for (uint32_t y = 0; y < rows; y++)
        for (uint32_t x = (y == 0 ? 4 : 0); x < row; x += (y % 7 == 0 ? 1 : 13)) {
            uint8_t want = (uint8_t)(x + y + 4 * n);
            if (p[(size_t)y * bpl + x] != want)
                fail_msg("frame %u byte (%u,%u) = %u, want %u", n, x, y, p[(size_t)y * bpl + x], want);
        }
}

static int expect_error(int rc, int code, const char *needle)
{
    if (rc != code)
        fail_msg("got %d (%s), want %d", rc, fshm_last_error(), code);
    if (needle && !strstr(fshm_last_error(), needle))
        fail_msg("message '%s' lacks '%s'", fshm_last_error(), needle);
    return 0;
}

/* ---- opening ---- */

static void test_open_errors(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:64x48@100");
    fshm_v4l2_cam *c = NULL;
    expect_error(fshm_v4l2_open("/dev/video9", fake(), &c), -ENOENT, "/dev/video9");
    assert_null(c);
    assert_int_equal(fake_v4l2_configure("path=/dev/video1 eacces=1"), 0);
    expect_error(fshm_v4l2_open("/dev/video1", fake(), &c), -EACCES, "video' group");
    expect_error(fshm_v4l2_open("", fake(), &c), -EINVAL, NULL);
    /* A real file that is not a V4L2 device, through libv4l2 when present. */
    if (fshm_v4l2_have_libv4l2()) {
        expect_error(fshm_v4l2_open("/dev/null", NULL, &c), -ENOTTY, "not a V4L2 device");
    } else {
        expect_error(fshm_v4l2_open("/dev/null", NULL, &c), FSHM_E_V4L2_NOLIB, "apt-get install libv4l-dev");
    }
    fake_v4l2_stats st;
    fake_v4l2_get_stats("/dev/video0", &st);
    assert_int_equal(st.open_fds, 0);
}

static void test_info_and_enumeration(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:640x480@30,YUYV:320x240@60,GREY:160x120@30");
    fshm_v4l2_cam *c = open_cam("/dev/video0");
    fshm_v4l2_info info;
    fshm_v4l2_get_info(c, &info);
    assert_string_equal(info.driver, "fshm-fake");
    assert_string_equal(info.backend, "fake");
    assert_true(info.capabilities & V4L2_CAP_STREAMING);

    fshm_v4l2_fmtdesc f[16];
    int n = fshm_v4l2_enum_formats(c, f, 16);
    /* native YUYV, GREY; converted RGB3/BGR3/YU12/YV12 only through libv4lconvert */
    assert_int_equal(f[0].fourcc, YUYV);
    assert_int_equal(f[0].flags, 0);
    assert_int_equal(f[1].fourcc, GREY);
    int have_rgb = 0, have_bgr = 0;
    for (int i = 2; i < n; i++) {
        assert_true(f[i].flags & FSHM_V4L2_FMT_CONVERTED);
        assert_int_equal(f[i].source_fourcc, YUYV);
        have_rgb |= f[i].fourcc == RGB3;
        have_bgr |= f[i].fourcc == BGR3;
    }
    assert_int_equal(have_rgb, fshm_v4l2_have_libv4l2());
    assert_int_equal(have_bgr, fshm_v4l2_have_libv4l2());
    if (!fshm_v4l2_have_libv4l2())
        assert_int_equal(n, 2);

    fshm_v4l2_frmsize s[8];
    assert_int_equal(fshm_v4l2_enum_sizes(c, YUYV, s, 8), 2);
    assert_true(s[0].discrete && s[0].width == 640 && s[0].height == 480);
    assert_true(s[1].discrete && s[1].width == 320 && s[1].height == 240);
    fshm_v4l2_frmival iv[8];
    int ni = fshm_v4l2_enum_intervals(c, YUYV, 320, 240, iv, 8);
    assert_int_equal(ni, 4);
    assert_true(iv[0].discrete && iv[0].num == 1 && iv[0].den == 60);
    assert_true(iv[3].num == 6 && iv[3].den == 60);
    expect_error(fshm_v4l2_enum_sizes(c, FSHM_FOURCC('H', '2', '6', '4'), s, 8), FSHM_E_V4L2_UNSUPPORTED, "H264");
    fshm_v4l2_close(c);
}

/* ---- negotiation errors ---- */

static void test_unsupported_format_and_size(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:640x480@30,YUYV:320x240@30");
    fshm_v4l2_cam *c = open_cam("/dev/video0");
    fshm_v4l2_request rq = {YUYV, 800, 600, 0, 0, 4};
    expect_error(fshm_v4l2_start(c, &rq), FSHM_E_V4L2_UNSUPPORTED, "640x480, 320x240");
    rq = (fshm_v4l2_request){FSHM_FOURCC('H', '2', '6', '4'), 640, 480, 0, 0, 4};
    expect_error(fshm_v4l2_start(c, &rq), FSHM_E_V4L2_UNSUPPORTED, "YUYV");
    rq = (fshm_v4l2_request){YUYV, 640, 0, 0, 0, 4};
    expect_error(fshm_v4l2_start(c, &rq), -EINVAL, "width and height");
    rq = (fshm_v4l2_request){YUYV, 640, 480, 0, 0, 33};
    expect_error(fshm_v4l2_start(c, &rq), -EINVAL, "at most 32");
    /* Defaults: the device's current format. */
    rq = (fshm_v4l2_request){0, 0, 0, 0, 0, 0};
    assert_int_equal(fshm_v4l2_start(c, &rq), 0);
    fshm_v4l2_format f;
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.fourcc, YUYV);
    assert_int_equal(f.width, 640);
    assert_int_equal(f.nbuffers, FSHM_V4L2_DEFAULT_BUFFERS);
    assert_int_equal(f.tensor.ndims, 3);
    assert_int_equal(f.tensor.dims[0], 480);
    assert_int_equal(f.tensor.dims[1], 640);
    assert_int_equal(f.tensor.dims[2], 2);
    assert_int_equal(f.frame_bytes, 640 * 480 * 2);
    fshm_v4l2_close(c);
}

/* ---- zero-copy ---- */

static void test_zero_copy_frames_and_timestamps(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:64x48@100");
    fshm_v4l2_cam *c = start_cam("/dev/video0", YUYV, 64, 48, 0, 4);
    uint64_t prev_ts = 0;
    uint32_t prev_seq = 0;
    for (int i = 0; i < 12; i++) {
        fshm_v4l2_buf b;
        int rc = fshm_v4l2_dequeue(c, 2 * SEC, &b);
        assert_int_equal(rc, 0);
        assert_int_equal(b.bytesused, 64 * 48 * 2);
        assert_int_equal(b.bytesperline, 128);
        assert_true(b.driver_timestamp);
        assert_true(b.timestamp_ns <= b.dequeue_ns);
        check_pattern(b.data, 128, 48, 128, b.sequence);
        if (i) {
            assert_true(b.sequence > prev_seq);
            /* the fake's capture instants: exactly (sequence gap) x 10 ms (us resolution) */
            assert_int_equal(b.timestamp_ns - prev_ts, (uint64_t)(b.sequence - prev_seq) * 10 * MS);
        }
        prev_ts = b.timestamp_ns;
        prev_seq = b.sequence;
        assert_int_equal(fshm_v4l2_held(c), 1);
        assert_int_equal(fshm_v4l2_requeue(c, b.index), 0);
        assert_int_equal(fshm_v4l2_held(c), 0);
    }
    expect_error(fshm_v4l2_requeue(c, 0), -EINVAL, "not held");
    fshm_v4l2_stats st;
    fshm_v4l2_get_stats(c, &st);
    assert_int_equal(st.delivered, 12);
    fshm_v4l2_close(c);
    assert_int_equal(fake_v4l2_live_mappings(), 0);
}

static void test_held_buffers_are_never_requeued(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:64x48@200");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 64, 48, 0, 3);
    fshm_v4l2_buf held[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &held[i]), 0);
    fake_v4l2_stats st;
    fake_v4l2_get_stats("/dev/video0", &st);
    assert_int_equal(st.queued, 0);   /* the driver owns nothing */
    fshm_v4l2_buf extra;
    expect_error(fshm_v4l2_dequeue(c, 50 * MS, &extra), FSHM_E_V4L2_NOBUFS, "held by the application");
    /* While held, the memory keeps its frame although the device keeps capturing. */
    tu_sleep_ms(30);
    for (int i = 0; i < 3; i++)
        check_pattern(held[i].data, 64, 48, 64, held[i].sequence);
    /* Give one back: frames flow through that buffer; the other two stay untouched. */
    assert_int_equal(fshm_v4l2_requeue(c, held[0].index), 0);
    for (int i = 0; i < 5; i++) {
        fshm_v4l2_buf b;
        assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &b), 0);
        assert_int_equal(b.index, held[0].index);
        assert_int_equal(fshm_v4l2_requeue(c, b.index), 0);
    }
    check_pattern(held[1].data, 64, 48, 64, held[1].sequence);
    check_pattern(held[2].data, 64, 48, 64, held[2].sequence);
    assert_int_equal(fshm_v4l2_requeue(c, held[1].index), 0);
    assert_int_equal(fshm_v4l2_requeue(c, held[2].index), 0);
    fshm_v4l2_close(c);
}

struct waiter {
    fshm_v4l2_cam *c;
    int rc;
    fshm_v4l2_buf b;
    char msg[256];   /* fshm_last_error() is per thread */
};

static void *wait_thread(void *arg)
{
    struct waiter *w = arg;
    w->rc = fshm_v4l2_dequeue(w->c, 5 * SEC, &w->b);
    snprintf(w->msg, sizeof w->msg, "%s", fshm_last_error());
    return NULL;
}

static void test_requeue_while_another_thread_waits(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:32x16@50");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 0, 2);
    fshm_v4l2_buf a;
    assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &a), 0);
    struct waiter w = {c, -1, {0}, {0}};
    pthread_t t;
    pthread_create(&t, NULL, wait_thread, &w);
    for (int i = 0; i < 20; i++) {   /* requeues race the waiting thread's DQBUF */
        tu_sleep_ms(1);
        if (i == 10)
            assert_int_equal(fshm_v4l2_requeue(c, a.index), 0);
    }
    pthread_join(t, NULL);
    assert_int_equal(w.rc, 0);
    check_pattern(w.b.data, 32, 16, 32, w.b.sequence);
    assert_int_equal(fshm_v4l2_requeue(c, w.b.index), 0);
    fshm_v4l2_close(c);
}

/* ---- one copy ---- */

static void test_read_into_compacts_padded_rows(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:64x48@100 pad=40");
    fshm_v4l2_cam *c = start_cam("/dev/video0", YUYV, 64, 48, 0, 4);
    fshm_v4l2_format f;
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.native_bytesperline, 128 + 40);
    assert_int_equal(f.bytesperline, 128 + 40);   /* zero-copy views keep the driver's rows */
    assert_int_equal(f.frame_bytes, 64 * 48 * 2);
    uint8_t dst[64 * 48 * 2];
    fshm_v4l2_buf info;
    expect_error(fshm_v4l2_read_into(c, SEC, dst, sizeof dst - 1, &info), -EINVAL, "frames are");
    for (int i = 0; i < 3; i++) {
        memset(dst, 0xEE, sizeof dst);
        assert_int_equal(fshm_v4l2_read_into(c, 2 * SEC, dst, sizeof dst, &info), 0);
        assert_ptr_equal(info.data, dst);
        assert_int_equal(info.bytesused, sizeof dst);
        check_pattern(dst, 128, 48, 128, info.sequence);   /* packed: no 0xEE padding */
    }
    assert_int_equal(fshm_v4l2_held(c), 0);
    /* zero-copy view of the same device: padded rows, the pad bytes are the driver's */
    fshm_v4l2_buf b;
    assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &b), 0);
    assert_int_equal(b.bytesperline, 168);
    check_pattern(b.data, 128, 48, 168, b.sequence);
    assert_int_equal(((const uint8_t *)b.data)[128], 0xEE);
    fshm_v4l2_requeue(c, b.index);
    fshm_v4l2_close(c);
}

static void test_capture_into_stream(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:64x48@100 pad=8");
    fshm_v4l2_cam *c = start_cam("/dev/video0", YUYV, 64, 48, 0, 4);
    fshm_writer *w = tu_writer("v4l2-capture", 4, 64 * 48 * 2);
    fshm_reader *r = tu_reader("v4l2-capture");
    for (int i = 0; i < 5; i++) {
        uint64_t seq = 99;
        fshm_v4l2_buf info;
        assert_int_equal(fshm_v4l2_capture(c, w, 2 * SEC, NULL, &seq, &info), 0);
        assert_int_equal(seq, (uint64_t)i);
        fshm_frame f;
        assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
        assert_int_equal(f.seq, seq);
        assert_int_equal(f.timestamp_ns, info.timestamp_ns);   /* driver capture time */
        assert_int_equal(f.nbytes, 64 * 48 * 2);
        assert_int_equal(f.tensor.ndims, 3);
        assert_int_equal(f.tensor.dims[0], 48);
        assert_int_equal(f.tensor.dims[1], 64);
        assert_int_equal(f.tensor.dims[2], 2);
        check_pattern(f.data, 128, 48, 128, info.sequence);
    }
    /* A stream whose slots are too small: the frame is dropped, the buffer requeued. */
    fshm_writer *small = tu_writer("v4l2-small", 2, 1024);
    expect_error(fshm_v4l2_capture(c, small, 2 * SEC, NULL, NULL, NULL), FSHM_E_NOPOOL, NULL);
    assert_int_equal(fshm_v4l2_held(c), 0);
    fake_v4l2_stats st;
    fake_v4l2_get_stats("/dev/video0", &st);
    assert_int_equal(st.queued, 4);   /* every buffer back with the driver, whatever it filled since */
    fshm_writer_close(small, 1);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
    fshm_v4l2_close(c);
}

static void test_wait_leaves_the_frame_for_the_next_delivery(void **state)
{
    (void)state;
    /* 5 fps and a software limit of 4 fps: a second wait for a frame would take 200+ ms. */
    configure("path=/dev/video0 formats=GREY:32x16@5 timeperframe=0");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 4, 4);
    uint8_t dst[32 * 16];
    for (int i = 0; i < 3; i++) {
        assert_int_equal(fshm_v4l2_wait(c, 2 * SEC), 32 * 16);
        uint64_t t0 = tu_now_ns();
        fshm_v4l2_buf info;
        assert_int_equal(fshm_v4l2_read_into(c, 0, dst, sizeof dst, &info), 0);   /* no waiting */
        assert_true(tu_now_ns() - t0 < 50 * MS);
        check_pattern(dst, 32, 16, 32, info.sequence);
    }
    expect_error(fshm_v4l2_read_into(c, 0, dst, sizeof dst, NULL), -ETIMEDOUT, "no frame");
    fshm_v4l2_close(c);
}

/* ---- device behaviour ---- */

static void test_fewer_buffers_than_asked(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:32x16@100 max_buffers=3");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 0, 8);
    fshm_v4l2_format f;
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.nbuffers, 3);
    fake_v4l2_stats st;
    fake_v4l2_get_stats("/dev/video0", &st);
    assert_int_equal(st.requested, 8);
    assert_int_equal(st.nbuffers, 3);
    assert_int_equal(st.mapped, 3);
    fshm_v4l2_buf b[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &b[i]), 0);
    expect_error(fshm_v4l2_dequeue(c, 10 * MS, &b[0]), FSHM_E_V4L2_NOBUFS, "all 3 buffers");
    for (int i = 0; i < 3; i++)
        fshm_v4l2_requeue(c, b[i].index);
    fshm_v4l2_close(c);
    /* And more than asked (drivers with a minimum). */
    configure("path=/dev/video0 formats=GREY:32x16@100 min_buffers=3");
    c = start_cam("/dev/video0", GREY, 32, 16, 0, 1);
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.nbuffers, 3);
    fshm_v4l2_close(c);
    assert_int_equal(fake_v4l2_live_mappings(), 0);
}

static void test_busy_device(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:32x16@100");
    fshm_v4l2_cam *a = start_cam("/dev/video0", GREY, 32, 16, 0, 2);
    fshm_v4l2_cam *b = open_cam("/dev/video0");   /* opening is allowed, streaming is not */
    fshm_v4l2_request rq = {GREY, 32, 16, 0, 0, 2};
    expect_error(fshm_v4l2_start(b, &rq), -EBUSY, "another process is capturing");
    fshm_v4l2_close(b);
    fshm_v4l2_buf f;
    assert_int_equal(fshm_v4l2_dequeue(a, 2 * SEC, &f), 0);   /* the owner is unaffected */
    fshm_v4l2_requeue(a, f.index);
    fshm_v4l2_close(a);
    b = start_cam("/dev/video0", GREY, 32, 16, 0, 2);          /* free again */
    fshm_v4l2_close(b);
}

static void test_device_gone_midstream_and_back(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:64x48@100 gone_after=5 gone_ms=150");
    fshm_v4l2_cam *c = start_cam("/dev/video0", YUYV, 64, 48, 0, 4);
    fshm_v4l2_buf kept;
    assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &kept), 0);   /* a zero-copy view stays alive */
    uint8_t dst[64 * 48 * 2];
    for (int i = 0; i < 4; i++)
        assert_int_equal(fshm_v4l2_read_into(c, 2 * SEC, dst, sizeof dst, NULL), 0);
    uint64_t t_gone = tu_now_ns();
    expect_error(fshm_v4l2_read_into(c, 2 * SEC, dst, sizeof dst, NULL), -ENODEV, "disappeared");
    assert_true(fshm_v4l2_gone(c));
    expect_error(fshm_v4l2_dequeue(c, 2 * SEC, &kept), -ENODEV, "gone");
    /* The held buffer's memory is still mapped and holds its frame. */
    check_pattern(kept.data, 128, 48, 128, kept.sequence);
    assert_int_equal(fshm_v4l2_requeue(c, kept.index), 0);   /* no-op on a gone device */
    fshm_v4l2_close(c);
    assert_int_equal(fake_v4l2_live_mappings(), 0);

    /* Reconnect: the node is absent for 150 ms, then streams again. */
    fshm_v4l2_cam *again = NULL;
    expect_error(fshm_v4l2_open("/dev/video0", fake(), &again), -ENOENT, "no camera");
    int tries = 0;
    while (fshm_v4l2_open("/dev/video0", fake(), &again) == -ENOENT) {
        assert_true(tu_now_ns() - t_gone < 5 * SEC);
        tu_sleep_ms(10);
        tries++;
    }
    assert_true(tu_now_ns() - t_gone >= 150 * MS);
    assert_true(tries > 0);
    fshm_v4l2_request rq = {YUYV, 64, 48, 0, 0, 4};
    assert_int_equal(fshm_v4l2_start(again, &rq), 0);
    for (int i = 0; i < 10; i++) {   /* one outage only: this stream keeps going */
        fshm_v4l2_buf info;
        assert_int_equal(fshm_v4l2_read_into(again, 2 * SEC, dst, sizeof dst, &info), 0);
        check_pattern(dst, 128, 48, 128, info.sequence);
    }
    fshm_v4l2_close(again);
}

static void test_unplug_while_waiting(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:32x16@10");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 0, 2);
    fshm_v4l2_buf b;
    assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &b), 0);
    fshm_v4l2_requeue(c, b.index);
    struct waiter w = {c, 0, {0}, {0}};
    pthread_t t;
    pthread_create(&t, NULL, wait_thread, &w);
    tu_sleep_ms(20);   /* the thread sleeps in poll: the next frame is 100 ms away */
    fake_v4l2_unplug("/dev/video0");
    pthread_join(t, NULL);
    assert_int_equal(w.rc, -ENODEV);
    if (!strstr(w.msg, "disappeared"))
        fail_msg("message: %s", w.msg);
    fshm_v4l2_close(c);
}

static void check_intervals(fshm_v4l2_cam *c, int n, uint64_t want_ns, int *exact_out)
{
    uint64_t prev = 0;
    int exact = 0;
    for (int i = 0; i < n; i++) {
        fshm_v4l2_buf b;
        assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &b), 0);
        if (i) {
            uint64_t d = b.timestamp_ns - prev;
            if (d + want_ns / 4 < want_ns)
                fail_msg("frames %llu ns apart, rate limit %llu ns", (unsigned long long)d, (unsigned long long)want_ns);
            exact += d == want_ns;
        }
        prev = b.timestamp_ns;
        fshm_v4l2_requeue(c, b.index);
    }
    *exact_out = exact;
}

static void test_rate_control_by_the_device(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:32x16@100 sparm_busy=1");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 25, 8);
    fshm_v4l2_format f;
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.device_fps_num, 25);
    assert_int_equal(f.device_fps_den, 1);
    assert_int_equal(f.rate_limit_num, 0);   /* the device paces itself */
    int exact;
    check_intervals(c, 6, 40 * MS, &exact);
    assert_true(exact >= 4);   /* device timestamps: exactly 40 ms apart (unless the test stalled) */
    fshm_v4l2_stats st;
    fshm_v4l2_get_stats(c, &st);
    assert_int_equal(st.rate_dropped, 0);

    /* While streaming this driver refuses S_PARM (EBUSY): restart around it. */
    assert_int_equal(fshm_v4l2_set_rate(c, 50, 1), 1);
    fake_v4l2_stats fs;
    fake_v4l2_get_stats("/dev/video0", &fs);
    assert_int_equal(fs.streamons, 2);
    assert_int_equal(fs.fps_num, 50);
    check_intervals(c, 6, 20 * MS, &exact);
    assert_true(exact >= 4);
    /* Faster than the device can: the device's best, paced by the device. */
    assert_int_equal(fshm_v4l2_set_rate(c, 200, 1), 1);
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.device_fps_num, 100);
    /* Back to the rate asked at start. */
    assert_int_equal(fshm_v4l2_set_rate(c, 0, 0), 1);
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.device_fps_num, 25);
    fshm_v4l2_close(c);
}

static void test_rate_control_in_software(void **state)
{
    (void)state;
    /* No S_PARM (like PipeWire's emulation, which ignores it): frameshm drops frames by
     * driver timestamp so that no two delivered frames are closer than the interval. */
    configure("path=/dev/video0 formats=GREY:32x16@100 timeperframe=0");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 25, 8);
    fshm_v4l2_format f;
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.device_fps_num, 100);   /* G_PARM reports the rate it cannot change */
    assert_int_equal(f.rate_limit_num, 25);
    int exact;
    check_intervals(c, 8, 40 * MS, &exact);
    assert_true(exact >= 4);   /* 100 fps decimated by 4; a late consumer may lose one */
    fshm_v4l2_stats st;
    fshm_v4l2_get_stats(c, &st);
    assert_true(st.rate_dropped >= 3 * 7 - 3);
    /* 12.5 fps (80 ms) and back to unlimited. */
    assert_int_equal(fshm_v4l2_set_rate(c, 25, 2), 0);
    check_intervals(c, 4, 80 * MS, &exact);
    assert_int_equal(fshm_v4l2_set_rate(c, 0, 0), 0);   /* back to 25 fps: still software */
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.rate_limit_num, 25);
    assert_int_equal(f.rate_limit_den, 1);
    fshm_v4l2_close(c);
}

/* A late frame (the camera lost the ones before it: nobody queued a buffer for 55 ms)
 * restarts the software rate's phase, so the frames after it keep the spacing too. Kept
 * in phase, the frame 10 ms after it went through (loaded CI, a starved consumer). */
static void test_rate_control_after_lost_frames(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:32x16@100 timeperframe=0");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 25, 2);
    fshm_v4l2_buf prev, b;
    assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &prev), 0);
    tu_sleep_ms(55);   /* holding it: the other buffer fills, then frames are lost */
    fshm_v4l2_requeue(c, prev.index);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &b), 0);
        uint64_t d = b.timestamp_ns - prev.timestamp_ns;
        if (d + 10 * MS < 40 * MS)
            fail_msg("frame %d: %llu ns after the one before, rate limit 40 ms", i, (unsigned long long)d);
        fshm_v4l2_requeue(c, b.index);
        prev = b;
    }
    fshm_v4l2_close(c);
}

static void test_flush_discards_old_frames(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:32x16@100");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 0, 4);
    tu_sleep_ms(120);   /* the 4 buffers fill with frames 0..3 (10..40 ms), later ones drop */
    assert_int_equal(fshm_v4l2_flush(c, 5 * SEC), 0);   /* nothing that old: all kept */
    fshm_v4l2_buf b;
    assert_int_equal(fshm_v4l2_dequeue(c, SEC, &b), 0);
    assert_int_equal(b.sequence, 0);   /* kept frames come first, in order */
    fshm_v4l2_requeue(c, b.index);
    int n = fshm_v4l2_flush(c, 30 * MS);
    assert_true(n >= 3);   /* frames 1..3 are >= 80 ms old */
    assert_int_equal(fshm_v4l2_dequeue(c, SEC, &b), 0);
    assert_true(b.sequence > 3);   /* a frame captured after the flushed ones */
    fshm_v4l2_requeue(c, b.index);
    fshm_v4l2_stats st;
    fshm_v4l2_get_stats(c, &st);
    assert_int_equal(st.flushed, (uint64_t)n);
    assert_true(st.driver_gaps > 0);   /* frames the full queue made the driver drop */
    fshm_v4l2_close(c);
}

static void test_errored_buffers_are_skipped(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=GREY:32x16@200 error_every=3");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 32, 16, 0, 4);
    uint8_t dst[32 * 16];
    for (int i = 0; i < 10; i++) {
        fshm_v4l2_buf info;
        assert_int_equal(fshm_v4l2_read_into(c, 2 * SEC, dst, sizeof dst, &info), 0);
        assert_int_not_equal((info.sequence + 1) % 3, 0);
        assert_int_equal(info.flags & V4L2_BUF_FLAG_ERROR, 0);
        check_pattern(dst, 32, 16, 32, info.sequence);
    }
    fshm_v4l2_stats st;
    fshm_v4l2_get_stats(c, &st);
    assert_true(st.errors >= 4);
    fshm_v4l2_close(c);
}

/* ---- conversions ---- */

static void test_gray8_from_yuyv(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:64x48@100 pad=6");
    fshm_v4l2_cam *c = start_cam("/dev/video0", GREY, 64, 48, 0, 4);
    fshm_v4l2_format f;
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.fourcc, GREY);
    assert_int_equal(f.native_fourcc, YUYV);
    assert_true(f.converted);
    assert_int_equal(f.tensor.ndims, 2);
    assert_int_equal(f.frame_bytes, 64 * 48);
    uint8_t dst[64 * 48];
    for (int k = 0; k < 2; k++) {
        fshm_v4l2_buf b;
        const uint8_t *p;
        if (k == 0) {
            assert_int_equal(fshm_v4l2_read_into(c, 2 * SEC, dst, sizeof dst, &b), 0);
            p = dst;
        } else {
            assert_int_equal(fshm_v4l2_dequeue(c, 2 * SEC, &b), 0);   /* converted once, zero-copy after */
            assert_int_equal(b.bytesperline, 64);
            p = b.data;
        }
        uint32_t n = b.sequence;
        assert_int_equal(p[0], n & 0xff);          /* Y0 = counter byte 0 */
        assert_int_equal(p[1], (n >> 16) & 0xff);  /* Y1 = counter byte 2 */
        for (uint32_t y = 0; y < 48; y++)
            for (uint32_t x = (y ? 0 : 2); x < 64; x++)
                if (p[y * 64 + x] != (uint8_t)(2 * x + y + 4 * n))
                    fail_msg("grey (%u,%u) of frame %u", x, y, n);
        if (k)
            fshm_v4l2_requeue(c, b.index);
    }
    fshm_v4l2_close(c);
}

static uint8_t clip(int v) { return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v; }

/* libv4lconvert's YUYV -> RGB24 (v4lconvert_yuyv_to_rgb24), for checking its output. */
static void ref_yuyv_to_rgb(const uint8_t *s, uint8_t *d, uint32_t w, uint32_t h, uint32_t bpl)
{
    for (uint32_t y = 0; y < h; y++) {
        const uint8_t *src = s + (size_t)y * bpl;
        for (uint32_t x = 0; x + 1 < w; x += 2, src += 4) {
            int u = src[1] - 128, v = src[3] - 128;
            int u1 = ((u << 7) + u) >> 6, rg = ((u << 1) + u + (v << 2) + (v << 1)) >> 3, v1 = ((v << 1) + v) >> 1;
            for (int k = 0; k < 2; k++) {
                int yy = src[2 * k];
                *d++ = clip(yy + v1);
                *d++ = clip(yy - rg);
                *d++ = clip(yy + u1);
            }
        }
    }
}

static void test_rgb24_through_libv4lconvert(void **state)
{
    (void)state;
    configure("path=/dev/video0 formats=YUYV:64x48@100 pad=16");
    fshm_v4l2_cam *c = open_cam("/dev/video0");
    fshm_v4l2_request rq = {RGB3, 64, 48, 0, 0, 4};
    int rc = fshm_v4l2_start(c, &rq);
    if (!fshm_v4l2_have_libv4l2()) {
        expect_error(rc, FSHM_E_V4L2_UNSUPPORTED, "needs libv4l2");
        expect_error(rc, FSHM_E_V4L2_UNSUPPORTED, "apt-get install libv4l-dev");
        fshm_v4l2_close(c);
        return;
    }
    assert_int_equal(rc, 0);
    fshm_v4l2_format f;
    fshm_v4l2_get_format(c, &f);
    assert_int_equal(f.native_fourcc, YUYV);
    assert_int_equal(f.frame_bytes, 64 * 48 * 3);
    static uint8_t dst[64 * 48 * 3], raw[(128 + 16) * 48], want[64 * 48 * 3];
    fshm_v4l2_buf b;
    assert_int_equal(fshm_v4l2_read_into(c, 2 * SEC, dst, sizeof dst, &b), 0);
    /* The raw frame this must have come from (the fake's pattern for its counter). */
    for (uint32_t y = 0; y < 48; y++)
        for (uint32_t x = 0; x < 128; x++)
            raw[y * 144 + x] = (uint8_t)(x + y + 4 * b.sequence);
    memcpy(raw, &b.sequence, 4);
    ref_yuyv_to_rgb(raw, want, 64, 48, 144);
    for (size_t i = 0; i < sizeof dst; i++) {
        int d = (int)dst[i] - (int)want[i];
        if (d < -1 || d > 1)
            fail_msg("RGB byte %zu = %u, want %u (frame %u)", i, dst[i], want[i], b.sequence);
    }
    fshm_v4l2_close(c);
}

/* ---- the test-backend hook and the libv4l2-less build ---- */

static void test_backend_hook_env(void **state)
{
    (void)state;
#ifdef FSHM_FAKE_SO
    setenv("FSHM_FAKE_V4L2", "path=/dev/video7 formats=GREY:16x8@100", 1);
    setenv("FRAMESHM_V4L2_BACKEND", FSHM_FAKE_SO, 1);
    fshm_v4l2_cam *c = NULL;
    assert_int_equal(fshm_v4l2_open("/dev/video7", NULL, &c), 0);
    fshm_v4l2_info info;
    fshm_v4l2_get_info(c, &info);
    assert_string_equal(info.backend, "fake");
    fshm_v4l2_request rq = {GREY, 16, 8, 0, 0, 2};
    assert_int_equal(fshm_v4l2_start(c, &rq), 0);
    uint8_t dst[16 * 8];
    fshm_v4l2_buf b;
    assert_int_equal(fshm_v4l2_read_into(c, 2 * SEC, dst, sizeof dst, &b), 0);
    check_pattern(dst, 16, 8, 16, b.sequence);
    fshm_v4l2_close(c);
    /* This process's statically linked fake knows nothing of /dev/video7. */
    fake_v4l2_stats st;
    fake_v4l2_get_stats("/dev/video7", &st);
    assert_int_equal(st.exists, 0);
    setenv("FRAMESHM_V4L2_BACKEND", "/nonexistent/libnothing.so", 1);
    expect_error(fshm_v4l2_open("/dev/video7", NULL, &c), -ENOENT, "FRAMESHM_V4L2_BACKEND");
    unsetenv("FRAMESHM_V4L2_BACKEND");
    unsetenv("FSHM_FAKE_V4L2");
#else
    skip();
#endif
}

static void test_build_flavour(void **state)
{
    (void)state;
#ifdef FSHM_V4L2_TEST_NOLIB
    assert_int_equal(fshm_v4l2_have_libv4l2(), 0);
    assert_null(fshm_v4l2_libv4l2_backend());
    fshm_v4l2_cam *c = NULL;
    expect_error(fshm_v4l2_open("/dev/video0", NULL, &c), FSHM_E_V4L2_NOLIB,
                 "frameshm was built without libv4l2: apt-get install libv4l-dev and reinstall");
#else
    assert_int_equal(fshm_v4l2_have_libv4l2(), FSHM_EXPECT_LIBV4L2);
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_build_flavour),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_info_and_enumeration),
        cmocka_unit_test(test_unsupported_format_and_size),
        cmocka_unit_test(test_zero_copy_frames_and_timestamps),
        cmocka_unit_test(test_held_buffers_are_never_requeued),
        cmocka_unit_test(test_requeue_while_another_thread_waits),
        cmocka_unit_test(test_read_into_compacts_padded_rows),
        cmocka_unit_test(test_capture_into_stream),
        cmocka_unit_test(test_wait_leaves_the_frame_for_the_next_delivery),
        cmocka_unit_test(test_fewer_buffers_than_asked),
        cmocka_unit_test(test_busy_device),
        cmocka_unit_test(test_device_gone_midstream_and_back),
        cmocka_unit_test(test_unplug_while_waiting),
        cmocka_unit_test(test_rate_control_by_the_device),
        cmocka_unit_test(test_rate_control_in_software),
        cmocka_unit_test(test_rate_control_after_lost_frames),
        cmocka_unit_test(test_flush_discards_old_frames),
        cmocka_unit_test(test_errored_buffers_are_skipped),
        cmocka_unit_test(test_gray8_from_yuyv),
        cmocka_unit_test(test_rgb24_through_libv4lconvert),
        cmocka_unit_test(test_backend_hook_env),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
