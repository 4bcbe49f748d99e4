/* Driver-model client (SHM Driver Model Spec v1.0): one control connection per lease.
 *
 * A lease is attached synchronously; then a background thread owns the socket: it sends
 * ShmLeaseKeepalive well before the lease would expire and reads what the driver pushes
 * (ShmLeaseRevoked, ShmPoolAnnounce, ShmDriverShutdown, and the ShmControlResponse to a
 * sealed consumer's request: fshm_lease_requests.c). Writers and readers only look
 * at the lease's atomic state on their own schedule, so the hot path never touches the
 * socket. Encoding: docs/driver-protocol.md. */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fshm_lease_impl.h"

/* ---- byte-level codec ---- */

void fshm_lease_put_header(uint8_t *p, uint16_t block, uint16_t tid, uint16_t schema)
{
    st16(p, block);
    st16(p + 2, tid);
    st16(p + 4, schema);
    st16(p + 6, schema == DRIVER_SCHEMA_ID ? DRIVER_SCHEMA_VERSION : FSHM_SCHEMA_VERSION);
}

typedef struct cursor {
    const uint8_t *p;
    size_t len;
    size_t off;
    int bad;
} cursor;

static const uint8_t *take(cursor *c, size_t n)
{
    if (c->bad || n > c->len - c->off) {
        c->bad = 1;
        return NULL;
    }
    const uint8_t *r = c->p + c->off;
    c->off += n;
    return r;
}

/* Var-length ASCII into a NUL-terminated buffer; longer than cap → bad. */
static void take_str(cursor *c, char *out, size_t cap)
{
    const uint8_t *lp = take(c, 4);
    if (!lp) {
        if (cap)
            out[0] = 0;
        return;
    }
    uint32_t n = ld32(lp);
    const uint8_t *s = take(c, n);
    if (!s || n >= cap) {
        c->bad = 1;
        if (cap)
            out[0] = 0;
        return;
    }
    memcpy(out, s, n);
    out[n] = 0;
    for (uint32_t i = 0; i < n; i++)
        if (s[i] == 0 || s[i] > 0x7e) {
            c->bad = 1;
            break;
        }
}

/* Skips a var field whose content we do not need (bounded by the packet). */
static void skip_str(cursor *c)
{
    const uint8_t *lp = take(c, 4);
    if (lp)
        take(c, ld32(lp));
}

static uint64_t now_ns(void) { return fshm_now_ns(); }

/* ---- socket helpers ---- */

int fshm_lease_send(fshm_lease *l, const uint8_t *buf, size_t n)
{
    pthread_mutex_lock(&l->send_mu);
    ssize_t r = send(l->fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    int e = errno;
    pthread_mutex_unlock(&l->send_mu);
    if (r == (ssize_t)n)
        return 0;
    return -(r < 0 ? e : EMSGSIZE);
}

static void close_fds(int *fds, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* Receives one packet within the deadline; 0 on timeout, <0 on error/EOF, else length.
 * Descriptors passed with it (SCM_RIGHTS) land in fds[*nfds] (fds NULL: closed); a packet
 * carrying more than FSHM_LEASE_MAX_FDS is refused whole. */
static ssize_t recv_msg_fds(int fd, uint8_t *buf, size_t cap, uint64_t deadline_ns, int *fds,
                            unsigned *nfds)
{
    if (nfds)
        *nfds = 0;
    for (;;) {
        uint64_t now = now_ns();
        if (now >= deadline_ns)
            return 0;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int ms = (int)((deadline_ns - now + 999999) / 1000000);
        int pr = poll(&pfd, 1, ms);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr < 0)
            return -errno;
        if (pr == 0)
            continue;
        union {
            struct cmsghdr h;
            char b[CMSG_SPACE(sizeof(int) * FSHM_LEASE_MAX_FDS)];
        } ctl;
        struct iovec iov = {.iov_base = buf, .iov_len = cap};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                            .msg_controllen = sizeof ctl.b};
        ssize_t n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_TRUNC | MSG_CMSG_CLOEXEC);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n < 0)
            return -errno;
        int got[FSHM_LEASE_MAX_FDS];
        unsigned ngot = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k; i++) {
                int f;
                memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
                if (ngot < FSHM_LEASE_MAX_FDS)
                    got[ngot++] = f;
                else
                    close(f);
            }
        }
        if (mh.msg_flags & MSG_CTRUNC || !fds) {
            close_fds(got, ngot);
            ngot = 0;
        }
        if (n == 0)
            return -ECONNRESET;
        if ((size_t)n > cap) {
            close_fds(got, ngot);
            return -EMSGSIZE;
        }
        if (fds) {
            memcpy(fds, got, ngot * sizeof(int));
            *nfds = ngot;
        }
        return n;
    }
}

