/* The driver-model client (lib/src/fshm_lease.c) against a scripted fake driver on a real
 * SOCK_SEQPACKET socket: correct grants decode, refusals carry the driver's message,
 * malformed or hostile answers are refused (never trusted), keepalives flow, and
 * revocation / shutdown / a vanished driver end the lease. */
#include "fshm_test_util.h"

#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

typedef enum {
    ANSWER_OK, ANSWER_REJECT, ANSWER_SHORT_BLOCK, ANSWER_NULL_LEASE, ANSWER_EMPTY_URI,
    ANSWER_NO_POOLS, ANSWER_URI_OVERRUN, ANSWER_WRONG_SLOTS, ANSWER_SILENT,
} answer_kind;

typedef enum { AFTER_NOTHING, AFTER_REVOKE, AFTER_SHUTDOWN, AFTER_CLOSE, AFTER_OTHER_REVOKE } after_kind;

typedef struct fake_driver {
    char path[108];
    int listen_fd;
    pthread_t thread;
    answer_kind answer;
    after_kind after;
    int keepalives;          /* counted until the test ends */
    int detaches;
    int stop;
    uint32_t client_id;      /* from the attach request */
    uint8_t role;
} fake_driver;

static size_t put_str(uint8_t *p, const char *s)
{
    uint32_t n = (uint32_t)strlen(s);
    st32(p, n);
    memcpy(p + 4, s, n);
    return 4 + n;
}

static size_t build_response(fake_driver *d, const uint8_t *req, uint8_t *out)
{
    uint16_t block = d->answer == ANSWER_SHORT_BLOCK ? 40 : 51;
    st16(out, block);
    st16(out + 2, 2);
    st16(out + 4, 901);
    st16(out + 6, 1);
    uint8_t *b = out + 8;
    memset(b, 0xff, 51);
    memcpy(b, req + 8, 8);   /* correlationId */
    size_t off = 8 + block;
    if (d->answer == ANSWER_REJECT) {
        st32(b + 8, 3);
        st16(out + off, 10);
        st16(out + off + 2, 0);
        off += 4;
        off += put_str(out + off, "");
        off += put_str(out + off, "stream 5 already has producer client 9 (pid 1)");
        return off;
    }
    st32(b + 8, 0);
    st64(b + 12, d->answer == ANSWER_NULL_LEASE ? UINT64_MAX : 42);
    st64(b + 20, fshm_now_ns() + 300000000ull);   /* expiry in 300 ms -> keepalive every 100 ms */
    st32(b + 28, 5);
    st64(b + 32, 7);
    st32(b + 40, 1);
    st32(b + 44, 16);
    st16(b + 48, 256);
    b[50] = 8;
    uint16_t count = d->answer == ANSWER_NO_POOLS ? 0 : 2;
    st16(out + off, 10);
    st16(out + off + 2, count);
    off += 4;
    for (unsigned i = 0; i < count; i++) {
        st16(out + off, (uint16_t)(i + 1));
        st32(out + off + 2, d->answer == ANSWER_WRONG_SLOTS && i == 1 ? 8 : 16);
        st32(out + off + 6, 65536u << i);
        off += 10;
        char uri[128];
        snprintf(uri, sizeof uri, "shm:file?path=/dev/shm/tensorpool-x/default/5/7/%u.pool", i + 1);
        if (d->answer == ANSWER_URI_OVERRUN) {
            st32(out + off, 100000);   /* claims more bytes than the packet holds */
            off += 4;
            memcpy(out + off, uri, strlen(uri));
            off += strlen(uri);
            return off;
        }
        off += put_str(out + off, uri);
    }
    off += put_str(out + off, d->answer == ANSWER_EMPTY_URI ? ""
                                   : "shm:file?path=/dev/shm/tensorpool-x/default/5/7/header.ring");
    off += put_str(out + off, "");
    return off;
}

static void send_revoke(int fd, uint64_t lease, uint8_t role, uint8_t reason)
{
    uint8_t m[8 + 26 + 4 + 16];
    st16(m, 26);
    st16(m + 2, 7);
    st16(m + 4, 901);
    st16(m + 6, 1);
    st64(m + 8, fshm_now_ns());
    st64(m + 16, lease);
    st32(m + 24, 5);
    st32(m + 28, 99);
    m[32] = role;
    m[33] = reason;
    size_t n = 34 + put_str(m + 34, "test says so");
    send(fd, m, n, MSG_NOSIGNAL);
}

