/* Internal declarations shared by the C core's translation units. */
#ifndef FSHM_INTERNAL_H
#define FSHM_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <limits.h>
#include <mqueue.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "frameshm/frameshm.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "frameshm's wire format is little-endian; big-endian hosts need byte swapping"
#endif

/* ---- errors ---- */
/* Records the system errno behind a frameshm-specific code (e.g. FSHM_E_LIMIT). */
void fshm_note_errno(int e);

/* Copies a caller's config struct (which starts with its struct_size) into `out` of the
 * library's own size: fields the caller's version does not have stay zero (their
 * defaults). -EINVAL when struct_size is 0 or smaller than the first version's struct. */
int fshm_config_copy(void *out, size_t out_size, const void *in, size_t min_size, const char *what);

/* ---- wire constants (SHM Tensor Pool Wire Spec v1.2) ---- */
#define FSHM_MAGIC 0x544F504C53484D31ULL   /* "TPOLSHM1" read as a little-endian u64 */
#define FSHM_LAYOUT_VERSION 1u
#define FSHM_SUPERBLOCK_SIZE 64u
#define FSHM_SLOT_BYTES 256u
#define FSHM_WIRE_DTYPE_BIT 14   /* in the spec's registry, refused (see fshm_tensor_check) */
#define FSHM_SB_SLOT_BYTES_NULL 0xFFFFFFFFu   /* SBE null u32: a pool's slot_bytes "not given" */
#define FSHM_REGION_HEADER_RING 1
#define FSHM_REGION_PAYLOAD_POOL 2
#define FSHM_SCHEMA_ID 900u
#define FSHM_SCHEMA_VERSION 1u
#define FSHM_TENSOR_TEMPLATE_ID 52u
#define FSHM_TENSOR_BLOCK_LENGTH 184u
#define FSHM_TENSOR_HEADER_BYTES 192u     /* 8-byte SBE message header + block */
#define FSHM_DESC_TEMPLATE_ID 4u
#define FSHM_DESC_BLOCK_LENGTH 40u
#define FSHM_DESC_BYTES 48u

/* Superblock field offsets (SBE packs fields back to back). */
enum {
    SB_MAGIC = 0, SB_LAYOUT_VERSION = 8, SB_EPOCH = 12, SB_STREAM_ID = 20, SB_REGION_TYPE = 24,
    SB_POOL_ID = 26, SB_NSLOTS = 28, SB_SLOT_BYTES = 32, SB_STRIDE_BYTES = 36, SB_PID = 40,
    SB_START_NS = 48, SB_ACTIVITY_NS = 56,
};
/* SlotHeader field offsets within a 256-byte slot. */
enum {
    SH_SEQ_COMMIT = 0, SH_VALUES_LEN = 8, SH_PAYLOAD_SLOT = 12, SH_POOL_ID = 16,
    SH_PAYLOAD_OFFSET = 18, SH_TIMESTAMP = 22, SH_META_VERSION = 30, SH_PAD = 34,
    SH_HEADER_LEN = 60, SH_HEADER = 64,
};
/* TensorHeader offsets relative to the embedded message (after its 8-byte header). */
enum {
    TH_DTYPE = 0, TH_MAJOR = 2, TH_NDIMS = 4, TH_PAD_ALIGN = 5, TH_PROGRESS_UNIT = 6,
    TH_PROGRESS_STRIDE = 7, TH_DIMS = 11, TH_STRIDES = 43,
    /* frameshm's own fields in the block's implementation-specific padding (75..183),
     * which other spec readers ignore: wire-format.md §3 */
    TH_REF_SEQ = 75, TH_PUBLISH_NS = 83,
};
/* FrameDescriptor offsets (after the 8-byte message header). */
enum { FD_STREAM_ID = 0, FD_EPOCH = 4, FD_SEQ = 12, FD_TIMESTAMP = 20, FD_META = 28, FD_TRACE = 32 };

/* A spin-wait step: tells the core (and an SMT sibling) that we only wait. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* ---- seqlock word helpers: seq_commit = (seq << 1) | committed ---- */
static inline uint64_t *slot_commit_word(uint8_t *ring, uint32_t idx)
{
    return (uint64_t *)(ring + FSHM_SUPERBLOCK_SIZE + (size_t)idx * FSHM_SLOT_BYTES);
}