static ssize_t recv_msg(int fd, uint8_t *buf, size_t cap, uint64_t deadline_ns)
{
    return recv_msg_fds(fd, buf, cap, deadline_ns, NULL, NULL);
}

static int connect_driver(const char *path, int *fd_out)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (!path || !*path)
        return fshm_set_error(-EINVAL, "no driver socket path given");
    if (strlen(path) >= sizeof sa.sun_path)
        return fshm_set_error(-ENAMETOOLONG, "driver socket path %s is too long", path);
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fshm_set_error(-errno, "cannot create a socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        int e = errno;
        close(fd);
        if (e == ENOENT || e == ECONNREFUSED) {
            int rc = fshm_set_error(FSHM_E_NODRIVER, "no frameshm driver is listening on %s (%s)",
                                    path, strerror(e));
            fshm_note_errno(e);
            return rc;
        }
        return fshm_set_error(-e, "cannot connect to the driver at %s: %s", path, strerror(e));
    }
    /* Only trust a driver running as ourselves or root: it hands us paths to map. */
    struct ucred cred;
    socklen_t cl = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0 && cred.uid != 0 &&
        cred.uid != geteuid()) {
        close(fd);
        return fshm_set_error(-EPERM, "the driver at %s runs as uid %u, neither root nor us", path,
                              (unsigned)cred.uid);
    }
    *fd_out = fd;
    return 0;
}

/* ---- attach ---- */

int64_t fshm_lease_next_correlation(void)
{
    static int64_t ctr;
    return ((int64_t)getpid() << 24) + __atomic_add_fetch(&ctr, 1, __ATOMIC_RELAXED);
}

uint32_t fshm_lease_new_client_id(void)
{
    /* Unique per lease in this process and across live processes (pid in the high
     * bits); never 0, which the protocol treats as invalid. */
    static uint32_t ctr;
    uint32_t n = __atomic_add_fetch(&ctr, 1, __ATOMIC_RELAXED);
    return (((uint32_t)getpid() & 0x3fffff) << 10) | (n & 0x3ff) | 0x80000000u;
}

const char *fshm_lease_code_name(int32_t code)
{
    switch (code) {
    case FSHM_RESP_OK: return "OK";
    case FSHM_RESP_UNSUPPORTED: return "UNSUPPORTED";
    case FSHM_RESP_INVALID_PARAMS: return "INVALID_PARAMS";
    case FSHM_RESP_REJECTED: return "REJECTED";
    case FSHM_RESP_INTERNAL_ERROR: return "INTERNAL_ERROR";
    default: return "unknown code";
    }
}

