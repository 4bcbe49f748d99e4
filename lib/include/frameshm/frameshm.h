/*
 * libframeshm: shared-memory frame/tensor streams between processes on one host.
 *
 * The public C API (docs/c-api.md). No Python dependency. Every function that can fail
 * returns 0 (or a non-negative value) on success and a negative errno-style code on
 * failure; fshm_last_error() then holds a human-readable message for the calling thread.
 *
 * Build against it with `cc prog.c $(pkg-config --cflags --libs frameshm)`.
 * Byte layout of everything in shared memory: docs/wire-format.md.
 */
#ifndef FRAMESHM_FRAMESHM_H
#define FRAMESHM_FRAMESHM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Only what is marked FSHM_API is exported from the shared library (it is built with
 * -fvisibility=hidden); everything else is internal to libframeshm. */
#if defined(FSHM_BUILDING_LIB) && defined(__GNUC__)
#define FSHM_API __attribute__((visibility("default")))
#else
#define FSHM_API
#endif

/* Version of the headers. The library's own is fshm_version(); a program built against
 * one minor version runs against any later minor version of the same major (SONAME
 * libframeshm.so.<major>). */
#define FSHM_VERSION_MAJOR 0
#define FSHM_VERSION_MINOR 2
#define FSHM_VERSION_PATCH 0
#define FSHM_VERSION_STRING "0.2.0"
#define FSHM_MAKE_VERSION(major, minor, patch) ((major) * 10000 + (minor) * 100 + (patch))
#define FSHM_VERSION FSHM_MAKE_VERSION(FSHM_VERSION_MAJOR, FSHM_VERSION_MINOR, FSHM_VERSION_PATCH)

/* The library's version (FSHM_MAKE_VERSION form); its parts through the pointers (any may
 * be NULL). Compare with FSHM_VERSION to detect a header/library mismatch. */
FSHM_API int fshm_version(int *major, int *minor, int *patch);
FSHM_API const char *fshm_version_string(void);

#define FSHM_MAX_DIMS 8
/* A stream's layout (writer config and driver profile alike): a header ring of nslots
 * slots, a power of two up to FSHM_MAX_NSLOTS; 1..FSHM_MAX_POOLS payload pools whose
 * strides are powers of two from FSHM_MIN_STRIDE to FSHM_MAX_STRIDE bytes. */
#define FSHM_MAX_NSLOTS (1u << 24)
#define FSHM_MAX_POOLS 4
#define FSHM_MIN_STRIDE 64u
#define FSHM_MAX_STRIDE 0x80000000u
#define FSHM_MAX_CONSUMERS 64
#define FSHM_MAX_FILL_THREADS 8   /* fshm_writer_config.fill_threads */
#define FSHM_NAME_MAX 63          /* stream, namespace and consumer names */
/* Control bytes: a small area of every stream's control region that libframeshm carries
 * but never interprets, for the application (e.g. a controller steering the rate of the
 * producer it watches). The stream's writer and each of its readers, passive ones too,
 * may read and set every byte; each byte is read and written atomically on its own
 * (release/acquire), starts at 0 and lasts as long as the control region: producer
 * restarts keep it, a stream removed and created anew starts over at 0. */
#define FSHM_CONTROL_BYTES 8
#define FSHM_CONSUMER_NAME_MAX 31

/* Errors: negative errno values where one fits, frameshm-specific codes below -1000. */
#define FSHM_E_CORRUPT (-1001)        /* shared memory failed validation */
#define FSHM_E_PRODUCER_DEAD (-1002)  /* timed out and the producer process is gone */
#define FSHM_E_NOPOOL (-1003)         /* frame larger than every payload pool: dropped */
#define FSHM_E_LIMIT (-1004)          /* a system limit (message queues) was hit */
#define FSHM_E_COLLISION (-1005)      /* stream id already used by another name */
#define FSHM_E_OVERRUN (-1006)        /* producer kept overwriting the slot during a copy */
#define FSHM_E_CLOSED (-1007)         /* object already closed */

FSHM_API const char *fshm_last_error(void);
/* The system errno behind the last error of this thread (0 if none). */
FSHM_API int fshm_last_errno(void);
FSHM_API const char *fshm_strerror(int code);
/* Records `code` and a message as this thread's last error and returns `code`: for code
 * layered on libframeshm (device sources, bindings) that reports through the same
 * fshm_last_error(). The message may wrap the previous one ("ctx: %s", fshm_last_error()). */