/* ---- control region (frameshm's own; see docs/wire-format.md) ---- */
#define FSHM_CTL_MAGIC 0x314C54434D485346ULL   /* ASCII "FSHMCTL1" read as a little-endian u64 */
#define FSHM_CTL_VERSION 2u   /* 2: control bytes at 120 (version 1 had one mode byte at 64) */
#define FSHM_CTL_HEADER_BYTES 4096u
#define FSHM_CONSUMER_BYTES 128u
#define FSHM_CTL_BYTES (FSHM_CTL_HEADER_BYTES + FSHM_MAX_CONSUMERS * FSHM_CONSUMER_BYTES)
#define FSHM_URI_MAX 496

enum { CTL_STATE_NEVER = 0, CTL_STATE_LIVE = 1, CTL_STATE_CLOSED = 2 };
/* The stream's files belong to a frameshm driver: producers must attach through it. */
enum { CTL_FLAG_DRIVER = 1 };
enum { CONS_FREE = 0, CONS_CLAIMING = 1, CONS_ACTIVE = 2, CONS_PRUNING = 3 };
/* A consumer slot's state word: the kind (CONS_*) in the low 8 bits and, while the slot is
 * being claimed or released, the pid of the process doing it in bits 8..31 (Linux pids
 * stay below 2^22). The slot names who is in charge from the very instruction that takes
 * it, so a process killed mid-transition leaves a slot whose owner is visibly dead, and
 * pruning reclaims it whatever the kind. ACTIVE is always the bare 2 (its owner is in
 * pid/pid_start), FREE the bare 0. A bare CLAIMING or PRUNING (pid 0) comes from an older
 * library still filling the slot in; it is left alone. */
#define CONS_KIND(s) ((uint32_t)(s) & 0xffu)
#define CONS_PID(s) ((uint32_t)(s) >> 8)
#define CONS_STATE(kind, pid) ((uint32_t)(kind) | (uint32_t)(pid) << 8)
#define CONS_PID_LIMIT (1u << 24)
/* Consumer flags (fshm_ctl_consumer.flags, set by the consumer with atomic OR).
 * DOORBELL: the consumer takes frames from the header ring by seq, raises `sleeping`
 * before each sleep and wants a wake only then, where `sleeping` says it sleeps: a futex
 * wake (BELL_FUTEX), or one descriptor in its queue (BELL_QUEUE). Without it the producer
 * wakes a NO_QUEUE consumer on every commit and sends a queued one a descriptor per frame
 * (an older library, a sealed consumer that cannot write its entry, a queued one with
 * max_rate_hz). */
enum { CONS_FLAG_NEXT = 1u, CONS_FLAG_NO_QUEUE = 2u, CONS_FLAG_DOORBELL = 4u };
/* A raised bell (fshm_ctl_consumer.sleeping): where its consumer sleeps. A queued
 * consumer sleeps on latest_seq's futex only while the control region's bells_epoch names
 * the current epoch (its producer answers BELL_FUTEX with a FUTEX_WAKE), on its queue
 * otherwise; any other non-zero value is answered as BELL_FUTEX. */
enum { BELL_FUTEX = 1u, BELL_QUEUE = 2u };

typedef struct fshm_ctl_pool {
    uint16_t pool_id;
    uint16_t reserved0;
    uint32_t stride_bytes;
    uint32_t nslots;
    uint32_t reserved1;
    char uri[FSHM_URI_MAX];
} fshm_ctl_pool;   /* 512 bytes */

