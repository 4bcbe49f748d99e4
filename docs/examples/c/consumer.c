/* consumer: takes N frames of a stream in order (process-all) and checks every byte.
 *
 *   consumer STREAM [N]
 *
 * May start before or after the producer. Exits 0 when all N frames arrived intact,
 * 1 on a missing, reordered or damaged frame (or any error). */
#include <frameshm/frameshm.h>

#include <stdio.h>
#include <stdlib.h>

#include "example.h"

#define TIMEOUT_NS (10 * 1000000000ll)

/* The frame's shape and bytes as producer.c made frame k; -1 and a message if not. */
static int check_frame(const fshm_frame *f, uint64_t k)
{
    const fshm_tensor *t = &f->tensor;
    if (t->dtype != FSHM_DTYPE_UINT8 || t->ndims != 2 || t->dims[0] != EXAMPLE_HEIGHT ||
        t->dims[1] != EXAMPLE_WIDTH || f->nbytes != EXAMPLE_BYTES) {
        fprintf(stderr, "consumer: frame %llu: dtype %d, %u dims (%d x %d), %zu bytes; expected "
                "uint8 %d x %d\n", (unsigned long long)k, t->dtype, t->ndims, t->dims[0],
                t->dims[1], f->nbytes, EXAMPLE_HEIGHT, EXAMPLE_WIDTH);
        return -1;
    }
    const uint8_t *p = f->data;   /* zero-copy: the producer's slot in shared memory */
    for (size_t i = 0; i < EXAMPLE_BYTES; i++)
        if (p[i] != example_byte(k, i)) {
            fprintf(stderr, "consumer: frame %llu (seq %llu): byte %zu is %u, expected %u\n",
                    (unsigned long long)k, (unsigned long long)f->seq, i, p[i], example_byte(k, i));
            return -1;
        }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s STREAM [N]\n", argv[0]);
        return 2;
    }
    uint64_t n = argc > 2 ? strtoull(argv[2], NULL, 10) : 100;

    fshm_reader_config cfg = FSHM_READER_CONFIG_INIT;
    cfg.addr.name = argv[1];
    cfg.consumer = "c-example";   /* how `frameshm ls` shows us */
    fshm_reader *r;
    int rc = fshm_reader_open(&cfg, &r);
    if (rc < 0) {
        fprintf(stderr, "consumer: %s (%s)\n", fshm_last_error(), fshm_strerror(rc));
        return 1;
    }
    int status = 0;
    for (uint64_t k = 0; k < n; k++) {
        fshm_frame f;
        if ((rc = fshm_reader_wait_next(r, TIMEOUT_NS, &f)) < 0) {
            fprintf(stderr, "consumer: frame %llu: %s\n", (unsigned long long)k, fshm_last_error());
            status = 1;
            break;
        }
        if (f.skipped) {
            fprintf(stderr, "consumer: %llu frames lost before frame %llu\n",
                    (unsigned long long)f.skipped, (unsigned long long)k);
            status = 1;
            break;
        }
        if (check_frame(&f, k) < 0) {
            status = 1;
            break;
        }
        /* The seqlock re-check: had the producer reused the slot while we read it, the
         * bytes above could be a mix of two frames. */
        if (!fshm_frame_valid(r, &f)) {
            fprintf(stderr, "consumer: frame %llu was overwritten while being checked\n",
                    (unsigned long long)k);
            status = 1;
            break;
        }
    }
    if (status == 0)
        printf("consumer: %llu frames checked\n", (unsigned long long)n);
    fshm_reader_close(r);
    return status;
}
