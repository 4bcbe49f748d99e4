/* The virtual camera's pure parts: which video layout a stream's tensor is served as
 * (fshm_pwcam_layout_for), and - as this Makefile builds the core without PipeWire - that
 * every entry point then says how to get it. The PipeWire side itself is exercised by
 * tests/python/test_virtualcam.py against a real PipeWire with third-party clients. */
#include "fshm_test_util.h"

#include <errno.h>
#include <string.h>

#include "fshm_pwcam.h"

static fshm_tensor tensor(int dtype, int ndims, int d0, int d1, int d2)
{
    fshm_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = (int16_t)dtype;
    t.major_order = FSHM_ORDER_ROW;
    t.ndims = (uint8_t)ndims;
    t.dims[0] = d0, t.dims[1] = d1, t.dims[2] = d2;
    return t;
}

static void expect_layout(const fshm_tensor *t, const char *want_fmt, const char *fmt, uint32_t w,
                          uint32_t h, uint32_t stride, uint32_t bytes)
{
    fshm_pwcam_layout l;
    int rc = fshm_pwcam_layout_for(t, want_fmt, 0, 0, &l);
    if (rc)
        fail_msg("layout: %d %s", rc, fshm_last_error());
    assert_string_equal(l.format, fmt);
    assert_int_equal(l.width, w);
    assert_int_equal(l.height, h);
    assert_int_equal(l.stride, stride);
    assert_int_equal(l.frame_bytes, bytes);
}

static void test_layout_from_tensor(void **state)
{
    (void)state;
    fshm_tensor t = tensor(FSHM_DTYPE_UINT8, 2, 480, 640, 0);
    expect_layout(&t, NULL, "GRAY8", 640, 480, 640, 640 * 480);
    t = tensor(FSHM_DTYPE_UINT8, 3, 480, 640, 1);
    expect_layout(&t, NULL, "GRAY8", 640, 480, 640, 640 * 480);
    t = tensor(FSHM_DTYPE_UINT8, 3, 480, 640, 2);
    expect_layout(&t, NULL, "YUYV", 640, 480, 1280, 1280 * 480);
    expect_layout(&t, "uyvy", "UYVY", 640, 480, 1280, 1280 * 480);
    t = tensor(FSHM_DTYPE_UINT8, 3, 480, 640, 3);
    expect_layout(&t, NULL, "RGB", 640, 480, 1920, 1920 * 480);
    expect_layout(&t, "BGR", "BGR", 640, 480, 1920, 1920 * 480);
    t = tensor(FSHM_DTYPE_UINT8, 3, 240, 320, 4);
    expect_layout(&t, NULL, "RGBA", 320, 240, 1280, 1280 * 240);
    expect_layout(&t, "bgrx", "BGRX", 320, 240, 1280, 1280 * 240);
    t = tensor(FSHM_DTYPE_UINT16, 2, 240, 320, 0);
    expect_layout(&t, NULL, "GRAY16", 320, 240, 640, 640 * 240);
    t = tensor(FSHM_DTYPE_UINT8, 2, 360, 320, 0);   /* 4:2:0 only when asked for */
    expect_layout(&t, NULL, "GRAY8", 320, 360, 320, 320 * 360);
    expect_layout(&t, "NV12", "NV12", 320, 240, 320, 320 * 240 * 3 / 2);
    expect_layout(&t, "i420", "I420", 320, 240, 320, 320 * 240 * 3 / 2);
}

static void expect_refused(const fshm_tensor *t, const char *fmt, uint32_t w, uint32_t h, int code,
                           const char *needle)
{
    fshm_pwcam_layout l;
    assert_int_equal(fshm_pwcam_layout_for(t, fmt, w, h, &l), code);
    if (!strstr(fshm_last_error(), needle))
        fail_msg("message '%s' lacks '%s'", fshm_last_error(), needle);
}

static void test_layout_refusals(void **state)
{
    (void)state;
    fshm_tensor t = tensor(FSHM_DTYPE_FLOAT32, 2, 480, 640, 0);
    expect_refused(&t, NULL, 0, 0, FSHM_E_PW_UNSUPPORTED, "float32 (480, 640)");
    t = tensor(FSHM_DTYPE_UINT8, 3, 480, 640, 5);
    expect_refused(&t, NULL, 0, 0, FSHM_E_PW_UNSUPPORTED, "uint8 (480, 640, 5)");
    t = tensor(FSHM_DTYPE_UINT8, 1, 4096, 0, 0);
    expect_refused(&t, NULL, 0, 0, FSHM_E_PW_UNSUPPORTED, "need 2 or 3 dimensions");
    t = tensor(FSHM_DTYPE_UINT8, 2, 480, 640, 0);
    t.strides[0] = 1024;   /* padded rows */
    expect_refused(&t, NULL, 0, 0, FSHM_E_PW_UNSUPPORTED, "not packed row-major");
    t = tensor(FSHM_DTYPE_UINT8, 3, 480, 640, 3);
    expect_refused(&t, "GRAY8", 0, 0, FSHM_E_PW_UNSUPPORTED, "format GRAY8 does not fit");
    expect_refused(&t, "MJPG", 0, 0, -EINVAL, "unknown virtual-camera format 'MJPG'");
    expect_refused(&t, NULL, 320, 240, -EINVAL, "not the 320x240 asked for");
    t = tensor(FSHM_DTYPE_UINT8, 2, 361, 320, 0);
    expect_refused(&t, "NV12", 0, 0, FSHM_E_PW_UNSUPPORTED, "(H*3/2, W)");
    expect_refused(NULL, NULL, 640, 480, -EINVAL, "needs format, width and height");
    fshm_pwcam_layout l;
    assert_int_equal(fshm_pwcam_layout_for(NULL, "YUY2", 640, 480, &l), 0);   /* GStreamer's name */
    assert_string_equal(l.format, "YUYV");
    assert_int_equal(l.frame_bytes, 640 * 480 * 2);
}

#ifndef FSHM_HAVE_PIPEWIRE
static void test_nolib_says_how_to_get_pipewire(void **state)
{
    (void)state;
    const char *msg = "frameshm was built without PipeWire (libpipewire-0.3 not found at build time): "
                      "install libpipewire-0.3-dev and reinstall";
    assert_int_equal(fshm_pwcam_have_pipewire(), 0);
    fshm_pwcam_config cfg = {0};
    cfg.addr.name = "cam0";
    fshm_pwcam *c = (fshm_pwcam *)1;
    assert_int_equal(fshm_pwcam_open(&cfg, &c), FSHM_E_PW_NOLIB);
    assert_null(c);
    assert_string_equal(fshm_last_error(), msg);
    fshm_pwcam_event ev;
    assert_int_equal(fshm_pwcam_next_event(NULL, 0, &ev), FSHM_E_PW_NOLIB);
    assert_string_equal(fshm_last_error(), msg);
    fshm_pwcam_close(NULL);
}
#endif

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_from_tensor),
        cmocka_unit_test(test_layout_refusals),
#ifndef FSHM_HAVE_PIPEWIRE
        cmocka_unit_test(test_nolib_says_how_to_get_pipewire),
#endif
    };
    return cmocka_run_group_tests_name("pwcam", tests, NULL, NULL);
}
