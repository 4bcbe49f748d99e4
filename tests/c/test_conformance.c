/* Conformance with the SHM Tensor Pool Wire Spec v1.2 as other implementations write it.
 *
 * Every byte vector here is built field by field from the spec's text (§7.1 superblock,
 * §8.2 slot header, §10.2.1 descriptor; SBE packs fields back to back, little-endian),
 * never with the library's own encoders, and then checked both ways: the library reads
 * what another implementation writes, and writes exactly those bytes itself. The
 * readings frameshm chooses where the spec is silent are in docs/wire-format.md. */
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fshm_test_util.h"

/* ---- a tiny little-endian builder, independent of the library's st16/st32/st64 ---- */

static void put(uint8_t *p, size_t off, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[off + (size_t)i] = (uint8_t)(v >> (8 * i));
}

/* ShmRegionSuperblock, 64 bytes: magic u64, layoutVersion u32, epoch u64, streamId u32,
 * regionType i16, poolId u16, nslots u32, slotBytes u32, strideBytes u32, pid u64,
 * startTimestampNs u64, activityTimestampNs u64. */
static void superblock(uint8_t *b, uint64_t epoch, uint32_t stream, int16_t type, uint16_t pool,
                       uint32_t nslots, uint32_t slot_bytes, uint32_t stride_bytes)
{
    memset(b, 0, 64);
    size_t o = 0;
    put(b, o, 0x544F504C53484D31ull, 8), o += 8;
    put(b, o, 1, 4), o += 4;
    put(b, o, epoch, 8), o += 8;
    put(b, o, stream, 4), o += 4;
    put(b, o, (uint16_t)type, 2), o += 2;
    put(b, o, pool, 2), o += 2;
    put(b, o, nslots, 4), o += 4;
    put(b, o, slot_bytes, 4), o += 4;
    put(b, o, stride_bytes, 4), o += 4;
    put(b, o, 31337, 8), o += 8;
    put(b, o, 1000, 8), o += 8;
    put(b, o, 2000, 8), o += 8;
    assert_int_equal(o, 64);
}