typedef struct fshm_ctl {
    uint64_t magic;             /* 0 */
    uint32_t version;           /* 8 */
    uint32_t stream_id;         /* 12 */
    uint64_t epoch;             /* 16: current epoch, 0 = never produced (atomic) */
    uint64_t latest_seq;        /* 24: newest committed seq + 1, 0 = none (atomic) */
    uint64_t producer_pid;      /* 32 */
    uint64_t producer_start;    /* 40: /proc/<pid>/stat starttime, guards pid reuse */
    uint64_t activity_ns;       /* 48: CLOCK_MONOTONIC of the last publish/heartbeat */
    uint64_t start_ns;          /* 56 */
    uint8_t reserved0;          /* 64 */
    uint8_t state;              /* 65: CTL_STATE_* (atomic) */
    uint16_t flags;             /* 66: CTL_FLAG_* (atomic) */
    uint32_t consumers_gen;     /* 68: bumped on every consumer table change (atomic) */
    uint64_t frames;            /* 72 */
    uint64_t drops_nopool;      /* 80 */
    uint64_t desc_sent;         /* 88 */
    uint64_t desc_dropped;      /* 96: queue full */
    uint64_t pruned;            /* 104: dead consumers removed */
    uint64_t announce_seq;      /* 112: seqlock over the announce block, odd while writing */
    uint8_t control[FSHM_CONTROL_BYTES]; /* 120: the application's, never interpreted (atomic) */
    char name[64];              /* 128 */
    /* announce block */
    uint64_t announce_epoch;    /* 192 */
    uint32_t header_nslots;     /* 200 */
    uint32_t npools;            /* 204 */
    char header_uri[FSHM_URI_MAX + 16]; /* 208 .. 720 */
    fshm_ctl_pool pools[FSHM_MAX_POOLS]; /* 720 .. 2768 */
    uint32_t producer_cpu;      /* 2768: CPU of the producer's last loan + 1, 0 = unknown (atomic, a hint) */
    uint32_t reserved1;         /* 2772 */
    uint64_t bells_epoch;       /* 2776: the epoch whose producer wakes a BELL_FUTEX queued consumer
                                 * with a FUTEX_WAKE (atomic; 0: none does) */
    uint8_t reserved2[FSHM_CTL_HEADER_BYTES - 2784];
} fshm_ctl;

typedef struct fshm_ctl_consumer {
    uint32_t state;             /* 0: CONS_* (atomic) */
    uint32_t flags;             /* 4: CONS_FLAG_*: bit0 process-all, bit1 no queue (futex) */
    uint64_t pid;               /* 8 */
    uint64_t pid_start;         /* 16 */
    uint64_t attach_ns;         /* 24 */
    uint64_t delivered;         /* 32: written by the producer */
    uint64_t queue_full;        /* 40: written by the producer */
    uint64_t last_seq;          /* 48: written by the consumer: newest seq taken + 1 */
    uint32_t max_rate_hz;       /* 56: 0 = every frame */
    uint32_t sleeping;          /* 60: DOORBELL consumers: BELL_* around a sleep, else 0 (atomic) */
    char name[32];              /* 64 */
    char queue[32];             /* 96 */
} fshm_ctl_consumer;

_Static_assert(sizeof(fshm_ctl) == FSHM_CTL_HEADER_BYTES, "control header size");
_Static_assert(sizeof(fshm_ctl_pool) == 512, "control pool entry size");
_Static_assert(sizeof(fshm_ctl_consumer) == FSHM_CONSUMER_BYTES, "consumer entry size");
_Static_assert(offsetof(fshm_ctl, control) == 120 && FSHM_CONTROL_BYTES == 8, "ctl control bytes");
_Static_assert(offsetof(fshm_ctl, name) == 128, "ctl name offset");
_Static_assert(offsetof(fshm_ctl, announce_epoch) == 192, "announce offset");
_Static_assert(offsetof(fshm_ctl, pools) == 720, "pools offset");
_Static_assert(offsetof(fshm_ctl, producer_cpu) == 2768, "producer cpu hint offset");
_Static_assert(offsetof(fshm_ctl, bells_epoch) == 2776, "futex bells epoch offset");
_Static_assert(offsetof(fshm_ctl_consumer, sleeping) == 60, "consumer doorbell word offset");

static inline fshm_ctl_consumer *ctl_consumer(void *ctl_base, unsigned i)
{
    return (fshm_ctl_consumer *)((uint8_t *)ctl_base + FSHM_CTL_HEADER_BYTES + i * FSHM_CONSUMER_BYTES);
}

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STORE_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define ADD_RLX(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)

