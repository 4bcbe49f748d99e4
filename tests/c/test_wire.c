/* Byte-exact checks of the shared-memory layout (docs/wire-format.md, SHM Tensor Pool
 * wire spec v1.2) and of the codec's validation: superblocks, slot headers, embedded
 * TensorHeader, payload placement, pool choice, tensor layout checks, descriptors,
 * names. Regions are read back through plain file I/O, never through the library. */
#include "fshm_test_util.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- helpers ---- */

static void expect_superblock(const uint8_t *b, uint64_t epoch, uint32_t stream_id,
                              int16_t region_type, uint16_t pool_id, uint32_t nslots,
                              uint32_t slot_bytes, uint32_t stride_bytes, uint64_t t_before,
                              uint64_t t_after)
{
    assert_int_equal(tu_le64(b + 0), 0x544F504C53484D31ull);   /* magic "TPOLSHM1" */
    assert_memory_equal(b, "1MHSLPOT", 8);                       /* ... as little-endian bytes */
    assert_int_equal(tu_le32(b + 8), 1);                         /* layout_version */
    assert_int_equal(tu_le64(b + 12), epoch);
    assert_int_equal(tu_le32(b + 20), stream_id);
    assert_int_equal((int16_t)tu_le16(b + 24), region_type);
    assert_int_equal(tu_le16(b + 26), pool_id);
    assert_int_equal(tu_le32(b + 28), nslots);
    assert_int_equal(tu_le32(b + 32), slot_bytes);
    assert_int_equal(tu_le32(b + 36), stride_bytes);
    assert_int_equal(tu_le64(b + 40), (uint64_t)getpid());
    uint64_t start = tu_le64(b + 48), activity = tu_le64(b + 56);
    assert_true(start >= t_before && start <= t_after);          /* CLOCK_MONOTONIC ns */
    /* The liveness ticker may refresh activity at any time after t_after, up to the
     * moment the region was read back (just before this call). */
    assert_true(activity >= start && activity <= fshm_now_ns());
}

static void expect_zero(const uint8_t *p, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            fail_msg("%s: byte %zu is 0x%02x, expected 0", what, i, p[i]);
}

typedef struct want_slot {
    uint64_t seq;
    uint32_t values_len;
    uint16_t pool_id;
    uint64_t timestamp;
    int16_t dtype;
    int16_t major;
    uint8_t ndims;
    int32_t dims[8];
    int32_t strides[8];
    uint64_t ref_plus1;   /* frameshm extension at TensorHeader offset 75; 0 = none */
    uint64_t published_from, published_to;   /* its commit time (offset 83) lies between */
} want_slot;

static void expect_slot(const uint8_t *ring, uint32_t nslots, const want_slot *w)
{
    uint32_t idx = (uint32_t)(w->seq & (nslots - 1));
    const uint8_t *s = ring + 64 + (size_t)idx * 256;
    assert_int_equal(tu_le64(s + 0), (w->seq << 1) | 1);     /* seq_commit */
    assert_int_equal(tu_le32(s + 8), w->values_len);
    assert_int_equal(tu_le32(s + 12), idx);                  /* payload_slot == slot index */
    assert_int_equal(tu_le16(s + 16), w->pool_id);
    assert_int_equal(tu_le32(s + 18), 0);                    /* payload_offset */
    assert_int_equal(tu_le64(s + 22), w->timestamp);
    assert_int_equal(tu_le32(s + 30), 0);                    /* meta_version */
    expect_zero(s + 34, 60 - 34, "slot pad");
    assert_int_equal(tu_le32(s + 60), 192);                  /* headerBytes varData length */
    const uint8_t *h = s + 64;                               /* embedded SBE message header */
    assert_int_equal(tu_le16(h + 0), 184);                   /* blockLength */
    assert_int_equal(tu_le16(h + 2), 52);                    /* templateId: TensorHeader */
    assert_int_equal(tu_le16(h + 4), 900);                   /* schemaId */
    assert_int_equal(tu_le16(h + 6), 1);                     /* version */
    const uint8_t *t = s + 72;                               /* TensorHeader block */
    assert_int_equal((int16_t)tu_le16(t + 0), w->dtype);
    assert_int_equal((int16_t)tu_le16(t + 2), w->major);
    assert_int_equal(t[4], w->ndims);
    assert_int_equal(t[5], 0);                               /* pad_align */
    assert_int_equal(t[6], 0);                               /* progress_unit NONE */
    assert_int_equal(tu_le32(t + 7), 0);                     /* progress_stride_bytes */
    for (int i = 0; i < 8; i++) {
        assert_int_equal((int32_t)tu_le32(t + 11 + 4 * i), i < w->ndims ? w->dims[i] : 0);
        assert_int_equal((int32_t)tu_le32(t + 43 + 4 * i), i < w->ndims ? w->strides[i] : 0);
    }
    assert_int_equal(tu_le64(t + 75), w->ref_plus1);         /* ref_seq_plus1 */
    uint64_t published = tu_le64(t + 83);                    /* publish_ns */
    if (published < w->published_from || published > w->published_to)
        fail_msg("seq %llu: publish_ns %llu is outside its publish call [%llu, %llu]",
                 (unsigned long long)w->seq, (unsigned long long)published,
                 (unsigned long long)w->published_from, (unsigned long long)w->published_to);
    expect_zero(t + 91, 184 - 91, "TensorHeader pad");
}

static fshm_tensor tensor2(int16_t dtype, int16_t order, int32_t d0, int32_t d1, int32_t s0,
                           int32_t s1)
{
    fshm_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dtype;
    t.major_order = order;
    t.ndims = 2;
    t.dims[0] = d0;
    t.dims[1] = d1;
    t.strides[0] = s0;
    t.strides[1] = s1;
    return t;
}