FSHM_API int fshm_set_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Element types: values of the wire spec's Dtype enum. */
enum fshm_dtype {
    FSHM_DTYPE_UNKNOWN = 0,
    FSHM_DTYPE_UINT8 = 1,
    FSHM_DTYPE_INT8 = 2,
    FSHM_DTYPE_UINT16 = 3,
    FSHM_DTYPE_INT16 = 4,
    FSHM_DTYPE_UINT32 = 5,
    FSHM_DTYPE_INT32 = 6,
    FSHM_DTYPE_UINT64 = 7,
    FSHM_DTYPE_INT64 = 8,
    FSHM_DTYPE_FLOAT32 = 9,
    FSHM_DTYPE_FLOAT64 = 10,
    FSHM_DTYPE_BOOLEAN = 11,
    FSHM_DTYPE_BYTES = 13,
};
/* Size in bytes of one element, 0 for unknown types. */
FSHM_API int fshm_dtype_size(int dtype);

enum fshm_major_order { FSHM_ORDER_ROW = 1, FSHM_ORDER_COLUMN = 2 };

typedef struct fshm_tensor {
    int16_t dtype;
    int16_t major_order;          /* FSHM_ORDER_ROW unless set */
    uint8_t ndims;                /* 1..FSHM_MAX_DIMS */
    int32_t dims[FSHM_MAX_DIMS];
    int32_t strides[FSHM_MAX_DIMS]; /* bytes; 0 = contiguous, inferred from order */
} fshm_tensor;

/* Where a stream lives. NULL/0 fields take their defaults. */
typedef struct fshm_stream_addr {
    const char *name;       /* stream name; NULL when addressed by stream_id only */
    uint32_t stream_id;     /* 0 = derived from name */
    const char *base_dir;   /* NULL = $FRAMESHM_DIR or /dev/shm */
    const char *ns;         /* NULL = $FRAMESHM_NAMESPACE or "default" */
} fshm_stream_addr;

/* Stream id a name maps to (stable across processes and builds). */
FSHM_API uint32_t fshm_stream_id_for_name(const char *name);
FSHM_API int fshm_validate_name(const char *name, const char *what);

/* ---- writer (producer) ---- */

typedef struct fshm_writer fshm_writer;
typedef struct fshm_map fshm_map;

/* Config structs carry their own size so that later versions can add fields at the end
 * without breaking programs built against older headers: start from the _INIT macro (or
 * set struct_size = sizeof the struct); fields past the caller's struct_size take their
 * defaults. A zero struct_size is refused (-EINVAL). */
#define FSHM_WRITER_CONFIG_INIT {.struct_size = sizeof(fshm_writer_config)}
#define FSHM_READER_CONFIG_INIT {.struct_size = sizeof(fshm_reader_config)}
#define FSHM_LEASE_CONFIG_INIT {.struct_size = sizeof(fshm_lease_config)}
#define FSHM_PROFILE_INIT {.struct_size = sizeof(fshm_profile), .gid = -1}

typedef struct fshm_writer_config {
    uint32_t struct_size;                  /* sizeof(fshm_writer_config) */
    fshm_stream_addr addr;
    uint32_t nslots;                       /* power of two, 1..FSHM_MAX_NSLOTS */
    uint32_t npools;                       /* 1..FSHM_MAX_POOLS */
    uint32_t pool_bytes[FSHM_MAX_POOLS];   /* rounded up to a stride (FSHM_MIN_STRIDE * 2^k) */
    unsigned file_mode;                    /* 0 = 0600 */
    /* Driver model: attach through the driver at this socket instead of creating the
     * regions (nslots/pools/file_mode then come from the driver's profile). */
    const char *driver;
    uint32_t client_id;                    /* 0 = generated */
    int publish_mode;                      /* 0 = EXISTING_OR_CREATE */
    /* Threads that copy a payload of 1 MiB or more in fshm_writer_publish: the caller and
     * fill_threads - 1 helper threads the writer starts at its first such publish and
     * joins at close (worth it only where a CPU is spare: docs/c-api.md). 0 (the default)
     * and 1: the caller alone. At most FSHM_MAX_FILL_THREADS. Loans are filled by the
     * application and never use them. */
    uint32_t fill_threads;
} fshm_writer_config;

