/* How publish() copies a payload into its pool slot: alone with streaming stores, or
 * shared with helper threads (a fill team) for big payloads.
 *
 * Why a team: a 1080p frame is 6.2 MB, and the slot it lands on (payload slot = header
 * index = seq mod nslots, docs/wire-format.md) was last written nslots frames ago. One
 * core copying it is bound by how many cache misses it keeps in flight more than by the
 * memory system: on the 2-vCPU EPYC guests we measure on, one thread publishes into a
 * 4-slot ring in 221-224 us (streaming stores; plain ones take 300 or more), the caller
 * and one helper with plain stores in 139-150 us (bench/publish_fill, docs/benchmarks.md
 * §11). Streaming stores gain nothing from a second thread (they are bound by the write
 * path to DRAM), so a team uses plain stores, which also leave the frame in the shared L3
 * for the consumers.
 *
 * How: the payload is cut into FILL_CHUNK pieces; the publishing thread and its helpers
 * claim pieces from one counter until none is left, so a helper that is slow to wake
 * (or not scheduled at all on a busy machine) costs nothing but the pieces the caller
 * copies itself. The caller returns only after every claimed piece is copied: the
 * commit that follows must publish complete data, and the caller's buffer is its own
 * again once publish returns. */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "fshm_internal.h"

#define FILL_CHUNK (128u << 10)
/* How long the caller spins for a helper's last piece (a piece takes 4-10 us) before it
 * sleeps on the done count. */
#define FILL_SPIN_NS 50000ull
#define HELPER_SPIN_NS 20000ull

/* The claim word: job number (32 bits) | pieces in the job (16) | next piece (16). The
 * job number makes a claim on an old job fail on a new one with the same counts; the
 * piece count lives here, not in the job fields, so that a claimer that finds the job
 * used up has read nothing the caller may be rewriting for the next one. */
#define CLAIM(job, n, next) ((uint64_t)(job) << 32 | (uint64_t)(n) << 16 | (uint64_t)(next))
#define CLAIM_N(c) ((uint32_t)((c) >> 16) & 0xffffu)
#define CLAIM_NEXT(c) ((uint32_t)(c)&0xffffu)
_Static_assert((uint64_t)UINT32_MAX / FILL_CHUNK + 1 + FSHM_MAX_FILL_THREADS <= 0xffffu,
               "a slot's pieces, and the failed claims past them, fit the claim word's 16 bits");

struct fshm_fill_team {
    /* The job, written by the caller only while no piece of a job is claimed or being
     * copied (before it publishes the claim word, after the done count reached the
     * piece count), read by a claimer only after its claim succeeded: no races. */
    uint8_t *dst;
    const uint8_t *src;
    size_t n;
    uint32_t job;           /* the caller's count of jobs started */
    uint32_t nhelpers;
    int stop;               /* set, then gen bumped, when the team ends */
    uint64_t helper_pieces; /* pieces the helpers copied (atomic; tests and benchmarks) */
    pthread_t helpers[FSHM_MAX_FILL_THREADS - 1];
    /* Contended words on lines of their own. */
    _Alignas(64) uint64_t claim;
    _Alignas(64) uint32_t done;   /* pieces of the current job copied */
    uint32_t caller_waiting;      /* the caller sleeps on `done` (futex) */
    _Alignas(64) uint32_t gen;    /* futex the helpers sleep on: bumped per job */
    uint32_t sleepers;            /* helpers in or about to enter that sleep */
};

#if defined(__x86_64__)
#include <emmintrin.h>

/* Alone, a big frame's plain-store fill of a ring bigger than the cache reads every
 * destination line in before overwriting it (the slot has long been evicted). Streaming
 * stores skip that read and leave the caches to the consumers (bench/fill.c: 0.83-0.95 ms
 * instead of 1.18-1.32 ms for 6.2 MB in a 4-slot ring, and no slower for a reader touching
 * the frame afterwards). A ring that fits the cache is the other way round
 * (fshm_fill_ring_warm): its slot is still there, and streaming stores would push it out
 * to DRAM. */
