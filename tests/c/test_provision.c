/* Driver-side provisioning (lib/src/fshm_provision.c): footprint arithmetic of the seed
 * profiles, what one epoch creates (files, modes, superblocks, announce, epoch word),
 * epoch bumps, refusing what does not fit with nothing created (the room check on a real
 * 64 MiB tmpfs), cleanup after a failure part-way, removal and the current-epoch query. */
#include "fshm_test_util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#define KIB 1024ull
#define MIB (1024ull * 1024ull)

static fshm_profile profile2(uint32_t nslots, uint32_t s1, uint32_t s2)
{
    fshm_profile p = FSHM_PROFILE_INIT;
    p.header_nslots = nslots;
    p.npools = 2;
    p.pool_id[0] = 1;
    p.pool_id[1] = 2;
    p.stride_bytes[0] = s1;
    p.stride_bytes[1] = s2;
    p.file_mode = 0600;
    p.gid = -1;
    return p;
}

static fshm_stream_addr addr_id(uint32_t id)
{
    fshm_stream_addr a;
    memset(&a, 0, sizeof a);
    a.stream_id = id;
    return a;
}

static void map_ctl(uint32_t stream_id, fshm_ctl_handle *h)
{
    fshm_stream_addr a = addr_id(stream_id);
    fshm_paths p;
    assert_int_equal(fshm_resolve(&a, 0, &p), 0);
    assert_int_equal(fshm_ctl_open(&p, 0, h), 0);
}

static mode_t mode_of(const char *path)
{
    struct stat st;
    assert_int_equal(lstat(path, &st), 0);
    return st.st_mode;
}

static void uri_of(const char *path, char *out, size_t cap)
{
    snprintf(out, cap, "shm:file?path=%s", path);
}

/* ---- footprint ---- */

static void test_footprint_seed_profiles(void **state)
{
    (void)state;
    /* docs/examples/driver_camera_example.toml: raw = 1024 slots, 1 MiB + 4 MiB pools;
     * processed = 512 slots, 512 KiB + 2 MiB pools. */
    fshm_profile raw = profile2(1024, 1 * MIB, 4 * MIB);
    uint64_t want_raw = 64 + 1024ull * 256 + 2 * 64 + 1024ull * (1 * MIB + 4 * MIB) + 12288;
    assert_int_equal(fshm_profile_footprint(&raw), want_raw);
    assert_int_equal(want_raw, 5368983744ull);
    assert_true(want_raw > 5ull * 1024 * MIB);   /* "5 GiB per camera" */
    fshm_profile processed = profile2(512, 512 * KIB, 2 * MIB);
    uint64_t want_proc = 64 + 512ull * 256 + 2 * 64 + 512ull * (512 * KIB + 2 * MIB) + 12288;
    assert_int_equal(fshm_profile_footprint(&processed), want_proc);
    assert_int_equal(want_proc, 1342320832ull);
    /* Three cameras and three processors: more than a 24 GiB machine's /dev/shm (half of RAM). */
    assert_true(3 * want_raw + 3 * want_proc > 12ull * 1024 * MIB);
    /* One pool, one slot: the smallest stream. */
    fshm_profile tiny = FSHM_PROFILE_INIT;
    tiny.header_nslots = 1;
    tiny.npools = 1;
    tiny.pool_id[0] = 1;
    tiny.stride_bytes[0] = 64;
    assert_int_equal(fshm_profile_footprint(&tiny), 64 + 256 + 64 + 64 + FSHM_CTL_BYTES);
    assert_int_equal(fshm_profile_footprint(NULL), 0);
}

/* ---- one epoch ---- */