typedef struct fshm_loan {
    void *data;
    uint64_t seq;
    uint32_t capacity;   /* stride of the chosen pool */
    uint16_t pool_id;
    uint16_t pool_index;
    uint32_t slot;
} fshm_loan;

FSHM_API int fshm_writer_open(const fshm_writer_config *cfg, fshm_writer **out);
/* Claims the next slot for nbytes of payload (marks it in progress). */
FSHM_API int fshm_writer_loan(fshm_writer *w, size_t nbytes, fshm_loan *out);
/* Tags the next committed frame as derived from frame `ref_seq` of another stream
 * (e.g. detections from a camera frame). Carried in the TensorHeader padding, which the
 * wire spec leaves to implementations; see docs/wire-format.md. */
FSHM_API void fshm_writer_set_ref(fshm_writer *w, uint64_t ref_seq);
/* Numbers the next frame `seq` instead of the next in line: a relay (the Zenoh bridge)
 * keeps its source's sequence numbers, gaps included, which consumers count as skipped
 * frames. -EINVAL if `seq` is behind the next seq (seqs never go back) or a loan is out. */
FSHM_API int fshm_writer_skip_to(fshm_writer *w, uint64_t seq);
/* Commits the outstanding loan: header, seqlock commit, descriptors to consumers. */
FSHM_API int fshm_writer_commit(fshm_writer *w, const fshm_tensor *t, size_t nbytes, uint64_t timestamp_ns);
/* Loan + one memcpy + commit. */
FSHM_API int fshm_writer_publish(fshm_writer *w, const void *src, size_t nbytes, const fshm_tensor *t,
                        uint64_t timestamp_ns);
/* Control byte `index` (< FSHM_CONTROL_BYTES): its value 0..255; -EINVAL for a bad index,
 * FSHM_E_LEASE while a driver-model writer holds no control region (its lease ended and
 * attaching again has not succeeded yet). */
FSHM_API int fshm_writer_control(const fshm_writer *w, unsigned index);
/* Sets control byte `index`: 0, or the errors of fshm_writer_control. */
FSHM_API int fshm_writer_set_control(fshm_writer *w, unsigned index, uint8_t value);
FSHM_API uint64_t fshm_writer_epoch(const fshm_writer *w);
FSHM_API uint32_t fshm_writer_stream_id(const fshm_writer *w);
FSHM_API uint32_t fshm_writer_nslots(const fshm_writer *w);
FSHM_API uint32_t fshm_writer_npools(const fshm_writer *w);
/* Base address and length of payload pool i (the whole region incl. superblock). */
FSHM_API void *fshm_writer_pool_base(const fshm_writer *w, unsigned i, size_t *len, uint32_t *stride,
                            uint16_t *pool_id);
FSHM_API uint64_t fshm_writer_next_seq(const fshm_writer *w);
/* Driver model: changes whenever the writer re-attached and its pools moved (pool
 * mappings/bases fetched earlier are stale then). */
FSHM_API uint32_t fshm_writer_attach_gen(const fshm_writer *w);
FSHM_API uint64_t fshm_writer_lease_id(const fshm_writer *w);   /* 0 without a driver */
/* 1 when the next loan needs no driver round trip (no driver, or the lease is fine); 0
 * when it will re-attach first (bindings release their interpreter lock for that). */
FSHM_API int fshm_writer_lease_ok(const fshm_writer *w);
/* Mapping of payload pool i (borrowed; fshm_map_ref to keep it past close). */
FSHM_API fshm_map *fshm_writer_pool_map(const fshm_writer *w, unsigned i);
/* Refreshes the control region's activity time without publishing. The superblocks'
 * activity_timestamp_ns (the spec's liveness) needs no call: a library thread refreshes
 * it every 0.5 s for every open writer. */
FSHM_API void fshm_writer_heartbeat(fshm_writer *w);
/* unlink_files: remove the stream's regions (and the control region when no live
 * consumer is registered) so nothing is left in the base directory. */
FSHM_API void fshm_writer_close(fshm_writer *w, int unlink_files);

