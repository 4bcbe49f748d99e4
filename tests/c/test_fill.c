/* publish()'s fill team (lib/src/fshm_fill.c): the bytes a reader gets are the bytes
 * published, however the pieces were shared out; a frame is committed only once every
 * piece is copied; the helper threads exist only for writers that asked for them, and
 * end with the writer; a fork()ed child fills without its parent's helpers. */
#include "fshm_test_util.h"
#include "fshm_writer_impl.h"

#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define SEC 1000000000ll
#define FRAME_1080P 6220800u
#define FILL_PIECE (128u << 10)   /* lib/src/fshm_fill.c's FILL_CHUNK */

static fshm_writer_config fill_config(const char *name, uint32_t nslots, uint32_t pool_bytes,
                                      uint32_t fill_threads)
{
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = name;
    cfg.nslots = nslots;
    cfg.npools = 1;
    cfg.pool_bytes[0] = pool_bytes;
    cfg.fill_threads = fill_threads;
    return cfg;
}

static fshm_writer *fill_writer(const char *name, uint32_t pool_bytes, uint32_t fill_threads)
{
    fshm_writer_config cfg = fill_config(name, 4, pool_bytes, fill_threads);
    fshm_writer *w = NULL;
    int rc = fshm_writer_open(&cfg, &w);
    if (rc)
        fail_msg("fshm_writer_open(%s): %d %s", name, rc, fshm_last_error());
    return w;
}

/* Threads of this process named like the writer's helpers. */
static int helper_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], comm[32] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;   /* ended since readdir */
        if (fgets(comm, sizeof comm, f))
            n += strcmp(comm, "fshm-fill\n") == 0;
        fclose(f);
    }
    closedir(d);
    return n;
}

/* Sizes around the piece size and the team's threshold, from an unaligned source; each
 * frame read back through a reader and compared byte for byte. Published until the
 * helpers took part at least once (they may be slow to wake on a loaded machine: the
 * caller then copies alone, which is also a correct fill). */
static void test_team_copies_every_byte(void **state)
{
    (void)state;
    const size_t sizes[] = {FSHM_FILL_TEAM_MIN, 3u * (1u << 20) + 17, FRAME_1080P, (1u << 20) + (128u << 10) - 1};
    const uint32_t teams[] = {2, 4};
    uint8_t *src = malloc(FRAME_1080P + 1);
    assert_non_null(src);
    for (unsigned ti = 0; ti < 2; ti++) {
        fshm_writer *w = fill_writer("fill-bytes", 8u << 20, teams[ti]);
        fshm_reader *r = tu_reader("fill-bytes");
        uint64_t frame = 0;
        for (unsigned si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            size_t n = sizes[si];
            fshm_tensor t = tu_u8_tensor(n);
            uint64_t until = fshm_now_ns() + 5 * (uint64_t)SEC, helped_before = fshm_fill_team_helper_pieces(w->fill);
            int rounds = 0;
            do {
                tu_fill(src + 1, n, frame);
                assert_int_equal(fshm_writer_publish(w, src + 1, n, &t, 0), 0);
                fshm_frame f;
                memset(&f, 0, sizeof f);
                assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
                assert_int_equal(f.nbytes, n);
                /* Last piece first: the pieces claimed last are the ones a commit that
                 * did not wait for its helpers would hand out half copied. */
                const uint8_t *got = f.data, *sent = src + 1;
                for (size_t off = (n - 1) / FILL_PIECE * FILL_PIECE;; off -= FILL_PIECE) {
                    size_t len = n - off < FILL_PIECE ? n - off : FILL_PIECE;
                    if (memcmp(got + off, sent + off, len) != 0) {
                        size_t i = off;
                        while (got[i] == sent[i])
                            i++;
                        fail_msg("%u threads, %zu bytes, frame %llu: wrong byte at %zu (piece %zu)", teams[ti], n,
                                 (unsigned long long)frame, i, i / FILL_PIECE);
                    }
                    if (off == 0)
                        break;
                }
                assert_true(fshm_frame_valid(r, &f));
                frame++;
                rounds++;
            } while ((rounds < 4 || fshm_fill_team_helper_pieces(w->fill) == helped_before) &&
                     fshm_now_ns() < until);
            if (fshm_fill_team_helper_pieces(w->fill) == helped_before)
                fail_msg("%u threads, %zu bytes: no helper copied a piece in 5 s (%d frames)", teams[ti], n, rounds);
        }
        fshm_reader_close(r);
        fshm_writer_close(w, 1);
    }
    free(src);
}

