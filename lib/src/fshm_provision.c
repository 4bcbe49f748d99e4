/* Creating a stream's epochs. Every epoch comes to exist through fshm_epoch_create and
 * fshm_epoch_publish: a writer that manages its own stream calls them directly, holding
 * the producer lock; under the driver model (SHM Driver Model Spec v1.0 §3, §6, §10) only
 * the driver creates, initialises, truncates and unlinks region files, through
 * fshm_provision_epoch, and clients then only map what it granted.
 *
 * Everything is checked before anything is created, and a failure part-way removes what
 * the call created, so a refused attach never leaves half a stream behind. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "fshm_internal.h"

static uint64_t region_bytes(uint32_t nslots, uint32_t slot_bytes)
{
    return FSHM_SUPERBLOCK_SIZE + (uint64_t)nslots * slot_bytes;
}

/* The caller's profile at the library's size (see fshm_config_copy). */
static int profile_copy(fshm_profile *out, const fshm_profile *p)
{
    if (!p)
        return fshm_set_error(-EINVAL, "no profile given");
    return fshm_config_copy(out, sizeof *out, p, offsetof(fshm_profile, gid) + sizeof(int64_t),
                            "fshm_profile");
}

uint64_t fshm_profile_footprint(const fshm_profile *user_p)
{
    fshm_profile copy, *p = &copy;
    if (profile_copy(&copy, user_p))
        return 0;
    uint64_t total = region_bytes(p->header_nslots, FSHM_SLOT_BYTES);
    for (uint32_t i = 0; i < p->npools && i < FSHM_MAX_POOLS; i++)
        total += region_bytes(p->header_nslots, p->stride_bytes[i]);
    return total + FSHM_CTL_BYTES;
}

/* "5.0 GiB": one decimal in the largest binary unit that keeps the value >= 1. */
static void human_bytes(uint64_t n, char *out, size_t cap)
{
    static const char *units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    if (n < 1024) {
        snprintf(out, cap, "%llu bytes", (unsigned long long)n);
        return;
    }
    double v = (double)n;
    int u = 0;
    while (v >= 1024.0 && u < 6) {
        v /= 1024.0;
        u++;
    }
    snprintf(out, cap, "%.1f %s", v, units[u]);
}

static int check_counts(uint32_t nslots, uint32_t npools)
{
    if (!fshm_valid_nslots(nslots))
        return fshm_set_error(-EINVAL, "nslots must be a power of two between 1 and %u, not %u",
                              FSHM_MAX_NSLOTS, nslots);
    if (!fshm_valid_npools(npools))
        return fshm_set_error(-EINVAL, "a stream has 1 to %d payload pools, not %u", FSHM_MAX_POOLS,
                              npools);
    return 0;
}

int fshm_profile_check(const fshm_profile *p)
{
    if (!p)
        return fshm_set_error(-EINVAL, "no profile given");
    int rc = check_counts(p->header_nslots, p->npools);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < p->npools; i++) {
        if (p->pool_id[i] == 0)
            return fshm_set_error(-EINVAL, "pool_id 0 is reserved (pool ids are 1..65535)");
        for (uint32_t j = 0; j < i; j++)
            if (p->pool_id[j] == p->pool_id[i])
                return fshm_set_error(-EINVAL, "pool_id %u appears twice in the profile",
                                      p->pool_id[i]);
        if (!fshm_valid_stride(p->stride_bytes[i]))
            return fshm_set_error(-EINVAL, "pool %u: stride_bytes %u is not a power-of-two multiple "
                                  "of %u", p->pool_id[i], p->stride_bytes[i], FSHM_MIN_STRIDE);
    }
    if (p->file_mode & ~0777u)
        return fshm_set_error(-EINVAL, "file_mode 0%o has bits outside 0777", p->file_mode);
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