static void test_superblock_readings(void **state)
{
    (void)state;
    enum { N = 4 };
    static uint8_t ring[64 + N * 256], pool[64 + N * 1024];
    /* Header ring as both references write it: slot_bytes 256, stride_bytes 0. */
    superblock(ring, 3, 1001, 1, 0, N, 256, 0);
    assert_int_equal(fshm_superblock_check(ring, sizeof ring, 3, 1001, 1, 0, N, 256, 256), 0);
    /* ... and as frameshm writes it (stride_bytes 256). */
    superblock(ring, 3, 1001, 1, 0, N, 256, 256);
    assert_int_equal(fshm_superblock_check(ring, sizeof ring, 3, 1001, 1, 0, N, 256, 256), 0);
    /* Anything else is refused, naming the field. */
    superblock(ring, 3, 1001, 1, 0, N, 256, 64);
    assert_int_equal(fshm_superblock_check(ring, sizeof ring, 3, 1001, 1, 0, N, 256, 256),
                     FSHM_E_CORRUPT);
    assert_non_null(strstr(fshm_last_error(), "stride_bytes"));
    superblock(ring, 3, 1001, 1, 0, N, 0, 0);
    assert_int_equal(fshm_superblock_check(ring, sizeof ring, 3, 1001, 1, 0, N, 256, 256),
                     FSHM_E_CORRUPT);
    assert_non_null(strstr(fshm_last_error(), "slot_bytes"));

    /* Payload pool: slot_bytes is the stride (Julia reference, frameshm) or the SBE null
     * value (C reference). */
    superblock(pool, 3, 1001, 2, 1, N, 1024, 1024);
    assert_int_equal(fshm_superblock_check(pool, sizeof pool, 3, 1001, 2, 1, N, 1024, 1024), 0);
    superblock(pool, 3, 1001, 2, 1, N, 0xFFFFFFFFu, 1024);
    assert_int_equal(fshm_superblock_check(pool, sizeof pool, 3, 1001, 2, 1, N, 1024, 1024), 0);
    static const uint32_t bad_slot[] = {0, 256, 512, 2048, 0xFFFFFFFEu};
    for (size_t i = 0; i < sizeof bad_slot / sizeof bad_slot[0]; i++) {
        superblock(pool, 3, 1001, 2, 1, N, bad_slot[i], 1024);
        if (fshm_superblock_check(pool, sizeof pool, 3, 1001, 2, 1, N, 1024, 1024) != FSHM_E_CORRUPT)
            fail_msg("pool slot_bytes %u accepted", bad_slot[i]);
    }
    /* Strides: 64 * 2^k only (§15.22); a multiple of 64 that is no power of two is not. */
    superblock(pool, 3, 1001, 2, 1, N, 0xFFFFFFFFu, 64);
    assert_int_equal(fshm_superblock_check(pool, sizeof pool, 3, 1001, 2, 1, N, 64, 64), 0);
    static const uint32_t bad_stride[] = {0, 32, 96, 192, 1000};
    for (size_t i = 0; i < sizeof bad_stride / sizeof bad_stride[0]; i++) {
        uint32_t s = bad_stride[i];
        superblock(pool, 3, 1001, 2, 1, N, 0xFFFFFFFFu, s);
        if (fshm_superblock_check(pool, sizeof pool, 3, 1001, 2, 1, N, s, s) != FSHM_E_CORRUPT)
            fail_msg("pool stride %u accepted", s);
    }
    /* A stride other than announced, and a file too short for nslots * stride. */
    superblock(pool, 3, 1001, 2, 1, N, 1024, 1024);
    assert_int_equal(fshm_superblock_check(pool, sizeof pool, 3, 1001, 2, 1, N, 512, 512),
                     FSHM_E_CORRUPT);
    assert_int_equal(fshm_superblock_check(pool, sizeof pool - 1, 3, 1001, 2, 1, N, 1024, 1024),
                     FSHM_E_CORRUPT);

    /* The other direction: frameshm writes the same bytes for the fields it shares with
     * the spec's vector (it keeps stride_bytes 256 in a ring, see the wire doc). */
    uint8_t mine[64];
    fshm_superblock_write(mine, 3, 1001, 2, 1, N, 1024, 1024, 31337, 1000);
    superblock(pool, 3, 1001, 2, 1, N, 1024, 1024);
    put(pool, 56, 1000, 8);   /* a fresh superblock's activity is its start */
    assert_memory_equal(mine, pool, 64);
}

/* SlotHeader (60-byte block + u32 length + 192-byte TensorHeader message). */
static void slot(uint8_t *s, uint64_t seq, uint32_t values_len, uint32_t payload_slot,
                 uint16_t pool, uint64_t ts, int16_t dtype, int16_t order, uint8_t ndims,
                 uint8_t unit, uint32_t pstride, const int32_t *dims, const int32_t *strides)
{
    memset(s, 0, 256);
    put(s, 0, (seq << 1) | 1, 8);
    put(s, 8, values_len, 4);
    put(s, 12, payload_slot, 4);
    put(s, 16, pool, 2);
    put(s, 18, 0, 4);        /* payload_offset */
    put(s, 22, ts, 8);
    put(s, 30, 0, 4);        /* meta_version */
    /* 34..59: pad[26] */
    put(s, 60, 192, 4);      /* headerBytes length */
    put(s, 64, 184, 2);      /* blockLength */
    put(s, 66, 52, 2);       /* templateId TensorHeader */
    put(s, 68, 900, 2);      /* schemaId */
    put(s, 70, 1, 2);        /* version */
    size_t b = 72;
    put(s, b + 0, (uint16_t)dtype, 2);
    put(s, b + 2, (uint16_t)order, 2);
    s[b + 4] = ndims;
    s[b + 5] = 0;            /* pad_align */
    s[b + 6] = unit;
    put(s, b + 7, pstride, 4);
    for (int i = 0; i < ndims; i++) {
        put(s, b + 11 + 4 * (size_t)i, (uint32_t)dims[i], 4);
        put(s, b + 43 + 4 * (size_t)i, (uint32_t)strides[i], 4);
    }
}