static uint64_t ctl_u64(uint32_t stream_id, size_t off)
{
    char dir[PATH_MAX], path[PATH_MAX + 32];
    tu_stream_dir(stream_id, dir, sizeof dir);
    snprintf(path, sizeof path, "%s/frameshm.ctl", dir);
    size_t len;
    uint8_t *b = tu_read_file(path, &len);
    assert_true(len >= off + 8);
    uint64_t v = tu_le64(b + off);
    free(b);
    return v;
}

/* ---- layout ---- */

static void test_layout_header_ring_and_pools(void **state)
{
    (void)state;
    const char *name = "wire-layout";
    uint64_t t0 = fshm_now_ns();
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = name;
    cfg.nslots = 4;
    cfg.npools = 2;
    cfg.pool_bytes[0] = 1000;     /* -> stride 1024 */
    cfg.pool_bytes[1] = 100000;   /* -> stride 131072 */
    fshm_writer *w = NULL;
    assert_int_equal(fshm_writer_open(&cfg, &w), 0);
    uint64_t t1 = fshm_now_ns();
    uint32_t sid = fshm_writer_stream_id(w);
    uint64_t epoch = fshm_writer_epoch(w);
    assert_int_equal(sid, fshm_stream_id_for_name(name));
    assert_int_equal(epoch, 1);
    assert_int_equal(fshm_writer_npools(w), 2);
    assert_int_equal(fshm_writer_next_seq(w), 0);

    /* The path the library resolves is the one the spec prescribes. */
    fshm_paths p;
    assert_int_equal(fshm_resolve(&cfg.addr, 0, &p), 0);
    char sdir[PATH_MAX];
    tu_stream_dir(sid, sdir, sizeof sdir);
    assert_string_equal(p.stream_dir, sdir);

    /* seq 0: uint16 4x6 with padded rows (row stride 16 bytes), pool 1. */
    uint8_t a[64];
    tu_fill(a, sizeof a, 0);
    fshm_tensor ta = tensor2(FSHM_DTYPE_UINT16, FSHM_ORDER_ROW, 4, 6, 16, 2);
    assert_int_equal(fshm_writer_publish(w, a, sizeof a, &ta, 1001), 0);
    /* seq 1: float32 3x5 column-major, strides inferred (4, 12), pool 1. */
    uint8_t b[60];
    tu_fill(b, sizeof b, 1);
    fshm_tensor tb = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_COLUMN, 3, 5, 0, 0);
    assert_int_equal(fshm_writer_publish(w, b, sizeof b, &tb, 1002), 0);
    /* seq 2: 5000 bytes, too big for pool 1: goes to pool 2. */
    uint8_t *c = malloc(5000);
    assert_non_null(c);
    tu_fill(c, 5000, 2);
    fshm_tensor tc = tu_u8_tensor(5000);
    assert_int_equal(fshm_writer_publish(w, c, 5000, &tc, 1003), 0);
    uint64_t t2 = fshm_now_ns();

    char path[PATH_MAX + 64];
    size_t len;
    tu_region_path(sid, epoch, "header.ring", path, sizeof path);
    uint8_t *ring = tu_read_file(path, &len);
    assert_int_equal(len, 64 + 4 * 256);
    expect_superblock(ring, epoch, sid, 1, 0, 4, 256, 256, t0, t2);
    assert_true(tu_le64(ring + 48) <= t1);

    want_slot s0 = {.seq = 0, .values_len = 64, .pool_id = 1, .timestamp = 1001, .published_from = t1, .published_to = t2,
                    .dtype = FSHM_DTYPE_UINT16, .major = 1, .ndims = 2,
                    .dims = {4, 6}, .strides = {16, 2}};
    want_slot s1 = {.seq = 1, .values_len = 60, .pool_id = 1, .timestamp = 1002, .published_from = t1, .published_to = t2,
                    .dtype = FSHM_DTYPE_FLOAT32, .major = 2, .ndims = 2,
                    .dims = {3, 5}, .strides = {4, 12}};
    want_slot s2 = {.seq = 2, .values_len = 5000, .pool_id = 2, .timestamp = 1003, .published_from = t1, .published_to = t2,
                    .dtype = FSHM_DTYPE_UINT8, .major = 1, .ndims = 1,
                    .dims = {5000}, .strides = {1}};
    expect_slot(ring, 4, &s0);
    expect_slot(ring, 4, &s1);
    expect_slot(ring, 4, &s2);
    expect_zero(ring + 64 + 3 * 256, 256, "never-used slot 3");

    /* Pool 1: stride 1024, payload of seq s at 64 + slot * stride. */
    uint8_t *pool;
    tu_region_path(sid, epoch, "1.pool", path, sizeof path);
    pool = tu_read_file(path, &len);
    assert_int_equal(len, 64 + 4 * 1024);
    expect_superblock(pool, epoch, sid, 2, 1, 4, 1024, 1024, t0, t2);
    assert_memory_equal(pool + 64 + 0 * 1024, a, sizeof a);
    assert_memory_equal(pool + 64 + 1 * 1024, b, sizeof b);
    free(pool);

    tu_region_path(sid, epoch, "2.pool", path, sizeof path);
    pool = tu_read_file(path, &len);
    assert_int_equal(len, 64 + 4 * 131072);
    expect_superblock(pool, epoch, sid, 2, 2, 4, 131072, 131072, t0, t2);
    assert_memory_equal(pool + 64 + 2 * 131072, c, 5000);
    free(pool);

    /* The pool base the writer exposes is the same mapping. */
    size_t plen;
    uint32_t stride;
    uint16_t pid;
    uint8_t *base = fshm_writer_pool_base(w, 1, &plen, &stride, &pid);
    assert_non_null(base);
    assert_int_equal(plen, 64 + 4 * 131072);
    assert_int_equal(stride, 131072);
    assert_int_equal(pid, 2);
    assert_memory_equal(base + 64 + 2 * 131072, c, 5000);
    assert_null(fshm_writer_pool_base(w, 2, NULL, NULL, NULL));

    /* Control region (frameshm's own): magic, stream id, epoch, latest seq + 1, name. */
    assert_int_equal(ctl_u64(sid, 0), 0x314C54434D485346ull);   /* "FSHMCTL1" */
    assert_int_equal(ctl_u64(sid, 8) >> 32, sid);
    assert_int_equal(ctl_u64(sid, 16), epoch);
    assert_int_equal(ctl_u64(sid, 24), 3);

    /* And a reader decodes exactly what was written. */
    fshm_reader *r = tu_reader(name);
    fshm_frame f;
    assert_int_equal(fshm_reader_peek_latest(r, &f), 0);
    assert_int_equal(f.seq, 2);
    assert_int_equal(f.nbytes, 5000);
    assert_int_equal(f.pool_id, 2);
    assert_int_equal(f.slot, 2);
    assert_int_equal(f.timestamp_ns, 1003);
    assert_memory_equal(f.data, c, 5000);
    assert_int_equal(f.tensor.ndims, 1);
    assert_int_equal(f.tensor.strides[0], 1);
    fshm_reader_close(r);

    free(c);
    free(ring);
    fshm_writer_close(w, 1);
    assert_false(tu_path_exists(sdir));
}