int fshm_profile_for_pools(uint32_t nslots, uint32_t npools, const uint32_t *pool_bytes,
                           unsigned file_mode, fshm_profile *out)
{
    memset(out, 0, sizeof *out);
    out->struct_size = sizeof *out;
    out->gid = -1;
    out->header_nslots = nslots;
    out->file_mode = file_mode;
    int rc = check_counts(nslots, npools);
    if (rc)
        return rc;
    uint32_t strides[FSHM_MAX_POOLS];
    for (uint32_t i = 0; i < npools; i++) {
        strides[i] = fshm_pool_stride_for(pool_bytes[i] ? pool_bytes[i] : 1);
        if (!strides[i])
            return fshm_set_error(-EINVAL, "pool of %u bytes is too large (%u bytes at most)",
                                  pool_bytes[i], FSHM_MAX_STRIDE);
    }
    /* Loans take the first pool that fits: sorted by stride, each stride once. */
    qsort(strides, npools, sizeof strides[0], cmp_u32);
    for (uint32_t i = 0; i < npools; i++)
        if (out->npools == 0 || out->stride_bytes[out->npools - 1] != strides[i]) {
            out->stride_bytes[out->npools] = strides[i];
            out->pool_id[out->npools] = (uint16_t)(out->npools + 1);
            out->npools++;
        }
    return fshm_profile_check(out);
}

/* Directories get x where the files get r, so whoever may read the regions can reach
 * them; setgid when a group is set (new files then inherit it too). */
static unsigned dir_mode_for(unsigned file_mode, int64_t gid)
{
    unsigned m = 0700 | (file_mode & 0777);
    m |= (m & 0444) >> 2;
    m &= ~0002u;   /* never writable by everyone: fshm_mkdir_private refuses such a tree */
    if (gid >= 0)
        m |= 02000;
    return m;
}

static int is_dir(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int path_exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* exact: set the mode; otherwise only add the bits (directories shared by streams). */
static int apply_dir_policy(const char *dir, unsigned dmode, int64_t gid, int exact)
{
    struct stat st;
    if (lstat(dir, &st) != 0)
        return fshm_set_error(-errno, "cannot stat %s: %s", dir, strerror(errno));
    if (gid >= 0 && (int64_t)st.st_gid != gid && chown(dir, (uid_t)-1, (gid_t)gid) != 0)
        return fshm_set_error(-errno, "cannot give %s to group %lld: %s", dir, (long long)gid,
                              strerror(errno));
    unsigned want = exact ? dmode : ((st.st_mode & 07777) | dmode);
    if ((st.st_mode & 07777) != want && chmod(dir, want) != 0)
        return fshm_set_error(-errno, "cannot chmod %s to 0%o: %s", dir, want, strerror(errno));
    return 0;
}

static int apply_file_policy(int fd, const char *path, unsigned mode, int64_t gid)
{
    if (gid >= 0 && fchown(fd, (uid_t)-1, (gid_t)gid) != 0)
        return fshm_set_error(-errno, "cannot give %s to group %lld: %s", path, (long long)gid,
                              strerror(errno));
    if (fchmod(fd, mode) != 0)
        return fshm_set_error(-errno, "cannot chmod %s to 0%o: %s", path, mode, strerror(errno));
    return 0;
}

static int numeric_name(const char *n, uint64_t *v)
{
    if (!*n || strspn(n, "0123456789") != strlen(n) || strlen(n) > 19)
        return 0;
    *v = strtoull(n, NULL, 10);
    return 1;
}

static uint64_t tree_bytes(const char *dir)
{
    uint64_t total = 0;
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        char path[FSHM_PATH_MAX + 300];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        struct stat st;
        if (de->d_name[0] != '.' && lstat(path, &st) == 0 && S_ISREG(st.st_mode))
            total += (uint64_t)st.st_blocks * 512u;
    }
    closedir(d);
    return total;
}