/* Decodes a ShmAttachResponse body (after the header) into g; returns 0, or the error. */
static int decode_attach_response(const uint8_t *msg, size_t len, int64_t corr, fshm_grant *g,
                                  int *matched)
{
    *matched = 0;
    uint16_t block = ld16(msg);
    if (block < B_ATTACH_RESP)
        return fshm_set_error(FSHM_E_CORRUPT, "driver sent a short ShmAttachResponse");
    cursor c = {msg, len, 8, 0};
    const uint8_t *b = take(&c, block);
    if (!b)
        return fshm_set_error(FSHM_E_CORRUPT, "driver sent a truncated ShmAttachResponse");
    if ((int64_t)ld64(b) != corr)
        return 0;   /* someone else's (or a stale) response */
    *matched = 1;
    int32_t code = (int32_t)ld32(b + 8);
    memset(g, 0, sizeof *g);
    g->lease_id = ld64(b + 12);
    g->lease_expiry_ns = ld64(b + 20);
    g->stream_id = ld32(b + 28);
    g->epoch = ld64(b + 32);
    g->layout_version = ld32(b + 40);
    g->header_nslots = ld32(b + 44);
    g->header_slot_bytes = ld16(b + 48);
    g->max_dims = b[50];
    const uint8_t *gh = take(&c, 4);
    uint16_t eblock = gh ? ld16(gh) : 0, count = gh ? ld16(gh + 2) : 0;
    if (gh && count && eblock < B_POOL_ENTRY)
        c.bad = 1;
    for (unsigned i = 0; i < count && !c.bad; i++) {
        const uint8_t *e = take(&c, eblock);
        if (!e)
            break;
        if (i < FSHM_MAX_POOLS) {
            g->pools[i].pool_id = ld16(e);
            g->pools[i].nslots = ld32(e + 2);
            g->pools[i].stride_bytes = ld32(e + 6);
            take_str(&c, g->pools[i].uri, sizeof g->pools[i].uri);
        } else {
            skip_str(&c);
        }
    }
    take_str(&c, g->header_uri, sizeof g->header_uri);
    char err[256] = "";
    if (c.off < len)
        take_str(&c, err, sizeof err);
    if (code != FSHM_RESP_OK) {
        return fshm_set_error(FSHM_E_REJECTED, "the driver refused the attach (%s): %s",
                              fshm_lease_code_name(code), err[0] ? err : "no message");
    }
    if (c.bad)
        return fshm_set_error(FSHM_E_CORRUPT, "driver sent a malformed ShmAttachResponse");
    if (!fshm_valid_npools(count))
        return fshm_set_error(FSHM_E_CORRUPT, "driver granted %u payload pools (1..%d supported)",
                              count, FSHM_MAX_POOLS);
    g->npools = count;
    /* Spec §4.2: an OK response with a null required field is a protocol error. */
    if (g->lease_id == UINT64_MAX || g->epoch == UINT64_MAX || g->stream_id == UINT32_MAX ||
        g->layout_version == UINT32_MAX || g->header_nslots == UINT32_MAX ||
        g->header_slot_bytes == UINT16_MAX || g->max_dims == UINT8_MAX || !g->header_uri[0])
        return fshm_set_error(FSHM_E_CORRUPT, "driver's ShmAttachResponse lacks required fields");
    for (unsigned i = 0; i < count; i++) {
        if (!g->pools[i].uri[0])
            return fshm_set_error(FSHM_E_CORRUPT, "driver's ShmAttachResponse has an empty pool URI");
        if (g->pools[i].nslots != g->header_nslots)
            return fshm_set_error(FSHM_E_CORRUPT, "driver granted pool %u with %u slots for a %u-slot "
                                  "header ring", g->pools[i].pool_id, g->pools[i].nslots,
                                  g->header_nslots);
        if (!fshm_valid_stride(g->pools[i].stride_bytes))
            return fshm_set_error(FSHM_E_CORRUPT, "driver granted pool %u with stride %u, not a "
                                  "power-of-two multiple of %u", g->pools[i].pool_id,
                                  g->pools[i].stride_bytes, FSHM_MIN_STRIDE);
    }
    if (!fshm_valid_nslots(g->header_nslots))
        return fshm_set_error(FSHM_E_CORRUPT, "driver granted a %u-slot header ring (a power of two "
                              "in 1..%u)", g->header_nslots, FSHM_MAX_NSLOTS);
    if (g->header_slot_bytes != FSHM_SLOT_BYTES || g->layout_version != FSHM_LAYOUT_VERSION)
        return fshm_set_error(FSHM_E_CORRUPT, "driver granted layout %u with %u-byte slots; this "
                              "build reads layout %u with %u-byte slots", g->layout_version,
                              g->header_slot_bytes, FSHM_LAYOUT_VERSION, FSHM_SLOT_BYTES);
    return 0;
}