static void test_loan_commit_in_place(void **state)
{
    (void)state;
    fshm_writer *w = tu_writer("wire-loan", 2, 256);
    uint32_t sid = fshm_writer_stream_id(w);
    fshm_loan l;
    assert_int_equal(fshm_writer_loan(w, 100, &l), 0);
    assert_int_equal(l.seq, 0);
    assert_int_equal(l.slot, 0);
    assert_int_equal(l.capacity, 256);
    assert_int_equal(l.pool_id, 1);

    char path[PATH_MAX + 64];
    size_t len;
    tu_region_path(sid, 1, "header.ring", path, sizeof path);
    uint8_t *ring = tu_read_file(path, &len);
    assert_int_equal(tu_le64(ring + 64), 0);   /* in progress: (seq << 1) | 0 */
    free(ring);

    tu_fill(l.data, 100, 0);
    fshm_tensor t = tu_u8_tensor(100);
    assert_int_equal(fshm_writer_commit(w, &t, 100, 77), 0);
    assert_int_equal(fshm_writer_commit(w, &t, 100, 77), -EINVAL);   /* no loan */

    /* A second loan abandons the first: its seq is spent, its slot stays in progress. */
    assert_int_equal(fshm_writer_loan(w, 10, &l), 0);
    assert_int_equal(l.seq, 1);
    assert_int_equal(fshm_writer_loan(w, 10, &l), 0);
    assert_int_equal(l.seq, 2);
    assert_int_equal(l.slot, 0);
    /* Committing more than the pool holds is refused. */
    assert_int_equal(fshm_writer_commit(w, &t, 257, 0), -EINVAL);
    t = tu_u8_tensor(10);
    tu_fill(l.data, 10, 2);
    assert_int_equal(fshm_writer_commit(w, &t, 10, 78), 0);

    ring = tu_read_file(path, &len);
    assert_int_equal(tu_le64(ring + 64 + 0 * 256), (2u << 1) | 1);
    assert_int_equal(tu_le64(ring + 64 + 1 * 256), 1u << 1);   /* abandoned loan of seq 1 */
    assert_int_equal(tu_le32(ring + 64 + 8), 10);
    free(ring);
    fshm_writer_close(w, 1);
}

/* fshm_writer_set_ref: seq + 1 of the source frame in the TensorHeader padding, for the
 * next commit only. */
static void test_ref_seq_extension(void **state)
{
    (void)state;
    fshm_writer *w = tu_writer("wire-ref", 4, 256);
    uint32_t sid = fshm_writer_stream_id(w);
    uint64_t t0 = fshm_now_ns();
    fshm_writer_set_ref(w, 41);
    assert_int_equal(tu_publish(w, 8), 0);       /* seq 0: ref 41 */
    assert_int_equal(tu_publish(w, 8), 0);       /* seq 1: none (cleared) */
    fshm_writer_set_ref(w, 0);
    assert_int_equal(tu_publish(w, 8), 0);       /* seq 2: ref 0 */
    fshm_writer_set_ref(w, 7);
    fshm_loan l;
    assert_int_equal(fshm_writer_loan(w, 8, &l), 0);
    fshm_tensor t = tu_u8_tensor(8);
    tu_fill(l.data, 8, l.seq);
    assert_int_equal(fshm_writer_commit(w, &t, 8, 5), 0);   /* seq 3: ref 7 via loan/commit */
    uint64_t t1 = fshm_now_ns();

    char path[PATH_MAX + 64];
    size_t len;
    tu_region_path(sid, 1, "header.ring", path, sizeof path);
    uint8_t *ring = tu_read_file(path, &len);
    static const uint64_t want_ref[4] = {42, 0, 1, 8};
    for (uint64_t seq = 0; seq < 4; seq++) {
        want_slot ws = {.seq = seq, .values_len = 8, .pool_id = 1,
                        .timestamp = tu_le64(ring + 64 + seq * 256 + 22),
                        .dtype = FSHM_DTYPE_UINT8, .major = 1, .ndims = 1,
                        .dims = {8}, .strides = {1}, .ref_plus1 = want_ref[seq],
                        .published_from = t0, .published_to = t1};
        expect_slot(ring, 4, &ws);
    }
    assert_int_equal(tu_le64(ring + 64 + 3 * 256 + 22), 5);
    free(ring);

    /* The reader reports it; the slot decoder (spec fields only) is unaffected. */
    fshm_reader *r = tu_reader("wire-ref");
    fshm_frame f;
    assert_int_equal(fshm_reader_peek_latest(r, &f), 0);
    assert_int_equal(f.seq, 3);
    assert_int_equal(f.has_ref, 1);
    assert_int_equal(f.ref_seq, 7);
    assert_int_equal(tu_publish(w, 8), 0);
    assert_int_equal(fshm_reader_peek_latest(r, &f), 0);
    assert_int_equal(f.seq, 4);
    assert_int_equal(f.has_ref, 0);
    fshm_writer_set_ref(w, 0);
    assert_int_equal(tu_publish(w, 8), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 1000000000ll, &f), 0);
    assert_int_equal(f.seq, 5);
    assert_int_equal(f.has_ref, 1);
    assert_int_equal(f.ref_seq, 0);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
}

