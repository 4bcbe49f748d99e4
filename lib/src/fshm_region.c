/* Mappings, superblocks, slot headers, tensor layouts and descriptors: the byte-level
 * codec of docs/wire-format.md. Decoders never trust their input. */
#include <sys/mman.h>
#include <stdlib.h>
#include <unistd.h>

#include "fshm_internal.h"

/* ---- mappings ---- */

int fshm_map_create(int fd, size_t size, int writable, int populate, fshm_map **out)
{
    fshm_map *m = calloc(1, sizeof *m);
    if (!m)
        return fshm_set_error(-ENOMEM, "out of memory");
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *base = mmap(NULL, size, prot, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, 0);
    if (base == MAP_FAILED) {
        int e = errno;
        free(m);
        return fshm_set_error(-e, "mmap of %zu bytes failed: %s", size, strerror(e));
    }
    m->refs = 1;
    m->writable = writable;
    m->base = base;
    m->size = size;
    *out = m;
    return 0;
}

void fshm_map_ref(fshm_map *m)
{
    if (m)
        __atomic_fetch_add(&m->refs, 1, __ATOMIC_RELAXED);
}

void fshm_map_unref(fshm_map *m)
{
    if (m && __atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        munmap(m->base, m->size);
        free(m);
    }
}

void *fshm_map_base(const fshm_map *m) { return m->base; }
size_t fshm_map_size(const fshm_map *m) { return m->size; }
int fshm_map_writable(const fshm_map *m) { return m->writable; }

/* ---- dtypes and pool strides ---- */

int fshm_dtype_size(int dtype)
{
    switch (dtype) {
    case FSHM_DTYPE_UINT8: case FSHM_DTYPE_INT8: case FSHM_DTYPE_BOOLEAN: case FSHM_DTYPE_BYTES:
        return 1;
    case FSHM_DTYPE_UINT16: case FSHM_DTYPE_INT16:
        return 2;
    case FSHM_DTYPE_UINT32: case FSHM_DTYPE_INT32: case FSHM_DTYPE_FLOAT32:
        return 4;
    case FSHM_DTYPE_UINT64: case FSHM_DTYPE_INT64: case FSHM_DTYPE_FLOAT64:
        return 8;
    default:
        return 0;
    }
}

uint32_t fshm_pool_stride_for(uint64_t nbytes)
{
    uint64_t s = FSHM_MIN_STRIDE;
    while (s < nbytes)
        s <<= 1;
    return s > FSHM_MAX_STRIDE ? 0 : (uint32_t)s;
}

/* ---- superblock ---- */

void fshm_superblock_write(uint8_t *b, uint64_t epoch, uint32_t stream_id, int16_t region_type,
                           uint16_t pool_id, uint32_t nslots, uint32_t slot_bytes,
                           uint32_t stride_bytes, uint64_t pid, uint64_t start_ns)
{
    memset(b, 0, FSHM_SUPERBLOCK_SIZE);
    st64(b + SB_MAGIC, FSHM_MAGIC);
    st32(b + SB_LAYOUT_VERSION, FSHM_LAYOUT_VERSION);
    st64(b + SB_EPOCH, epoch);
    st32(b + SB_STREAM_ID, stream_id);
    st16(b + SB_REGION_TYPE, (uint16_t)region_type);
    st16(b + SB_POOL_ID, pool_id);
    st32(b + SB_NSLOTS, nslots);
    st32(b + SB_SLOT_BYTES, slot_bytes);
    st32(b + SB_STRIDE_BYTES, stride_bytes);
    st64(b + SB_PID, pid);
    st64(b + SB_START_NS, start_ns);
    st64(b + SB_ACTIVITY_NS, start_ns);
}