void fshm_fill_stream(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    size_t blocks = n / 64;
    for (size_t i = 0; i < blocks; i++, d += 64, s += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)s + 1);
        __m128i c = _mm_loadu_si128((const __m128i *)s + 2), e = _mm_loadu_si128((const __m128i *)s + 3);
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)d + 1, b);
        _mm_stream_si128((__m128i *)d + 2, c);
        _mm_stream_si128((__m128i *)d + 3, e);
    }
    memcpy(d, s, n % 64);
    /* Streaming stores are weakly ordered: they must be visible before the commit's release. */
    _mm_sfence();
}
#else
void fshm_fill_stream(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
#endif


/* The L3 cache (the largest level-3 entry sysfs lists for CPU 0; 0 when none is, or no
 * sysfs): what a ring has to fit for its slots to stay cached between fills. sysfs, not
 * cpuid: a guest's cpuid may describe the host's caches (sysconf says 320 MiB on the
 * 32 MiB EPYC guests). */
static size_t l3_size;
static pthread_once_t l3_once = PTHREAD_ONCE_INIT;

static void read_l3_size(void)
{
    for (int i = 0; i < 8; i++) {
        char path[64], buf[32];
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", i);
        FILE *f = fopen(path, "re");
        if (!f)
            continue;
        int level = fgets(buf, sizeof buf, f) ? atoi(buf) : 0;
        fclose(f);
        if (level != 3)
            continue;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
        if (!(f = fopen(path, "re")))
            continue;
        char *end = NULL;
        unsigned long long v = fgets(buf, sizeof buf, f) ? strtoull(buf, &end, 10) : 0;
        fclose(f);
        if (end && *end == 'K')
            v <<= 10;
        else if (end && *end == 'M')
            v <<= 20;
        if (v > l3_size)
            l3_size = (size_t)v;
    }
}

int fshm_fill_ring_warm(size_t ring_bytes)
{
    pthread_once(&l3_once, read_l3_size);
    /* Half the cache: the source frame, the consumers' reads and everything else running
     * need the rest (a 2-slot 1080p ring, 12.4 MB, fills faster with plain stores on a
     * 32 MiB L3; a 4-slot one, 24.9 MB, with streaming stores: docs/benchmarks.md §11). */
    return l3_size && ring_bytes <= l3_size / 2;
}

static void futex_wait_private(uint32_t *word, uint32_t seen, uint64_t timeout_ns)
{
    struct timespec ts = {(time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull)};
    /* EAGAIN, EINTR, ETIMEDOUT: every caller looks at the word again. */
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, timeout_ns ? &ts : NULL, NULL, 0);
}