static void handle_push(fshm_lease *l, const uint8_t *msg, size_t len);

static void *lease_thread(void *arg);

static int lease_attach(const fshm_lease_config *cfg, fshm_lease **out, fshm_grant *grant);

int fshm_lease_attach(const fshm_lease_config *user_cfg, fshm_lease **out, fshm_grant *grant)
{
    fshm_lease_config cfg;
    *out = NULL;
    int rc = fshm_config_copy(&cfg, sizeof cfg, user_cfg, offsetof(fshm_lease_config, timeout_ns) + sizeof(int64_t), "fshm_lease_config");
    return rc ? rc : lease_attach(&cfg, out, grant);
}

static int lease_attach(const fshm_lease_config *cfg, fshm_lease **out, fshm_grant *grant)
{
    *out = NULL;
    int fds[FSHM_LEASE_MAX_FDS];
    unsigned nfds = 0;
    if (cfg->role != FSHM_ROLE_PRODUCER && cfg->role != FSHM_ROLE_CONSUMER)
        return fshm_set_error(-EINVAL, "lease role must be producer or consumer");
    if (!cfg->stream_id)
        return fshm_set_error(-EINVAL, "the driver model addresses streams by a non-zero stream_id");
    int pm = cfg->publish_mode ? cfg->publish_mode : FSHM_EXISTING_OR_CREATE;
    if (pm != FSHM_REQUIRE_EXISTING && pm != FSHM_EXISTING_OR_CREATE)
        return fshm_set_error(-EINVAL, "publish mode must be REQUIRE_EXISTING or EXISTING_OR_CREATE");
    fshm_lease *l = calloc(1, sizeof *l);
    if (!l)
        return fshm_set_error(-ENOMEM, "out of memory");
    l->fd = -1;
    l->wake[0] = l->wake[1] = -1;
    pthread_mutex_init(&l->send_mu, NULL);
    pthread_mutex_init(&l->req_mu, NULL);
    pthread_mutex_init(&l->resp_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&l->resp_cv, &ca);
    pthread_condattr_destroy(&ca);
    l->stream_id = cfg->stream_id;
    l->role = cfg->role;
    l->client_id = cfg->client_id ? cfg->client_id : fshm_lease_new_client_id();
    int rc = connect_driver(cfg->socket_path, &l->fd);
    if (rc)
        goto fail;

    uint8_t req[8 + B_ATTACH_REQ];
    memset(req, 0, sizeof req);
    fshm_lease_put_header(req, B_ATTACH_REQ, T_ATTACH_REQ, DRIVER_SCHEMA_ID);
    uint8_t *b = req + 8;
    int64_t corr = fshm_lease_next_correlation();
    st64(b, (uint64_t)corr);
    st32(b + 8, cfg->stream_id);
    st32(b + 12, l->client_id);
    b[16] = (uint8_t)cfg->role;
    st32(b + 17, cfg->expected_layout_version);
    b[21] = FSHM_MAX_DIMS;
    b[22] = (uint8_t)pm;
    b[23] = 0;   /* requireHugepages FALSE */
    if ((rc = fshm_lease_send(l, req, sizeof req)) < 0) {
        rc = fshm_set_error(rc, "cannot send ShmAttachRequest to %s: %s", cfg->socket_path,
                            strerror(-rc));
        goto fail;
    }
    uint64_t deadline = now_ns() + (cfg->timeout_ns > 0 ? (uint64_t)cfg->timeout_ns : 5000000000ull);
    uint8_t buf[MSG_MAX];
    for (;;) {
        close_fds(fds, nfds);   /* whatever came with a packet that was not our answer */
        nfds = 0;
        ssize_t n = recv_msg_fds(l->fd, buf, sizeof buf, deadline, fds, &nfds);
        if (n == 0) {
            rc = fshm_set_error(-ETIMEDOUT, "the driver at %s did not answer the attach in time",
                                cfg->socket_path);
            goto fail;
        }
        if (n < 0) {
            rc = fshm_set_error((int)n == -ECONNRESET ? -ECONNRESET : (int)n,
                                "the driver at %s closed the connection during attach (%s)",
                                cfg->socket_path, strerror((int)-n));
            goto fail;
        }
        if (n < 8)
            continue;
        if (ld16(buf + 2) == T_ATTACH_RESP && ld16(buf + 4) == DRIVER_SCHEMA_ID) {
            int matched;
            rc = decode_attach_response(buf, (size_t)n, corr, grant, &matched);
            if (!matched && rc == 0)
                continue;
            if (rc)
                goto fail;
            /* Sealed transport: the control region, the header ring, each pool, in order. */
            if (nfds && nfds != 2 + grant->npools) {
                rc = fshm_set_error(FSHM_E_CORRUPT, "the driver passed %u descriptors for a "
                                    "grant of %u pools (expected %u)", nfds, grant->npools,
                                    2 + grant->npools);
                goto fail;
            }
            memcpy(l->fds, fds, nfds * sizeof(int));
            l->nfds = nfds;
            nfds = 0;
            break;
        }
        handle_push(l, buf, (size_t)n);   /* announces may come first */
    }
    if (grant->stream_id != cfg->stream_id) {
        rc = fshm_set_error(FSHM_E_CORRUPT, "asked the driver for stream %u, got %u", cfg->stream_id,
                            grant->stream_id);
        goto fail;
    }
    l->lease_id = grant->lease_id;
    uint64_t now = now_ns();
    /* Three keepalives per expiry period: one lost or late packet never expires us. */
    uint64_t left = grant->lease_expiry_ns > now ? grant->lease_expiry_ns - now : 0;
    l->interval_ns = left / 3;
    if (l->interval_ns < 10000000ull)
        l->interval_ns = 10000000ull;
    if (l->interval_ns > 1000000000ull)
        l->interval_ns = 1000000000ull;
    if (l->announced_epoch < grant->epoch)
        l->announced_epoch = grant->epoch;
    if (pipe2(l->wake, O_CLOEXEC | O_NONBLOCK) != 0) {
        rc = fshm_set_error(-errno, "pipe: %s", strerror(errno));
        goto fail;
    }
    /* The keepalive thread takes no signals: they belong to the application's threads
     * (Ctrl-C must reach the one waiting on a frame, not interrupt a keepalive). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&l->thread, NULL, lease_thread, l);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        rc = fshm_set_error(-rc, "cannot start the keepalive thread: %s", strerror(rc));
        goto fail;
    }
    l->thread_running = 1;
    *out = l;
    return 0;
fail:
    close_fds(fds, nfds);
    fshm_lease_close(l, 0);
    return rc;
}

unsigned fshm_lease_nfds(const fshm_lease *l) { return l->nfds; }
int fshm_lease_has_fd(const fshm_lease *l, unsigned i) { return i < l->nfds && l->fds[i] >= 0; }

int fshm_lease_take_fd(fshm_lease *l, unsigned i)
{
    if (i >= l->nfds)
        return -1;
    int fd = l->fds[i];
    l->fds[i] = -1;
    return fd;
}

/* ---- what the driver pushes ---- */

static void end_lease(fshm_lease *l, int state, int reason, const char *fmt, const char *detail)
{
    if (LOAD_ACQ(&l->state) != FSHM_LEASE_ACTIVE)
        return;
    snprintf(l->message, sizeof l->message, fmt, detail);
    STORE_RLX(&l->reason, reason);
    STORE_REL(&l->state, state);
    pthread_mutex_lock(&l->resp_mu);
    pthread_cond_broadcast(&l->resp_cv);   /* a request in flight gets no answer now */
    pthread_mutex_unlock(&l->resp_mu);
}

static const char *reason_name(int r)
{
    return r == FSHM_REVOKE_DETACHED ? "detached" : r == FSHM_REVOKE_EXPIRED ? "expired"
         : r == FSHM_REVOKE_REVOKED ? "revoked" : "ended";
}

static void handle_push(fshm_lease *l, const uint8_t *msg, size_t len)
{
    if (len < 8)
        return;
    uint16_t block = ld16(msg), tid = ld16(msg + 2), schema = ld16(msg + 4);
    cursor c = {msg, len, 8, 0};
    if (schema == ANNOUNCE_SCHEMA_ID && tid == T_POOL_ANNOUNCE) {
        const uint8_t *b = block >= B_ANNOUNCE ? take(&c, block) : NULL;
        if (!b || ld32(b) != l->stream_id)
            return;
        uint64_t e = ld64(b + 8);
        uint64_t old = LOAD_ACQ(&l->announced_epoch);
        while (e > old && !__atomic_compare_exchange_n(&l->announced_epoch, &old, e, 0,
                                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            ;
        return;
    }
    if (schema != DRIVER_SCHEMA_ID)
        return;
    if (tid == T_REVOKED && block >= B_REVOKED) {
        const uint8_t *b = take(&c, block);
        if (!b)
            return;
        uint64_t lease = ld64(b + 8);
        uint32_t stream = ld32(b + 16);
        int role = b[24], reason = b[25];
        if (reason < FSHM_REVOKE_DETACHED || reason > FSHM_REVOKE_REVOKED)
            return;   /* spec §4.9: unknown reasons are rejected */
        char err[128] = "";
        if (c.off < len)
            take_str(&c, err, sizeof err);
        if (lease == l->lease_id) {
            char why[200];
            snprintf(why, sizeof why, "%s%s%s", reason_name(reason), err[0] ? ": " : "", err);
            end_lease(l, FSHM_LEASE_REVOKED, reason, "the driver ended our lease (%s)", why);
        } else if (stream == l->stream_id && role == FSHM_ROLE_PRODUCER) {
            ADD_RLX(&l->producer_revokes, 1);
        }
    } else if (tid == T_CONTROL_RESP && block >= B_CONTROL_RESP) {
        const uint8_t *b = take(&c, block);
        if (!b)
            return;
        char err[160] = "";
        if (c.off < len)
            take_str(&c, err, sizeof err);
        fshm_lease_deliver_response(l, b, err);
    } else if (tid == T_SHUTDOWN && block >= B_SHUTDOWN) {
        const uint8_t *b = take(&c, block);
        if (b)
            end_lease(l, FSHM_LEASE_DRIVER_GONE, b[8], "%s", "the driver shut down");
    }
}

static void *lease_thread(void *arg)
{
    fshm_lease *l = arg;
    uint8_t buf[MSG_MAX];
    uint64_t next_ka = now_ns() + l->interval_ns;
    for (;;) {
        uint64_t now = now_ns();
        if (now >= next_ka) {
            if (LOAD_ACQ(&l->state) == FSHM_LEASE_ACTIVE) {
                uint8_t ka[8 + B_KEEPALIVE];
                fshm_lease_put_header(ka, B_KEEPALIVE, T_KEEPALIVE, DRIVER_SCHEMA_ID);
                st64(ka + 8, l->lease_id);
                st32(ka + 16, l->stream_id);
                st32(ka + 20, l->client_id);
                ka[24] = (uint8_t)l->role;
                st64(ka + 25, now);
                int rc = fshm_lease_send(l, ka, sizeof ka);
                /* Spec §4.4: a failed keepalive send is fatal for the lease. */
                if (rc < 0 && rc != -EAGAIN)
                    end_lease(l, FSHM_LEASE_DRIVER_GONE, 0, "keepalive failed: %s", strerror(-rc));
            }
            next_ka = now + l->interval_ns;
        }
        struct pollfd p[2] = {{.fd = l->fd, .events = POLLIN}, {.fd = l->wake[0], .events = POLLIN}};
        int ms = (int)((next_ka - now + 999999) / 1000000);
        int pr = poll(p, 2, ms);
        if (pr < 0 && errno != EINTR)
            break;
        if (pr <= 0)
            continue;
        if (p[1].revents)
            break;
        if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = recv(l->fd, buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC);
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                continue;
            if (n <= 0) {
                end_lease(l, FSHM_LEASE_DRIVER_GONE, 0, "%s", "the driver closed the connection");
                /* Keep the thread parked until close: nothing more will arrive. */
                struct pollfd w = {.fd = l->wake[0], .events = POLLIN};
                while (poll(&w, 1, -1) < 0 && errno == EINTR)
                    ;
                break;
            }
            if ((size_t)n <= sizeof buf)
                handle_push(l, buf, (size_t)n);
        }
    }
    return NULL;
}

/* ---- queries and detach ---- */

int fshm_lease_state(const fshm_lease *l, int *reason)
{
    int s = LOAD_ACQ(&l->state);
    if (reason)
        *reason = LOAD_RLX(&l->reason);
    return s;
}

const char *fshm_lease_message(const fshm_lease *l)
{
    return LOAD_ACQ(&l->state) == FSHM_LEASE_ACTIVE ? "" : l->message;
}

uint64_t fshm_lease_id(const fshm_lease *l) { return l->lease_id; }
uint32_t fshm_lease_client_id(const fshm_lease *l) { return l->client_id; }
uint64_t fshm_lease_announced_epoch(const fshm_lease *l) { return LOAD_ACQ(&l->announced_epoch); }
uint32_t fshm_lease_producer_revokes(const fshm_lease *l) { return LOAD_ACQ(&l->producer_revokes); }

static void stop_thread(fshm_lease *l)
{
    if (!l->thread_running)
        return;
    char x = 1;
    ssize_t ignored = write(l->wake[1], &x, 1);
    (void)ignored;
    pthread_join(l->thread, NULL);
    l->thread_running = 0;
}

void fshm_lease_close(fshm_lease *l, int detach)
{
    if (!l)
        return;
    stop_thread(l);
    if (detach && l->fd >= 0 && LOAD_ACQ(&l->state) == FSHM_LEASE_ACTIVE) {
        uint8_t req[8 + B_DETACH_REQ];
        fshm_lease_put_header(req, B_DETACH_REQ, T_DETACH_REQ, DRIVER_SCHEMA_ID);
        int64_t corr = fshm_lease_next_correlation();
        st64(req + 8, (uint64_t)corr);
        st64(req + 16, l->lease_id);
        st32(req + 24, l->stream_id);
        st32(req + 28, l->client_id);
        req[32] = (uint8_t)l->role;
        if (fshm_lease_send(l, req, sizeof req) == 0) {
            /* Best effort (spec §4.9): wait briefly for the answer so the driver has
             * acted on it (e.g. bumped the epoch) before we return. */
            uint8_t buf[MSG_MAX];
            uint64_t deadline = now_ns() + 1000000000ull;
            for (;;) {
                ssize_t n = recv_msg(l->fd, buf, sizeof buf, deadline);
                if (n <= 0)
                    break;
                if (n >= 8 + B_DETACH_RESP && ld16(buf + 2) == T_DETACH_RESP &&
                    ld16(buf + 4) == DRIVER_SCHEMA_ID && (int64_t)ld64(buf + 8) == corr)
                    break;
            }
        }
    }
    close_fds(l->fds, l->nfds);
    if (l->fd >= 0)
        close(l->fd);
    if (l->wake[0] >= 0)
        close(l->wake[0]);
    if (l->wake[1] >= 0)
        close(l->wake[1]);
    pthread_mutex_destroy(&l->send_mu);
    pthread_mutex_destroy(&l->req_mu);
    pthread_mutex_destroy(&l->resp_mu);
    pthread_cond_destroy(&l->resp_cv);
    free(l);
}