int fshm_superblock_check(const uint8_t *b, size_t map_size, uint64_t epoch, uint32_t stream_id,
                          int16_t region_type, uint16_t pool_id, uint32_t nslots,
                          uint32_t slot_bytes, uint32_t stride_bytes)
{
    const char *what = region_type == FSHM_REGION_HEADER_RING ? "header ring" : "payload pool";
    if (map_size < FSHM_SUPERBLOCK_SIZE)
        return fshm_set_error(FSHM_E_CORRUPT, "%s is %zu bytes, smaller than its superblock", what,
                              map_size);
    if (ld64(b + SB_MAGIC) != FSHM_MAGIC)
        return fshm_set_error(FSHM_E_CORRUPT, "%s has a bad magic number (not a frameshm region)",
                              what);
    uint32_t lv = ld32(b + SB_LAYOUT_VERSION);
    if (lv != FSHM_LAYOUT_VERSION)
        return fshm_set_error(FSHM_E_CORRUPT, "%s has layout_version %u; this build reads %u", what,
                              lv, FSHM_LAYOUT_VERSION);
#define CHECK(off, ld, want, label)                                                              \
    if ((uint64_t)ld(b + (off)) != (uint64_t)(want))                                              \
        return fshm_set_error(FSHM_E_CORRUPT, "%s superblock: %s is %llu, announced %llu", what,   \
                              label, (unsigned long long)ld(b + (off)), (unsigned long long)(want));
    CHECK(SB_EPOCH, ld64, epoch, "epoch")
    CHECK(SB_STREAM_ID, ld32, stream_id, "stream_id")
    CHECK(SB_REGION_TYPE, ld16, (uint16_t)region_type, "region_type")
    CHECK(SB_POOL_ID, ld16, pool_id, "pool_id")
    CHECK(SB_NSLOTS, ld32, nslots, "nslots")
#undef CHECK
    /* The spec names these two fields without saying what each holds in the other kind
     * of region, and its implementations disagree: accept exactly the readings found
     * (docs/wire-format.md §2, "Readings"), never an arbitrary value. */
    uint32_t sb_slot = ld32(b + SB_SLOT_BYTES), sb_stride = ld32(b + SB_STRIDE_BYTES);
    if (region_type == FSHM_REGION_HEADER_RING) {
        if (sb_slot != FSHM_SLOT_BYTES)
            return fshm_set_error(FSHM_E_CORRUPT, "%s superblock: slot_bytes is %u, must be %u",
                                  what, sb_slot, FSHM_SLOT_BYTES);
        if (sb_stride != 0 && sb_stride != FSHM_SLOT_BYTES)
            return fshm_set_error(FSHM_E_CORRUPT,
                                  "%s superblock: stride_bytes is %u, must be 0 or %u", what,
                                  sb_stride, FSHM_SLOT_BYTES);
        (void)slot_bytes;
    } else {
        if (sb_stride != stride_bytes)
            return fshm_set_error(FSHM_E_CORRUPT, "%s superblock: stride_bytes is %u, announced %u",
                                  what, sb_stride, stride_bytes);
        if (!fshm_valid_stride(sb_stride))
            return fshm_set_error(FSHM_E_CORRUPT,
                                  "%s superblock: stride_bytes %u is not a power-of-two multiple "
                                  "of %u up to %u", what, sb_stride, FSHM_MIN_STRIDE,
                                  FSHM_MAX_STRIDE);
        if (sb_slot != sb_stride && sb_slot != FSHM_SB_SLOT_BYTES_NULL)
            return fshm_set_error(FSHM_E_CORRUPT,
                                  "%s superblock: slot_bytes is %u, must be the stride (%u) or "
                                  "the SBE null value 0xFFFFFFFF", what, sb_slot, sb_stride);
    }
    uint64_t need = FSHM_SUPERBLOCK_SIZE + (uint64_t)nslots * (region_type == FSHM_REGION_HEADER_RING
                                                                   ? FSHM_SLOT_BYTES
                                                                   : stride_bytes);
    if (map_size < need)
        return fshm_set_error(FSHM_E_CORRUPT, "%s is %zu bytes; its superblock needs %llu", what,
                              map_size, (unsigned long long)need);
    return 0;
}