static void test_provision_creates_epoch(void **state)
{
    (void)state;
    fshm_profile p = profile2(16, 4096, 65536);
    p.file_mode = 0640;
    fshm_stream_addr a = addr_id(1001);
    fshm_grant g;
    int rc = fshm_provision_epoch(&a, &p, 0, &g);
    if (rc)
        fail_msg("provision: %s", fshm_last_error());
    assert_int_equal(g.epoch, 1);
    assert_int_equal(g.stream_id, 1001);
    assert_int_equal(g.layout_version, FSHM_LAYOUT_VERSION);
    assert_int_equal(g.header_nslots, 16);
    assert_int_equal(g.header_slot_bytes, 256);
    assert_int_equal(g.max_dims, FSHM_MAX_DIMS);
    assert_int_equal(g.lease_id, 0);
    assert_int_equal(g.npools, 2);

    char path[1024], want[1100], dir[1024];
    tu_region_path(1001, 1, "header.ring", path, sizeof path);
    uri_of(path, want, sizeof want);
    assert_string_equal(g.header_uri, want);
    size_t len;
    uint8_t *ring = tu_read_file(path, &len);
    assert_int_equal(len, 64 + 16 * 256);
    assert_int_equal(fshm_superblock_check(ring, len, 1, 1001, FSHM_REGION_HEADER_RING, 0, 16, 256, 256), 0);
    assert_int_equal(tu_le64(ring + SB_PID), (uint64_t)getpid());
    for (size_t i = 64; i < len; i++)
        assert_int_equal(ring[i], 0);   /* no slot committed */
    free(ring);
    assert_int_equal(mode_of(path) & 07777, 0640);
    for (unsigned i = 0; i < 2; i++) {
        char file[32];
        snprintf(file, sizeof file, "%u.pool", i + 1);
        tu_region_path(1001, 1, file, path, sizeof path);
        uri_of(path, want, sizeof want);
        assert_string_equal(g.pools[i].uri, want);
        assert_int_equal(g.pools[i].pool_id, i + 1);
        assert_int_equal(g.pools[i].nslots, 16);
        assert_int_equal(g.pools[i].stride_bytes, p.stride_bytes[i]);
        uint8_t *pool = tu_read_file(path, &len);
        assert_int_equal(len, 64 + 16ull * p.stride_bytes[i]);
        assert_int_equal(fshm_superblock_check(pool, len, 1, 1001, FSHM_REGION_PAYLOAD_POOL, i + 1, 16,
                                               p.stride_bytes[i], p.stride_bytes[i]), 0);
        free(pool);
        assert_int_equal(mode_of(path) & 07777, 0640);
    }
    /* Directories get x where files get r. */
    tu_stream_dir(1001, dir, sizeof dir);
    assert_int_equal(mode_of(dir) & 07777, 0750);
    snprintf(path, sizeof path, "%s/1", dir);
    assert_int_equal(mode_of(path) & 07777, 0750);
    snprintf(path, sizeof path, "%s/frameshm.ctl", dir);
    assert_int_equal(mode_of(path) & 07777, 0640);

    /* The control region announces exactly the granted files, epoch published last. */
    fshm_ctl_handle h;
    map_ctl(1001, &h);
    assert_int_equal(LOAD_ACQ(&h.ctl->epoch), 1);
    assert_int_equal(LOAD_ACQ(&h.ctl->state), CTL_STATE_NEVER);
    assert_int_equal(h.ctl->producer_pid, 0);
    fshm_announce an;
    assert_int_equal(fshm_ctl_read_announce(h.ctl, &an), 0);
    assert_int_equal(an.epoch, 1);
    assert_int_equal(an.header_nslots, 16);
    assert_int_equal(an.npools, 2);
    assert_string_equal(an.header_uri, g.header_uri);
    assert_string_equal(an.pools[1].uri, g.pools[1].uri);
    assert_string_equal(h.ctl->name, "stream-1001");
    /* A producer ran on it: sequence numbers must carry on into the next epoch. */
    STORE_REL(&h.ctl->latest_seq, 42);
    STORE_REL(&h.ctl->state, (uint8_t)CTL_STATE_LIVE);
    STORE_RLX(&h.ctl->producer_pid, 12345);
    fshm_ctl_close(&h);

    uint64_t cur = 0;
    assert_int_equal(fshm_provision_current(&a, &cur), 0);
    assert_int_equal(cur, 1);

    /* The next epoch replaces the old directory. */
    rc = fshm_provision_epoch(&a, &p, 0, &g);
    if (rc)
        fail_msg("provision 2: %s", fshm_last_error());
    assert_int_equal(g.epoch, 2);
    snprintf(path, sizeof path, "%s/1", dir);
    assert_false(tu_path_exists(path));
    tu_region_path(1001, 2, "header.ring", path, sizeof path);
    assert_true(tu_path_exists(path));
    map_ctl(1001, &h);
    assert_int_equal(LOAD_ACQ(&h.ctl->epoch), 2);
    assert_int_equal(LOAD_ACQ(&h.ctl->latest_seq), 42);
    assert_int_equal(LOAD_ACQ(&h.ctl->state), CTL_STATE_NEVER);
    assert_int_equal(h.ctl->producer_pid, 0);
    fshm_ctl_close(&h);

    /* min_epoch wins when larger (a restarted driver never reissues an epoch). */
    rc = fshm_provision_epoch(&a, &p, 10, &g);
    assert_int_equal(rc, 0);
    assert_int_equal(g.epoch, 10);
    assert_int_equal(fshm_provision_current(&a, &cur), 0);
    assert_int_equal(cur, 10);

    assert_int_equal(fshm_provision_remove(&a), 1);
    assert_false(tu_path_exists(dir));
    assert_int_equal(fshm_provision_remove(&a), 0);
    assert_int_equal(fshm_provision_current(&a, &cur), -ENOENT);
    assert_int_equal(cur, 0);
}

