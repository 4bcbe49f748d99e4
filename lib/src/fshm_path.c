/* Names, directories, region files and region URIs (spec §15.21a, §15.22). */
#include <fcntl.h>
#include <ftw.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "fshm_internal.h"

#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif

static int name_char_ok(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-' || c == '.';
}

int fshm_validate_name(const char *name, const char *what)
{
    if (!name || !*name)
        return fshm_set_error(-EINVAL, "%s name must not be empty", what);
    size_t n = strlen(name);
    if (n > FSHM_NAME_MAX)
        return fshm_set_error(-EINVAL, "%s name '%.80s' is longer than %d characters", what, name,
                              FSHM_NAME_MAX);
    if (name[0] == '.' || name[0] == '-')
        return fshm_set_error(-EINVAL, "%s name '%s' must start with a letter, digit or '_'", what,
                              name);
    for (size_t i = 0; i < n; i++)
        if (!name_char_ok(name[i]))
            return fshm_set_error(-EINVAL,
                                  "%s name '%.80s' may only contain letters, digits, '_', '-' and '.'",
                                  what, name);
    return 0;
}

uint32_t fshm_stream_id_for_name(const char *name)
{
    /* FNV-1a; named streams live in the upper half of the id space so that small
     * explicit ids (the driver's 1001, 2001, ...) never collide with them. */
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 16777619u;
    }
    return h | 0x80000000u;
}

/* What to tell a user whose directory is taken: the per-user base that nobody else can
 * write into. Not chosen automatically: producers and consumers must agree on one place,
 * and a squatter who comes and goes would split them between two. */
static void way_out(char *out, size_t cap)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (xdg && xdg[0] == '/')
        snprintf(out, cap, "set FRAMESHM_DIR=%.200s (your $XDG_RUNTIME_DIR) for every process of "
                 "the stream, or ask root to remove it; see docs/security.md", xdg);
    else
        snprintf(out, cap, "set FRAMESHM_DIR to a directory only you can write (e.g. your "
                 "$XDG_RUNTIME_DIR) for every process of the stream, or ask root to remove it; "
                 "see docs/security.md");
}

/* An existing directory of our tree must be ours and not writable by everyone: else
 * another local user made it (to deny us service, or to plant regions and names for us
 * to open) or can change what is in it. */
static int check_private_dir(const char *path, const struct stat *st)
{
    char how[400];
    if (!S_ISDIR(st->st_mode)) {
        way_out(how, sizeof how);
        return fshm_set_error(-ENOTDIR, "%s exists and is not a directory (symlinks are refused): "
                              "%s", path, how);
    }
    if (st->st_uid != geteuid()) {
        way_out(how, sizeof how);
        return fshm_set_error(-EPERM, "%s is owned by uid %u, not by us (uid %u): another local "
                              "user made it, maybe to keep us from creating streams; %s", path,
                              (unsigned)st->st_uid, (unsigned)geteuid(), how);
    }
    if (st->st_mode & S_IWOTH) {
        way_out(how, sizeof how);
        return fshm_set_error(-EPERM, "%s has mode 0%o: writable by every local user, who could "
                              "replace what is in it; chmod o-w it, or %s", path,
                              (unsigned)(st->st_mode & 07777), how);
    }
    return 0;
}

int fshm_mkdir_private(const char *path, unsigned mode)
{
    if (mkdir(path, mode) == 0)
        return 0;
    if (errno != EEXIST)
        return fshm_set_error(-errno, "cannot create directory %s: %s", path, strerror(errno));
    struct stat st;
    if (lstat(path, &st) != 0)
        return fshm_set_error(-errno, "cannot stat %s: %s", path, strerror(errno));
    return check_private_dir(path, &st);
}