/* Highest epoch directory in stream_dir and (bytes not NULL) the bytes their files hold. */
static void scan_epochs(const char *stream_dir, uint64_t *max_epoch, uint64_t *bytes)
{
    *max_epoch = 0;
    if (bytes)
        *bytes = 0;
    DIR *d = opendir(stream_dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d))) {
        uint64_t e;
        if (!numeric_name(de->d_name, &e))
            continue;
        char path[FSHM_PATH_MAX + 32];
        snprintf(path, sizeof path, "%s/%s", stream_dir, de->d_name);
        if (!is_dir(path))
            continue;
        if (e > *max_epoch)
            *max_epoch = e;
        if (bytes)
            *bytes += tree_bytes(path);
    }
    closedir(d);
}

/* Removes every epoch directory of the stream but `keep` (0: all). */
static void remove_epochs_except(const char *stream_dir, uint64_t keep)
{
    DIR *d = opendir(stream_dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d))) {
        uint64_t e;
        if (!numeric_name(de->d_name, &e) || (keep && e == keep))
            continue;
        char path[FSHM_PATH_MAX + 32];
        snprintf(path, sizeof path, "%s/%s", stream_dir, de->d_name);
        fshm_remove_tree(path);
    }
    closedir(d);
}

#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif

/* A /proc/meminfo value in bytes (0 if absent). */
static uint64_t meminfo_bytes(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f)
        return 0;
    char line[256];
    size_t klen = strlen(key);
    uint64_t v = 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            v = strtoull(line + klen + 1, NULL, 10) * 1024u;
            break;
        }
    fclose(f);
    return v;
}

int fshm_shm_room(const char *dir, uint64_t *room, uint64_t *fs_free)
{
    uint64_t fr = 0;
    int rc = fshm_statvfs_free(dir, &fr);
    if (rc)
        return fshm_set_error(rc, "cannot read the free space of %s: %s", dir, strerror(-rc));
    uint64_t r = fr;
    struct statfs sfs;
    /* tmpfs pages are memory: a size limit above what RAM (and swap) can back would turn
     * "fits" into the OOM killer. Count no more than the memory available. */
    if (statfs(dir, &sfs) == 0 && (uint64_t)sfs.f_type == (uint64_t)TMPFS_MAGIC) {
        uint64_t mem = meminfo_bytes("MemAvailable") + meminfo_bytes("SwapFree");
        if (mem && mem < r)
            r = mem;
    }
    if (room)
        *room = r;
    if (fs_free)
        *fs_free = fr;
    return 0;
}

/* The base directory as fshm_resolve picks it, created if missing (then with the
 * directory mode of the profile, so that whoever may read the files can reach them). */
static int ensure_base(const fshm_stream_addr *addr, unsigned dmode)
{
    const char *base;
    int rc = fshm_base_dir(addr->base_dir, &base);
    if (rc)
        return rc;
    if (mkdir(base, 0700) == 0) {
        if (chmod(base, dmode & 0777) != 0)
            return fshm_set_error(-errno, "cannot chmod %s: %s", base, strerror(errno));
    } else if (errno != EEXIST) {
        return fshm_set_error(-errno, "cannot create base directory %s: %s", base, strerror(errno));
    }
    return 0;
}

/* Creates one region file of the epoch (full size reserved) and writes its superblock. */
static int create_region(const char *path, uint64_t size, unsigned mode, int64_t gid,
                         const uint8_t sb[FSHM_SUPERBLOCK_SIZE])
{
    if (size > (uint64_t)SIZE_MAX || size > (uint64_t)INT64_MAX)
        return fshm_set_error(-EFBIG, "region %s would be %llu bytes: too large", path,
                              (unsigned long long)size);
    int fd, rc = fshm_create_file(path, (size_t)size, mode, &fd);
    if (rc)
        return rc;
    if ((rc = apply_file_policy(fd, path, mode, gid)) == 0) {
        ssize_t w = pwrite(fd, sb, FSHM_SUPERBLOCK_SIZE, 0);
        if (w != (ssize_t)FSHM_SUPERBLOCK_SIZE)
            rc = fshm_set_error(w < 0 ? -errno : -EIO, "cannot write the superblock of %s: %s",
                                path, w < 0 ? strerror(errno) : "short write");
    }
    close(fd);
    if (rc)
        unlink(path);
    return rc;
}