/* A stale epoch directory above the control region's epoch is never reused. */
static void test_epoch_skips_leftover_directories(void **state)
{
    (void)state;
    fshm_profile p = profile2(4, 64, 128);
    fshm_stream_addr a = addr_id(1002);
    fshm_grant g;
    assert_int_equal(fshm_provision_epoch(&a, &p, 0, &g), 0);
    assert_int_equal(g.epoch, 1);
    char dir[1024], path[1100];
    tu_stream_dir(1002, dir, sizeof dir);
    snprintf(path, sizeof path, "%s/7", dir);
    assert_int_equal(mkdir(path, 0700), 0);
    assert_int_equal(fshm_provision_epoch(&a, &p, 0, &g), 0);
    assert_int_equal(g.epoch, 8);
    assert_false(tu_path_exists(path));
    assert_int_equal(fshm_provision_remove(&a), 1);
}

static void test_named_stream_and_group(void **state)
{
    (void)state;
    fshm_profile p = profile2(8, 256, 1024);
    p.file_mode = 0660;
    p.gid = 4242;   /* root may give files to any group; others only to their own */
    if (geteuid() != 0)
        p.gid = getegid();
    fshm_stream_addr a;
    memset(&a, 0, sizeof a);
    a.name = "cam1";
    fshm_grant g;
    int rc = fshm_provision_epoch(&a, &p, 0, &g);
    if (rc)
        fail_msg("provision: %s", fshm_last_error());
    assert_int_equal(g.stream_id, fshm_stream_id_for_name("cam1"));
    char dir[1024], path[1100];
    tu_stream_dir(g.stream_id, dir, sizeof dir);
    struct stat st;
    assert_int_equal(lstat(dir, &st), 0);
    assert_int_equal(st.st_gid, (gid_t)p.gid);
    assert_int_equal(st.st_mode & 07777, 02770);
    snprintf(path, sizeof path, "%s/frameshm.ctl", dir);
    assert_int_equal(lstat(path, &st), 0);
    assert_int_equal(st.st_gid, (gid_t)p.gid);
    assert_int_equal(st.st_mode & 07777, 0660);
    tu_region_path(g.stream_id, g.epoch, "2.pool", path, sizeof path);
    assert_int_equal(lstat(path, &st), 0);
    assert_int_equal(st.st_gid, (gid_t)p.gid);
    fshm_ctl_handle h;
    fshm_paths pp;
    assert_int_equal(fshm_resolve(&a, 0, &pp), 0);
    assert_int_equal(fshm_ctl_open(&pp, 0, &h), 0);
    assert_string_equal(h.ctl->name, "cam1");
    fshm_ctl_close(&h);
    assert_int_equal(fshm_provision_remove(&a), 1);
}

/* ---- refusals: nothing is created ---- */

static void test_invalid_profiles_create_nothing(void **state)
{
    (void)state;
    fshm_stream_addr a = addr_id(1003);
    fshm_grant g;
    char dir[1024];
    tu_stream_dir(1003, dir, sizeof dir);
    fshm_profile bad[8];
    for (int i = 0; i < 8; i++)
        bad[i] = profile2(16, 4096, 8192);
    bad[0].header_nslots = 12;                 /* not a power of two */
    bad[1].header_nslots = 1u << 25;           /* above 2^24 */
    bad[2].npools = 0;
    bad[3].npools = FSHM_MAX_POOLS + 1;
    bad[4].pool_id[1] = 1;                     /* duplicate */
    bad[5].pool_id[0] = 0;                     /* reserved */
    bad[6].stride_bytes[0] = 100;              /* not a power-of-two multiple of 64 */
    bad[7].file_mode = 04755;
    for (int i = 0; i < 8; i++) {
        int rc = fshm_provision_epoch(&a, &bad[i], 0, &g);
        if (rc != -EINVAL)
            fail_msg("profile %d: rc %d (%s)", i, rc, fshm_last_error());
        assert_false(tu_path_exists(dir));
    }
}

