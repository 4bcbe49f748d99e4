/* A sealed consumer's requests to the driver, frameshm's extensions of the driver
 * protocol (docs/driver-protocol.md): ShmConsumerRegister (101) and ShmSetControl (102),
 * answered by ShmControlResponse (103), which the lease's thread (fshm_lease.c) hands
 * over here. The driver applies them to the control region consumers map read-only. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "fshm_lease_impl.h"

#define REQUEST_TIMEOUT_NS 5000000000ull

/* The lease's thread hands a ShmControlResponse (block b, the driver's message err) to
 * the request waiting for it, if it is the one in flight. */
void fshm_lease_deliver_response(fshm_lease *l, const uint8_t *b, const char *err)
{
    pthread_mutex_lock(&l->resp_mu);
    if ((int64_t)ld64(b) == l->resp_corr && !l->resp_done) {
        l->resp_code = (int32_t)ld32(b + 8);
        l->resp_value = (int32_t)ld32(b + 12);
        snprintf(l->resp_msg, sizeof l->resp_msg, "%s", err);
        l->resp_done = 1;
        pthread_cond_broadcast(&l->resp_cv);
    }
    pthread_mutex_unlock(&l->resp_mu);
}

/* Sends req (its correlation id at byte 8) and waits for the thread to hand over the
 * ShmControlResponse: the entry index (or 0) on OK; the driver's refusal otherwise. */
static int lease_request(fshm_lease *l, uint8_t *req, size_t n, const char *what)
{
    if (!l->thread_running || LOAD_ACQ(&l->state) != FSHM_LEASE_ACTIVE)
        return fshm_set_error(FSHM_E_LEASE, "%s: no active lease", what);
    pthread_mutex_lock(&l->req_mu);
    int64_t corr = fshm_lease_next_correlation();
    st64(req + 8, (uint64_t)corr);
    pthread_mutex_lock(&l->resp_mu);
    l->resp_corr = corr;
    l->resp_done = 0;
    pthread_mutex_unlock(&l->resp_mu);
    int rc = fshm_lease_send(l, req, n);
    if (rc < 0) {
        pthread_mutex_unlock(&l->req_mu);
        return fshm_set_error(rc, "%s: cannot send to the driver: %s", what, strerror(-rc));
    }
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += REQUEST_TIMEOUT_NS / 1000000000ull;
    pthread_mutex_lock(&l->resp_mu);
    while (!l->resp_done && LOAD_ACQ(&l->state) == FSHM_LEASE_ACTIVE &&
           pthread_cond_timedwait(&l->resp_cv, &l->resp_mu, &dl) != ETIMEDOUT)
        ;
    int done = l->resp_done;
    int32_t code = l->resp_code, value = l->resp_value;
    char msg[160];
    snprintf(msg, sizeof msg, "%s", l->resp_msg);
    l->resp_corr = 0;
    pthread_mutex_unlock(&l->resp_mu);
    pthread_mutex_unlock(&l->req_mu);
    if (!done)
        return LOAD_ACQ(&l->state) != FSHM_LEASE_ACTIVE
                   ? fshm_set_error(FSHM_E_LEASE, "%s: the lease ended (%s)", what, l->message)
                   : fshm_set_error(-ETIMEDOUT, "%s: the driver did not answer (a driver "
                                    "older than this library does not know the request)", what);
    if (code == FSHM_RESP_OK)
        return value < 0 ? 0 : value;
    /* The driver says which of our errors it was when it is one a caller tells apart
     * (a full consumer table: FSHM_E_LIMIT); anything else is a refusal. */
    int err = value == FSHM_E_LIMIT ? FSHM_E_LIMIT : FSHM_E_REJECTED;
    return fshm_set_error(err, "%s: the driver refused (%s): %s", what, fshm_lease_code_name(code), msg);
}

static void put_str(uint8_t **p, const char *s)
{
    uint32_t n = (uint32_t)strlen(s);
    st32(*p, n);
    memcpy(*p + 4, s, n);
    *p += 4 + n;
}

int fshm_lease_register_consumer(fshm_lease *l, const char *consumer, const char *queue,
                                 uint32_t flags, uint32_t max_rate_hz)
{
    uint8_t req[8 + B_CONSUMER_REGISTER + 4 + 64 + 4 + 32];
    size_t cn = strnlen(consumer, 64), qn = strnlen(queue, 32);
    if (cn >= 64 || qn >= 32)
        return fshm_set_error(-EINVAL, "consumer or queue name too long");
    memset(req, 0, sizeof req);
    fshm_lease_put_header(req, B_CONSUMER_REGISTER, T_CONSUMER_REGISTER, DRIVER_SCHEMA_ID);
    uint8_t *b = req + 8;
    st64(b + 8, l->lease_id);
    st32(b + 16, l->stream_id);
    st32(b + 20, l->client_id);
    st32(b + 24, flags);
    st32(b + 28, max_rate_hz);
    uint8_t *p = b + B_CONSUMER_REGISTER;
    put_str(&p, consumer);
    put_str(&p, queue);
    return lease_request(l, req, (size_t)(p - req), "consumer registration");
}

int fshm_lease_set_control(fshm_lease *l, unsigned index, uint8_t value)
{
    uint8_t req[8 + B_SET_CONTROL];
    memset(req, 0, sizeof req);
    fshm_lease_put_header(req, B_SET_CONTROL, T_SET_CONTROL, DRIVER_SCHEMA_ID);
    uint8_t *b = req + 8;
    st64(b + 8, l->lease_id);
    st32(b + 16, l->stream_id);
    b[20] = (uint8_t)index;
    b[21] = value;
    int rc = lease_request(l, req, sizeof req, "setting a control byte");
    return rc < 0 ? rc : 0;
}