/* A region file, or (sealed_fd not NULL) a sealed memfd labelled with the path's tail. */
static int new_region(const char *path, uint64_t size, unsigned mode, int64_t gid,
                      const uint8_t sb[FSHM_SUPERBLOCK_SIZE], int *sealed_fd)
{
    if (!sealed_fd)
        return create_region(path, size, mode, gid, sb);
    char label[64];
    const char *tail = strrchr(path, '/');
    snprintf(label, sizeof label, "fshm-%s", tail ? tail + 1 : path);
    int fd, rc = fshm_sealed_create(label, size, &fd);
    if (rc)
        return rc;
    ssize_t w = pwrite(fd, sb, FSHM_SUPERBLOCK_SIZE, 0);
    if (w != (ssize_t)FSHM_SUPERBLOCK_SIZE) {
        rc = fshm_set_error(w < 0 ? -errno : -EIO, "cannot write the superblock of %s: %s", label,
                            w < 0 ? strerror(errno) : "short write");
        close(fd);
        return rc;
    }
    *sealed_fd = fd;
    return 0;
}

static unsigned file_mode_of(const fshm_profile *p) { return p->file_mode ? p->file_mode : 0600; }

/* ---- the epoch ledger ----
 * Spec §15.2 and §10.1.1: the epoch grows on every producer restart and consumers ignore
 * an announce below the highest epoch they saw. The control region counts epochs, but a
 * clean close with nobody registered removes it (and the whole stream directory), so
 * the next producer would start over at 1 -- below what a consumer of another
 * implementation, or a frameshm reader that reopens by name, has already seen. The
 * ledger keeps the last epoch of every stream id that ever had one, outside the stream
 * tree so that removing a stream does not take it along:
 *     <base>/.frameshm-epochs-<user>/<namespace>/<stream_id>   (decimal, one line)
 * It is written only by whoever creates epochs (the producer lock or the driver's own
 * serialisation excludes a second creator), by rename() so a reader never sees half a
 * number. Losing it (no room, a squatted directory) costs only the guarantee, never the
 * stream: the failure is not reported. */
static int ledger_path(const fshm_paths *paths, int create_dirs, char *out, size_t cap)
{
    char userdir[FSHM_PATH_MAX], dir[FSHM_PATH_MAX + 64];
    fshm_user_dir(paths, userdir, sizeof userdir);
    const char *user = strrchr(userdir, '/');
    const char *ns = strrchr(paths->ns_dir, '/');
    if (!user || !ns || strncmp(user + 1, "tensorpool-", 11) != 0)
        return -EINVAL;
    int n = snprintf(dir, sizeof dir, "%s/.frameshm-epochs-%s", paths->base, user + 12);
    if (n < 0 || (size_t)n >= sizeof dir)
        return -ENAMETOOLONG;
    if (create_dirs && fshm_mkdir_private(dir, 0700))
        return -EPERM;
    n = snprintf(dir + n, sizeof dir - (size_t)n, "%s", ns);
    if (n < 0 || strlen(dir) + 1 >= sizeof dir)
        return -ENAMETOOLONG;
    if (create_dirs && fshm_mkdir_private(dir, 0700))
        return -EPERM;
    n = snprintf(out, cap, "%s/%u", dir, paths->stream_id);
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : 0;
}

/* The last epoch the ledger records for the stream; 0 when none (or unreadable). */
static uint64_t ledger_read(const fshm_paths *paths)
{
    char path[FSHM_PATH_MAX + 96], buf[32];
    if (ledger_path(paths, 0, path, sizeof path))
        return 0;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return 0;
    struct stat st;
    ssize_t n = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid()
                    ? read(fd, buf, sizeof buf - 1)
                    : -1;
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    uint64_t v = 0;
    for (ssize_t i = 0; i < n && buf[i] != '\n'; i++) {
        if (buf[i] < '0' || buf[i] > '9' || v > (UINT64_MAX - 9) / 10)
            return 0;   /* not ours, or damaged: as if absent */
        v = v * 10 + (uint64_t)(buf[i] - '0');
    }
    return v;
}