static void user_name(char *out, size_t cap)
{
    struct passwd pw, *res = NULL;
    char buf[1024];
    uid_t uid = geteuid();
    if (getpwuid_r(uid, &pw, buf, sizeof buf, &res) == 0 && res && res->pw_name[0]) {
        size_t j = 0;
        for (const char *p = res->pw_name; *p && j + 1 < cap; p++)
            out[j++] = name_char_ok(*p) && *p != '.' ? *p : '_';
        out[j] = 0;
        return;
    }
    snprintf(out, cap, "%u", (unsigned)uid);
}

int fshm_base_dir(const char *configured, const char **out)
{
    const char *base = configured;
    if (!base || !*base)
        base = getenv("FRAMESHM_DIR");
    if (!base || !*base)
        base = "/dev/shm";
    if (base[0] != '/')
        return fshm_set_error(-EINVAL, "base directory '%s' must be an absolute path", base);
    *out = base;
    return 0;
}

int fshm_resolve(const fshm_stream_addr *addr, int create_dirs, fshm_paths *p)
{
    memset(p, 0, sizeof *p);
    const char *base;
    int rc = fshm_base_dir(addr->base_dir, &base);
    if (rc)
        return rc;
    const char *ns = addr->ns;
    if (!ns || !*ns)
        ns = getenv("FRAMESHM_NAMESPACE");
    if (!ns || !*ns)
        ns = "default";
    rc = fshm_validate_name(ns, "namespace");
    if (rc)
        return rc;
    if (addr->name) {
        if ((rc = fshm_validate_name(addr->name, "stream")))
            return rc;
        snprintf(p->name, sizeof p->name, "%s", addr->name);
        p->stream_id = addr->stream_id ? addr->stream_id : fshm_stream_id_for_name(addr->name);
    } else {
        if (!addr->stream_id)
            return fshm_set_error(-EINVAL, "a stream needs a name or a non-zero stream_id");
        p->stream_id = addr->stream_id;
        p->any_name = 1;
        snprintf(p->name, sizeof p->name, "stream-%u", addr->stream_id);
    }
    if (create_dirs && mkdir(base, 0700) != 0 && errno != EEXIST)
        return fshm_set_error(-errno, "cannot create base directory %s: %s", base, strerror(errno));
    char canon[PATH_MAX];
    if (!realpath(base, canon))
        return fshm_set_error(-errno, "base directory %s: %s", base, strerror(errno));
    if (strlen(canon) + 200 >= FSHM_PATH_MAX)
        return fshm_set_error(-ENAMETOOLONG, "base directory %s is too long", canon);
    char user[64];
    user_name(user, sizeof user);
    snprintf(p->base, sizeof p->base, "%s", canon);
    char userdir[FSHM_PATH_MAX];
    snprintf(userdir, sizeof userdir, "%s/tensorpool-%s", canon, user);
    snprintf(p->ns_dir, sizeof p->ns_dir, "%s/%s", userdir, ns);
    snprintf(p->stream_dir, sizeof p->stream_dir, "%s/%u", p->ns_dir, p->stream_id);
    snprintf(p->ctl, sizeof p->ctl, "%s/frameshm.ctl", p->stream_dir);
    if (create_dirs)
        return fshm_make_stream_dir(p);
    /* Looking only (ls, gc, info, a reader that makes nothing): a squatted tree is
     * refused all the same, rather than read as ours or silently seen as empty. */
    struct stat st;
    return lstat(userdir, &st) == 0 ? check_private_dir(userdir, &st) : 0;
}

int fshm_make_stream_dir(const fshm_paths *p)
{
    char userdir[FSHM_PATH_MAX];
    fshm_user_dir(p, userdir, sizeof userdir);
    /* Whoever removes the last stream of a namespace removes the emptied namespace and
     * user directories too (fshm_remove_empty_parents), possibly between our mkdirs: a
     * parent gone from under the next mkdir means start over. Once the stream directory
     * exists the parents are not empty, so they stay. */
    for (int attempt = 0;; attempt++) {
        int rc;
        if ((rc = fshm_mkdir_private(userdir, 0700)) || (rc = fshm_mkdir_private(p->ns_dir, 0700)) ||
            (rc = fshm_mkdir_private(p->stream_dir, 0700))) {
            if (rc == -ENOENT && attempt < 32)
                continue;
            return rc;
        }
        return 0;
    }
}