static void *driver_main(void *arg)
{
    fake_driver *d = arg;
    int fd = accept(d->listen_fd, NULL, NULL);
    if (fd < 0)
        return NULL;
    uint8_t buf[4096], out[4096];
    int answered = 0;
    while (!__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 20) <= 0)
            continue;
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n <= 0)
            break;
        uint16_t tid = ld16(buf + 2);
        if (tid == 1 && n >= 8 + 24) {
            d->client_id = ld32(buf + 8 + 12);
            d->role = buf[8 + 16];
            if (d->answer == ANSWER_SILENT)
                continue;
            size_t len = build_response(d, buf, out);
            send(fd, out, len, MSG_NOSIGNAL);
            answered = 1;
            if (d->answer != ANSWER_OK)
                continue;
            if (d->after == AFTER_REVOKE) {
                usleep(150000);
                send_revoke(fd, 42, d->role, 2);
            } else if (d->after == AFTER_OTHER_REVOKE) {
                send_revoke(fd, 41, 1, 3);   /* the stream's producer, not us */
            } else if (d->after == AFTER_SHUTDOWN) {
                uint8_t m[8 + 9 + 4];
                st16(m, 9);
                st16(m + 2, 6);
                st16(m + 4, 901);
                st16(m + 6, 1);
                st64(m + 8, fshm_now_ns());
                m[16] = 0;
                st32(m + 17, 0);
                send(fd, m, sizeof m, MSG_NOSIGNAL);
            } else if (d->after == AFTER_CLOSE) {
                break;
            }
        } else if (tid == 5 && answered) {
            __atomic_add_fetch(&d->keepalives, 1, __ATOMIC_RELAXED);
        } else if (tid == 3) {
            d->detaches++;
            uint8_t r[8 + 12 + 4];
            st16(r, 12);
            st16(r + 2, 4);
            st16(r + 4, 901);
            st16(r + 6, 1);
            memcpy(r + 8, buf + 8, 8);
            st32(r + 16, 0);
            st32(r + 20, 0);
            send(fd, r, sizeof r, MSG_NOSIGNAL);
        }
    }
    close(fd);
    return NULL;
}