static void ledger_write(const fshm_paths *paths, uint64_t epoch)
{
    char path[FSHM_PATH_MAX + 96], tmp[FSHM_PATH_MAX + 128], line[32];
    if (ledger_path(paths, 1, path, sizeof path))
        return;
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    int len = snprintf(line, sizeof line, "%llu\n", (unsigned long long)epoch);
    int ok = write(fd, line, (size_t)len) == len;
    close(fd);
    if (!ok || rename(tmp, path) != 0)
        unlink(tmp);
}

/* sealed_fds NULL: region files in <stream_dir>/<epoch>/. Otherwise sealed memfds
 * (sealed_fds[0] the header ring, [1 + i] pool i; the caller owns them) named by the same
 * URIs, nothing created in the base directory: the paths only name the regions. */
static int epoch_create(const fshm_paths *paths, fshm_ctl *c, const fshm_profile *p,
                        uint64_t min_epoch, int replace_first, int *sealed_fds, fshm_new_epoch *out)
{
    memset(out, 0, sizeof *out);
    unsigned mode = file_mode_of(p);
    fshm_ctl_prune(c);
    uint64_t max_epoch = 0;
    scan_epochs(paths->stream_dir, &max_epoch, NULL);
    uint64_t epoch = LOAD_ACQ(&c->epoch) + 1;
    if (epoch < min_epoch)
        epoch = min_epoch;
    if (epoch <= max_epoch)
        epoch = max_epoch + 1;   /* never reuse a directory left behind */
    uint64_t last = ledger_read(paths);
    if (epoch <= last && last < UINT64_MAX)
        epoch = last + 1;        /* the stream was removed since: continue above its last epoch */
    if (epoch == 0 || epoch == UINT64_MAX)
        return fshm_set_error(-EOVERFLOW, "stream %u: epoch counter exhausted", paths->stream_id);
    if (replace_first && !sealed_fds)
        remove_epochs_except(paths->stream_dir, 0);
    char *edir = out->dir;
    snprintf(edir, sizeof out->dir, "%s/%llu", paths->stream_dir, (unsigned long long)epoch);
    int rc = 0;
    if (!sealed_fds) {
        if (mkdir(edir, 0700) != 0) {
            rc = fshm_set_error(-errno, "cannot create %s: %s", edir, strerror(errno));
            edir[0] = 0;
            return rc;
        }
        rc = apply_dir_policy(edir, dir_mode_for(mode, p->gid), p->gid, 1);
    }
    unsigned nfds = 0;

    uint32_t n = p->header_nslots;
    uint64_t now = fshm_now_ns();
    uint64_t pid = (uint64_t)getpid();
    uint8_t sb[FSHM_SUPERBLOCK_SIZE];
    char path[FSHM_PATH_MAX + 64];
    fshm_announce *a = &out->announce;
    snprintf(path, sizeof path, "%s/header.ring", edir);
    fshm_superblock_write(sb, epoch, paths->stream_id, FSHM_REGION_HEADER_RING, 0, n, FSHM_SLOT_BYTES,
                          FSHM_SLOT_BYTES, pid, now);
    if (!rc && !(rc = new_region(path, region_bytes(n, FSHM_SLOT_BYTES), mode, p->gid, sb,
                                 sealed_fds ? &sealed_fds[nfds] : NULL)))
        rc = fshm_uri_format(a->header_uri, sizeof a->header_uri, path);
    nfds += !rc && sealed_fds;
    for (uint32_t i = 0; !rc && i < p->npools; i++) {
        uint16_t id = p->pool_id[i];
        uint32_t stride = p->stride_bytes[i];
        snprintf(path, sizeof path, "%s/%u.pool", edir, id);
        fshm_superblock_write(sb, epoch, paths->stream_id, FSHM_REGION_PAYLOAD_POOL, id, n, stride,
                              stride, pid, now);
        if ((rc = new_region(path, region_bytes(n, stride), mode, p->gid, sb,
                             sealed_fds ? &sealed_fds[nfds] : NULL)))
            break;
        nfds += sealed_fds != NULL;
        if ((rc = fshm_uri_format(a->pools[i].uri, sizeof a->pools[i].uri, path)))
            break;
        a->pools[i].pool_id = id;
        a->pools[i].stride_bytes = stride;
        a->pools[i].nslots = n;
    }
    if (rc) {
        if (sealed_fds)
            for (unsigned i = 0; i < nfds; i++)
                close(sealed_fds[i]);
        else
            fshm_remove_tree(edir);
        edir[0] = 0;
        return rc;
    }
    if (sealed_fds)
        edir[0] = 0;   /* nothing on disk */
    a->epoch = epoch;
    a->header_nslots = n;
    a->npools = p->npools;
    ledger_write(paths, epoch);

    fshm_grant *g = &out->grant;
    g->stream_id = paths->stream_id;
    g->epoch = epoch;
    g->layout_version = FSHM_LAYOUT_VERSION;
    g->header_nslots = n;
    g->header_slot_bytes = FSHM_SLOT_BYTES;
    g->max_dims = FSHM_MAX_DIMS;
    _Static_assert(sizeof g->header_uri >= sizeof a->header_uri, "grant header URI capacity");
    _Static_assert(sizeof g->pools[0].uri >= sizeof a->pools[0].uri, "grant pool URI capacity");
    memcpy(g->header_uri, a->header_uri, sizeof a->header_uri);
    g->npools = p->npools;
    for (uint32_t i = 0; i < p->npools; i++) {
        g->pools[i].pool_id = a->pools[i].pool_id;
        g->pools[i].nslots = n;
        g->pools[i].stride_bytes = a->pools[i].stride_bytes;
        memcpy(g->pools[i].uri, a->pools[i].uri, sizeof a->pools[i].uri);
    }
    return 0;
}