/* The caller alone: plain stores for a ring that fits half the L3, streaming stores for
 * one that does not (fshm_fill_ring_warm). Both kinds put every byte where it belongs,
 * from an unaligned source, with a tail that is not a whole cache line. */
static void test_alone_fill_both_store_kinds(void **state)
{
    (void)state;
    const size_t n = 3u * (1u << 20) / 2 + 13;   /* 1.5 MiB + 13: in a 2 MiB stride */
    const uint32_t rings[] = {2, 32};           /* 4 MiB and 64 MiB of slots */
    uint8_t *src = malloc(n + 1), *want = malloc(n);
    assert_non_null(src);
    assert_non_null(want);
    fshm_tensor t = tu_u8_tensor(n);
    assert_false(fshm_fill_ring_warm(SIZE_MAX));
    for (unsigned ri = 0; ri < 2; ri++) {
        fshm_writer_config cfg = fill_config("fill-alone", rings[ri], 2u << 20, 1);
        fshm_writer *w = NULL;
        assert_int_equal(fshm_writer_open(&cfg, &w), 0);
        fshm_reader *r = tu_reader("fill-alone");
        print_message("    %u slots of 2 MiB: %s stores\n", rings[ri],
                      fshm_fill_ring_warm((size_t)rings[ri] << 21) ? "plain" : "streaming");
        for (uint64_t frame = 0; frame < 3; frame++) {
            tu_fill(src + 1, n, frame);
            assert_int_equal(fshm_writer_publish(w, src + 1, n, &t, 0), 0);
            fshm_frame f;
            memset(&f, 0, sizeof f);
            assert_int_equal(fshm_reader_wait_next(r, 2 * SEC, &f), 0);
            tu_fill(want, n, frame);
            assert_int_equal(f.nbytes, n);
            assert_memory_equal(f.data, want, n);
        }
        assert_null(w->fill);
        fshm_reader_close(r);
        fshm_writer_close(w, 1);
    }
    free(src);
    free(want);
}

/* A reader racing a producer that publishes back to back with its team: every frame it
 * is handed, and finds still valid after looking at it, is entirely one frame's bytes
 * (the seqlock covers the helpers' stores too). A commit that does not wait for the
 * helpers' last pieces is caught by test_team_copies_every_byte, which compares at
 * once, not here: a reader woken by the commit is slower than a helper's last piece. */
typedef struct racing_reader {
    fshm_reader *r;
    int stop;   /* atomic */
    uint64_t checked, mixed;
    int rc;
} racing_reader;

static void *racing_main(void *arg)
{
    racing_reader *rr = arg;
    fshm_reader *r = rr->r;
    while (!__atomic_load_n(&rr->stop, __ATOMIC_RELAXED)) {
        fshm_frame f;
        memset(&f, 0, sizeof f);
        int rc = fshm_reader_wait_latest(r, SEC / 10, &f);
        if (rc == -ETIMEDOUT)
            continue;
        if (rc) {
            rr->rc = rc;
            break;
        }
        const uint8_t *p = f.data;
        uint8_t first = p[0];
        int same = 1;
        for (size_t i = 0; i < f.nbytes && same; i += 64)
            same = p[i] == first && p[f.nbytes - 1 - i] == first;
        if (!fshm_frame_valid(r, &f))
            continue;   /* overwritten while we looked: the seqlock says so, as it must */
        rr->checked++;
        rr->mixed += !same;
    }
    return NULL;
}

static void test_commit_waits_for_every_piece(void **state)
{
    (void)state;
    fshm_writer *w = fill_writer("fill-race", FRAME_1080P, 2);
    racing_reader rr = {.r = tu_reader("fill-race")};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, racing_main, &rr), 0);
    uint8_t *src = malloc(FRAME_1080P);
    assert_non_null(src);
    fshm_tensor tn = tu_u8_tensor(FRAME_1080P);
    for (int i = 0; i < 400; i++) {
        memset(src, i & 0xff, FRAME_1080P);
        assert_int_equal(fshm_writer_publish(w, src, FRAME_1080P, &tn, 0), 0);
    }
    usleep(50000);
    __atomic_store_n(&rr.stop, 1, __ATOMIC_RELAXED);
    pthread_join(t, NULL);
    print_message("    %llu frames checked whole, %llu mixed; helpers copied %llu pieces\n",
                  (unsigned long long)rr.checked, (unsigned long long)rr.mixed,
                  (unsigned long long)fshm_fill_team_helper_pieces(w->fill));
    assert_int_equal(rr.rc, 0);
    assert_true(rr.checked > 0);
    assert_int_equal(rr.mixed, 0);
    free(src);
    fshm_reader_close(rr.r);
    fshm_writer_close(w, 1);
}