static void start_driver(fake_driver *d, answer_kind a, after_kind after)
{
    memset(d, 0, sizeof *d);
    d->answer = a;
    d->after = after;
    snprintf(d->path, sizeof d->path, "%s/fake-driver.sock", tu_base);
    unlink(d->path);
    d->listen_fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    assert_true(d->listen_fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, d->path);
    assert_int_equal(bind(d->listen_fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(d->listen_fd, 4), 0);
    assert_int_equal(pthread_create(&d->thread, NULL, driver_main, d), 0);
}

static void stop_driver(fake_driver *d)
{
    __atomic_store_n(&d->stop, 1, __ATOMIC_RELEASE);
    shutdown(d->listen_fd, SHUT_RDWR);
    close(d->listen_fd);
    pthread_join(d->thread, NULL);
    unlink(d->path);
}

static int attach(fake_driver *d, fshm_lease **l, fshm_grant *g)
{
    fshm_lease_config c = {.struct_size = sizeof(fshm_lease_config), .socket_path = d->path, .stream_id = 5, .role = FSHM_ROLE_CONSUMER,
                           .timeout_ns = 500000000};
    return fshm_lease_attach(&c, l, g);
}

static void test_grant_decodes_and_keepalives_flow(void **state)
{
    (void)state;
    fake_driver d;
    start_driver(&d, ANSWER_OK, AFTER_NOTHING);
    fshm_lease *l;
    fshm_grant g;
    assert_int_equal(attach(&d, &l, &g), 0);
    assert_int_equal(g.lease_id, 42);
    assert_int_equal(g.epoch, 7);
    assert_int_equal(g.header_nslots, 16);
    assert_int_equal(g.npools, 2);
    assert_int_equal(g.pools[1].stride_bytes, 131072);
    assert_string_equal(g.pools[0].uri, "shm:file?path=/dev/shm/tensorpool-x/default/5/7/1.pool");
    assert_string_equal(g.header_uri, "shm:file?path=/dev/shm/tensorpool-x/default/5/7/header.ring");
    assert_int_equal(d.role, FSHM_ROLE_CONSUMER);
    assert_int_not_equal(d.client_id, 0);
    usleep(450000);
    /* 300 ms expiry -> a keepalive every 100 ms: about 4 in 450 ms, never fewer than 2 */
    int ka = __atomic_load_n(&d.keepalives, __ATOMIC_RELAXED);
    printf("keepalives in 450 ms: %d\n", ka);
    assert_true(ka >= 2 && ka <= 8);
    assert_int_equal(fshm_lease_state(l, NULL), FSHM_LEASE_ACTIVE);
    fshm_lease_close(l, 1);
    assert_int_equal(d.detaches, 1);
    stop_driver(&d);
}

static void test_refusals_and_hostile_answers(void **state)
{
    (void)state;
    struct { answer_kind a; int code; const char *needle; } cases[] = {
        {ANSWER_REJECT, FSHM_E_REJECTED, "already has producer"},
        {ANSWER_SHORT_BLOCK, FSHM_E_CORRUPT, "short"},
        {ANSWER_NULL_LEASE, FSHM_E_CORRUPT, "required"},
        {ANSWER_EMPTY_URI, FSHM_E_CORRUPT, "required"},
        {ANSWER_NO_POOLS, FSHM_E_CORRUPT, "pools"},
        {ANSWER_URI_OVERRUN, FSHM_E_CORRUPT, "malformed"},
        {ANSWER_WRONG_SLOTS, FSHM_E_CORRUPT, "slots"},
        {ANSWER_SILENT, -ETIMEDOUT, "did not answer"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fake_driver d;
        start_driver(&d, cases[i].a, AFTER_NOTHING);
        fshm_lease *l = (fshm_lease *)0x1;
        fshm_grant g;
        int rc = attach(&d, &l, &g);
        printf("case %zu: %d %s\n", i, rc, fshm_last_error());
        assert_int_equal(rc, cases[i].code);
        assert_non_null(strstr(fshm_last_error(), cases[i].needle));
        assert_null(l);
        stop_driver(&d);
    }
}

static void test_lease_endings(void **state)
{
    (void)state;
    struct { after_kind after; int state; const char *needle; } cases[] = {
        {AFTER_REVOKE, FSHM_LEASE_REVOKED, "expired"},
        {AFTER_SHUTDOWN, FSHM_LEASE_DRIVER_GONE, "shut down"},
        {AFTER_CLOSE, FSHM_LEASE_DRIVER_GONE, "closed"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fake_driver d;
        start_driver(&d, ANSWER_OK, cases[i].after);
        fshm_lease *l;
        fshm_grant g;
        assert_int_equal(attach(&d, &l, &g), 0);
        int st = FSHM_LEASE_ACTIVE;
        for (int t = 0; t < 200 && st == FSHM_LEASE_ACTIVE; t++) {
            usleep(10000);
            st = fshm_lease_state(l, NULL);
        }
        printf("ending %zu: state %d: %s\n", i, st, fshm_lease_message(l));
        assert_int_equal(st, cases[i].state);
        assert_non_null(strstr(fshm_lease_message(l), cases[i].needle));
        fshm_lease_close(l, 1);
        stop_driver(&d);
    }
}

static void test_someone_elses_revoke_is_only_counted(void **state)
{
    (void)state;
    fake_driver d;
    start_driver(&d, ANSWER_OK, AFTER_OTHER_REVOKE);
    fshm_lease *l;
    fshm_grant g;
    assert_int_equal(attach(&d, &l, &g), 0);
    for (int t = 0; t < 100 && fshm_lease_producer_revokes(l) == 0; t++)
        usleep(10000);
    assert_int_equal(fshm_lease_producer_revokes(l), 1);
    assert_int_equal(fshm_lease_state(l, NULL), FSHM_LEASE_ACTIVE);
    fshm_lease_close(l, 0);
    stop_driver(&d);
}

static void test_no_driver(void **state)
{
    (void)state;
    char path[600];
    snprintf(path, sizeof path, "%s/nobody.sock", tu_base);
    fshm_lease_config c = {.struct_size = sizeof(fshm_lease_config), .socket_path = path, .stream_id = 5, .role = FSHM_ROLE_PRODUCER};
    fshm_lease *l;
    fshm_grant g;
    assert_int_equal(fshm_lease_attach(&c, &l, &g), FSHM_E_NODRIVER);
    assert_int_equal(fshm_last_errno(), ENOENT);
    c.stream_id = 0;
    assert_int_equal(fshm_lease_attach(&c, &l, &g), -EINVAL);
    c.stream_id = 5;
    c.role = 9;
    assert_int_equal(fshm_lease_attach(&c, &l, &g), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grant_decodes_and_keepalives_flow),
        cmocka_unit_test(test_refusals_and_hostile_answers),
        cmocka_unit_test(test_lease_endings),
        cmocka_unit_test(test_someone_elses_revoke_is_only_counted),
        cmocka_unit_test(test_no_driver),
    };
    return cmocka_run_group_tests(tests, tu_group_setup, tu_group_teardown);
}