/* ---- mappings: refcounted so frames/views can outlive a reader ---- */

FSHM_API void fshm_map_ref(fshm_map *m);
FSHM_API void fshm_map_unref(fshm_map *m);
FSHM_API void *fshm_map_base(const fshm_map *m);
FSHM_API size_t fshm_map_size(const fshm_map *m);
FSHM_API int fshm_map_writable(const fshm_map *m);

/* ---- reader (consumer) ---- */

typedef struct fshm_reader fshm_reader;

typedef struct fshm_reader_config {
    uint32_t struct_size;   /* sizeof(fshm_reader_config) */
    fshm_stream_addr addr;
    const char *consumer;   /* label in the consumer table (fshm_stream_info_get);
                             * NULL = "pid-<pid>" */
    int spin;               /* 1: predictive spin just before a steady stream's next frame
                             * is due (lower latency, a few % of a core; a window opening
                             * on the CPU the producer fills on moves the thread off it
                             * first, its affinity kept), and on a fast stream (a message
                             * every 50 us or less) a poll of at most 20 us, never on the
                             * producer's CPU, before a reader that caught up sleeps;
                             * 0: always sleep */
    int passive;            /* 1: no queue and no registration — for peeking at the newest
                             * frame and the control bytes without being a consumer */
    uint32_t max_rate_hz;   /* >0: the producer sends this consumer at most this many
                             * descriptors per second (others still get every frame); such
                             * a queued reader gets a descriptor per frame of its share,
                             * where every other reader takes frames from the header ring
                             * and is woken only from a sleep (a futex wake; a descriptor
                             * from an older producer) */
    const char *driver;     /* driver model: attach through the driver at this socket */
    uint32_t client_id;     /* 0 = generated */
    int publish_mode;       /* 0 = EXISTING_OR_CREATE */
    int lease_events;       /* 1: report a lost lease as FSHM_E_LEASE instead of reattaching */
    int foreign;            /* 1: the stream has no frameshm control region (another
                             * implementation of the wire spec writes it): find its newest
                             * epoch from the directory layout and superblocks, follow the
                             * header ring by seq (docs/wire-format.md §9). No queue, no
                             * registration, no control bytes. */
    int no_queue;           /* 1: register without a descriptor queue: frames are taken from
                             * the header ring by seq (no syscall per frame while the reader
                             * keeps up) and it sleeps on latest_seq's futex, which the
                             * producer wakes only while it sleeps, as with a queue; it uses
                             * none of the system's queues, and an older producer wakes it
                             * on every commit (docs/wire-format.md §7). Losses count as
                             * with a queue. */
} fshm_reader_config;

typedef struct fshm_frame {
    uint64_t seq;
    uint64_t epoch;
    uint64_t timestamp_ns;   /* capture time from the slot header (CLOCK_MONOTONIC) */
    uint64_t publish_ns;     /* the producer's commit time (CLOCK_MONOTONIC), from the slot
                             * header; 0 if the producer does not record it */
    uint64_t skipped;        /* frames between the previously returned one and this */
    const void *data;
    size_t nbytes;
    fshm_tensor tensor;
    fshm_map *map;           /* pool mapping holding data: borrowed, fshm_map_ref to keep */
    uint32_t slot;
    uint16_t pool_id;
    int has_ref;             /* frame carries ref_seq (fshm_writer_set_ref) */
    uint64_t ref_seq;
} fshm_frame;

enum fshm_producer_state {
    FSHM_PRODUCER_NONE = 0,   /* no producer has attached yet */
    FSHM_PRODUCER_ALIVE = 1,
    FSHM_PRODUCER_DEAD = 2,   /* process gone without closing */
    FSHM_PRODUCER_CLOSED = 3, /* closed cleanly */
};

FSHM_API int fshm_reader_open(const fshm_reader_config *cfg, fshm_reader **out);
/* Blocks up to timeout_ns (<0: forever) for a frame newer than the last one returned
 * and returns the newest committed frame (a rate-capped reader: once its descriptor came,
 * the queue drained). */