static void test_pool_choice(void **state)
{
    (void)state;
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = "wire-pools";
    cfg.nslots = 2;
    cfg.npools = 4;
    cfg.pool_bytes[0] = 100;    /* 128 */
    cfg.pool_bytes[1] = 64;     /* 64 */
    cfg.pool_bytes[2] = 5000;   /* 8192 */
    cfg.pool_bytes[3] = 1;      /* 64 again: merged */
    fshm_writer *w = NULL;
    assert_int_equal(fshm_writer_open(&cfg, &w), 0);
    uint32_t sid = fshm_writer_stream_id(w);
    assert_int_equal(fshm_writer_npools(w), 3);
    static const uint32_t want_stride[3] = {64, 128, 8192};
    for (unsigned i = 0; i < 3; i++) {
        uint32_t stride;
        uint16_t id;
        size_t len;
        assert_non_null(fshm_writer_pool_base(w, i, &len, &stride, &id));
        assert_int_equal(stride, want_stride[i]);
        assert_int_equal(id, i + 1);
        assert_true(fshm_valid_stride(stride));
        assert_int_equal(stride % 64, 0);
        assert_int_equal(stride & (stride - 1), 0);
        char fname[32], path[PATH_MAX + 64];
        snprintf(fname, sizeof fname, "%u.pool", id);
        tu_region_path(sid, 1, fname, path, sizeof path);
        uint8_t *b = tu_read_file(path, &len);
        assert_int_equal(len, 64 + 2 * (size_t)stride);
        assert_int_equal(tu_le16(b + 26), id);
        assert_int_equal(tu_le32(b + 32), stride);
        assert_int_equal(tu_le32(b + 36), stride);
        free(b);
    }
    char path[PATH_MAX + 64];
    tu_region_path(sid, 1, "4.pool", path, sizeof path);
    assert_false(tu_path_exists(path));

    /* The smallest pool that fits is used. */
    static const struct { size_t n; uint16_t pool; } cases[] = {
        {0, 1}, {1, 1}, {64, 1}, {65, 2}, {128, 2}, {129, 3}, {8192, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fshm_loan l;
        assert_int_equal(fshm_writer_loan(w, cases[i].n, &l), 0);
        assert_int_equal(l.pool_id, cases[i].pool);
        assert_int_equal(l.capacity, want_stride[cases[i].pool - 1]);
        fshm_tensor t = tu_u8_tensor((uint32_t)cases[i].n);
        memset(l.data, 0xAB, cases[i].n);
        assert_int_equal(fshm_writer_commit(w, &t, cases[i].n, 0), 0);
    }
    /* Too large for every pool: dropped, counted, no seq spent, no slot touched. */
    uint64_t next = fshm_writer_next_seq(w);
    assert_int_equal(ctl_u64(sid, 80), 0);   /* drops_nopool */
    fshm_loan l;
    assert_int_equal(fshm_writer_loan(w, 8193, &l), FSHM_E_NOPOOL);
    assert_int_equal(tu_publish(w, 8193), FSHM_E_NOPOOL);
    assert_int_equal(tu_publish(w, 1 << 20), FSHM_E_NOPOOL);
    assert_int_equal(fshm_writer_next_seq(w), next);
    assert_int_equal(ctl_u64(sid, 80), 3);
    assert_int_equal(ctl_u64(sid, 24), next);   /* latest_seq + 1 unchanged */
    assert_int_equal(tu_publish(w, 8192), 0);   /* and the writer still works */
    fshm_writer_close(w, 1);
}

static void test_stride_helpers(void **state)
{
    (void)state;
    assert_int_equal(fshm_pool_stride_for(0), 64);
    assert_int_equal(fshm_pool_stride_for(1), 64);
    assert_int_equal(fshm_pool_stride_for(64), 64);
    assert_int_equal(fshm_pool_stride_for(65), 128);
    assert_int_equal(fshm_pool_stride_for(4096), 4096);
    assert_int_equal(fshm_pool_stride_for(4097), 8192);
    assert_int_equal(fshm_pool_stride_for(0x80000000ull), 0x80000000u);
    assert_int_equal(fshm_pool_stride_for(0x80000001ull), 0);
    assert_true(fshm_valid_stride(64));
    assert_true(fshm_valid_stride(1u << 31));
    assert_false(fshm_valid_stride(0));
    assert_false(fshm_valid_stride(32));
    assert_false(fshm_valid_stride(96));
    assert_false(fshm_valid_stride(192));
    for (int d = 0; d <= 13; d++) {
        int want = (d == 1 || d == 2 || d == 11 || d == 13) ? 1
                   : (d == 3 || d == 4)                      ? 2
                   : (d == 5 || d == 6 || d == 9)            ? 4
                   : (d == 7 || d == 8 || d == 10)           ? 8
                                                             : 0;
        assert_int_equal(fshm_dtype_size(d), want);
    }
}

static void test_writer_config_validation(void **state)
{
    (void)state;
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    fshm_writer *w = (fshm_writer *)&cfg;   /* must be reset to NULL on failure */
    static const uint32_t bad_nslots[] = {0, 3, 6, (1u << 24) + 1, 1u << 25};
    for (size_t i = 0; i < sizeof bad_nslots / sizeof bad_nslots[0]; i++) {
        cfg.addr.name = "wire-cfg";
        cfg.nslots = bad_nslots[i];
        cfg.npools = 1;
        cfg.pool_bytes[0] = 64;
        assert_int_equal(fshm_writer_open(&cfg, &w), -EINVAL);
        assert_null(w);
    }
    cfg = (fshm_writer_config)FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = "wire-cfg";
    cfg.nslots = 1;
    cfg.npools = 0;
    assert_int_equal(fshm_writer_open(&cfg, &w), -EINVAL);
    cfg.npools = FSHM_MAX_POOLS + 1;
    assert_int_equal(fshm_writer_open(&cfg, &w), -EINVAL);
    cfg.npools = 1;
    cfg.pool_bytes[0] = 0x80000001u;
    assert_int_equal(fshm_writer_open(&cfg, &w), -EINVAL);
    /* Nothing was created for any of these. */
    char sdir[PATH_MAX];
    tu_stream_dir(fshm_stream_id_for_name("wire-cfg"), sdir, sizeof sdir);
    assert_false(tu_path_exists(sdir));
}

/* ---- tensor layouts ---- */

static fshm_tensor tensor1(int16_t dtype, int32_t d0, int32_t s0)
{
    fshm_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dtype;
    t.major_order = FSHM_ORDER_ROW;
    t.ndims = 1;
    t.dims[0] = d0;
    t.strides[0] = s0;
    return t;
}

static void test_tensor_check(void **state)
{
    (void)state;
    fshm_tensor out, t;

    /* Contiguous row-major: strides inferred innermost first. */
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 3, 4, 0, 0);
    assert_int_equal(fshm_tensor_check(&t, 48, 1, &out), 0);
    assert_int_equal(out.strides[0], 16);
    assert_int_equal(out.strides[1], 4);
    assert_int_equal(fshm_tensor_check(&t, 47, 1, &out), -EINVAL);   /* extent 48 > 47 */
    /* fill_strides = 0 keeps the caller's (zero) strides. */
    assert_int_equal(fshm_tensor_check(&t, 48, 0, &out), 0);
    assert_int_equal(out.strides[0], 0);
    /* Column-major. */
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_COLUMN, 3, 4, 0, 0);
    assert_int_equal(fshm_tensor_check(&t, 48, 1, &out), 0);
    assert_int_equal(out.strides[0], 4);
    assert_int_equal(out.strides[1], 12);
    /* major_order 0 means row; others are refused. */
    t = tensor2(FSHM_DTYPE_UINT8, 0, 2, 2, 0, 0);
    assert_int_equal(fshm_tensor_check(&t, 4, 1, &out), 0);
    assert_int_equal(out.major_order, FSHM_ORDER_ROW);
    t.major_order = 3;
    assert_int_equal(fshm_tensor_check(&t, 4, 1, &out), -EINVAL);

    /* Padded rows are fine; the extent excludes the last row's padding. */
    t = tensor2(FSHM_DTYPE_UINT16, FSHM_ORDER_ROW, 4, 6, 16, 2);
    assert_int_equal(fshm_tensor_check(&t, 60, 1, &out), 0);
    assert_int_equal(fshm_tensor_check(&t, 59, 1, &out), -EINVAL);

    /* Overlapping strides are rejected (row and column order). */
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 3, 4, 8, 4);
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 3, 4, 16, 8);   /* inner 8 < next 16? ok */
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);   /* 16 < span 28 */
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 3, 4, 4, 0);    /* outer == inner */
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_COLUMN, 3, 4, 4, 8);
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 3, 4, 2, 0);    /* elements overlap */
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    t = tensor1(FSHM_DTYPE_FLOAT64, 4, 4);                           /* stride < itemsize */
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    /* ... but a dimension of extent 1 may carry any stride. */
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 1, 4, 4, 4);
    assert_int_equal(fshm_tensor_check(&t, 16, 1, NULL), 0);

    /* Negative strides and dims are rejected. */
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 3, 4, -16, 4);
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    t = tensor1(FSHM_DTYPE_UINT8, 4, -1);
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    t = tensor1(FSHM_DTYPE_UINT8, -4, 0);
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);

    /* ndims 0 and 9 are rejected, 1 and 8 accepted. */
    t = tensor1(FSHM_DTYPE_UINT8, 1, 0);
    t.ndims = 0;
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    t.ndims = 9;
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    t.ndims = 255;
    assert_int_equal(fshm_tensor_check(&t, 1 << 20, 1, NULL), -EINVAL);
    memset(&t, 0, sizeof t);
    t.dtype = FSHM_DTYPE_INT8;
    t.ndims = 8;
    for (int i = 0; i < 8; i++)
        t.dims[i] = 2;
    assert_int_equal(fshm_tensor_check(&t, 256, 1, &out), 0);
    assert_int_equal(out.strides[0], 128);
    assert_int_equal(out.strides[7], 1);
    assert_int_equal(fshm_tensor_check(&t, 255, 1, &out), -EINVAL);

    /* Extent larger than the payload. */
    t = tensor1(FSHM_DTYPE_UINT8, 10, 0);
    assert_int_equal(fshm_tensor_check(&t, 9, 1, NULL), -EINVAL);
    assert_int_equal(fshm_tensor_check(&t, 10, 1, NULL), 0);
    t = tensor1(FSHM_DTYPE_INT64, 3, 0);
    assert_int_equal(fshm_tensor_check(&t, 23, 1, NULL), -EINVAL);
    /* Strides that would overflow 32 bits. */
    t = tensor2(FSHM_DTYPE_FLOAT64, FSHM_ORDER_ROW, 2, 1 << 29, 0, 0);
    assert_int_equal(fshm_tensor_check(&t, SIZE_MAX, 1, NULL), -EINVAL);

    /* Empty tensors span nothing. */
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 0, 5, 0, 0);
    assert_int_equal(fshm_tensor_check(&t, 0, 1, &out), 0);

    /* Unknown dtypes. */
    t = tensor1(0, 4, 0);
    assert_int_equal(fshm_tensor_check(&t, 64, 1, NULL), -EINVAL);
    t.dtype = 12;
    assert_int_equal(fshm_tensor_check(&t, 64, 1, NULL), -EINVAL);
    t.dtype = 14;
    assert_int_equal(fshm_tensor_check(&t, 64, 1, NULL), -EINVAL);

    /* Dims beyond ndims are cleared in the output. */
    t = tensor1(FSHM_DTYPE_UINT8, 4, 0);
    t.dims[3] = 99;
    t.strides[5] = 7;
    assert_int_equal(fshm_tensor_check(&t, 4, 1, &out), 0);
    assert_int_equal(out.dims[3], 0);
    assert_int_equal(out.strides[5], 0);

    /* The writer applies the same checks and spends no seq on a refused frame. */
    fshm_writer *w = tu_writer("wire-tcheck", 2, 256);
    uint8_t buf[64] = {0};
    t = tensor2(FSHM_DTYPE_FLOAT32, FSHM_ORDER_ROW, 3, 4, 8, 4);
    assert_int_equal(fshm_writer_publish(w, buf, sizeof buf, &t, 0), -EINVAL);
    t = tensor1(FSHM_DTYPE_UINT8, 65, 0);
    assert_int_equal(fshm_writer_publish(w, buf, sizeof buf, &t, 0), -EINVAL);
    fshm_loan l;
    assert_int_equal(fshm_writer_loan(w, 64, &l), 0);
    t.ndims = 0;
    assert_int_equal(fshm_writer_commit(w, &t, 64, 0), -EINVAL);
    assert_int_equal(fshm_writer_next_seq(w), 0);
    fshm_writer_close(w, 1);
}

