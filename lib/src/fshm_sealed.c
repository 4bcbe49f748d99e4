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