FSHM_API int fshm_reader_wait_latest(fshm_reader *r, int64_t timeout_ns, fshm_frame *f);
/* Process-all: the next frame in order; f->skipped counts frames lost (overruns). */
FSHM_API int fshm_reader_wait_next(fshm_reader *r, int64_t timeout_ns, fshm_frame *f);
/* Newest committed frame without waiting; -EAGAIN when none is newer than the last frame
 * this reader returned. */
FSHM_API int fshm_reader_peek_latest(fshm_reader *r, fshm_frame *f);
/* 1 if the slot still holds frame f (seqlock re-check after using its data). */
FSHM_API int fshm_frame_valid(fshm_reader *r, const fshm_frame *f);
/* The header ring mapping of the reader's current epoch (borrowed, valid until the next
 * call on r; NULL when nothing is mapped). A caller that takes a reference (fshm_map_ref)
 * right after a frame was returned can re-check that frame with fshm_ring_holds later,
 * from any thread, without the reader: see the thread-safety contract in docs/c-api.md. */
FSHM_API fshm_map *fshm_reader_ring(const fshm_reader *r);
/* 1 if slot `slot` of the header ring `ring` still holds the committed frame `seq`, else 0
 * (also for a slot outside the ring). A ring of a finished epoch is never written again, so
 * its frames stay valid: their pool is not reused either. */
FSHM_API int fshm_ring_holds(const fshm_map *ring, uint32_t slot, uint64_t seq);
/* Copies f's payload to dst (capacity >= f->nbytes) and checks it was not torn. */
FSHM_API int fshm_frame_copy(fshm_reader *r, const fshm_frame *f, void *dst, size_t capacity);
FSHM_API int fshm_reader_producer_state(fshm_reader *r, int64_t *pid);
/* Control byte `index` (< FSHM_CONTROL_BYTES) of the stream's current control region: a
 * stream removed and created anew is followed first (so a controller keeps steering it).
 * Its value 0..255, or -EINVAL for a bad index. */
FSHM_API int fshm_reader_control(fshm_reader *r, unsigned index);
/* Sets control byte `index`: 0, -EINVAL for a bad index, or the error that kept the reader
 * from following a replaced control region (the write never lands in the old one). Under
 * a driver's sealed transport the driver sets it (the reader's control region is
 * read-only): FSHM_E_REJECTED when its policy refuses us, FSHM_E_LEASE without a lease. */
FSHM_API int fshm_reader_set_control(fshm_reader *r, unsigned index, uint8_t value);
FSHM_API uint64_t fshm_reader_epoch(const fshm_reader *r);
/* 1 unless the next call may first re-attach through the driver (bindings release their
 * interpreter lock for that). */
FSHM_API int fshm_reader_lease_ok(const fshm_reader *r);
FSHM_API uint32_t fshm_reader_stream_id(const fshm_reader *r);
FSHM_API uint64_t fshm_reader_overruns(const fshm_reader *r);
FSHM_API uint64_t fshm_reader_drops(const fshm_reader *r);   /* frames dropped by validation */
/* Called from inside a wait when a predictive spin window opens (config.spin, frames
 * coming steadily): the next frame is due within the window and the reader is about to
 * poll for it. `prev` is the last frame this reader returned, read again just now (NULL
 * when its slot is being reused). On a shared host the code and data a consumer runs on
 * each frame go cold over a frame period, which costs the first frame after it tens of
 * microseconds (docs/benchmarks.md §11); a caller that touches them here takes that off
 * the frame's latency. Runs on the waiting thread, at most once per frame, while the
 * reader is inside its wait: it must not call into r. fn NULL: none (the default). */
typedef void (*fshm_window_fn)(void *arg, const fshm_frame *prev);
FSHM_API void fshm_reader_on_window(fshm_reader *r, fshm_window_fn fn, void *arg);
FSHM_API const char *fshm_reader_queue_name(const fshm_reader *r);
FSHM_API void fshm_reader_close(fshm_reader *r);

/* ---- driver model (SHM Driver Model Spec v1.0; docs/driver-protocol.md) ---- */

#define FSHM_E_LEASE (-1008)          /* the lease was revoked/expired or the driver went away */
#define FSHM_E_REJECTED (-1009)       /* the driver refused the attach (code != OK) */
#define FSHM_E_NODRIVER (-1010)       /* no driver listens on the control socket */
#define FSHM_URI_CAP 512