/* ---- tensor layouts ---- */

int fshm_tensor_check(const fshm_tensor *t, size_t nbytes, int fill_strides, fshm_tensor *out)
{
    fshm_tensor r = *t;
    int item = fshm_dtype_size(r.dtype);
    if (!item && r.dtype == FSHM_WIRE_DTYPE_BIT)
        return fshm_set_error(-EINVAL, "dtype BIT (14) is not supported: the spec defines no bit "
                              "packing for it (docs/wire-format.md §3, \"Readings\")");
    if (!item)
        return fshm_set_error(-EINVAL, "unsupported dtype code %d", r.dtype);
    if (r.major_order == 0)
        r.major_order = FSHM_ORDER_ROW;
    if (r.major_order != FSHM_ORDER_ROW && r.major_order != FSHM_ORDER_COLUMN)
        return fshm_set_error(-EINVAL, "major_order %d is neither ROW (1) nor COLUMN (2)",
                              r.major_order);
    if (r.ndims < 1 || r.ndims > FSHM_MAX_DIMS)
        return fshm_set_error(-EINVAL, "ndims %u is outside 1..%d", r.ndims, FSHM_MAX_DIMS);
    int64_t contiguous = item;
    int row = r.major_order == FSHM_ORDER_ROW;
    for (int k = 0; k < r.ndims; k++) {
        int i = row ? r.ndims - 1 - k : k;
        if (r.dims[i] < 0)
            return fshm_set_error(-EINVAL, "dimension %d is negative (%d)", i, r.dims[i]);
        if (r.strides[i] < 0)
            return fshm_set_error(-EINVAL, "negative strides are not supported (dimension %d)", i);
        if (r.strides[i] == 0) {
            if (contiguous > INT32_MAX)
                return fshm_set_error(-EINVAL, "tensor too large for 32-bit strides");
            r.strides[i] = (int32_t)contiguous;
        }
        contiguous = (int64_t)r.strides[i] * (r.dims[i] ? r.dims[i] : 1);
    }
    /* Extent, and no overlap: walking from the fastest dimension outwards, each
     * stride must step over everything the faster dimensions span. */
    int64_t extent = item, span = item;
    int empty = 0;
    for (int k = 0; k < r.ndims; k++) {
        int i = row ? r.ndims - 1 - k : k;
        if (r.dims[i] == 0)
            empty = 1;
        if (r.dims[i] <= 1)
            continue;
        if ((int64_t)r.strides[i] < span)
            return fshm_set_error(-EINVAL,
                                  "strides overlap or contradict the %s-major order at dimension %d",
                                  row ? "row" : "column", i);
        extent += (int64_t)(r.dims[i] - 1) * r.strides[i];
        span = extent;
    }
    if (empty)
        extent = 0;
    if ((uint64_t)extent > nbytes)
        return fshm_set_error(-EINVAL, "tensor spans %lld bytes but only %zu bytes are provided",
                              (long long)extent, nbytes);
    if (out) {
        /* Unused dimensions read as 0. Built on a zeroed struct (a fixed-size memset is a
         * few stores): clearing the tail in a loop cost more than the whole check of a
         * 64 B message's tensor. */
        fshm_tensor o;
        memset(&o, 0, sizeof o);
        o.dtype = r.dtype, o.major_order = r.major_order, o.ndims = r.ndims;
        for (int i = 0; i < r.ndims; i++) {
            o.dims[i] = r.dims[i];
            o.strides[i] = fill_strides ? r.strides[i] : t->strides[i];
        }
        *out = o;
    }
    return 0;
}

/* ---- slot headers ---- */