static void test_does_not_fit_creates_nothing(void **state)
{
    (void)state;
    char user[1024], dir[1024];
    tu_user_dir(user, sizeof user);
    tu_rmtree(user);
    fshm_stream_addr a = addr_id(1001);
    fshm_grant g;
    /* The largest valid profile: 2^24 slots of 2 GiB. No file system holds 32 PiB. */
    fshm_profile huge = profile2(1u << 24, 0x80000000u, 0x80000000u);
    int rc = fshm_provision_epoch(&a, &huge, 0, &g);
    assert_int_equal(rc, -ENOSPC);
    assert_non_null(strstr(fshm_last_error(), "stream 1001 needs"));
    assert_non_null(strstr(fshm_last_error(), "profile footprint"));
    assert_non_null(strstr(fshm_last_error(), tu_base));
    assert_false(tu_path_exists(user));   /* not even the directories */

    /* An existing stream's next epoch: refused, the current one is untouched. */
    fshm_profile small = profile2(4, 64, 128);
    assert_int_equal(fshm_provision_epoch(&a, &small, 0, &g), 0);
    /* Earlier tests' stream 1001 was removed, but its epochs go on (the ledger). */
    uint64_t first = g.epoch;
    rc = fshm_provision_epoch(&a, &huge, 0, &g);
    assert_int_equal(rc, -ENOSPC);
    assert_non_null(strstr(fshm_last_error(), "held by the epoch being replaced"));
    uint64_t cur;
    assert_int_equal(fshm_provision_current(&a, &cur), 0);
    assert_int_equal(cur, first);
    char path[1100];
    tu_region_path(1001, first, "header.ring", path, sizeof path);
    assert_true(tu_path_exists(path));
    tu_stream_dir(1001, dir, sizeof dir);
    snprintf(path, sizeof path, "%s/%llu", dir, (unsigned long long)first + 1);
    assert_false(tu_path_exists(path));
    assert_int_equal(fshm_provision_remove(&a), 1);
}

/* ---- the room check against a real small file system ---- */

static char small_fs[PATH_MAX];

static int unmount_small_fs(void **state)
{
    (void)state;
    tu_tmpfs_unmount(small_fs);
    return 0;
}

/* Free bytes of the file system holding dir, from statvfs (not through the library). */
static uint64_t fs_free_bytes(const char *dir)
{
    struct statvfs v;
    assert_int_equal(statvfs(dir, &v), 0);
    return (uint64_t)v.f_bavail * v.f_frsize;
}

/* Bytes the files directly in dir occupy. */
static uint64_t dir_file_bytes(const char *dir)
{
    uint64_t total = 0;
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *de;
    while ((de = readdir(d))) {
        char path[PATH_MAX + 256];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (lstat(path, &st) == 0 && S_ISREG(st.st_mode))
            total += (uint64_t)st.st_blocks * 512u;
    }
    closedir(d);
    return total;
}

static int dir_is_empty(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d)))
        n += strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0;
    closedir(d);
    return n == 0;
}

/* Every size in this test is between 1 MiB and 1 GiB: the library prints those so. */
static void mib(uint64_t n, char *out, size_t cap)
{
    assert_true(n >= MIB && n < 1024 * MIB);
    snprintf(out, cap, "%.1f MiB", (double)n / (double)MIB);
}