enum fshm_role { FSHM_ROLE_PRODUCER = 1, FSHM_ROLE_CONSUMER = 2 };
enum fshm_publish_mode { FSHM_REQUIRE_EXISTING = 1, FSHM_EXISTING_OR_CREATE = 2 };
enum fshm_response_code {
    FSHM_RESP_OK = 0, FSHM_RESP_UNSUPPORTED = 1, FSHM_RESP_INVALID_PARAMS = 2,
    FSHM_RESP_REJECTED = 3, FSHM_RESP_INTERNAL_ERROR = 4,
};
enum fshm_revoke_reason { FSHM_REVOKE_DETACHED = 1, FSHM_REVOKE_EXPIRED = 2, FSHM_REVOKE_REVOKED = 3 };

/* A stream's pool profile as the driver's policy gives it. */
typedef struct fshm_profile {
    uint32_t struct_size;                   /* sizeof(fshm_profile) */
    uint32_t header_nslots;                 /* power of two, 1..FSHM_MAX_NSLOTS */
    uint32_t npools;                        /* 1..FSHM_MAX_POOLS */
    uint16_t pool_id[FSHM_MAX_POOLS];       /* nonzero, distinct */
    uint32_t stride_bytes[FSHM_MAX_POOLS];  /* power of two, FSHM_MIN_STRIDE..FSHM_MAX_STRIDE */
    unsigned file_mode;                     /* 0 = 0600 */
    int64_t gid;                            /* -1 = leave the group alone */
} fshm_profile;

/* What a successful attach grants (ShmAttachResponse fields), also what provisioning
 * an epoch produces on the driver side. */
typedef struct fshm_grant_pool {
    uint16_t pool_id;
    uint32_t nslots;
    uint32_t stride_bytes;
    char uri[FSHM_URI_CAP];
} fshm_grant_pool;

typedef struct fshm_grant {
    uint64_t lease_id;
    uint64_t lease_expiry_ns;     /* CLOCK_MONOTONIC */
    uint32_t stream_id;
    uint64_t epoch;
    uint32_t layout_version;
    uint32_t header_nslots;
    uint16_t header_slot_bytes;
    uint8_t max_dims;
    char header_uri[FSHM_URI_CAP];
    uint32_t npools;
    fshm_grant_pool pools[FSHM_MAX_POOLS];
} fshm_grant;

/* Bytes of shared memory one stream of this profile occupies (all regions). */
FSHM_API uint64_t fshm_profile_footprint(const fshm_profile *p);

/* ---- driver side: provisioning a stream's regions (docs/driver-protocol.md) ---- */

/* Moves the stream to a new epoch: validates the profile, checks the base directory has
 * room for it (-ENOSPC with a clear message, nothing created), creates the control region
 * if needed (mode/group from the profile), then <stream_dir>/<epoch>/header.ring and
 * <pool_id>.pool with their superblocks, announces them, resets the producer fields
 * (sequence numbers carry on) and publishes the epoch; older epoch directories go.
 * New epoch = max(current + 1, min_epoch, newest epoch directory + 1). On failure nothing
 * this call created is left. `out` gets what an attach grants (lease fields 0). */
FSHM_API int fshm_provision_epoch(const fshm_stream_addr *addr, const fshm_profile *p, uint64_t min_epoch,
                         fshm_grant *out);
/* The same with the sealed transport (docs/driver.md "Sealed regions"): every region is a
 * memfd, sized, pages reserved, mode 0600 and sealed against shrinking and growing; nothing
 * but the epoch ledger is written into the base directory (the grant's URIs only name the
 * regions). *ctl_fd is the stream's control region, a sealed memfd kept by the caller
 * across epochs: pass -1 the first time and it is created. region_fds gets 1 + npools
 * descriptors (the header ring, then the grant's pools in order), owned by the caller.
 * On failure nothing is created and *ctl_fd is unchanged. */
FSHM_API int fshm_provision_epoch_sealed(const fshm_stream_addr *addr, const fshm_profile *p,
                                         uint64_t min_epoch, int *ctl_fd, fshm_grant *out,
                                         int *region_fds);
