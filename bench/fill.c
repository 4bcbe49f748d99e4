/* How a producer's fill of a 1080p RGB frame (6,220,800 bytes) into a pool slot costs, by
 * the kind of store: plain memcpy (what fshm_writer_publish does) against non-temporal
 * (streaming) stores, which write around the caches instead of reading each destination
 * line first. The destination is a shared tmpfs mapping like a pool, `nslots` slots used in
 * turn (4 = frameshm's default ring: each fill lands on memory not touched for 3 frames;
 * 1 = the same slot every time, as a loan that hands back the slot just released).
 * After each fill a "consumer" sums one byte per cache line of the slot, which is what a
 * reader touching the frame pays for where the fill left it (cache or DRAM).
 * Methods alternate per iteration, so both see the same machine load.
 *
 *   make -C bench fill && bench/fill [iterations]
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <emmintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define FRAME 6220800u

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Streaming copy: 64 bytes per step, 16-byte aligned destination (pool slots are). */
static void copy_nt(void *dst, const void *src, size_t n)
{
    __m128i *d = dst;
    const __m128i *s = src;
    for (size_t i = 0; i < n / 64; i++, d += 4, s += 4) {
        __m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1);
        __m128i c = _mm_loadu_si128(s + 2), e = _mm_loadu_si128(s + 3);
        _mm_stream_si128(d, a);
        _mm_stream_si128(d + 1, b);
        _mm_stream_si128(d + 2, c);
        _mm_stream_si128(d + 3, e);
    }
    memcpy((uint8_t *)dst + n / 64 * 64, (const uint8_t *)src + n / 64 * 64, n % 64);
    _mm_sfence();   /* the commit's release store must not pass the streamed data */
}

static unsigned touch(const uint8_t *p, size_t n)
{
    unsigned sum = 0;
    for (size_t i = 0; i < n; i += 64)
        sum += p[i];
    return sum;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    int iters = argc > 1 ? atoi(argv[1]) : 400;
    if (iters < 2)
        iters = 2;
    uint8_t *src = aligned_alloc(64, FRAME);
    if (!src)
        return 1;
    for (size_t i = 0; i < FRAME; i++)
        src[i] = (uint8_t)(i * 7);
    uint64_t *t = malloc(sizeof *t * (size_t)iters * 2), *r = malloc(sizeof *r * (size_t)iters * 2);
    if (!t || !r)
        return 1;
    printf("fill of %u bytes, median of %d each; load average ", FRAME, iters);
    FILE *la = fopen("/proc/loadavg", "r");
    char buf[64] = "?";
    if (la && fgets(buf, sizeof buf, la))
        buf[strcspn(buf, " ")] = 0;
    if (la)
        fclose(la);
    printf("%s\n", buf);
    int slots_cases[] = {4, 1};
    for (int c = 0; c < 2; c++) {
        int nslots = slots_cases[c];
        int fd = memfd_create("fill-pool", 0);
        if (fd < 0 || ftruncate(fd, (off_t)FRAME * nslots))
            return 1;
        uint8_t *pool = mmap(NULL, (size_t)FRAME * nslots, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (pool == MAP_FAILED)
            return 1;
        memset(pool, 0, (size_t)FRAME * nslots);   /* pools are faulted in at creation */
        unsigned sink = 0;
        for (int i = 0; i < iters * 2; i++) {
            uint8_t *dst = pool + (size_t)(i / 2 % nslots) * FRAME;
            int nt = i & 1;
            uint64_t a = now_ns();
            if (nt)
                copy_nt(dst, src, FRAME);
            else
                memcpy(dst, src, FRAME);
            uint64_t b = now_ns();
            sink += touch(dst, FRAME);
            uint64_t e = now_ns();
            t[(nt ? iters : 0) + i / 2] = b - a;
            r[(nt ? iters : 0) + i / 2] = e - b;
        }
        qsort(t, (size_t)iters, sizeof *t, cmp_u64);
        qsort(t + iters, (size_t)iters, sizeof *t, cmp_u64);
        qsort(r, (size_t)iters, sizeof *r, cmp_u64);
        qsort(r + iters, (size_t)iters, sizeof *r, cmp_u64);
        printf("nslots=%d  memcpy %7.1f us (reader touch %6.1f us)  non-temporal %7.1f us "
               "(reader touch %6.1f us)  [%u]\n", nslots, t[iters / 2] / 1e3, r[iters / 2] / 1e3,
               t[iters + iters / 2] / 1e3, r[iters + iters / 2] / 1e3, sink & 1);
        munmap(pool, (size_t)FRAME * nslots);
        close(fd);
    }
    return 0;
}