static void test_room_check_on_small_tmpfs(void **state)
{
    (void)state;
    if (tu_tmpfs_mount("64m", small_fs) != 0)
        skip();
    assert_int_equal(fs_free_bytes(small_fs), 64 * MIB);
    uint64_t room = 0, fs_free = 0;
    assert_int_equal(fshm_shm_room(small_fs, &room, &fs_free), 0);
    assert_int_equal(fs_free, 64 * MIB);
    if (room < fs_free) {
        print_message("    SKIP: less than 64 MiB of memory available to back the tmpfs\n");
        skip();
    }
    fshm_stream_addr a = addr_id(1001);
    a.base_dir = small_fs;
    fshm_grant g;
    char want[PATH_MAX + 300], fr[32], ob[32], fp[32];

    /* The seed raw profile (5 GiB): refused against the real free space, nothing made. */
    fshm_profile raw = profile2(1024, 1 * MIB, 4 * MIB);
    assert_int_equal(fshm_provision_epoch(&a, &raw, 0, &g), -ENOSPC);
    snprintf(want, sizeof want, "stream 1001 needs 5.0 GiB (profile footprint, 5368983744 bytes) but %s "
             "has 64.0 MiB free", small_fs);
    assert_string_equal(fshm_last_error(), want);
    assert_true(dir_is_empty(small_fs));

    /* 40 MiB fits; its next epoch only fits once the first is gone, which it then is. */
    fshm_profile p40 = profile2(8, 1 * MIB, 4 * MIB);
    assert_int_equal(fshm_provision_epoch(&a, &p40, 0, &g), 0);
    assert_int_equal(g.epoch, 1);
    assert_true(fs_free_bytes(small_fs) < fshm_profile_footprint(&p40));
    assert_int_equal(fshm_provision_epoch(&a, &p40, 0, &g), 0);
    assert_int_equal(g.epoch, 2);
    char sdir[PATH_MAX], edir[PATH_MAX + 32];
    fshm_paths paths;
    assert_int_equal(fshm_resolve(&a, 0, &paths), 0);
    snprintf(sdir, sizeof sdir, "%s", paths.stream_dir);
    snprintf(edir, sizeof edir, "%s/1", sdir);
    assert_false(tu_path_exists(edir));

    /* 80 MiB does not fit even with epoch 2's bytes: refused, epoch 2 untouched. */
    fshm_profile p80 = profile2(16, 1 * MIB, 4 * MIB);
    snprintf(edir, sizeof edir, "%s/2", sdir);
    uint64_t free_now = fs_free_bytes(small_fs), held = dir_file_bytes(edir);
    assert_int_equal(fshm_provision_epoch(&a, &p80, 0, &g), -ENOSPC);
    mib(fshm_profile_footprint(&p80), fp, sizeof fp);
    mib(free_now, fr, sizeof fr);
    mib(held, ob, sizeof ob);
    snprintf(want, sizeof want, "stream 1001 needs %s (profile footprint, %llu bytes) but %s has %s "
             "free (plus %s held by the epoch being replaced)", fp,
             (unsigned long long)fshm_profile_footprint(&p80), small_fs, fr, ob);
    assert_string_equal(fshm_last_error(), want);
    uint64_t cur;
    assert_int_equal(fshm_provision_current(&a, &cur), 0);
    assert_int_equal(cur, 2);
    assert_int_equal(dir_file_bytes(edir), held);
    snprintf(edir, sizeof edir, "%s/3", sdir);
    assert_false(tu_path_exists(edir));

    assert_int_equal(fshm_provision_remove(&a), 1);
}

/* A failure after some files exist (here: the file-size limit stops the big pool's
 * reservation) removes everything this call created. */
static void test_failure_partway_leaves_nothing(void **state)
{
    (void)state;
    char user[1024];
    tu_user_dir(user, sizeof user);
    tu_rmtree(user);
    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    lim = old;
    lim.rlim_cur = 1 * MIB;
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    fshm_profile p = profile2(16, 4096, 1 * MIB);   /* pool 2: 16 MiB > the limit */
    fshm_stream_addr a = addr_id(1004);
    fshm_grant g;
    int rc = fshm_provision_epoch(&a, &p, 0, &g);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, prev);
    assert_true(rc < 0);
    assert_false(tu_path_exists(user));

    /* With a stream already there, only the new epoch goes; the old one stays current. */
    fshm_profile ok = profile2(4, 64, 128);
    assert_int_equal(fshm_provision_epoch(&a, &ok, 0, &g), 0);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    signal(SIGXFSZ, SIG_IGN);
    rc = fshm_provision_epoch(&a, &p, 0, &g);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, prev);
    assert_true(rc < 0);
    char dir[1024], path[1100];
    tu_stream_dir(1004, dir, sizeof dir);
    snprintf(path, sizeof path, "%s/2", dir);
    assert_false(tu_path_exists(path));
    tu_region_path(1004, 1, "header.ring", path, sizeof path);
    assert_true(tu_path_exists(path));
    uint64_t cur;
    assert_int_equal(fshm_provision_current(&a, &cur), 0);
    assert_int_equal(cur, 1);
    assert_int_equal(fshm_provision_remove(&a), 1);
}