void fshm_user_dir(const fshm_paths *p, char *out, size_t cap)
{
    snprintf(out, cap, "%s", p->ns_dir);
    char *slash = strrchr(out, '/');
    if (slash)
        *slash = 0;
}

void fshm_remove_empty_parents(const fshm_paths *p)
{
    /* rmdir only removes empty directories: a namespace or user directory another
     * process is using (or just started to) stays. */
    char userdir[FSHM_PATH_MAX];
    fshm_user_dir(p, userdir, sizeof userdir);
    if (rmdir(p->ns_dir) == 0)
        rmdir(userdir);
}

int fshm_remove_stream_dir(const fshm_paths *p)
{
    int rc = fshm_remove_tree(p->stream_dir);
    fshm_remove_empty_parents(p);
    return rc;
}

/* Driver model: the driver chose the paths; we only accept them if the header ring sits
 * exactly at <base>/tensorpool-<user>/<ns>/<stream_id>/<epoch>/header.ring (canonical,
 * inside our configured base) and every pool is in that same epoch directory. */
int fshm_paths_from_grant(const char *base_dir, const fshm_grant *g, int sealed, fshm_paths *p)
{
    memset(p, 0, sizeof *p);
    const char *base;
    int rc = fshm_base_dir(base_dir, &base);
    if (rc)
        return rc;
    char canon[PATH_MAX];
    if (!realpath(base, canon))
        return fshm_set_error(-errno, "base directory %s: %s", base, strerror(errno));
    static const char prefix[] = "shm:file?path=";
    if (strncmp(g->header_uri, prefix, sizeof prefix - 1) != 0)
        return fshm_set_error(FSHM_E_CORRUPT, "driver gave an unsupported header URI '%.80s'",
                              g->header_uri);
    char path[FSHM_PATH_MAX];
    snprintf(path, sizeof path, "%s", g->header_uri + sizeof prefix - 1);
    char *bar = strchr(path, '|');
    if (bar)
        *bar = 0;
    char real[PATH_MAX];
    if (sealed) {
        /* Only a name: canonical means no "." / ".." / empty components. */
        snprintf(real, sizeof real, "%s", path);
        if (strstr(path, "//") || strstr(path, "/./") || strstr(path, "/../"))
            real[0] = 0;
    } else if (!realpath(path, real)) {
        return fshm_set_error(-errno, "driver's header region %s: %s", path, strerror(errno));
    }
    if (strcmp(real, path) != 0)
        return fshm_set_error(FSHM_E_CORRUPT, "driver's header region path %s is not canonical (%s)",
                              path, real);
    size_t blen = strlen(canon);
    if (strncmp(path, canon, blen) != 0 || path[blen] != '/')
        return fshm_set_error(FSHM_E_CORRUPT, "driver's header region %s is outside the base "
                              "directory %s", path, canon);
    /* Split the rest: tensorpool-<user>/<ns>/<stream_id>/<epoch>/header.ring */
    char rest[FSHM_PATH_MAX];
    snprintf(rest, sizeof rest, "%s", path + blen + 1);
    char *parts[6];
    int n = 0;
    char *save = NULL;   /* strtok_r: attaches may run on several threads at once */
    for (char *tok = strtok_r(rest, "/", &save); tok && n < 6; tok = strtok_r(NULL, "/", &save))
        parts[n++] = tok;
    char want_id[16], want_epoch[24];
    snprintf(want_id, sizeof want_id, "%u", g->stream_id);
    snprintf(want_epoch, sizeof want_epoch, "%llu", (unsigned long long)g->epoch);
    if (n != 5 || strncmp(parts[0], "tensorpool-", 11) != 0 || strcmp(parts[2], want_id) != 0 ||
        strcmp(parts[3], want_epoch) != 0 || strcmp(parts[4], "header.ring") != 0 ||
        fshm_validate_name(parts[1], "namespace") != 0)
        return fshm_set_error(FSHM_E_CORRUPT, "driver's header region %s is not "
                              "<base>/tensorpool-<user>/<ns>/%u/%llu/header.ring", path, g->stream_id,
                              (unsigned long long)g->epoch);
    snprintf(p->base, sizeof p->base, "%s", canon);
    snprintf(p->ns_dir, sizeof p->ns_dir, "%s/%s/%s", canon, parts[0], parts[1]);
    snprintf(p->stream_dir, sizeof p->stream_dir, "%s/%u", p->ns_dir, g->stream_id);
    snprintf(p->ctl, sizeof p->ctl, "%s/frameshm.ctl", p->stream_dir);
    snprintf(p->name, sizeof p->name, "stream-%u", g->stream_id);
    p->stream_id = g->stream_id;
    p->any_name = 1;
    char epoch_dir[FSHM_PATH_MAX + 32];
    snprintf(epoch_dir, sizeof epoch_dir, "%s/%s/", p->stream_dir, want_epoch);
    for (unsigned i = 0; i < g->npools; i++) {
        const char *u = g->pools[i].uri;
        if (strncmp(u, prefix, sizeof prefix - 1) != 0 ||
            strncmp(u + sizeof prefix - 1, epoch_dir, strlen(epoch_dir)) != 0 ||
            strchr(u + sizeof prefix - 1 + strlen(epoch_dir), '/'))
            return fshm_set_error(FSHM_E_CORRUPT, "driver's pool URI '%.120s' is not in %s", u,
                                  epoch_dir);
    }
    return 0;
}

