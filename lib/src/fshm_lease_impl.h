/* The lease client's state and the driver protocol's message numbers and block sizes,
 * shared by the lease client (fshm_lease.c: attach, keepalive thread, what the driver
 * pushes) and a sealed consumer's requests (fshm_lease_requests.c). Encoding:
 * docs/driver-protocol.md. */
#ifndef FSHM_LEASE_IMPL_H
#define FSHM_LEASE_IMPL_H

#include <pthread.h>

#include "fshm_internal.h"

#define DRIVER_SCHEMA_ID 901u
#define DRIVER_SCHEMA_VERSION 1u
#define ANNOUNCE_SCHEMA_ID 900u
#define MSG_MAX 4096u

enum {
    T_ATTACH_REQ = 1, T_ATTACH_RESP = 2, T_DETACH_REQ = 3, T_DETACH_RESP = 4,
    T_KEEPALIVE = 5, T_SHUTDOWN = 6, T_REVOKED = 7,
    /* frameshm's extensions (sealed transport; docs/driver-protocol.md): a consumer's
     * requests the driver applies to the control region consumers map read-only. */
    T_CONSUMER_REGISTER = 101, T_SET_CONTROL = 102, T_CONTROL_RESP = 103,
};
enum { T_POOL_ANNOUNCE = 1 };   /* in the wire spec's schema (900) */

/* Fixed block sizes (docs/driver-protocol.md). */
enum {
    B_ATTACH_REQ = 24, B_ATTACH_RESP = 51, B_DETACH_REQ = 25, B_DETACH_RESP = 12,
    B_KEEPALIVE = 25, B_SHUTDOWN = 9, B_REVOKED = 26, B_ANNOUNCE = 35, B_POOL_ENTRY = 10,
    B_CONSUMER_REGISTER = 32, B_SET_CONTROL = 22, B_CONTROL_RESP = 16,
};

struct fshm_lease {
    int fd;
    int wake[2];              /* pipe: tells the thread to stop */
    pthread_t thread;
    int thread_running;
    pthread_mutex_t send_mu;  /* keepalives (thread) and detach (caller) share the socket */
    uint32_t stream_id;
    uint32_t client_id;
    int role;
    uint64_t lease_id;
    uint64_t interval_ns;
    int state;                /* atomic: FSHM_LEASE_* */
    int reason;               /* atomic: revoke reason / shutdown reason */
    uint64_t announced_epoch; /* atomic: newest ShmPoolAnnounce epoch for our stream */
    uint32_t producer_revokes; /* atomic: producer leases of our stream that ended */
    char message[160];        /* why the lease ended (written once, before state) */
    /* Sealed transport: the descriptors that came with the attach response (control
     * region, header ring, pools), until the writer or reader takes them. */
    int fds[FSHM_LEASE_MAX_FDS];
    unsigned nfds;
    /* One request in flight at a time (req_mu); the thread fills in its answer. */
    pthread_mutex_t req_mu;
    pthread_mutex_t resp_mu;
    pthread_cond_t resp_cv;
    int64_t resp_corr;
    int resp_done;
    int32_t resp_code, resp_value;
    char resp_msg[160];
};

/* fshm_lease.c: the 8-byte message header; one packet on the lease's socket (0 or
 * -errno); a fresh correlation id; the name of a driver response code. */
void fshm_lease_put_header(uint8_t *p, uint16_t block, uint16_t tid, uint16_t schema);
int fshm_lease_send(fshm_lease *l, const uint8_t *buf, size_t n);
int64_t fshm_lease_next_correlation(void);
const char *fshm_lease_code_name(int32_t code);

/* fshm_lease_requests.c: called by the lease's thread with a ShmControlResponse. */
void fshm_lease_deliver_response(fshm_lease *l, const uint8_t *b, const char *err);

#endif