/* A reader of the non-driver API can follow a provisioned stream's announce (same control
 * region format): the files the driver made map and validate. */
static void test_reader_maps_provisioned_epoch(void **state)
{
    (void)state;
    fshm_profile p = profile2(8, 4096, 16384);
    fshm_stream_addr a = addr_id(1005);
    fshm_grant g;
    assert_int_equal(fshm_provision_epoch(&a, &p, 0, &g), 0);
    fshm_paths paths;
    assert_int_equal(fshm_resolve(&a, 0, &paths), 0);
    for (unsigned i = 0; i < 2; i++) {
        int fd;
        size_t size;
        assert_int_equal(fshm_uri_open(g.pools[i].uri, paths.base, 1, &fd, &size), 0);
        assert_int_equal(size, 64 + 8ull * p.stride_bytes[i]);
        void *m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
        assert_true(m != MAP_FAILED);
        assert_int_equal(fshm_superblock_check(m, size, g.epoch, 1005, FSHM_REGION_PAYLOAD_POOL,
                                               g.pools[i].pool_id, 8, p.stride_bytes[i],
                                               p.stride_bytes[i]), 0);
        munmap(m, size);
        close(fd);
    }
    assert_int_equal(fshm_provision_remove(&a), 1);
}

/* ---- the sealed transport ---- */

static int seals_of(int fd) { return fcntl(fd, F_GET_SEALS); }

/* Every region (and the control region) is a memfd of the exact size, mode 0600, sealed
 * against resizing; nothing lands in the base directory; the next epoch keeps the
 * control region and announces itself there. */