int fshm_namespace_dir(const char *base_dir, const char *ns, char *out, size_t cap)
{
    fshm_stream_addr a = {.name = "x", .base_dir = base_dir, .ns = ns};
    fshm_paths p;
    int rc = fshm_resolve(&a, 0, &p);
    if (rc)
        return rc;
    snprintf(out, cap, "%s", p.ns_dir);
    return 0;
}

int fshm_statvfs_free(const char *dir, uint64_t *free_bytes)
{
    struct statvfs sv;
    if (statvfs(dir, &sv) != 0)
        return -errno;
    *free_bytes = (uint64_t)sv.f_bavail * sv.f_frsize;
    return 0;
}

int fshm_create_file(const char *path, size_t size, unsigned mode, int *fd_out)
{
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0)
        return fshm_set_error(-errno, "cannot create %s: %s", path, strerror(errno));
    /* Reserve every page now: a full /dev/shm fails here, not as SIGBUS mid-stream. */
    int err = posix_fallocate(fd, 0, (off_t)size);
    if (err) {
        uint64_t avail = 0;
        char dir[FSHM_PATH_MAX];
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = 0;
        fshm_statvfs_free(dir, &avail);
        close(fd);
        unlink(path);
        if (err == ENOSPC)
            return fshm_set_error(-ENOSPC,
                                  "not enough shared memory for %s: need %zu bytes, %llu free in %s",
                                  path, size, (unsigned long long)avail, dir);
        return fshm_set_error(-err, "cannot reserve %zu bytes for %s: %s", size, path, strerror(err));
    }
    *fd_out = fd;
    return 0;
}

int fshm_uri_format(char *out, size_t cap, const char *path)
{
    int n = snprintf(out, cap, "shm:file?path=%s", path);
    if (n < 0 || (size_t)n >= cap)
        return fshm_set_error(-ENAMETOOLONG, "region path %s is too long for a URI", path);
    return 0;
}