void fshm_slot_header_write(uint8_t *s, uint32_t values_len, uint32_t payload_slot,
                            uint16_t pool_id, uint64_t timestamp_ns, const fshm_tensor *t)
{
    /* Every byte but seq_commit is rewritten: readers must never see a previous
     * frame's fields mixed in (spec §8.3 step 3). */
    memset(s + 8, 0, FSHM_SLOT_BYTES - 8);
    st32(s + SH_VALUES_LEN, values_len);
    st32(s + SH_PAYLOAD_SLOT, payload_slot);
    st16(s + SH_POOL_ID, pool_id);
    st32(s + SH_PAYLOAD_OFFSET, 0);
    st64(s + SH_TIMESTAMP, timestamp_ns);
    st32(s + SH_META_VERSION, 0);
    st32(s + SH_HEADER_LEN, FSHM_TENSOR_HEADER_BYTES);
    uint8_t *h = s + SH_HEADER;
    st16(h + 0, FSHM_TENSOR_BLOCK_LENGTH);
    st16(h + 2, FSHM_TENSOR_TEMPLATE_ID);
    st16(h + 4, FSHM_SCHEMA_ID);
    st16(h + 6, FSHM_SCHEMA_VERSION);
    uint8_t *b = h + 8;
    st16(b + TH_DTYPE, (uint16_t)t->dtype);
    st16(b + TH_MAJOR, (uint16_t)(t->major_order ? t->major_order : FSHM_ORDER_ROW));
    b[TH_NDIMS] = t->ndims;
    b[TH_PAD_ALIGN] = 0;
    b[TH_PROGRESS_UNIT] = 0;
    st32(b + TH_PROGRESS_STRIDE, 0);
    for (int i = 0; i < FSHM_MAX_DIMS; i++) {
        st32(b + TH_DIMS + 4 * i, (uint32_t)(i < t->ndims ? t->dims[i] : 0));
        st32(b + TH_STRIDES + 4 * i, (uint32_t)(i < t->ndims ? t->strides[i] : 0));
    }
}

int fshm_slot_header_decode(const uint8_t s[FSHM_SLOT_BYTES], fshm_slot_view *v)
{
    v->seq_commit = ld64(s + SH_SEQ_COMMIT);
    v->values_len = ld32(s + SH_VALUES_LEN);
    v->payload_slot = ld32(s + SH_PAYLOAD_SLOT);
    v->pool_id = ld16(s + SH_POOL_ID);
    v->timestamp_ns = ld64(s + SH_TIMESTAMP);
    uint32_t off = ld32(s + SH_PAYLOAD_OFFSET);
    if (off != 0)
        return fshm_set_error(FSHM_E_CORRUPT, "slot header: payload_offset %u must be 0", off);
    uint32_t hl = ld32(s + SH_HEADER_LEN);
    if (hl != FSHM_TENSOR_HEADER_BYTES)
        return fshm_set_error(FSHM_E_CORRUPT, "slot header: headerBytes length %u, expected %u", hl,
                              FSHM_TENSOR_HEADER_BYTES);
    const uint8_t *h = s + SH_HEADER;
    if (ld16(h) != FSHM_TENSOR_BLOCK_LENGTH || ld16(h + 2) != FSHM_TENSOR_TEMPLATE_ID ||
        ld16(h + 4) != FSHM_SCHEMA_ID || ld16(h + 6) != FSHM_SCHEMA_VERSION)
        return fshm_set_error(FSHM_E_CORRUPT,
                              "slot header: embedded header is block %u template %u schema %u "
                              "version %u, expected TensorHeader 184/52/900/1",
                              ld16(h), ld16(h + 2), ld16(h + 4), ld16(h + 6));
    const uint8_t *b = h + 8;
    fshm_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = (int16_t)ld16(b + TH_DTYPE);
    t.major_order = (int16_t)ld16(b + TH_MAJOR);
    t.ndims = b[TH_NDIMS];
    if (t.ndims < 1 || t.ndims > FSHM_MAX_DIMS)
        return fshm_set_error(FSHM_E_CORRUPT, "slot header: ndims %u outside 1..%d", t.ndims,
                              FSHM_MAX_DIMS);
    if (t.major_order != FSHM_ORDER_ROW && t.major_order != FSHM_ORDER_COLUMN)
        return fshm_set_error(FSHM_E_CORRUPT, "slot header: unknown major_order %d", t.major_order);
    for (int i = 0; i < t.ndims; i++) {
        t.dims[i] = (int32_t)ld32(b + TH_DIMS + 4 * i);
        t.strides[i] = (int32_t)ld32(b + TH_STRIDES + 4 * i);
    }
    uint8_t unit = b[TH_PROGRESS_UNIT];
    uint32_t pstride = ld32(b + TH_PROGRESS_STRIDE);
    fshm_tensor full;
    int rc = fshm_tensor_check(&t, v->values_len, 1, &full);
    if (rc)
        return fshm_set_error(FSHM_E_CORRUPT, "slot header: %s", fshm_last_error());
    if (unit > 2)
        return fshm_set_error(FSHM_E_CORRUPT, "slot header: unknown progress_unit %u", unit);
    /* Rows are dimension 0 and columns dimension 1 whatever the rank (an image is
     * rows x columns [x channels]); the stride is the step between two of them. */
    if (unit == 1 && (pstride == 0 || pstride != (uint32_t)full.strides[0]))
        return fshm_set_error(FSHM_E_CORRUPT, "slot header: progress_stride_bytes %u != row stride",
                              pstride);
    if (unit == 2 && full.ndims < 2)
        return fshm_set_error(FSHM_E_CORRUPT,
                              "slot header: progress_unit COLUMNS on a 1-dimensional tensor");
    if (unit == 2 && (pstride == 0 || pstride != (uint32_t)full.strides[1]))
        return fshm_set_error(FSHM_E_CORRUPT,
                              "slot header: progress_stride_bytes %u != column stride", pstride);
    v->tensor = full;
    return 0;
}