/* ---- slot header and superblock codecs ---- */

static void test_slot_header_codec(void **state)
{
    (void)state;
    uint8_t s[256];
    memset(s, 0xEE, sizeof s);
    fshm_tensor t = tensor2(FSHM_DTYPE_INT32, FSHM_ORDER_ROW, 5, 7, 0, 0);
    fshm_tensor full;
    assert_int_equal(fshm_tensor_check(&t, 140, 1, &full), 0);
    st64(s, (9u << 1) | 1);
    fshm_slot_header_write(s, 140, 3, 2, 123456789ull, &full);
    assert_int_equal(tu_le64(s), (9u << 1) | 1);   /* seq_commit is not touched */
    fshm_slot_view v;
    assert_int_equal(fshm_slot_header_decode(s, &v), 0);
    assert_int_equal(v.seq_commit, (9u << 1) | 1);
    assert_int_equal(v.values_len, 140);
    assert_int_equal(v.payload_slot, 3);
    assert_int_equal(v.pool_id, 2);
    assert_int_equal(v.timestamp_ns, 123456789ull);
    assert_int_equal(v.tensor.dtype, FSHM_DTYPE_INT32);
    assert_int_equal(v.tensor.ndims, 2);
    assert_int_equal(v.tensor.dims[0], 5);
    assert_int_equal(v.tensor.dims[1], 7);
    assert_int_equal(v.tensor.strides[0], 28);
    assert_int_equal(v.tensor.strides[1], 4);

    /* Every corruption the decoder must refuse. */
    static const struct { size_t off; uint8_t val; } bad[] = {
        {18, 1},             /* payload_offset != 0 */
        {60, 191},           /* headerBytes length */
        {64, 183},           /* blockLength */
        {66, 53},            /* templateId */
        {68, 0x85},          /* schemaId */
        {70, 2},             /* version */
        {72 + 4, 0},         /* ndims 0 */
        {72 + 4, 9},         /* ndims 9 */
        {72 + 2, 3},         /* major_order 3 */
        {72 + 0, 12},        /* dtype 12 */
        {72 + 6, 3},         /* progress_unit 3 */
        {72 + 6, 1},         /* progress_unit ROWS with stride 0 != row stride */
        {72 + 11 + 3, 0x80}, /* dims[0] negative */
        {72 + 43 + 0, 27},   /* strides[0] overlapping */
        {8, 139},            /* values_len below the extent */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint8_t c[256];
        memcpy(c, s, sizeof c);
        c[bad[i].off] = bad[i].val;
        int rc = fshm_slot_header_decode(c, &v);
        if (rc != FSHM_E_CORRUPT)
            fail_msg("corruption #%zu (byte %zu = %u) decoded with rc %d", i, bad[i].off,
                     bad[i].val, rc);
    }
    /* progress_unit ROWS with the right stride is accepted. */
    uint8_t c[256];
    memcpy(c, s, sizeof c);
    c[72 + 6] = 1;
    st32(c + 72 + 7, 28);
    assert_int_equal(fshm_slot_header_decode(c, &v), 0);
    c[72 + 6] = 2;
    st32(c + 72 + 7, 4);
    assert_int_equal(fshm_slot_header_decode(c, &v), 0);
}