int fshm_uri_open(const char *uri, const char *base, int writable, int *fd_out, size_t *size_out)
{
    static const char prefix[] = "shm:file?path=";
    if (strncmp(uri, prefix, sizeof prefix - 1) != 0)
        return fshm_set_error(FSHM_E_CORRUPT, "unsupported region URI '%.80s'", uri);
    const char *path_start = uri + sizeof prefix - 1;
    const char *bar = strchr(path_start, '|');
    size_t plen = bar ? (size_t)(bar - path_start) : strlen(path_start);
    if (plen == 0 || plen >= FSHM_PATH_MAX || path_start[0] != '/')
        return fshm_set_error(FSHM_E_CORRUPT, "region URI '%.80s' needs an absolute path", uri);
    char path[FSHM_PATH_MAX];
    memcpy(path, path_start, plen);
    path[plen] = 0;
    for (size_t i = 0; i < plen; i++)
        if (path[i] == '?' || path[i] == ' ' || (unsigned char)path[i] < 0x21 || path[i] == 0x7f)
            return fshm_set_error(FSHM_E_CORRUPT, "region URI '%.80s' has a bad path", uri);
    int hugepages = 0;
    while (bar) {
        const char *param = bar + 1;
        bar = strchr(param, '|');
        size_t len = bar ? (size_t)(bar - param) : strlen(param);
        if (len == 22 && strncmp(param, "require_hugepages=true", 22) == 0)
            hugepages = 1;
        else if (len == 23 && strncmp(param, "require_hugepages=false", 23) == 0)
            hugepages = 0;
        else
            return fshm_set_error(FSHM_E_CORRUPT, "region URI '%.80s' has an unknown parameter", uri);
    }
    char canon[PATH_MAX];
    if (!realpath(path, canon))
        return fshm_set_error(errno == ENOENT ? -ENOENT : -errno, "region %s: %s", path,
                              strerror(errno));
    size_t blen = strlen(base);
    if (strncmp(canon, base, blen) != 0 || canon[blen] != '/')
        return fshm_set_error(FSHM_E_CORRUPT, "region %s is outside the base directory %s", canon,
                              base);
    /* O_NONBLOCK: a FIFO planted in place of a region must not hang us before the
     * regular-file check below rejects it. */
    int fd = open(canon, (writable ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return fshm_set_error(-errno, "cannot open region %s: %s", canon, strerror(errno));
    struct stat fst, pst;
    if (fstat(fd, &fst) != 0 || !S_ISREG(fst.st_mode)) {
        close(fd);
        return fshm_set_error(FSHM_E_CORRUPT, "region %s is not a regular file", canon);
    }
    if (stat(canon, &pst) != 0 || pst.st_dev != fst.st_dev || pst.st_ino != fst.st_ino) {
        close(fd);
        /* Removed or replaced between open and stat: a producer restarting (its old
         * epoch's files go). Not corruption; whoever maps retries on the new epoch. */
        return fshm_set_error(-EAGAIN, "region %s changed while being opened", canon);
    }
    if (hugepages) {
        struct statfs sfs;
        if (fstatfs(fd, &sfs) != 0 || (uint64_t)sfs.f_type != (uint64_t)HUGETLBFS_MAGIC) {
            close(fd);
            return fshm_set_error(FSHM_E_CORRUPT, "region %s requires hugepages but is not on hugetlbfs",
                                  canon);
        }
    }
    *fd_out = fd;
    *size_out = (size_t)fst.st_size;
    return 0;
}

int fshm_uri_map(const char *uri, const char *base, int writable, fshm_map **out)
{
    int fd;
    size_t size;
    int rc = fshm_uri_open(uri, base, writable, &fd, &size);
    if (rc)
        return rc;
    /* A producer touches every page soon anyway: fault them in now, not mid-frame. */
    rc = fshm_map_create(fd, size, writable, writable, out);
    close(fd);   /* the mapping keeps the file */
    return rc;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)ftw;
    if (flag == FTW_DP || flag == FTW_D)
        rmdir(path);
    else
        unlink(path);
    return 0;
}

int fshm_remove_tree(const char *dir)
{
    return nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS) == 0 ? 0 : -errno;
}