static void test_slot_header_readings(void **state)
{
    (void)state;
    uint8_t s[256];
    fshm_slot_view v;
    /* An image, rows x columns x channels, uint8, explicit strides. */
    const int32_t dims[3] = {48, 64, 3}, strides[3] = {192, 3, 1};
    const uint32_t len = 48 * 64 * 3;
    slot(s, 7, len, 3, 1, 555, FSHM_DTYPE_UINT8, FSHM_ORDER_ROW, 3, 0, 0, dims, strides);
    assert_int_equal(fshm_slot_header_decode(s, &v), 0);
    assert_int_equal(v.seq_commit >> 1, 7);
    assert_int_equal(v.values_len, len);
    assert_int_equal(v.tensor.dims[1], 64);
    assert_int_equal(v.tensor.strides[0], 192);

    /* The same frame, written by frameshm: byte for byte the spec's vector. */
    uint8_t mine[256];
    memset(mine, 0xA5, sizeof mine);
    put(mine, 0, (7u << 1) | 1, 8);
    fshm_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = FSHM_DTYPE_UINT8;
    t.major_order = FSHM_ORDER_ROW;
    t.ndims = 3;
    memcpy(t.dims, dims, sizeof dims);
    memcpy(t.strides, strides, sizeof strides);
    fshm_slot_header_write(mine, len, 3, 1, 555, &t);
    assert_memory_equal(mine, s, 256);

    /* Progress units: ROWS steps dimension 0, COLUMNS dimension 1 (what both references
     * check), whatever the rank; the last dimension is the channels here. */
    slot(s, 7, len, 3, 1, 555, FSHM_DTYPE_UINT8, FSHM_ORDER_ROW, 3, 1, 192, dims, strides);
    assert_int_equal(fshm_slot_header_decode(s, &v), 0);
    slot(s, 7, len, 3, 1, 555, FSHM_DTYPE_UINT8, FSHM_ORDER_ROW, 3, 2, 3, dims, strides);
    assert_int_equal(fshm_slot_header_decode(s, &v), 0);
    slot(s, 7, len, 3, 1, 555, FSHM_DTYPE_UINT8, FSHM_ORDER_ROW, 3, 2, 1, dims, strides);
    assert_int_equal(fshm_slot_header_decode(s, &v), FSHM_E_CORRUPT);   /* the channel stride */
    assert_non_null(strstr(fshm_last_error(), "column stride"));
    slot(s, 7, len, 3, 1, 555, FSHM_DTYPE_UINT8, FSHM_ORDER_ROW, 3, 1, 0, dims, strides);
    assert_int_equal(fshm_slot_header_decode(s, &v), FSHM_E_CORRUPT);   /* zero: "MUST be > 0" */
    const int32_t d1[1] = {64}, s1[1] = {1};
    slot(s, 7, 64, 3, 1, 555, FSHM_DTYPE_UINT8, FSHM_ORDER_ROW, 1, 2, 1, d1, s1);
    assert_int_equal(fshm_slot_header_decode(s, &v), FSHM_E_CORRUPT);   /* no dimension 1 */

    /* Strides left 0: contiguous in the major order (§8.2), as other writers may do. */
    const int32_t zero[3] = {0, 0, 0};
    slot(s, 7, len, 3, 1, 555, FSHM_DTYPE_UINT8, FSHM_ORDER_ROW, 3, 2, 3, dims, zero);
    assert_int_equal(fshm_slot_header_decode(s, &v), 0);
    assert_int_equal(v.tensor.strides[0], 192);
    assert_int_equal(v.tensor.strides[1], 3);

    /* dtype BIT (14) is in the registry but the spec gives it no layout: refused with a
     * reason, not as an unknown value. */
    slot(s, 7, 8, 3, 1, 555, 14, FSHM_ORDER_ROW, 1, 0, 0, d1, zero);
    assert_int_equal(fshm_slot_header_decode(s, &v), FSHM_E_CORRUPT);
    assert_non_null(strstr(fshm_last_error(), "BIT"));
    /* Every other §15.8 value is read. */
    static const int16_t codes[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const int32_t dd[1] = {4};
        slot(s, 7, 32, 3, 1, 555, codes[i], FSHM_ORDER_COLUMN, 1, 0, 0, dd, zero);
        if (fshm_slot_header_decode(s, &v) != 0)
            fail_msg("dtype %d refused: %s", codes[i], fshm_last_error());
    }
}