static void test_superblock_codec(void **state)
{
    (void)state;
    uint8_t b[64 + 2 * 256];
    memset(b, 0x55, sizeof b);
    fshm_superblock_write(b, 7, 0x80000001u, 1, 0, 2, 256, 256, 4242, 99);
    assert_int_equal(tu_le64(b + 0), 0x544F504C53484D31ull);
    assert_int_equal(tu_le32(b + 8), 1);
    assert_int_equal(tu_le64(b + 12), 7);
    assert_int_equal(tu_le32(b + 20), 0x80000001u);
    assert_int_equal(tu_le16(b + 24), 1);
    assert_int_equal(tu_le16(b + 26), 0);
    assert_int_equal(tu_le32(b + 28), 2);
    assert_int_equal(tu_le32(b + 32), 256);
    assert_int_equal(tu_le32(b + 36), 256);
    assert_int_equal(tu_le64(b + 40), 4242);
    assert_int_equal(tu_le64(b + 48), 99);
    assert_int_equal(tu_le64(b + 56), 99);
    assert_int_equal(b[64], 0x55);   /* writes the 64-byte superblock only */
    assert_int_equal(fshm_superblock_check(b, sizeof b, 7, 0x80000001u, 1, 0, 2, 256, 256), 0);
    /* Mismatches against the announce, and truncated regions. */
    assert_int_equal(fshm_superblock_check(b, sizeof b, 8, 0x80000001u, 1, 0, 2, 256, 256),
                     FSHM_E_CORRUPT);
    assert_int_equal(fshm_superblock_check(b, sizeof b, 7, 0x80000002u, 1, 0, 2, 256, 256),
                     FSHM_E_CORRUPT);
    assert_int_equal(fshm_superblock_check(b, sizeof b, 7, 0x80000001u, 2, 0, 2, 256, 256),
                     FSHM_E_CORRUPT);
    assert_int_equal(fshm_superblock_check(b, sizeof b, 7, 0x80000001u, 1, 1, 2, 256, 256),
                     FSHM_E_CORRUPT);
    assert_int_equal(fshm_superblock_check(b, sizeof b, 7, 0x80000001u, 1, 0, 4, 256, 256),
                     FSHM_E_CORRUPT);
    assert_int_equal(fshm_superblock_check(b, sizeof b - 1, 7, 0x80000001u, 1, 0, 2, 256, 256),
                     FSHM_E_CORRUPT);
    assert_int_equal(fshm_superblock_check(b, 63, 7, 0x80000001u, 1, 0, 2, 256, 256),
                     FSHM_E_CORRUPT);
    uint8_t c[sizeof b];
    memcpy(c, b, sizeof c);
    c[0] ^= 1;
    assert_int_equal(fshm_superblock_check(c, sizeof c, 7, 0x80000001u, 1, 0, 2, 256, 256),
                     FSHM_E_CORRUPT);
    memcpy(c, b, sizeof c);
    c[8] = 2;
    assert_int_equal(fshm_superblock_check(c, sizeof c, 7, 0x80000001u, 1, 0, 2, 256, 256),
                     FSHM_E_CORRUPT);
}