/* Helpers are started by the first publish that uses them, only for writers that asked,
 * only for payloads of FSHM_FILL_TEAM_MIN and more, and are joined by close. */
static void test_helper_threads_come_and_go(void **state)
{
    (void)state;
    uint8_t *src = calloc(1, FRAME_1080P);
    assert_non_null(src);
    fshm_tensor big = tu_u8_tensor(FRAME_1080P), small = tu_u8_tensor(FSHM_FILL_TEAM_MIN - 1);
    for (uint32_t ft = 0; ft <= 3; ft++) {
        fshm_writer *w = fill_writer("fill-threads", FRAME_1080P, ft);
        assert_int_equal(helper_threads(), 0);
        assert_int_equal(fshm_writer_publish(w, src, FSHM_FILL_TEAM_MIN - 1, &small, 0), 0);
        assert_int_equal(helper_threads(), 0);
        assert_int_equal(fshm_writer_publish(w, src, FRAME_1080P, &big, 0), 0);
        assert_int_equal(helper_threads(), ft > 1 ? (int)ft - 1 : 0);
        fshm_writer_close(w, 1);
        assert_int_equal(helper_threads(), 0);
    }
    free(src);
}

static void test_fill_threads_limit(void **state)
{
    (void)state;
    fshm_writer_config cfg = fill_config("fill-limit", 4, 4096, FSHM_MAX_FILL_THREADS + 1);
    fshm_writer *w = NULL;
    assert_int_equal(fshm_writer_open(&cfg, &w), -EINVAL);
    assert_null(w);
    assert_non_null(strstr(fshm_last_error(), "fill_threads"));
    char dir[PATH_MAX];
    tu_stream_dir(fshm_stream_id_for_name("fill-limit"), dir, sizeof dir);
    assert_false(tu_path_exists(dir));
    /* A caller built against an older header (its struct ends before fill_threads) gets
     * the default. */
    cfg.fill_threads = 0;
    cfg.struct_size = offsetof(fshm_writer_config, fill_threads);
    assert_int_equal(fshm_writer_open(&cfg, &w), 0);
    assert_int_equal(w->fill_threads, 0);
    fshm_writer_close(w, 1);
}

/* The child of a fork() has none of the parent's helper threads: its first big publish
 * must not wait for them, and the parent's team goes on working. */
static void test_fork_child_fills_without_parent_helpers(void **state)
{
    (void)state;
    fshm_writer *w = fill_writer("fill-fork", FRAME_1080P, 2);
    fshm_reader *r = tu_reader("fill-fork");
    uint8_t *src = malloc(FRAME_1080P), *want = malloc(FRAME_1080P);
    assert_non_null(src);
    assert_non_null(want);
    fshm_tensor t = tu_u8_tensor(FRAME_1080P);
    tu_fill(src, FRAME_1080P, 1);
    assert_int_equal(fshm_writer_publish(w, src, FRAME_1080P, &t, 0), 0);
    assert_non_null(w->fill);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        alarm(20);   /* a child waiting for helpers it does not have would hang: fail instead */
        int ok = w->fill == NULL && fshm_writer_publish(w, src, FRAME_1080P, &t, 0) == 0;
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    fshm_frame f;
    memset(&f, 0, sizeof f);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    /* The child used the seq that came next for its copy of the writer too: the parent's
     * next frame takes the one after, through the parent's own team. */
    assert_int_equal(fshm_writer_skip_to(w, fshm_writer_next_seq(w) + 1), 0);
    tu_fill(src, FRAME_1080P, 2);
    assert_int_equal(fshm_writer_publish(w, src, FRAME_1080P, &t, 0), 0);
    assert_int_equal(fshm_reader_wait_latest(r, 2 * SEC, &f), 0);
    tu_fill(want, FRAME_1080P, 2);
    assert_memory_equal(f.data, want, FRAME_1080P);
    fshm_reader_close(r);
    fshm_writer_close(w, 1);
    free(src);
    free(want);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_team_copies_every_byte),
        cmocka_unit_test(test_alone_fill_both_store_kinds),
        cmocka_unit_test(test_commit_waits_for_every_piece),
        cmocka_unit_test(test_helper_threads_come_and_go),
        cmocka_unit_test(test_fill_threads_limit),
        cmocka_unit_test(test_fork_child_fills_without_parent_helpers),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