/* ---- mappings ---- */
struct fshm_map {
    int refs;          /* atomic */
    int writable;
    void *base;
    size_t size;
};
int fshm_map_create(int fd, size_t size, int writable, int populate, fshm_map **out);

/* ---- paths and files (fshm_path.c) ---- */
#define FSHM_PATH_MAX 512
typedef struct fshm_paths {
    char base[FSHM_PATH_MAX];     /* canonical base directory */
    char ns_dir[FSHM_PATH_MAX];   /* base/tensorpool-<user>/<ns> */
    char stream_dir[FSHM_PATH_MAX];
    char ctl[FSHM_PATH_MAX];
    char name[FSHM_NAME_MAX + 1];
    uint32_t stream_id;
    int any_name;   /* addressed by id only: accept whatever name the stream has */
} fshm_paths;
/* The base directory to use: configured, else $FRAMESHM_DIR, else /dev/shm (absolute). */
int fshm_base_dir(const char *configured, const char **out);
int fshm_resolve(const fshm_stream_addr *addr, int create_dirs, fshm_paths *out);
int fshm_mkdir_private(const char *path, unsigned mode);
int fshm_create_file(const char *path, size_t size, unsigned mode, int *fd_out);
int fshm_uri_format(char *out, size_t cap, const char *path);
/* Parses a region URI, checks containment under base and opens it no-follow. */
int fshm_uri_open(const char *uri, const char *base, int writable, int *fd_out, size_t *size_out);
/* fshm_uri_open + a mapping of the whole file (writable ones pre-faulted). */
int fshm_uri_map(const char *uri, const char *base, int writable, fshm_map **out);
int fshm_remove_tree(const char *dir);
/* Creates the user, namespace and stream directories of p (private, ours), retrying when a
 * parent is removed meanwhile by fshm_remove_empty_parents. */
int fshm_make_stream_dir(const fshm_paths *p);
/* <base>/tensorpool-<user>, the parent of p->ns_dir. */
void fshm_user_dir(const fshm_paths *p, char *out, size_t cap);
/* Removes p's namespace directory and then its user directory if they are empty: called
 * after a stream directory was removed, so that a clean stop leaves nothing behind. */
void fshm_remove_empty_parents(const fshm_paths *p);
/* fshm_remove_tree(p->stream_dir), then fshm_remove_empty_parents. */
int fshm_remove_stream_dir(const fshm_paths *p);
/* sealed: the grant's regions came as descriptors, its URIs only name them (nothing on
 * disk to resolve: the names are checked lexically). */
int fshm_paths_from_grant(const char *base_dir, const fshm_grant *g, int sealed, fshm_paths *p);
int fshm_statvfs_free(const char *dir, uint64_t *free_bytes);

/* ---- processes (fshm_proc.c) ---- */
uint64_t fshm_proc_start_time(int64_t pid);   /* 0 if unknown */
int fshm_pid_alive(int64_t pid, uint64_t start_time);
uint64_t fshm_self_start_time(void);

/* ---- superblocks and slots (fshm_region.c) ---- */
void fshm_superblock_write(uint8_t *base, uint64_t epoch, uint32_t stream_id, int16_t region_type,
                           uint16_t pool_id, uint32_t nslots, uint32_t slot_bytes,
                           uint32_t stride_bytes, uint64_t pid, uint64_t start_ns);
int fshm_superblock_check(const uint8_t *base, size_t map_size, uint64_t epoch, uint32_t stream_id,
                          int16_t region_type, uint16_t pool_id, uint32_t nslots,
                          uint32_t slot_bytes, uint32_t stride_bytes);
void fshm_slot_header_write(uint8_t *slot, uint32_t values_len, uint32_t payload_slot,
                            uint16_t pool_id, uint64_t timestamp_ns, const fshm_tensor *t);
/* Decodes a private copy of a slot header; validates every field. */
typedef struct fshm_slot_view {
    uint64_t seq_commit;
    uint32_t values_len;
    uint32_t payload_slot;
    uint16_t pool_id;
    uint64_t timestamp_ns;
    fshm_tensor tensor;
} fshm_slot_view;
int fshm_slot_header_decode(const uint8_t slot[FSHM_SLOT_BYTES], fshm_slot_view *out);
int fshm_tensor_check(const fshm_tensor *t, size_t nbytes, int fill_strides, fshm_tensor *out);
/* The stride of the smallest pool that holds nbytes; 0 when above FSHM_MAX_STRIDE. */
uint32_t fshm_pool_stride_for(uint64_t nbytes);
/* The layout limits of frameshm.h as predicates: every check (config, profile, announce)
 * goes through these. */
