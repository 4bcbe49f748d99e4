/* What a producer's fshm_writer_publish of a 1080p RGB frame (6,220,800 bytes) costs, back
 * to back with no consumer, by fshm_writer_config.fill_threads setting and ring size
 * (nslots: the slots the fills rotate over). Settings take turns round by round, so
 * machine load hits every one alike. Per setting: median and p90 wall time of a publish,
 * and the process's CPU per frame (helper threads included), over all rounds.
 *
 *   make -C bench publish_fill
 *   bench/publish_fill [-n nslots] [-r rounds] [-f frames-per-round] [fill_threads...]
 *   bench/publish_fill -n 4 -r 10 -f 200 1 2 4
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <frameshm/frameshm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FRAME 6220800u
#define MAX_SETTINGS 8

static uint64_t clock_ns(clockid_t c)
{
    struct timespec t;
    clock_gettime(c, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    int rounds = 10, per = 200, nslots = 4, opt;
    while ((opt = getopt(argc, argv, "n:r:f:")) != -1) {
        if (opt == 'n')
            nslots = atoi(optarg);
        else if (opt == 'r')
            rounds = atoi(optarg);
        else if (opt == 'f')
            per = atoi(optarg);
        else
            rounds = 0;
    }
    unsigned settings[MAX_SETTINGS] = {1, 2}, ns = 2;
    if (optind < argc)
        for (ns = 0; ns < MAX_SETTINGS && optind + (int)ns < argc; ns++)
            settings[ns] = (unsigned)atoi(argv[optind + ns]);
    if (rounds < 1 || per < 1 || nslots < 1)
        return fprintf(stderr, "usage: %s [-n nslots] [-r rounds] [-f frames-per-round] [fill_threads...]\n",
                       argv[0]), 2;
    uint8_t *src = aligned_alloc(64, FRAME);
    for (size_t i = 0; i < FRAME; i++)
        src[i] = (uint8_t)(i * 7);
    fshm_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = FSHM_DTYPE_UINT8;
    t.major_order = FSHM_ORDER_ROW;
    t.ndims = 3;
    t.dims[0] = 1080, t.dims[1] = 1920, t.dims[2] = 3;
    fshm_writer *w[MAX_SETTINGS];
    uint64_t *wall[MAX_SETTINGS], cpu[MAX_SETTINGS] = {0};
    char name[MAX_SETTINGS][64];
    for (unsigned s = 0; s < ns; s++) {
        fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
        snprintf(name[s], sizeof name[s], "bench-fill-%d-%u", (int)getpid(), s);
        cfg.addr.name = name[s];
        cfg.nslots = (uint32_t)nslots;
        cfg.npools = 1;
        cfg.pool_bytes[0] = FRAME;
        cfg.fill_threads = settings[s];
        if (fshm_writer_open(&cfg, &w[s]))
            return fprintf(stderr, "fshm_writer_open: %s\n", fshm_last_error()), 1;
        wall[s] = malloc(sizeof(uint64_t) * (size_t)rounds * (size_t)per);
        for (int i = 0; i < 2 * nslots + 8; i++)   /* warm-up: helpers started, every slot touched */
            fshm_writer_publish(w[s], src, FRAME, &t, 0);
    }
    for (int r = 0; r < rounds; r++)
        for (unsigned s = 0; s < ns; s++) {
            uint64_t c0 = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
            for (int i = 0; i < per; i++) {
                uint64_t a = clock_ns(CLOCK_MONOTONIC);
                if (fshm_writer_publish(w[s], src, FRAME, &t, 0))
                    return fprintf(stderr, "publish: %s\n", fshm_last_error()), 1;
                wall[s][r * per + i] = clock_ns(CLOCK_MONOTONIC) - a;
            }
            cpu[s] += clock_ns(CLOCK_PROCESS_CPUTIME_ID) - c0;
        }
    double load[3] = {0};
    getloadavg(load, 3);
    printf("publish of 6,220,800 bytes into a %d-slot stream, %d rounds of %d frames; libframeshm %s; load %.2f\n",
           nslots, rounds, per, fshm_version_string(), load[0]);
    size_t n = (size_t)rounds * (size_t)per;
    for (unsigned s = 0; s < ns; s++) {
        qsort(wall[s], n, sizeof(uint64_t), cmp_u64);
        printf("fill_threads %u: median %6.1f us  p90 %6.1f us  cpu/frame %6.1f us\n", settings[s],
               wall[s][n / 2] / 1e3, wall[s][n * 9 / 10] / 1e3, cpu[s] / 1e3 / (double)n);
        fshm_writer_close(w[s], 1);
        free(wall[s]);
    }
    free(src);
    return 0;
}