/* ---- descriptors ---- */

void fshm_desc_encode(uint8_t m[FSHM_DESC_BYTES], uint32_t stream_id, uint64_t epoch, uint64_t seq,
                      uint64_t publish_ns)
{
    st16(m + 0, FSHM_DESC_BLOCK_LENGTH);
    st16(m + 2, FSHM_DESC_TEMPLATE_ID);
    st16(m + 4, FSHM_SCHEMA_ID);
    st16(m + 6, FSHM_SCHEMA_VERSION);
    uint8_t *b = m + 8;
    st32(b + FD_STREAM_ID, stream_id);
    st64(b + FD_EPOCH, epoch);
    st64(b + FD_SEQ, seq);
    st64(b + FD_TIMESTAMP, publish_ns);
    st32(b + FD_META, 0xFFFFFFFFu);
    st64(b + FD_TRACE, 0);
}

int fshm_desc_decode(const uint8_t *m, size_t len, uint32_t stream_id, uint64_t *epoch,
                     uint64_t *seq, uint64_t *publish_ns)
{
    if (len != FSHM_DESC_BYTES || ld16(m) != FSHM_DESC_BLOCK_LENGTH ||
        ld16(m + 2) != FSHM_DESC_TEMPLATE_ID || ld16(m + 4) != FSHM_SCHEMA_ID ||
        ld16(m + 6) != FSHM_SCHEMA_VERSION)
        return fshm_set_error(FSHM_E_CORRUPT, "malformed frame descriptor (%zu bytes)", len);
    const uint8_t *b = m + 8;
    if (ld32(b + FD_STREAM_ID) != stream_id)
        return fshm_set_error(FSHM_E_CORRUPT, "descriptor for stream %u on stream %u's queue",
                              ld32(b + FD_STREAM_ID), stream_id);
    *epoch = ld64(b + FD_EPOCH);
    *seq = ld64(b + FD_SEQ);
    uint64_t ts = ld64(b + FD_TIMESTAMP);
    *publish_ns = ts == UINT64_MAX ? 0 : ts;
    return 0;
}