int fshm_epoch_create(const fshm_paths *paths, fshm_ctl *c, const fshm_profile *p, uint64_t min_epoch,
                      int replace_first, fshm_new_epoch *out)
{
    return epoch_create(paths, c, p, min_epoch, replace_first, NULL, out);
}

void fshm_epoch_publish(const fshm_paths *paths, fshm_ctl *c, const fshm_new_epoch *e)
{
    fshm_ctl_write_announce(c, &e->announce);
    STORE_REL(&c->epoch, e->grant.epoch);
    remove_epochs_except(paths->stream_dir, e->grant.epoch);
}

int fshm_provision_epoch(const fshm_stream_addr *addr, const fshm_profile *user_p, uint64_t min_epoch,
                         fshm_grant *out)
{
    memset(out, 0, sizeof *out);
    fshm_profile copy, *p = &copy;
    int rc = profile_copy(&copy, user_p);
    if (rc)
        return rc;
    rc = fshm_profile_check(p);
    if (rc)
        return rc;
    unsigned mode = file_mode_of(p);
    unsigned dmode = dir_mode_for(mode, p->gid);
    if ((rc = ensure_base(addr, dmode)))
        return rc;
    fshm_paths paths;
    if ((rc = fshm_resolve(addr, 0, &paths)))
        return rc;
    char user_dir[FSHM_PATH_MAX];
    fshm_user_dir(&paths, user_dir, sizeof user_dir);
    int had_stream = is_dir(paths.stream_dir), had_ctl = path_exists(paths.ctl);

    /* Room check first: nothing is created for a profile that cannot fit. The epoch this
     * one replaces is about to go, so its bytes count as available. */
    uint64_t max_epoch = 0, old_bytes = 0;
    if (had_stream)
        scan_epochs(paths.stream_dir, &max_epoch, &old_bytes);
    uint64_t footprint = fshm_profile_footprint(p);
    uint64_t need = footprint - (had_ctl ? FSHM_CTL_BYTES : 0);
    uint64_t free_bytes = 0, fs_free = 0;
    if ((rc = fshm_shm_room(paths.base, &free_bytes, &fs_free)))
        return rc;
    if (need > free_bytes + old_bytes) {
        char fp[32], fr[32], ob[32], extra[200] = "", ff[32];
        human_bytes(footprint, fp, sizeof fp);
        human_bytes(free_bytes, fr, sizeof fr);
        human_bytes(old_bytes, ob, sizeof ob);
        human_bytes(fs_free, ff, sizeof ff);
        if (old_bytes)
            snprintf(extra, sizeof extra, " (plus %s held by the epoch being replaced)", ob);
        else if (free_bytes < fs_free)
            snprintf(extra, sizeof extra, " (memory available to back tmpfs; the file system "
                     "itself has %s free)", ff);
        return fshm_set_error(-ENOSPC, "stream %u needs %s (profile footprint, %llu bytes) but %s "
                              "has %s free%s", paths.stream_id, fp, (unsigned long long)footprint,
                              paths.base, fr, extra);
    }

    fshm_ctl_handle h;
    memset(&h, 0, sizeof h);
    h.fd = -1;
    int created_ctl = 0;
    if ((rc = fshm_resolve(addr, 1, &paths)))
        goto undo_dirs;
    if ((rc = apply_dir_policy(user_dir, dmode & 0777, p->gid, 0)) ||
        (rc = apply_dir_policy(paths.ns_dir, dmode & 0777, p->gid, 0)) ||
        (rc = apply_dir_policy(paths.stream_dir, dmode, p->gid, 1)))
        goto undo_dirs;
    if ((rc = fshm_ctl_open(&paths, 1, &h)))
        goto undo_dirs;
    created_ctl = !had_ctl;
    if ((rc = apply_file_policy(h.fd, paths.ctl, mode, p->gid)))
        goto undo_ctl;

    fshm_new_epoch e;
    if ((rc = fshm_epoch_create(&paths, h.ctl, p, min_epoch, need > free_bytes, &e)))
        goto undo_ctl;
    /* The new epoch has no producer until one attaches; sequence numbers carry on. */
    fshm_ctl *c = h.ctl;
    STORE_RLX(&c->producer_pid, 0);
    STORE_RLX(&c->producer_start, 0);
    STORE_REL(&c->state, (uint8_t)CTL_STATE_NEVER);
    STORE_REL(&c->flags, (uint16_t)(LOAD_RLX(&c->flags) | CTL_FLAG_DRIVER));
    fshm_epoch_publish(&paths, c, &e);
    *out = e.grant;
    fshm_ctl_close(&h);
    return 0;

undo_ctl:
    if (created_ctl && fshm_ctl_same_file(&h, paths.ctl))
        unlink(paths.ctl);
    fshm_ctl_close(&h);
undo_dirs:
    if (!had_stream) {
        rmdir(paths.stream_dir);
        fshm_remove_empty_parents(&paths);   /* only what is empty: ours, or nobody's */
    }
    return rc;
}

