/* Shared helpers of the C core's cmocka tests. */
#include "fshm_test_util.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <mqueue.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fshm_internal.h"

char tu_base[PATH_MAX];
static char tu_mkdtemp_path[PATH_MAX];
static pid_t tu_owner_pid;

void tu_rmtree(const char *dir)
{
    if (dir && *dir && tu_path_exists(dir))
        fshm_remove_tree(dir);   /* the core's own, compiled into every test binary */
}

static int list_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)ftw;
    fprintf(stderr, "    left: %s (%s, mode %o, uid %u)\n", path, flag == FTW_D ? "dir" : "file",
            (unsigned)(sb->st_mode & 07777), (unsigned)sb->st_uid);
    return 0;
}

int tu_gone(const char *path)
{
    if (!tu_path_exists(path))
        return 1;
    nftw(path, list_entry, 16, FTW_PHYS);
    return 0;
}

static int files_seen, files_verbose;
static int count_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)ftw;
    if (flag == FTW_F && S_ISREG(sb->st_mode)) {
        files_seen++;
        if (files_verbose)
            fprintf(stderr, "    (file: %s)\n", path);
    }
    return 0;
}

int tu_count_files_v(const char *dir, int verbose)
{
    files_seen = 0;
    files_verbose = verbose;
    if (tu_path_exists(dir))
        nftw(dir, count_entry, 16, FTW_PHYS);
    return files_seen;
}

int tu_tmpfs_mount(const char *size, char *dir)
{
    snprintf(dir, PATH_MAX, "/tmp/fshm-ctest-tmpfs-XXXXXX");
    if (!mkdtemp(dir)) {
        int e = errno;
        print_message("    cannot create a mount point under /tmp: %s\n", strerror(e));
        dir[0] = 0;
        return -e;
    }
    char opts[64];
    snprintf(opts, sizeof opts, "size=%s,mode=0700", size);
    if (mount("tmpfs", dir, "tmpfs", MS_NOSUID | MS_NODEV, opts) != 0) {
        int e = errno;
        print_message("    SKIP: cannot mount a %s tmpfs on %s (%s); needs root or CAP_SYS_ADMIN\n",
                      size, dir, strerror(e));
        rmdir(dir);
        dir[0] = 0;
        return -e;
    }
    return 0;
}

void tu_tmpfs_unmount(char *dir)
{
    if (!dir[0])
        return;
    umount2(dir, MNT_DETACH);
    rmdir(dir);
    dir[0] = 0;
}

int tu_path_exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

#define TU_MAX_TRACKED 1024
static char tracked[TU_MAX_TRACKED][32];
static int ntracked;

void tu_track_name(const char *queue)
{
    if (queue && queue[0] == '/' && ntracked < TU_MAX_TRACKED)
        snprintf(tracked[ntracked++], 32, "%s", queue);
}

void tu_track(fshm_reader *r)
{
    if (r)
        tu_track_name(fshm_reader_queue_name(r));
}

static void unlink_tracked_queues(void)
{
    for (int i = 0; i < ntracked; i++)
        mq_unlink(tracked[i]);   /* ENOENT for every reader that was closed */
    ntracked = 0;
}

static void cleanup_at_exit(void)
{
    /* Only the process that created the directory removes it (children _exit). */
    if (getpid() != tu_owner_pid)
        return;
    unlink_tracked_queues();
    if (tu_mkdtemp_path[0])
        tu_rmtree(tu_mkdtemp_path);
}

int tu_group_setup(void **state)
{
    (void)state;
    snprintf(tu_mkdtemp_path, sizeof tu_mkdtemp_path, "/tmp/fshm-ctest-XXXXXX");
    if (!mkdtemp(tu_mkdtemp_path)) {
        fprintf(stderr, "mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    if (!realpath(tu_mkdtemp_path, tu_base)) {
        fprintf(stderr, "realpath: %s\n", strerror(errno));
        return -1;
    }
    tu_owner_pid = getpid();
    static int registered;
    if (!registered) {
        atexit(cleanup_at_exit);
        registered = 1;
    }
    setenv("FRAMESHM_DIR", tu_base, 1);
    unsetenv("FRAMESHM_NAMESPACE");
    return 0;
}

int tu_group_teardown(void **state)
{
    (void)state;
    unlink_tracked_queues();
    tu_rmtree(tu_mkdtemp_path);
    tu_mkdtemp_path[0] = 0;
    unsetenv("FRAMESHM_DIR");
    return 0;
}

void tu_user_dir(char *out, size_t cap)
{
    /* Mirrors the wire spec's directory rule: tensorpool-<user name>, with characters
     * outside [A-Za-z0-9_-] replaced by '_'. */
    char user[64];
    struct passwd *pw = getpwuid(geteuid());
    if (pw && pw->pw_name[0]) {
        size_t j = 0;
        for (const char *p = pw->pw_name; *p && j + 1 < sizeof user; p++) {
            char c = *p;
            int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                     c == '_' || c == '-';
            user[j++] = ok ? c : '_';
        }
        user[j] = 0;
    } else {
        snprintf(user, sizeof user, "%u", (unsigned)geteuid());
    }
    snprintf(out, cap, "%s/tensorpool-%s", tu_base, user);
}

void tu_stream_dir(uint32_t stream_id, char *out, size_t cap)
{
    char u[PATH_MAX];
    tu_user_dir(u, sizeof u);
    snprintf(out, cap, "%s/default/%u", u, stream_id);
}

void tu_region_path(uint32_t stream_id, uint64_t epoch, const char *file, char *out, size_t cap)
{
    char s[PATH_MAX];
    tu_stream_dir(stream_id, s, sizeof s);
    snprintf(out, cap, "%s/%llu/%s", s, (unsigned long long)epoch, file);
}

uint8_t *tu_read_file(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail_msg("cannot open %s: %s", path, strerror(errno));
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    uint8_t *buf = malloc((size_t)st.st_size + 1);
    assert_non_null(buf);
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t n = pread(fd, buf + got, (size_t)st.st_size - got, (off_t)got);
        if (n <= 0)
            fail_msg("read %s: %s", path, n < 0 ? strerror(errno) : "short file");
        got += (size_t)n;
    }
    close(fd);
    *len = got;
    return buf;
}