/* ---- descriptors ---- */

static void test_descriptor_roundtrip(void **state)
{
    (void)state;
    uint8_t m[FSHM_DESC_BYTES];
    memset(m, 0xCC, sizeof m);
    fshm_desc_encode(m, 0x80001234u, 7, 123456789012ull, 555666777ull);
    assert_int_equal(FSHM_DESC_BYTES, 48);
    assert_int_equal(tu_le16(m + 0), 40);    /* blockLength */
    assert_int_equal(tu_le16(m + 2), 4);     /* templateId: FrameDescriptor */
    assert_int_equal(tu_le16(m + 4), 900);
    assert_int_equal(tu_le16(m + 6), 1);
    assert_int_equal(tu_le32(m + 8), 0x80001234u);
    assert_int_equal(tu_le64(m + 12), 7);
    assert_int_equal(tu_le64(m + 20), 123456789012ull);
    assert_int_equal(tu_le64(m + 28), 555666777ull);
    assert_int_equal(tu_le32(m + 36), 0xFFFFFFFFu);   /* meta_version: null */
    assert_int_equal(tu_le64(m + 40), 0);             /* trace id */

    uint64_t epoch = 0, seq = 0, pub = 0;
    assert_int_equal(fshm_desc_decode(m, sizeof m, 0x80001234u, &epoch, &seq, &pub), 0);
    assert_int_equal(epoch, 7);
    assert_int_equal(seq, 123456789012ull);
    assert_int_equal(pub, 555666777ull);

    /* Extremes survive the round trip; a null timestamp decodes as 0. */
    fshm_desc_encode(m, 1, UINT64_MAX - 1, UINT64_MAX >> 1, UINT64_MAX);
    assert_int_equal(fshm_desc_decode(m, sizeof m, 1, &epoch, &seq, &pub), 0);
    assert_int_equal(epoch, UINT64_MAX - 1);
    assert_int_equal(seq, UINT64_MAX >> 1);
    assert_int_equal(pub, 0);

    /* Malformed messages. */
    fshm_desc_encode(m, 5, 1, 2, 3);
    assert_int_equal(fshm_desc_decode(m, 47, 5, &epoch, &seq, &pub), FSHM_E_CORRUPT);
    assert_int_equal(fshm_desc_decode(m, 64, 5, &epoch, &seq, &pub), FSHM_E_CORRUPT);
    assert_int_equal(fshm_desc_decode(m, sizeof m, 6, &epoch, &seq, &pub), FSHM_E_CORRUPT);
    for (int field = 0; field < 4; field++) {
        uint8_t c[FSHM_DESC_BYTES];
        memcpy(c, m, sizeof c);
        c[field * 2] ^= 0x10;
        assert_int_equal(fshm_desc_decode(c, sizeof c, 5, &epoch, &seq, &pub), FSHM_E_CORRUPT);
    }
}