static void futex_wake_private(uint32_t *word, int n)
{
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

/* Claims and copies pieces of the current job until none is left; returns how many. */
static uint32_t copy_pieces(fshm_fill_team *t)
{
    uint32_t copied = 0;
    uint64_t c = __atomic_load_n(&t->claim, __ATOMIC_ACQUIRE);
    for (;;) {
        if (CLAIM_NEXT(c) >= CLAIM_N(c))
            return copied;
        /* Acquire on success: the job's fields, written before the claim word's release. */
        if (!__atomic_compare_exchange_n(&t->claim, &c, c + 1, 1, __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE))
            continue;
        size_t off = (size_t)CLAIM_NEXT(c) * FILL_CHUNK;
        size_t len = t->n - off < FILL_CHUNK ? t->n - off : FILL_CHUNK;
        memcpy(t->dst + off, t->src + off, len);
        copied++;
        c = __atomic_load_n(&t->claim, __ATOMIC_ACQUIRE);
    }
}

static void *helper_main(void *arg)
{
    fshm_fill_team *t = arg;
    uint32_t seen = 0;
    for (;;) {
        uint32_t g = __atomic_load_n(&t->gen, __ATOMIC_SEQ_CST);
        if (g == seen) {
            /* A producer publishing back to back starts its next job a few microseconds
             * after we finish a piece: wait for that awake, since waking takes longer. */
            uint64_t until = fshm_now_ns() + HELPER_SPIN_NS;
            for (unsigned i = 1; (g = __atomic_load_n(&t->gen, __ATOMIC_ACQUIRE)) == seen; i++)
                if (i % 64 == 0 && fshm_now_ns() >= until)
                    break;
                else
                    cpu_relax();
        }
        if (g == seen) {
            /* Dekker with fshm_fill_copy: we raise `sleepers` then look at gen; the caller
             * bumps gen then looks at `sleepers`. One of the two sees the other, and the
             * futex call itself re-checks gen, so no job is slept through. */
            __atomic_add_fetch(&t->sleepers, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&t->gen, __ATOMIC_SEQ_CST) == seen)
                futex_wait_private(&t->gen, seen, 0);
            __atomic_sub_fetch(&t->sleepers, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        seen = g;
        if (__atomic_load_n(&t->stop, __ATOMIC_ACQUIRE))
            return NULL;
        uint32_t k = copy_pieces(t);
        if (!k)
            continue;   /* woke too late: the caller copied every piece itself */
        __atomic_add_fetch(&t->helper_pieces, k, __ATOMIC_RELAXED);
        /* Release: our copies happen before the caller's commit, which publishes them
         * (happens-before is transitive through its acquire of `done`). */
        __atomic_add_fetch(&t->done, k, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&t->caller_waiting, __ATOMIC_SEQ_CST))
            futex_wake_private(&t->done, 1);
    }
}

int fshm_fill_team_start(unsigned nthreads, fshm_fill_team **out)
{
    *out = NULL;
    if (nthreads < 2 || nthreads > FSHM_MAX_FILL_THREADS)
        return -EINVAL;
    fshm_fill_team *t = aligned_alloc(64, sizeof *t);
    if (!t)
        return -ENOMEM;
    memset(t, 0, sizeof *t);
    pthread_attr_t a;
    if (pthread_attr_init(&a) != 0) {
        free(t);
        return -ENOMEM;
    }
    /* Small stacks: a helper only copies. The application's signal handlers must never
     * run on our threads. */
    pthread_attr_setstacksize(&a, 256u << 10);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = 0;
    for (unsigned i = 0; i < nthreads - 1; i++) {
        if ((rc = pthread_create(&t->helpers[i], &a, helper_main, t)) != 0)
            break;
        pthread_setname_np(t->helpers[i], "fshm-fill");   /* what top -H and the tests see */
        t->nhelpers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&a);
    if (!t->nhelpers) {
        free(t);
        return -rc;
    }
    *out = t;
    return 0;
}

void fshm_fill_team_stop(fshm_fill_team *t)
{
    if (!t)
        return;
    __atomic_store_n(&t->stop, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&t->gen, 1, __ATOMIC_SEQ_CST);
    futex_wake_private(&t->gen, INT_MAX);
    for (unsigned i = 0; i < t->nhelpers; i++)
        pthread_join(t->helpers[i], NULL);
    free(t);
}

void fshm_fill_team_forget(fshm_fill_team *t)
{
    /* A fork()ed child: the helpers did not come along, and nothing of the team is in use
     * by this (the only) thread of the child, so the memory can simply go. */
    free(t);
}

uint64_t fshm_fill_team_helper_pieces(const fshm_fill_team *t)
{
    return t ? __atomic_load_n(&t->helper_pieces, __ATOMIC_RELAXED) : 0;
}

void fshm_fill_copy(fshm_fill_team *t, void *dst, const void *src, size_t n)
{
    uint32_t pieces = (uint32_t)((n + FILL_CHUNK - 1) / FILL_CHUNK);
    t->dst = dst;
    t->src = src;
    t->n = n;
    t->job++;
    __atomic_store_n(&t->done, 0, __ATOMIC_RELAXED);
    /* Release: the job's fields and the reset count before any claim of this job. */
    __atomic_store_n(&t->claim, CLAIM(t->job, pieces, 0), __ATOMIC_RELEASE);
    __atomic_store_n(&t->gen, t->job, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&t->sleepers, __ATOMIC_SEQ_CST))
        futex_wake_private(&t->gen, (int)t->nhelpers);
    uint32_t mine = copy_pieces(t);
    uint32_t done = mine ? __atomic_add_fetch(&t->done, mine, __ATOMIC_SEQ_CST)
                         : __atomic_load_n(&t->done, __ATOMIC_ACQUIRE);
    if (done == pieces)
        return;
    /* A helper is finishing a piece it claimed: spin for it a little, then sleep (it may
     * have been preempted, and our CPU is what it may need). */
    uint64_t until = fshm_now_ns() + FILL_SPIN_NS;
    for (unsigned i = 1; (done = __atomic_load_n(&t->done, __ATOMIC_ACQUIRE)) != pieces; i++) {
        if (i % 64)
            cpu_relax();
        else if (fshm_now_ns() >= until)
            break;
    }
    while (done != pieces) {
        __atomic_store_n(&t->caller_waiting, 1, __ATOMIC_SEQ_CST);
        done = __atomic_load_n(&t->done, __ATOMIC_SEQ_CST);
        if (done != pieces)
            futex_wait_private(&t->done, done, 1000000ull);
        __atomic_store_n(&t->caller_waiting, 0, __ATOMIC_RELAXED);
        done = __atomic_load_n(&t->done, __ATOMIC_ACQUIRE);
    }
}