static void test_sealed_provision(void **state)
{
    (void)state;
    fshm_profile p = profile2(8, 4096, 65536);
    p.file_mode = 0660;
    fshm_stream_addr a = addr_id(1077);
    fshm_grant g;
    int ctl = -1, fds[1 + FSHM_MAX_POOLS];
    if (fshm_provision_epoch_sealed(&a, &p, 0, &ctl, &g, fds))
        fail_msg("provision: %s", fshm_last_error());
    assert_true(ctl >= 0);
    uint64_t e1 = g.epoch;   /* above whatever the epoch ledger remembers of this id */
    assert_true(e1 >= 1);
    assert_int_equal(g.npools, 2);
    char path[1024], want[1100];
    tu_region_path(1077, e1, "header.ring", path, sizeof path);
    uri_of(path, want, sizeof want);
    assert_string_equal(g.header_uri, want);   /* the spec's name, nothing behind it */
    struct stat st;
    assert_int_equal(lstat(path, &st), -1);
    fshm_stream_addr sa = addr_id(1077);
    fshm_paths paths;
    assert_int_equal(fshm_resolve(&sa, 0, &paths), 0);
    assert_int_equal(lstat(paths.stream_dir, &st), -1);
    const size_t sizes[3] = {64 + 8 * 256, 64 + 8 * 4096, 64 + 8 * 65536};
    for (unsigned i = 0; i < 3; i++) {
        assert_int_equal(fstat(fds[i], &st), 0);
        assert_int_equal((size_t)st.st_size, sizes[i]);
        assert_int_equal(st.st_mode & 0777, 0600);
        assert_int_equal(seals_of(fds[i]) & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
                         F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
        assert_int_equal(ftruncate(fds[i], 0), -1);
        assert_int_equal(errno, EPERM);
        assert_int_equal(fshm_sealed_check(fds[i], sizes[i], 1, "region"), 0);
        assert_int_equal(fshm_sealed_check(fds[i], sizes[i] + 1, 0, "region"), FSHM_E_CORRUPT);
        uint8_t sb[64];
        assert_int_equal(pread(fds[i], sb, sizeof sb, 0), 64);
        assert_int_equal(fshm_superblock_check(sb, sizes[i], e1, 1077,
                                               i ? FSHM_REGION_PAYLOAD_POOL : FSHM_REGION_HEADER_RING,
                                               i ? (uint16_t)i : 0, 8, i ? (uint32_t)(sizes[i] - 64) / 8 : 256,
                                               i ? (uint32_t)(sizes[i] - 64) / 8 : 256), 0);
    }
    /* A read-only description can never be mapped writable. */
    int ro = fshm_sealed_readonly(fds[1]);
    assert_true(ro >= 0);
    assert_int_equal(fshm_sealed_check(ro, sizes[1], 1, "region"), FSHM_E_CORRUPT);
    assert_int_equal(fshm_sealed_check(ro, sizes[1], 0, "region"), 0);
    assert_true(mmap(NULL, sizes[1], PROT_READ | PROT_WRITE, MAP_SHARED, ro, 0) == MAP_FAILED);
    assert_int_equal(errno, EACCES);
    void *m = mmap(NULL, sizes[1], PROT_READ, MAP_SHARED, ro, 0);
    assert_true(m != MAP_FAILED);
    assert_int_equal(mprotect(m, sizes[1], PROT_READ | PROT_WRITE), -1);
    assert_int_equal(errno, EACCES);
    munmap(m, sizes[1]);
    close(ro);
    for (unsigned i = 0; i < 3; i++)
        close(fds[i]);

    /* The next epoch: same control region, new regions, epoch word and announce set. */
    int ctl_before = ctl;
    assert_int_equal(fshm_provision_epoch_sealed(&a, &p, 0, &ctl, &g, fds), 0);
    assert_int_equal(ctl, ctl_before);
    assert_int_equal(g.epoch, e1 + 1);
    fshm_ctl_handle h;
    int dup_ctl = dup(ctl);
    assert_int_equal(fshm_ctl_map_fd(dup_ctl, &paths, &h), 0);
    assert_int_equal(h.ctl->epoch, e1 + 1);
    fshm_announce an;
    assert_int_equal(fshm_ctl_read_announce(h.ctl, &an), 0);
    assert_int_equal(an.epoch, e1 + 1);
    assert_string_equal(an.header_uri, g.header_uri);
    assert_true(LOAD_ACQ(&h.ctl->flags) & CTL_FLAG_DRIVER);
    fshm_ctl_close(&h);
    assert_int_equal(fshm_sealed_check(ctl, FSHM_CTL_BYTES, 1, "control region"), 0);
    assert_int_equal(ftruncate(ctl, FSHM_CTL_BYTES * 2), -1);
    assert_int_equal(errno, EPERM);
    for (unsigned i = 0; i < 3; i++)
        close(fds[i]);
    close(ctl);
}

/* The sealed control region's consumer table, which only the driver writes: an entry for
 * a peer's pid (queue named for that pid only), mapped read-only by consumers; freed only
 * while it still names that consumer; control bytes set through the driver's descriptor. */
static void test_sealed_consumer_table(void **state)
{
    (void)state;
    fshm_profile p = profile2(8, 4096, 65536);
    fshm_stream_addr a = addr_id(1078);
    fshm_grant g;
    int ctl = -1, fds[1 + FSHM_MAX_POOLS];
    if (fshm_provision_epoch_sealed(&a, &p, 0, &ctl, &g, fds))
        fail_msg("provision: %s", fshm_last_error());
    for (unsigned i = 0; i < 1 + g.npools; i++)
        close(fds[i]);
    pid_t child = fork();   /* a live consumer process other than us */
    assert_true(child >= 0);
    if (child == 0) {
        pause();
        _exit(0);
    }
    char mine[32], theirs[32];
    snprintf(mine, sizeof mine, "/fshm-%x-1-1", (unsigned)child);
    snprintf(theirs, sizeof theirs, "/fshm-%x-1-1", (unsigned)getpid());
    /* A queue of another process, no queue without the flag, and a bad index: refused. */
    assert_int_equal(fshm_sealed_consumer_add(ctl, child, "v", theirs, 0, 0, 0), -EINVAL);
    assert_int_equal(fshm_sealed_consumer_add(ctl, child, "v", "", 0, 0, 0), -EINVAL);
    assert_int_equal(fshm_sealed_set_control(ctl, FSHM_CONTROL_BYTES, 1), -EINVAL);
    int idx = fshm_sealed_consumer_add(ctl, child, "viewer", mine, 0, 1, 30);
    assert_true(idx >= 0 && idx < FSHM_MAX_CONSUMERS);
    int nq = fshm_sealed_consumer_add(ctl, child, "futex", "", 1, 0, 0);
    assert_true(nq >= 0 && nq != idx);
    assert_int_equal(fshm_sealed_set_control(ctl, 3, 0xA5), 0);

    /* As a consumer sees it: read-only, the entry its own pid's, ACTIVE. */
    int ro = fshm_sealed_readonly(ctl);
    assert_true(ro >= 0);
    fshm_paths paths;
    fshm_ctl_handle h;
    assert_int_equal(fshm_resolve(&a, 0, &paths), 0);
    assert_int_equal(fshm_ctl_map_fd(ro, &paths, &h), 0);
    assert_false(h.map->writable);
    fshm_ctl_consumer *e = ctl_consumer(h.ctl, (unsigned)idx);
    assert_int_equal(LOAD_ACQ(&e->state), CONS_ACTIVE);
    assert_int_equal(e->pid, (uint64_t)child);
    assert_true(e->pid_start != 0 && e->pid_start == fshm_proc_start_time(child));
    assert_string_equal(e->queue, mine);
    assert_string_equal(e->name, "viewer");
    assert_int_equal(e->flags, CONS_FLAG_NEXT);
    assert_int_equal(e->max_rate_hz, 30);
    assert_int_equal(ctl_consumer(h.ctl, (unsigned)nq)->flags, CONS_FLAG_NO_QUEUE);
    assert_int_equal(h.ctl->control[3], 0xA5);
    assert_int_equal(fshm_ctl_live_consumers(h.ctl), 2);

    /* Freed only while it names that consumer and queue. */
    assert_int_equal(fshm_sealed_consumer_remove(ctl, idx, getpid(), mine), 0);
    assert_int_equal(fshm_sealed_consumer_remove(ctl, idx, child, "/fshm-1-1-1"), 0);
    assert_int_equal(LOAD_ACQ(&e->state), CONS_ACTIVE);
    assert_int_equal(fshm_sealed_consumer_remove(ctl, idx, child, mine), 1);
    assert_int_equal(LOAD_ACQ(&e->state), CONS_FREE);
    assert_int_equal(fshm_sealed_consumer_remove(ctl, idx, child, mine), 0);
    /* The consumer dies: pruning (the producer's) reclaims its entry; the driver's later
     * release finds it gone and leaves the slot alone. */
    kill(child, SIGKILL);
    assert_int_equal(waitpid(child, NULL, 0), child);
    int w = open(paths.ctl, O_RDONLY);   /* no file: the sealed region has none */
    assert_int_equal(w, -1);
    fshm_map *rw;
    assert_int_equal(fshm_sealed_map(ctl, FSHM_CTL_BYTES, 1, "control region", &rw), 0);
    assert_int_equal(fshm_ctl_prune(rw->base), 1);
    assert_int_equal(fshm_sealed_consumer_remove(ctl, nq, child, ""), 0);
    assert_int_equal(fshm_ctl_live_consumers(h.ctl), 0);
    /* A process that is gone gets no entry. */
    assert_int_equal(fshm_sealed_consumer_add(ctl, child, "late", "", 1, 0, 0), -ESRCH);
    fshm_map_unref(rw);
    fshm_ctl_close(&h);
    close(ctl);
    fshm_provision_remove(&a);
}

/* A memfd the driver forgot to seal, or a plain file, is refused. */
static void test_sealed_check_refuses_unsealed(void **state)
{
    (void)state;
    int fd = memfd_create("unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, 4096), 0);
    assert_int_equal(fshm_sealed_check(fd, 4096, 1, "region"), FSHM_E_CORRUPT);
    assert_int_equal(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK), 0);   /* half sealed: still refused */
    assert_int_equal(fshm_sealed_check(fd, 4096, 1, "region"), FSHM_E_CORRUPT);
    assert_int_equal(fcntl(fd, F_ADD_SEALS, F_SEAL_GROW), 0);
    assert_int_equal(fshm_sealed_check(fd, 4096, 1, "region"), 0);
    close(fd);
    assert_int_equal(fshm_sealed_check(-1, 4096, 0, "region"), FSHM_E_CORRUPT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_footprint_seed_profiles),
        cmocka_unit_test(test_provision_creates_epoch),
        cmocka_unit_test(test_epoch_skips_leftover_directories),
        cmocka_unit_test(test_named_stream_and_group),
        cmocka_unit_test(test_invalid_profiles_create_nothing),
        cmocka_unit_test(test_does_not_fit_creates_nothing),
        cmocka_unit_test_teardown(test_room_check_on_small_tmpfs, unmount_small_fs),
        cmocka_unit_test(test_failure_partway_leaves_nothing),
        cmocka_unit_test(test_reader_maps_provisioned_epoch),
        cmocka_unit_test(test_sealed_provision),
        cmocka_unit_test(test_sealed_check_refuses_unsealed),
        cmocka_unit_test(test_sealed_consumer_table),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
