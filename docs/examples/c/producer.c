/* producer: publishes N frames to a stream, zero-copy (loan a slot, fill it, commit).
 *
 *   producer STREAM [N]
 *
 * frameshm's producer never waits for its consumers: one that falls more than the ring
 * behind skips frames (it sees how many in fshm_frame.skipped). This example wants every
 * frame to arrive, so it waits for a consumer to register and then never runs more than
 * half the ring ahead of the slowest one, watching their progress through the stream's
 * control region (fshm_stream_info_get). A camera would not wait: it publishes and moves on. */
#define _POSIX_C_SOURCE 200809L   /* nanosleep under -std=c11 */
#include <frameshm/frameshm.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "example.h"

#define NSLOTS 16
#define PATIENCE_NS (10 * 1000000000ull)

static void nap(void)
{
    struct timespec ts = {0, 200 * 1000};
    nanosleep(&ts, NULL);
}

/* Smallest "taken up to" (newest seq taken + 1) over the live consumers; INT64_MAX if
 * none is left, -1 if none came yet (or the stream cannot be read). */
static int64_t slowest_consumer(const fshm_stream_addr *addr, uint64_t first_seq, int came)
{
    static fshm_stream_info info;   /* ~7 KiB: not on the stack */
    if (fshm_stream_info_get(addr, &info) < 0)
        return -1;
    int64_t slowest = came ? INT64_MAX : -1;
    for (uint32_t i = 0; i < info.nconsumers; i++) {
        if (!info.consumers[i].alive)
            continue;
        /* A consumer that took frames of an earlier producer has taken none of ours yet. */
        uint64_t taken = info.consumers[i].last_seq > first_seq ? info.consumers[i].last_seq : first_seq;
        if (slowest < 0 || (int64_t)taken < slowest)
            slowest = (int64_t)taken;
    }
    return slowest;
}

/* Waits until every live consumer has taken the seqs below `need` (`came` = 0: and one
 * is registered); returns how far the slowest got, or -1 after PATIENCE_NS without that.
 * Consumers that left are not waited for. */
static int64_t wait_for_consumers(const fshm_stream_addr *addr, uint64_t first_seq, uint64_t need,
                                  int came)
{
    uint64_t give_up = fshm_now_ns() + PATIENCE_NS;
    for (;;) {
        int64_t slowest = slowest_consumer(addr, first_seq, came);
        if (slowest >= 0 && (uint64_t)slowest >= need)
            return slowest;
        if (fshm_now_ns() > give_up) {
            fprintf(stderr, "producer: %s\n", slowest < 0 ? "no consumer came"
                                                          : "a consumer stopped taking frames");
            return -1;
        }
        nap();
    }
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s STREAM [N]\n", argv[0]);
        return 2;
    }
    uint64_t n = argc > 2 ? strtoull(argv[2], NULL, 10) : 100;

    /* Built against one minor version, it runs against any later one of the same major. */
    int major, minor;
    fshm_version(&major, &minor, NULL);
    if (major != FSHM_VERSION_MAJOR || minor < FSHM_VERSION_MINOR) {
        fprintf(stderr, "producer: built for libframeshm %s, loaded %s\n", FSHM_VERSION_STRING,
                fshm_version_string());
        return 1;
    }

    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = argv[1];
    cfg.nslots = NSLOTS;
    cfg.npools = 1;
    cfg.pool_bytes[0] = EXAMPLE_BYTES;
    fshm_writer *w;
    int rc = fshm_writer_open(&cfg, &w);
    if (rc < 0) {
        fprintf(stderr, "producer: %s (%s)\n", fshm_last_error(), fshm_strerror(rc));
        return 1;
    }

    fshm_tensor t = {.dtype = FSHM_DTYPE_UINT8, .ndims = 2, .dims = {EXAMPLE_HEIGHT, EXAMPLE_WIDTH}};
    const uint64_t first = fshm_writer_next_seq(w);   /* seqs carry on across producer restarts */
    int64_t taken = -1;   /* the slowest consumer's progress, as last seen */
    int status = 0;
    for (uint64_t k = 0; k < n && status == 0; k++) {
        /* Frame `first + k` overwrites the slot of seq `first + k - NSLOTS`: stay half a ring
         * ahead of the slowest consumer at most. The first frame waits for a consumer. */
        uint64_t need = k >= NSLOTS / 2 ? first + k - NSLOTS / 2 + 1 : first;
        if (taken < 0 || (uint64_t)taken < need) {
            if ((taken = wait_for_consumers(&cfg.addr, first, need, k > 0)) < 0) {
                status = 1;
                break;
            }
        }
        fshm_loan loan;
        if ((rc = fshm_writer_loan(w, EXAMPLE_BYTES, &loan)) < 0) {
            fprintf(stderr, "producer: loan: %s\n", fshm_last_error());
            status = 1;
            break;
        }
        uint8_t *p = loan.data;
        for (size_t i = 0; i < EXAMPLE_BYTES; i++)
            p[i] = example_byte(k, i);
        if ((rc = fshm_writer_commit(w, &t, EXAMPLE_BYTES, fshm_now_ns())) < 0) {
            fprintf(stderr, "producer: commit: %s\n", fshm_last_error());
            status = 1;
        }
    }
    /* Let the consumers take the last frame before the stream goes away. */
    if (status == 0 && wait_for_consumers(&cfg.addr, first, first + n, 1) < 0)
        status = 1;
    if (status == 0)
        printf("producer: %llu frames published to '%s'\n", (unsigned long long)n, argv[1]);
    fshm_writer_close(w, 1);
    return status;
}
