/* What docs/c-api.md promises a C user, checked from a program built like one (only the
 * installed header and `pkg-config --libs frameshm`). Run by tests/python/test_c_library.py:
 *
 *   c_user_contract STREAM
 *
 * prints one "ok <what>" line per promise kept and exits 0; on the first broken one it
 * prints "FAIL <what>: <detail>" and exits 1. */
#define _GNU_SOURCE
#include <frameshm/frameshm.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAIL(...)                                                                              \
    do {                                                                                       \
        printf("FAIL " __VA_ARGS__);                                                           \
        printf("\n");                                                                          \
        exit(1);                                                                               \
    } while (0)

/* ---- versions ---- */

static void check_version(void)
{
    int major = -1, minor = -1, patch = -1;
    int v = fshm_version(&major, &minor, &patch);
    if (v != FSHM_VERSION || major != FSHM_VERSION_MAJOR || minor != FSHM_VERSION_MINOR ||
        patch != FSHM_VERSION_PATCH)
        FAIL("version: library %d (%d.%d.%d), header %d", v, major, minor, patch, FSHM_VERSION);
    if (strcmp(fshm_version_string(), FSHM_VERSION_STRING) != 0)
        FAIL("version: library '%s', header '%s'", fshm_version_string(), FSHM_VERSION_STRING);
    if (fshm_version(NULL, NULL, NULL) != FSHM_MAKE_VERSION(major, minor, patch))
        FAIL("version: FSHM_MAKE_VERSION disagrees with fshm_version()");
    printf("ok version %s\n", fshm_version_string());
}

/* ---- config structs: struct_size and the growth rule ---- */

static void check_struct_size(const char *stream)
{
    fshm_writer *w = NULL;
    fshm_writer_config zero;
    memset(&zero, 0, sizeof zero);
    zero.addr.name = stream;
    zero.nslots = 4;
    zero.npools = 1;
    zero.pool_bytes[0] = 64;
    int rc = fshm_writer_open(&zero, &w);
    if (rc != -EINVAL || w || !strstr(fshm_last_error(), "struct_size is 0"))
        FAIL("struct_size 0: rc %d, '%s'", rc, fshm_last_error());

    fshm_writer_config small = zero;
    small.struct_size = 8;
    rc = fshm_writer_open(&small, &w);
    if (rc != -EINVAL || w)
        FAIL("struct_size 8: rc %d, '%s'", rc, fshm_last_error());

    /* A program built against a later header passes a larger struct: the fields this
     * library does not know are ignored. */
    struct {
        fshm_writer_config cfg;
        unsigned char later_fields[32];
    } newer;
    memset(&newer, 0xA5, sizeof newer);
    newer.cfg = zero;
    newer.cfg.struct_size = sizeof newer;
    rc = fshm_writer_open(&newer.cfg, &w);
    if (rc != 0)
        FAIL("larger struct_size: %s", fshm_last_error());
    fshm_writer_close(w, 1);

    /* The _INIT macro is all a caller needs. */
    fshm_writer_config init = FSHM_WRITER_CONFIG_INIT;
    if (init.struct_size != sizeof init)
        FAIL("FSHM_WRITER_CONFIG_INIT: struct_size %u", init.struct_size);
    fshm_profile prof = FSHM_PROFILE_INIT;
    if (prof.struct_size != sizeof prof || prof.gid != -1)
        FAIL("FSHM_PROFILE_INIT: struct_size %u gid %lld", prof.struct_size, (long long)prof.gid);
    printf("ok struct_size\n");
}

/* ---- errors: negative codes, per-thread messages ---- */

static void *fail_on_a_thread(void *arg)
{
    (void)arg;
    fshm_reader *r;
    fshm_reader_config cfg = FSHM_READER_CONFIG_INIT;
    cfg.addr.name = "bad/name";
    int rc = fshm_reader_open(&cfg, &r);
    static char msg[600];
    snprintf(msg, sizeof msg, "%d %s", rc, fshm_last_error());
    return msg;
}