/* ---- names ---- */

static void test_name_validation(void **state)
{
    (void)state;
    int files_before = tu_count_files(tu_base);
    char n63[64], n64[65];
    memset(n63, 'a', 63);
    n63[63] = 0;
    memset(n64, 'b', 64);
    n64[64] = 0;
    static const char *const bad[] = {"../x", "a/b", "", "..", ".", ".hidden", "-x", "a b",
                                      "a\\b", "x\n", "caf\xc3\xa9", "a:b", "/abs", "a*"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (fshm_validate_name(bad[i], "stream") != -EINVAL)
            fail_msg("name '%s' was accepted", bad[i]);
    assert_int_equal(fshm_validate_name(NULL, "stream"), -EINVAL);
    assert_int_equal(fshm_validate_name(n64, "stream"), -EINVAL);
    static const char *const good[] = {"cam0", "a", "_x", "0", "cam_0.rgb-1", "A.B.C", "x..y"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        if (fshm_validate_name(good[i], "stream") != 0)
            fail_msg("name '%s' was refused: %s", good[i], fshm_last_error());
    assert_int_equal(fshm_validate_name(n63, "stream"), 0);

    /* The public entry points refuse them before touching the file system. */
    const char *probes[] = {"../x", "a/b", "", n64};
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
        wc.addr.name = probes[i];
        wc.nslots = 1;
        wc.npools = 1;
        wc.pool_bytes[0] = 64;
        fshm_writer *w = NULL;
        assert_int_equal(fshm_writer_open(&wc, &w), -EINVAL);
        assert_null(w);
        fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
        rc.addr.name = probes[i];
        fshm_reader *r = NULL;
        assert_int_equal(fshm_reader_open(&rc, &r), -EINVAL);
        assert_null(r);
    }
    /* Namespaces too, and consumer labels (31 characters at most). */
    fshm_reader_config rc = FSHM_READER_CONFIG_INIT;
    rc.addr.name = "wire-names";
    rc.addr.ns = "../evil";
    fshm_reader *r = NULL;
    assert_int_equal(fshm_reader_open(&rc, &r), -EINVAL);
    rc.addr.ns = NULL;
    rc.consumer = "a/b";
    assert_int_equal(fshm_reader_open(&rc, &r), -EINVAL);
    rc.consumer = "c23456789012345678901234567890123";   /* 33 characters */
    assert_int_equal(fshm_reader_open(&rc, &r), -EINVAL);
    setenv("FRAMESHM_NAMESPACE", "a/b", 1);
    rc.consumer = NULL;
    assert_int_equal(fshm_reader_open(&rc, &r), -EINVAL);
    unsetenv("FRAMESHM_NAMESPACE");
    /* No stream-less address and no relative base directories. */
    rc = (fshm_reader_config)FSHM_READER_CONFIG_INIT;
    assert_int_equal(fshm_reader_open(&rc, &r), -EINVAL);
    rc.addr.name = "wire-names";
    rc.addr.base_dir = "relative/dir";
    assert_int_equal(fshm_reader_open(&rc, &r), -EINVAL);
    /* Nothing was created in the base directory by any of these. */
    assert_int_equal(tu_count_files(tu_base), files_before);
    char evil[PATH_MAX + 16];
    snprintf(evil, sizeof evil, "%s/evil", tu_base);
    assert_false(tu_path_exists(evil));

    /* The stream id is FNV-1a of the name with the top bit set. */
    assert_int_equal(fshm_stream_id_for_name(""), 0x811C9DC5u);
    assert_int_equal(fshm_stream_id_for_name("a"), 0xE40C292Cu);
    assert_int_equal(fshm_stream_id_for_name("foobar"), 0xBF9CF968u);
    assert_true(fshm_stream_id_for_name("x") & 0x80000000u);
}

static void test_strerror(void **state)
{
    (void)state;
    assert_string_equal(fshm_strerror(0), "success");
    assert_string_equal(fshm_strerror(FSHM_E_CORRUPT), "corrupt shared memory");
    assert_string_equal(fshm_strerror(FSHM_E_NOPOOL), "frame larger than every payload pool");
    assert_string_equal(fshm_strerror(-ENOSPC), strerror(ENOSPC));
    assert_string_equal(fshm_strerror(-5000), "unknown error");
    assert_string_equal(fshm_strerror(7), "unknown error");
    fshm_set_error(-EINVAL, "hello %d", 42);
    assert_string_equal(fshm_last_error(), "hello 42");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_header_ring_and_pools),
        cmocka_unit_test(test_loan_commit_in_place),
        cmocka_unit_test(test_ref_seq_extension),
        cmocka_unit_test(test_pool_choice),
        cmocka_unit_test(test_stride_helpers),
        cmocka_unit_test(test_writer_config_validation),
        cmocka_unit_test(test_tensor_check),
        cmocka_unit_test(test_slot_header_codec),
        cmocka_unit_test(test_superblock_codec),
        cmocka_unit_test(test_descriptor_roundtrip),
        cmocka_unit_test(test_name_validation),
        cmocka_unit_test(test_strerror),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