static inline int fshm_valid_nslots(uint32_t n)
{
    return n >= 1 && n <= FSHM_MAX_NSLOTS && (n & (n - 1)) == 0;
}
static inline int fshm_valid_npools(uint32_t n) { return n >= 1 && n <= FSHM_MAX_POOLS; }
static inline int fshm_valid_stride(uint32_t s)
{
    return s >= FSHM_MIN_STRIDE && s <= FSHM_MAX_STRIDE && (s & (s - 1)) == 0;
}
void fshm_desc_encode(uint8_t out[FSHM_DESC_BYTES], uint32_t stream_id, uint64_t epoch,
                      uint64_t seq, uint64_t publish_ns);
int fshm_desc_decode(const uint8_t *msg, size_t len, uint32_t stream_id, uint64_t *epoch,
                     uint64_t *seq, uint64_t *publish_ns);

/* ---- control region (fshm_control.c) ---- */
typedef struct fshm_ctl_handle {
    int fd;
    fshm_map *map;
    fshm_ctl *ctl;
    uint64_t dev, ino;
} fshm_ctl_handle;
int fshm_ctl_open(const fshm_paths *p, int create, fshm_ctl_handle *h);
void fshm_ctl_close(fshm_ctl_handle *h);
/* Maps an open control region descriptor (a driver's sealed memfd); on success the handle
 * owns fd. fshm_ctl_init writes a new region's identity. */
int fshm_ctl_map_fd(int fd, const fshm_paths *p, fshm_ctl_handle *h);
void fshm_ctl_init(fshm_ctl *c, const fshm_paths *p);
int fshm_ctl_validate(const fshm_ctl *c, size_t map_size, const fshm_paths *p);
int fshm_ctl_same_file(const fshm_ctl_handle *h, const char *path);
/* Unlinks the queues of consumers whose process died; returns how many were pruned. */
int fshm_ctl_prune(fshm_ctl *c);
/* The same, listing each dead consumer in out[*n] (up to FSHM_MAX_CONSUMERS entries);
 * dry_run: list them and change nothing. */
int fshm_ctl_prune_report(fshm_ctl *c, int dry_run, fshm_gc_queue *out, uint32_t *n);
int fshm_ctl_live_consumers(fshm_ctl *c);
/* The consumer lifecycle, in an order where a SIGKILL at any instruction leaves only what
 * pruning removes: claim a slot (it names us from the CAS on), record the queue's name in
 * it, create the queue, activate; on the way out mark the slot released (it still names
 * us), unlink the queue, free the slot. */
/* Claims a free slot for this process (CLAIMING|pid): its index, or <0. */
int fshm_ctl_claim(fshm_ctl *c, const char *consumer, uint32_t max_rate_hz);
/* The claimed slot's queue field: the name about to be created ("" for none). */
char *fshm_ctl_queue_field(fshm_ctl *c, int idx);
/* CLAIMING|pid -> ACTIVE (no_queue: the consumer waits on latest_seq, see
 * CONS_FLAG_NO_QUEUE; the flags follow from no_queue and max_rate_hz as
 * fshm_ctl_doorbell_for says). -ESTALE if the slot was taken from us meanwhile. */
int fshm_ctl_activate(fshm_ctl *c, int idx, int no_queue, uint32_t max_rate_hz);
/* Whether a consumer that writes its own entry registers with CONS_FLAG_DOORBELL: every
 * one but a queued consumer with max_rate_hz, whose descriptors the producer paces. */
static inline int fshm_ctl_doorbell_for(int no_queue, uint32_t max_rate_hz)
{
    return no_queue || !max_rate_hz;
}
/* claim + queue field + activate, for a queue that exists already (moving to a replaced
 * control region, or re-registering after being pruned). */