int fshm_provision_epoch_sealed(const fshm_stream_addr *addr, const fshm_profile *user_p,
                                uint64_t min_epoch, int *ctl_fd, fshm_grant *out, int *region_fds)
{
    memset(out, 0, sizeof *out);
    fshm_profile copy, *p = &copy;
    int rc = profile_copy(&copy, user_p);
    if (rc || (rc = fshm_profile_check(p)))
        return rc;
    /* The base directory holds only the epoch ledger: it must exist and be ours. */
    if ((rc = ensure_base(addr, 0700)))
        return rc;
    fshm_paths paths;
    if ((rc = fshm_resolve(addr, 0, &paths)))
        return rc;
    /* The epoch being replaced is the same profile; its memory goes once its holders
     * let go, so (as for files) it counts as available. */
    int had_ctl = *ctl_fd >= 0;
    uint64_t footprint = fshm_profile_footprint(p), room = 0, fs_free = 0;
    uint64_t need = footprint - (had_ctl ? FSHM_CTL_BYTES : 0), old_bytes = had_ctl ? need : 0;
    if ((rc = fshm_shm_room(paths.base, &room, &fs_free)))
        return rc;
    if (need > room + old_bytes) {
        char fp[32], fr[32];
        human_bytes(footprint, fp, sizeof fp);
        human_bytes(room, fr, sizeof fr);
        return fshm_set_error(-ENOSPC, "stream %u needs %s (profile footprint, %llu bytes) but "
                              "only %s of memory is available", paths.stream_id, fp,
                              (unsigned long long)footprint, fr);
    }
    int cfd = *ctl_fd;
    if (!had_ctl) {
        char label[48];
        snprintf(label, sizeof label, "fshm-%u-frameshm.ctl", paths.stream_id);
        if ((rc = fshm_sealed_create(label, FSHM_CTL_BYTES, &cfd)))
            return rc;
        fshm_map *m;
        if ((rc = fshm_map_create(cfd, FSHM_CTL_BYTES, 1, 1, &m))) {
            close(cfd);
            return rc;
        }
        fshm_ctl_init((fshm_ctl *)m->base, &paths);
        fshm_map_unref(m);
    }
    int dup_fd = fcntl(cfd, F_DUPFD_CLOEXEC, 0);
    fshm_ctl_handle h;
    if (dup_fd < 0)
        rc = fshm_set_error(-errno, "dup: %s", strerror(errno));
    else if ((rc = fshm_ctl_map_fd(dup_fd, &paths, &h)))
        close(dup_fd);
    fshm_new_epoch e;
    if (!rc && (rc = epoch_create(&paths, h.ctl, p, min_epoch, 0, region_fds, &e)))
        fshm_ctl_close(&h);
    if (rc) {
        if (!had_ctl)
            close(cfd);
        return rc;
    }
    fshm_ctl *c = h.ctl;
    STORE_RLX(&c->producer_pid, 0);
    STORE_RLX(&c->producer_start, 0);
    STORE_REL(&c->state, (uint8_t)CTL_STATE_NEVER);
    STORE_REL(&c->flags, (uint16_t)(LOAD_RLX(&c->flags) | CTL_FLAG_DRIVER));
    fshm_ctl_write_announce(c, &e.announce);
    STORE_REL(&c->epoch, e.grant.epoch);
    fshm_ctl_close(&h);
    *ctl_fd = cfd;
    *out = e.grant;
    return 0;
}

