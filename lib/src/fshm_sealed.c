/* Sealed regions: the driver's memfd transport (docs/driver.md "Sealed regions").
 *
 * A region file in the base directory can be written and truncated by whoever the file
 * mode lets in, and a truncation under a live mapping kills every process that maps it
 * with SIGBUS. Under `transport = "memfd"` the driver creates each region (and the
 * control region) as a memfd, sizes it, seals it against shrinking and growing, and hands
 * descriptors over its Unix socket (SCM_RIGHTS) with the attach response: read-write to
 * the producer, read-only to consumers for the header ring and the pools. Nobody,
 * the driver included, can change a sealed region's size afterwards; a read-only
 * description cannot be mapped writable, and the inode's mode (0600, the driver's) keeps
 * another user from re-opening it writable through /proc/self/fd. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fshm_internal.h"

#define SEALS_WANTED (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

int fshm_sealed_create(const char *label, uint64_t size, int *fd_out)
{
    *fd_out = -1;
    if (size > (uint64_t)INT64_MAX || size > (uint64_t)SIZE_MAX)
        return fshm_set_error(-EFBIG, "region %s would be %llu bytes: too large", label,
                              (unsigned long long)size);
    int fd = memfd_create(label, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return fshm_set_error(-errno, "memfd_create(%s): %s", label, strerror(errno));
    int rc = 0;
    /* memfds start as 0777: without this another user holding a read-only descriptor
     * could open /proc/self/fd/N for writing. */
    if (fchmod(fd, 0600) != 0)
        rc = fshm_set_error(-errno, "cannot chmod memfd %s: %s", label, strerror(errno));
    else if (ftruncate(fd, (off_t)size) != 0)
        rc = fshm_set_error(-errno, "cannot size memfd %s to %llu bytes: %s", label,
                            (unsigned long long)size, strerror(errno));
    if (!rc) {
        /* Reserve every page now: no memory fails here, not as SIGBUS mid-stream. */
        int err = posix_fallocate(fd, 0, (off_t)size);
        if (err == ENOSPC || err == ENOMEM)
            rc = fshm_set_error(-ENOSPC, "not enough memory for region %s (%llu bytes)", label,
                                (unsigned long long)size);
        else if (err)
            rc = fshm_set_error(-err, "cannot reserve %llu bytes for region %s: %s",
                                (unsigned long long)size, label, strerror(err));
    }
    if (!rc && fcntl(fd, F_ADD_SEALS, SEALS_WANTED) != 0)
        rc = fshm_set_error(-errno, "cannot seal memfd %s: %s", label, strerror(errno));
    if (rc) {
        close(fd);
        return rc;
    }
    *fd_out = fd;
    return 0;
}

int fshm_sealed_check(int fd, size_t size, int writable, const char *what)
{
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return fshm_set_error(FSHM_E_CORRUPT, "the driver's %s is not a regular file descriptor",
                              what);
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
        return fshm_set_error(FSHM_E_CORRUPT, "the driver's %s is not sealed against resizing "
                              "(seals 0x%x)", what, seals < 0 ? 0 : seals);
    if ((uint64_t)st.st_size != (uint64_t)size)
        return fshm_set_error(FSHM_E_CORRUPT, "the driver's %s is %lld bytes, expected %zu", what,
                              (long long)st.st_size, size);
    int acc = fcntl(fd, F_GETFL);
    if (writable && (acc < 0 || (acc & O_ACCMODE) != O_RDWR))
        return fshm_set_error(FSHM_E_CORRUPT, "the driver gave us a read-only %s to write", what);
    return 0;
}

int fshm_sealed_map(int fd, size_t size, int writable, const char *what, fshm_map **out)
{
    int rc = fshm_sealed_check(fd, size, writable, what);
    return rc ? rc : fshm_map_create(fd, size, writable, writable, out);
}

int fshm_sealed_readonly(int fd)
{
    char proc[48];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    int ro = open(proc, O_RDONLY | O_CLOEXEC);
    if (ro < 0)
        return fshm_set_error(-errno, "cannot re-open descriptor %d read-only: %s", fd,
                              strerror(errno));
    return ro;
}

/* ---- the driver's side of the consumer table ----
 * One short mapping per call: registrations and control writes are rare (attach, a mode
 * change), and keeping nothing mapped leaves the driver's state in its descriptors. */
static int with_ctl(int ctl_fd, fshm_map **m)
{
    int rc = fshm_sealed_check(ctl_fd, FSHM_CTL_BYTES, 1, "control region");
    if (rc)
        return rc;
    rc = fshm_map_create(ctl_fd, FSHM_CTL_BYTES, 1, 0, m);
    if (!rc && LOAD_RLX(&((fshm_ctl *)(*m)->base)->magic) != FSHM_CTL_MAGIC) {
        fshm_map_unref(*m);
        rc = fshm_set_error(FSHM_E_CORRUPT, "the control region is not initialised");
    }
    return rc;
}

int fshm_sealed_consumer_add(int ctl_fd, int64_t pid, const char *consumer, const char *queue,
                             int no_queue, int process_all, uint32_t max_rate_hz)
{
    if (!consumer || !queue || strlen(consumer) > FSHM_CONSUMER_NAME_MAX || strlen(queue) > 31)
        return fshm_set_error(-EINVAL, "consumer or queue name too long");
    fshm_map *m;
    int rc = with_ctl(ctl_fd, &m);
    if (rc)
        return rc;
    uint32_t flags = (no_queue ? CONS_FLAG_NO_QUEUE : 0) | (process_all ? CONS_FLAG_NEXT : 0);
    rc = fshm_ctl_register_peer(m->base, pid, consumer, queue, flags, max_rate_hz);
    fshm_map_unref(m);
    return rc;
}

int fshm_sealed_consumer_remove(int ctl_fd, int idx, int64_t pid, const char *queue)
{
    fshm_map *m;
    int rc = with_ctl(ctl_fd, &m);
    if (rc)
        return rc;
    rc = fshm_ctl_release_peer(m->base, idx, pid, queue ? queue : "");
    fshm_map_unref(m);
    return rc;
}

int fshm_sealed_set_control(int ctl_fd, unsigned index, uint8_t value)
{
    if (index >= FSHM_CONTROL_BYTES)
        return fshm_set_error(-EINVAL, "control byte %u does not exist (0..%d)", index,
                              FSHM_CONTROL_BYTES - 1);
    fshm_map *m;
    int rc = with_ctl(ctl_fd, &m);
    if (rc)
        return rc;
    STORE_REL(&((fshm_ctl *)m->base)->control[index], value);
    fshm_map_unref(m);
    return 0;
}

int fshm_sealed_prune(int ctl_fd)
{
    fshm_map *m;
    int rc = with_ctl(ctl_fd, &m);
    if (rc)
        return rc;
    rc = fshm_ctl_prune(m->base);
    fshm_map_unref(m);
    return rc;
}