int fshm_ctl_register(fshm_ctl *c, const char *consumer, const char *queue, uint32_t max_rate_hz,
                      int no_queue);
/* Releases our slot idx if it still holds `queue` (ours, claimed or active): marks it
 * PRUNING|pid, unlinks the queue when unlink_queue (before the slot is freed, so a kill in
 * between leaves a slot that names both), then frees it. */
void fshm_ctl_release(fshm_ctl *c, int idx, const char *queue, int unlink_queue);
/* Sealed transport: the driver writes a consumer's entry for process pid (its peer's
 * SO_PEERCRED) and frees it when the lease ends; the queue must be named for pid (or ""
 * with CONS_FLAG_NO_QUEUE). Returns the index or <0. release_peer frees entry idx only if
 * it still names pid and queue (1 if freed). */
int fshm_ctl_register_peer(fshm_ctl *c, int64_t pid, const char *consumer, const char *queue,
                           uint32_t flags, uint32_t max_rate_hz);
int fshm_ctl_release_peer(fshm_ctl *c, int idx, int64_t pid, const char *queue);
int fshm_ctl_producer_state(const fshm_ctl *c, int64_t *pid);
typedef struct fshm_announce {
    uint64_t epoch;
    uint32_t header_nslots;
    uint32_t npools;
    char header_uri[FSHM_URI_MAX + 16];
    fshm_ctl_pool pools[FSHM_MAX_POOLS];
} fshm_announce;
int fshm_ctl_read_announce(const fshm_ctl *c, fshm_announce *a);
void fshm_ctl_write_announce(fshm_ctl *c, const fshm_announce *a);

/* ---- epochs (fshm_provision.c): the one path by which a stream's regions come to exist,
 * for the driver (fshm_provision_epoch) and for a writer that manages its own stream ---- */
typedef struct fshm_new_epoch {
    fshm_grant grant;               /* what was created, as an attach grants it (no lease) */
    fshm_announce announce;         /* the same, as the control region announces it */
    char dir[FSHM_PATH_MAX + 32];   /* <stream_dir>/<epoch> */
} fshm_new_epoch;
/* Validates a profile against the layout limits (-EINVAL with a message). */
int fshm_profile_check(const fshm_profile *p);
/* A self-managed writer's layout as a checked profile: each pool size rounded up to a
 * stride, strides sorted and merged, pool ids 1..n in stride order, no group. */
int fshm_profile_for_pools(uint32_t nslots, uint32_t npools, const uint32_t *pool_bytes,
                           unsigned file_mode, fshm_profile *out);
/* Creates the stream's next epoch from a checked profile, with the control region open
 * (and whatever excludes other creators held: the producer lock, or the driver's own
 * serialisation): picks the epoch number, creates <stream_dir>/<epoch>/ and its regions
 * (full size reserved, superblocks written, mode/group from the profile). Nothing is
 * announced yet; on failure nothing it created is left. replace_first: remove the
 * stream's other epoch directories before creating (their space is needed, or they are
 * a dead producer's). New epoch = max(current + 1, min_epoch, newest directory + 1). */
int fshm_epoch_create(const fshm_paths *p, fshm_ctl *c, const fshm_profile *prof,
                      uint64_t min_epoch, int replace_first, fshm_new_epoch *out);
/* Announces the epoch and publishes the epoch word (release: readers key everything off
 * it, so the producer fields must be set before), then removes every other epoch
 * directory of the stream. */
void fshm_epoch_publish(const fshm_paths *p, fshm_ctl *c, const fshm_new_epoch *e);

/* ---- sealed regions (fshm_sealed.c): the driver's memfd transport ---- */
/* Descriptors an attach response may carry: control region, header ring, the pools. */
#define FSHM_LEASE_MAX_FDS (2 + FSHM_MAX_POOLS)
/* How many came with the attach (0: the file transport); take_fd hands one over (-1 when
 * already taken or out of range). Untaken ones close with the lease. */
unsigned fshm_lease_nfds(const fshm_lease *l);
int fshm_lease_take_fd(fshm_lease *l, unsigned i);
int fshm_lease_has_fd(const fshm_lease *l, unsigned i);
/* A memfd of `size` bytes, mode 0600, pages reserved, sealed against shrinking, growing
 * and further sealing. */