void tu_patch_file(const char *path, off_t off, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        fail_msg("cannot open %s for writing: %s", path, strerror(errno));
    ssize_t n = pwrite(fd, data, len, off);
    if (n != (ssize_t)len)
        fail_msg("pwrite %s: %s", path, strerror(errno));
    close(fd);
}

uint16_t tu_le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
uint32_t tu_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
uint64_t tu_le64(const uint8_t *p) { return (uint64_t)tu_le32(p) | (uint64_t)tu_le32(p + 4) << 32; }

fshm_writer *tu_writer(const char *name, uint32_t nslots, uint32_t pool_bytes)
{
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = name;
    cfg.nslots = nslots;
    cfg.npools = 1;
    cfg.pool_bytes[0] = pool_bytes ? pool_bytes : 4096;
    fshm_writer *w = NULL;
    int rc = fshm_writer_open(&cfg, &w);
    if (rc)
        fail_msg("fshm_writer_open(%s): %d %s", name, rc, fshm_last_error());
    return w;
}

fshm_reader *tu_reader(const char *name)
{
    fshm_reader_config cfg = FSHM_READER_CONFIG_INIT;
    cfg.addr.name = name;
    fshm_reader *r = NULL;
    int rc = fshm_reader_open(&cfg, &r);
    if (rc)
        fail_msg("fshm_reader_open(%s): %d %s", name, rc, fshm_last_error());
    tu_track(r);
    return r;
}

fshm_reader *tu_reader_no_queue(const char *name)
{
    fshm_reader_config cfg = FSHM_READER_CONFIG_INIT;
    cfg.addr.name = name;
    cfg.no_queue = 1;
    fshm_reader *r = NULL;
    int rc = fshm_reader_open(&cfg, &r);
    if (rc)
        fail_msg("fshm_reader_open(%s, no_queue): %d %s", name, rc, fshm_last_error());
    return r;
}

fshm_frame tu_frame_zero(void)
{
    fshm_frame f;
    memset(&f, 0, sizeof f);
    return f;
}

fshm_tensor tu_u8_tensor(uint32_t n)
{
    fshm_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = FSHM_DTYPE_UINT8;
    t.major_order = FSHM_ORDER_ROW;
    t.ndims = 1;
    t.dims[0] = (int32_t)n;
    return t;
}

static uint8_t pattern_byte(uint64_t seq, size_t i)
{
    uint64_t x = seq * 0x9E3779B97F4A7C15ull + i * 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return (uint8_t)(x ^ (x >> 17) ^ (x >> 41));
}

void tu_fill(void *buf, size_t n, uint64_t seq)
{
    uint8_t *b = buf;
    for (size_t i = 0; i < n; i++)
        b[i] = pattern_byte(seq, i);
}

int tu_check(const void *buf, size_t n, uint64_t seq)
{
    const uint8_t *b = buf;
    for (size_t i = 0; i < n; i++)
        if (b[i] != pattern_byte(seq, i))
            return 0;
    return 1;
}

int tu_publish(fshm_writer *w, size_t n)
{
    uint8_t *buf = malloc(n ? n : 1);
    assert_non_null(buf);
    tu_fill(buf, n, fshm_writer_next_seq(w));
    fshm_tensor t = tu_u8_tensor((uint32_t)n);
    int rc = fshm_writer_publish(w, buf, n, &t, 0);
    free(buf);
    return rc;
}

pid_t tu_dead_pid(void)
{
    pid_t pid = tu_fork();
    if (pid == 0)
        _exit(0);
    assert_int_equal(waitpid(pid, NULL, 0), pid);
    return pid;
}

pid_t tu_fork(void)
{
    fflush(stdout);
    fflush(stderr);
    pid_t parent = getpid();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* A child must never outlive the test binary (e.g. after a failed assertion). */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        /* cmocka's handlers would longjmp back into the parent's test runner. */
        static const int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS, SIGABRT};
        for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
            signal(sigs[i], SIG_DFL);
        if (getppid() != parent)
            _exit(121);
        alarm(60);
    }
    return pid;
}

void tu_signal_ready(int fd, const void *msg, size_t len)
{
    const char *p = msg;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n <= 0)
            _exit(120);
        p += n;
        len -= (size_t)n;
    }
}

int tu_wait_ready(int fd, void *msg, size_t len, int timeout_ms)
{
    char *p = msg;
    uint64_t deadline = tu_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (len) {
        uint64_t now = tu_now_ns();
        if (now >= deadline)
            return -ETIMEDOUT;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int pr = poll(&pfd, 1, (int)((deadline - now) / 1000000ull) + 1);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            return -ETIMEDOUT;
        ssize_t n = read(fd, p, len);
        if (n <= 0)
            return -EPIPE;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

void tu_kill_child(pid_t pid)
{
    kill(pid, SIGKILL);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
}

int tu_wait_child(pid_t pid, int timeout_ms)
{
    uint64_t deadline = tu_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (r < 0 && errno != EINTR)
            return -1;
        if (tu_now_ns() >= deadline) {
            tu_kill_child(pid);
            return -ETIMEDOUT;
        }
        tu_sleep_ms(2);
    }
}

void tu_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

uint64_t tu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