int fshm_provision_remove(const fshm_stream_addr *addr)
{
    fshm_paths p;
    int rc = fshm_resolve(addr, 0, &p);
    if (rc == -ENOENT)
        return 0;   /* no base directory: nothing to remove */
    if (rc)
        return rc;
    struct stat st;
    if (lstat(p.stream_dir, &st) != 0)
        return errno == ENOENT ? 0 : fshm_set_error(-errno, "%s: %s", p.stream_dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return fshm_set_error(-ENOTDIR, "%s is not a directory", p.stream_dir);
    /* Dead consumers' descriptor queues go with the stream; live ones are theirs. */
    fshm_ctl_handle h;
    if (fshm_ctl_open(&p, 0, &h) == 0) {
        fshm_ctl_prune(h.ctl);
        fshm_ctl_close(&h);
    }
    rc = fshm_remove_stream_dir(&p);
    if (rc && path_exists(p.stream_dir))
        return fshm_set_error(rc, "cannot remove %s: %s", p.stream_dir, strerror(-rc));
    return 1;
}

int fshm_provision_current(const fshm_stream_addr *addr, uint64_t *epoch)
{
    *epoch = 0;
    fshm_paths p;
    int rc = fshm_resolve(addr, 0, &p);
    if (rc)
        return rc;
    fshm_ctl_handle h;
    if ((rc = fshm_ctl_open(&p, 0, &h)))
        return rc;
    *epoch = LOAD_ACQ(&h.ctl->epoch);
    fshm_ctl_close(&h);
    return 0;
}