int fshm_sealed_create(const char *label, uint64_t size, int *fd_out);
/* Refuses a descriptor that is not a regular file sealed against resizing, of exactly
 * `size` bytes (and open read-write when `writable`). */
int fshm_sealed_check(int fd, size_t size, int writable, const char *what);
int fshm_sealed_map(int fd, size_t size, int writable, const char *what, fshm_map **out);
/* A read-only description of the same memfd (through /proc/self/fd); <0 on error. */
int fshm_sealed_readonly(int fd);
/* Sealed consumers' requests to the driver over their lease's socket (frameshm's
 * extension messages, docs/driver-protocol.md): register in the consumer table (returns
 * the entry index), set a control byte. The lease's thread delivers the answer. */
int fshm_lease_register_consumer(fshm_lease *l, const char *consumer, const char *queue,
                                 uint32_t flags, uint32_t max_rate_hz);
int fshm_lease_set_control(fshm_lease *l, unsigned index, uint8_t value);

/* ---- waiting without a queue (fshm_queue.c) ----
 * A consumer that could not get a queue waits on the low 32 bits of the control region's
 * latest_seq (a shared futex: the region is a MAP_SHARED file); producers wake it after
 * each commit once a consumer flagged CONS_FLAG_NO_QUEUE is registered. */
void fshm_futex_wake(uint64_t *latest_seq);
/* Sleeps while the word still equals (uint32_t)seen, at most timeout_ns: -EINTR if a
 * signal handler ran, 1 if the time ran out, else 0 (woken, or the word had changed). */
int fshm_futex_wait(uint64_t *latest_seq, uint64_t seen, uint64_t timeout_ns);

/* ---- message queues (fshm_queue.c) ---- */
/* Whether queue name q was created by process pid ("/fshm-<pid hex>-..."). */
int fshm_queue_named_for(const char *q, uint64_t pid);
/* Creates this process's next queue. record (may be NULL): where each candidate name is
 * written before the queue is created (a claimed consumer slot), so that no queue exists
 * that the slot does not name. */
int fshm_queue_create(char name[32], mqd_t *out, char *record);
/* The queue-creation failures that mean "no more queues" (system-wide queues_max,
 * RLIMIT_MSGQUEUE, descriptors, no mqueue support): a consumer then goes on without one. */
int fshm_queue_unavailable(int rc);
int fshm_queue_open_send(const char *name, mqd_t *out);
int fshm_queue_limit(void);
/* The owner a queue's name records: pid, and start time (0 in names made before they
 * carried it). -1 for a name frameshm does not make. Takes the name with or without the
 * leading '/' (the mqueue file system lists them without). */
int fshm_queue_owner(const char *name, int64_t *pid, uint64_t *start);
/* Where an mqueue file system is mounted (/dev/mqueue preferred); -ENOENT with a message
 * when none is. */
int fshm_mqueue_dir(char *out, size_t cap);

/* fshm_fill.c: how publish() copies a payload of FSHM_FILL_TEAM_MIN or more into its
 * slot (below, plain memcpy; and a helper's wake-up would cost more than the pieces it
 * could take over). fill_stream: the calling thread alone, with streaming stores on x86-64.
 * A fill team: the caller plus helper threads. */
#define FSHM_FILL_TEAM_MIN (1u << 20)
typedef struct fshm_fill_team fshm_fill_team;
void fshm_fill_stream(void *dst, const void *src, size_t n);
/* 1 when a ring of ring_bytes (nslots x a pool's stride) fits the cache well enough that
 * its slots are still cached when they are filled again: plain stores, not fill_stream. */
int fshm_fill_ring_warm(size_t ring_bytes);
int fshm_fill_team_start(unsigned nthreads, fshm_fill_team **out);
void fshm_fill_copy(fshm_fill_team *t, void *dst, const void *src, size_t n);
void fshm_fill_team_stop(fshm_fill_team *t);         /* joins the helpers, frees t */
void fshm_fill_team_forget(fshm_fill_team *t);       /* in a fork()ed child: frees t */
uint64_t fshm_fill_team_helper_pieces(const fshm_fill_team *t);

#endif