/* FrameDescriptor: message header (40, 4, 900, 1), streamId u32, epoch u64, seq u64,
 * timestampNs u64, metaVersion u32, traceId u64. */
static void test_descriptor_vector(void **state)
{
    (void)state;
    uint8_t m[48];
    put(m, 0, 40, 2);
    put(m, 2, 4, 2);
    put(m, 4, 900, 2);
    put(m, 6, 1, 2);
    put(m, 8, 1001, 4);
    put(m, 12, 9, 8);
    put(m, 20, 123456, 8);
    put(m, 28, 777, 8);
    put(m, 36, 0xFFFFFFFFu, 4);
    put(m, 40, 0, 8);
    uint64_t epoch, seq, pub;
    assert_int_equal(fshm_desc_decode(m, sizeof m, 1001, &epoch, &seq, &pub), 0);
    assert_int_equal(epoch, 9);
    assert_int_equal(seq, 123456);
    assert_int_equal(pub, 777);
    uint8_t mine[48];
    fshm_desc_encode(mine, 1001, 9, 123456, 777);
    assert_memory_equal(mine, m, 48);
    /* The timestamp is optional: the SBE null value reads as "not given". */
    put(m, 28, UINT64_MAX, 8);
    assert_int_equal(fshm_desc_decode(m, sizeof m, 1001, &epoch, &seq, &pub), 0);
    assert_int_equal(pub, 0);
}

/* ---- liveness: an idle producer keeps activity_timestamp_ns fresh (§7.1) ---- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t activity_of(const char *path)
{
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    uint8_t b[64];
    assert_int_equal(pread(fd, b, sizeof b, 0), 64);
    close(fd);
    return tu_le64(b + 56);
}

static void test_idle_producer_refreshes_activity(void **state)
{
    (void)state;
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = "conf-idle";
    cfg.nslots = 2;
    cfg.npools = 1;
    cfg.pool_bytes[0] = 256;
    fshm_writer *w;
    assert_int_equal(fshm_writer_open(&cfg, &w), 0);
    char ring[PATH_MAX + 64], pool[PATH_MAX + 64];
    uint64_t e = fshm_writer_epoch(w);
    tu_region_path(fshm_writer_stream_id(w), e, "header.ring", ring, sizeof ring);
    tu_region_path(fshm_writer_stream_id(w), e, "1.pool", pool, sizeof pool);
    /* No frame, no heartbeat(): only the library's own ticker can move the field. Each
     * round must see it advance and stay within a few ticks of now; generous bounds, the
     * machine may be loaded. */
    uint64_t last_ring = activity_of(ring), last_pool = activity_of(pool);
    for (int round = 0; round < 2; round++) {
        uint64_t deadline = now_ns() + 10ull * 1000000000ull;
        uint64_t a = last_ring;
        while (a == last_ring && now_ns() < deadline) {
            usleep(100 * 1000);
            a = activity_of(ring);
        }
        if (a == last_ring)
            fail_msg("round %d: activity_timestamp_ns stayed %llu for 10 s", round,
                     (unsigned long long)a);
        uint64_t now = now_ns();
        assert_true(a > last_ring && a <= now);
        assert_true(now - a < 5ull * 1000000000ull);
        uint64_t p = activity_of(pool);
        assert_true(p > last_pool);
        last_ring = a, last_pool = p;
    }
    fshm_writer_close(w, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_superblock_readings),
        cmocka_unit_test(test_slot_header_readings),
        cmocka_unit_test(test_descriptor_vector),
        cmocka_unit_test(test_idle_producer_refreshes_activity),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