/* The sealed control region's consumer table, written by the driver only (consumers map
 * it read-only): registers process pid (the peer's SO_PEERCRED) under `consumer`, with
 * its descriptor queue (named for pid; "" with no_queue), and returns the entry index;
 * FSHM_E_LIMIT when the table is full, -EINVAL for a queue another process created.
 * consumer_remove frees entry idx if it still names pid and queue (1 freed, 0 not ours
 * any more); set_control writes control byte `index`. ctl_fd: the driver's read-write
 * control region descriptor. */
FSHM_API int fshm_sealed_consumer_add(int ctl_fd, int64_t pid, const char *consumer,
                                      const char *queue, int no_queue, int process_all,
                                      uint32_t max_rate_hz);
FSHM_API int fshm_sealed_consumer_remove(int ctl_fd, int idx, int64_t pid, const char *queue);
FSHM_API int fshm_sealed_set_control(int ctl_fd, unsigned index, uint8_t value);
/* Frees the entries of consumers whose process died, with their queues where we may
 * remove them (the pruning producers do): how many were freed. */
FSHM_API int fshm_sealed_prune(int ctl_fd);
/* Removes the stream directory entirely: 1 if removed, 0 if there was none. */
FSHM_API int fshm_provision_remove(const fshm_stream_addr *addr);
/* Current epoch of an existing stream; -ENOENT (epoch 0) if it has no control region. */
FSHM_API int fshm_provision_current(const fshm_stream_addr *addr, uint64_t *epoch);
/* Bytes new regions can take in dir: its free space and, on tmpfs (pages are RAM), no more
 * than MemAvailable + SwapFree. fs_free: the file system's own free space. */
FSHM_API int fshm_shm_room(const char *dir, uint64_t *room, uint64_t *fs_free);

/* ---- inspection and cleanup ---- */

typedef struct fshm_consumer_info {
    char name[FSHM_CONSUMER_NAME_MAX + 1];
    char queue[32];
    int64_t pid;
    int alive;
    int process_all;
    uint64_t last_seq;       /* newest seq the consumer took, +1 (0 = none yet) */
    uint64_t delivered;
    uint64_t queue_full;
    uint32_t max_rate_hz;
} fshm_consumer_info;

typedef struct fshm_stream_info {
    char name[FSHM_NAME_MAX + 1];
    uint32_t stream_id;
    uint64_t epoch;
    int producer_state;
    int64_t producer_pid;
    uint64_t latest_seq;     /* newest committed seq + 1, 0 = none */
    uint64_t frames;
    uint64_t drops_nopool;
    uint64_t desc_sent;
    uint64_t desc_dropped;
    uint64_t pruned;
    uint64_t activity_ns;
    uint8_t control[FSHM_CONTROL_BYTES];
    int driver_managed;      /* the stream's files belong to a frameshm driver */
    uint32_t nslots;
    uint32_t npools;
    uint32_t pool_stride[FSHM_MAX_POOLS];
    uint32_t nconsumers;
    fshm_consumer_info consumers[FSHM_MAX_CONSUMERS];
} fshm_stream_info;

FSHM_API int fshm_stream_info_get(const fshm_stream_addr *addr, fshm_stream_info *out);
/* Directory holding the streams of a namespace (for listing). */
FSHM_API int fshm_namespace_dir(const char *base_dir, const char *ns, char *out, size_t cap);
/* Removes the stream if its producer is dead/closed and no live consumer remains.
 * Always unlinks dead consumers' queues. Returns 1 if removed, 0 if kept. */
FSHM_API int fshm_stream_gc(const fshm_stream_addr *addr);

/* Garbage collection with a report (what `frameshm gc` prints). */
enum { FSHM_GC_DRY_RUN = 1 };   /* flag: report what would go, remove nothing */

/* A message queue of a dead consumer: unlinked (or, dry run, would be). */
typedef struct fshm_gc_queue {
    char name[32];                                /* "/fshm-..." */
    int64_t pid;                                  /* the consumer process, no longer alive */
    uint32_t stream_id;                           /* whose consumer table named it; 0: none */
    char consumer[FSHM_CONSUMER_NAME_MAX + 1];    /* its label there ("" without a table) */
} fshm_gc_queue;