static void check_errors(void)
{
    /* A message set on this thread... */
    fshm_writer *w;
    fshm_writer_config cfg = FSHM_WRITER_CONFIG_INIT;
    cfg.addr.name = "x";
    cfg.nslots = 3;
    cfg.npools = 1;
    int rc = fshm_writer_open(&cfg, &w);
    if (rc != -EINVAL || !strstr(fshm_last_error(), "power of two") || fshm_last_errno() != EINVAL)
        FAIL("errors: rc %d errno %d '%s'", rc, fshm_last_errno(), fshm_last_error());
    char mine[600];
    snprintf(mine, sizeof mine, "%s", fshm_last_error());
    /* ...is not changed by a failure on another thread, which sees its own. */
    pthread_t t;
    void *theirs;
    pthread_create(&t, NULL, fail_on_a_thread, NULL);
    pthread_join(t, &theirs);
    if (strcmp(mine, fshm_last_error()) != 0)
        FAIL("errors: another thread's failure changed ours to '%s'", fshm_last_error());
    if (strncmp(theirs, "-22 ", 4) != 0 || !strstr(theirs, "bad/name"))
        FAIL("errors: the other thread saw '%s'", (char *)theirs);
    if (strcmp(fshm_strerror(FSHM_E_NOPOOL), "frame larger than every payload pool") != 0 ||
        strcmp(fshm_strerror(-ENOENT), strerror(ENOENT)) != 0)
        FAIL("errors: fshm_strerror");
    if (fshm_set_error(-EIO, "layered: %s", "context") != -EIO ||
        strcmp(fshm_last_error(), "layered: context") != 0 || fshm_last_errno() != EIO)
        FAIL("errors: fshm_set_error");
    printf("ok errors\n");
}

/* ---- mappings: frames outlive their reader; ref/unref from many threads ---- */

#define REF_THREADS 4
#define REF_ROUNDS 200000

static void *ref_unref(void *m)
{
    for (int i = 0; i < REF_ROUNDS; i++) {
        fshm_map_ref(m);
        fshm_map_unref(m);
    }
    return NULL;
}

/* 1 if [base, base+size) is mapped in this process (per /proc/self/maps). */
static int is_mapped(const void *base)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int found = 0;
    unsigned long lo, hi, p = (unsigned long)base;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && p >= lo && p < hi)
            found = 1;
    if (f)
        fclose(f);
    return found;
}

static void check_mappings(const char *stream)
{
    fshm_reader_config rc_cfg = FSHM_READER_CONFIG_INIT;
    rc_cfg.addr.name = stream;
    rc_cfg.consumer = "contract";
    fshm_reader *r;
    if (fshm_reader_open(&rc_cfg, &r) != 0)
        FAIL("mappings: reader: %s", fshm_last_error());
    fshm_writer_config wc = FSHM_WRITER_CONFIG_INIT;
    wc.addr.name = stream;
    wc.nslots = 4;
    wc.npools = 1;
    wc.pool_bytes[0] = 4096;
    fshm_writer *w;
    if (fshm_writer_open(&wc, &w) != 0)
        FAIL("mappings: writer: %s", fshm_last_error());
    unsigned char payload[4096];
    for (size_t i = 0; i < sizeof payload; i++)
        payload[i] = (unsigned char)(i * 5 + 1);
    fshm_tensor t = {.dtype = FSHM_DTYPE_UINT8, .ndims = 1, .dims = {sizeof payload}};
    if (fshm_writer_publish(w, payload, sizeof payload, &t, 0) != 0)
        FAIL("mappings: publish: %s", fshm_last_error());
    fshm_frame f;
    if (fshm_reader_wait_latest(r, 2000000000ll, &f) != 0)
        FAIL("mappings: wait: %s", fshm_last_error());
    void *base = fshm_map_base(f.map);
    fshm_map *m = f.map;
    fshm_map_ref(m);   /* keep the frame's pool past the reader */

    pthread_t th[REF_THREADS];
    for (int i = 0; i < REF_THREADS; i++)
        pthread_create(&th[i], NULL, ref_unref, m);
    fshm_reader_close(r);   /* drops the reader's own reference meanwhile */
    fshm_writer_close(w, 1);
    for (int i = 0; i < REF_THREADS; i++)
        pthread_join(th[i], NULL);

    /* Ours is the last reference: still mapped, the bytes intact... */
    if (!is_mapped(base) || memcmp(f.data, payload, sizeof payload) != 0)
        FAIL("mappings: the kept pool was unmapped or changed before the last unref");
    /* ...and gone with it (a lost count would unmap early above, or never here). */
    fshm_map_unref(m);
    if (is_mapped(base))
        FAIL("mappings: the pool is still mapped after the last unref");
    printf("ok mappings\n");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s STREAM\n", argv[0]);
        return 2;
    }
    check_version();
    check_struct_size(argv[1]);
    check_errors();
    check_mappings(argv[1]);
    return 0;
}