/* Why a stream was removed or kept. */
enum fshm_gc_reason {
    FSHM_GC_NO_STREAM = 0,        /* nothing there */
    FSHM_GC_UNUSED = 1,           /* removed: no producer (dead, closed or never) and no live consumer */
    FSHM_GC_CORRUPT = 2,          /* removed: control region failed validation, no producer */
    FSHM_GC_NO_CONTROL = 3,       /* removed: a directory without a control region */
    FSHM_GC_PRODUCER = 4,         /* kept: a producer holds it */
    FSHM_GC_CONSUMERS = 5,        /* kept: live consumers wait on it */
    FSHM_GC_DRIVER = 6,           /* kept: the driver that provisioned it runs */
};

typedef struct fshm_gc_stream_report {
    uint32_t stream_id;
    char name[FSHM_NAME_MAX + 1];   /* "" when there was no readable control region */
    int removed;                    /* 1: removed (dry run: would be) */
    int reason;                     /* enum fshm_gc_reason */
    int producer_state;             /* FSHM_PRODUCER_* (readable control region only) */
    int64_t producer_pid;
    uint32_t live_consumers;
    uint32_t nqueues;               /* dead consumers taken out of its table, with their queues */
    fshm_gc_queue queues[FSHM_MAX_CONSUMERS];
} fshm_gc_stream_report;

/* fshm_stream_gc, saying what it did (flags: FSHM_GC_DRY_RUN). Returns out->removed, or
 * a negative error; a missing stream is 0 with reason FSHM_GC_NO_STREAM. */
FSHM_API int fshm_stream_gc_report(const fshm_stream_addr *addr, unsigned flags,
                                   fshm_gc_stream_report *out);
/* Unlinks the message queues, of any stream or none, whose name says a frameshm consumer
 * of this user made them and whose owner is no longer alive (pid and start time; a name
 * without the start time: pid only, so a reused pid keeps the queue). Lists up to cap of
 * them in out and their number in *count (those past cap are unlinked too). Needs an
 * mqueue file system mounted (-ENOENT otherwise). Returns 0 or a negative error. */
FSHM_API int fshm_queue_gc(unsigned flags, fshm_gc_queue *out, size_t cap, size_t *count);

/* ---- driver-model client: a lease on one stream (docs/driver-protocol.md) ---- */

typedef struct fshm_lease fshm_lease;

typedef struct fshm_lease_config {
    uint32_t struct_size;             /* sizeof(fshm_lease_config) */
    const char *socket_path;          /* the driver's control socket */
    uint32_t stream_id;
    int role;                         /* FSHM_ROLE_* */
    int publish_mode;                 /* FSHM_* publish mode; 0 = EXISTING_OR_CREATE */
    uint32_t client_id;               /* 0 = a fresh id unique to this lease */
    uint32_t expected_layout_version; /* 0 = whatever the driver uses */
    int64_t timeout_ns;               /* for the driver's answer; <= 0 = 5 s */
} fshm_lease_config;

enum fshm_lease_state {
    FSHM_LEASE_ACTIVE = 0,
    FSHM_LEASE_REVOKED = 1,      /* detached, expired or revoked by the driver (reason set) */
    FSHM_LEASE_DRIVER_GONE = 2,  /* driver shut down or the connection broke */
};

/* Attaches (ShmAttachRequest) and starts the keepalive thread. On a refusal the message
 * carries the driver's code and errorMessage. */
FSHM_API int fshm_lease_attach(const fshm_lease_config *cfg, fshm_lease **out, fshm_grant *grant);
FSHM_API int fshm_lease_state(const fshm_lease *l, int *reason);
FSHM_API const char *fshm_lease_message(const fshm_lease *l);   /* why it ended ("" while active) */
FSHM_API uint64_t fshm_lease_id(const fshm_lease *l);
FSHM_API uint32_t fshm_lease_client_id(const fshm_lease *l);
FSHM_API uint64_t fshm_lease_announced_epoch(const fshm_lease *l);
FSHM_API uint32_t fshm_lease_producer_revokes(const fshm_lease *l);
FSHM_API uint32_t fshm_lease_new_client_id(void);
/* detach: send ShmDetachRequest (best effort) before closing the connection. */
FSHM_API void fshm_lease_close(fshm_lease *l, int detach);

FSHM_API uint64_t fshm_now_ns(void);   /* CLOCK_MONOTONIC */

#ifdef __cplusplus
}
#endif
#endif
