/* Shared helpers of the C core's cmocka tests (tests/c). */
#ifndef FSHM_TEST_UTIL_H
#define FSHM_TEST_UTIL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include <cmocka.h>

#include <frameshm/frameshm.h>
#include "fshm_internal.h"

/* Canonical path of the private base directory every test runs in (FRAMESHM_DIR). */
extern char tu_base[];

/* cmocka group setup/teardown: a fresh mkdtemp directory under /tmp exported as
 * FRAMESHM_DIR (FRAMESHM_NAMESPACE unset), removed again afterwards. */
int tu_group_setup(void **state);
int tu_group_teardown(void **state);

/* Recursively removes a directory tree (no-op when it does not exist). */
void tu_rmtree(const char *dir);
/* Number of regular files below dir (0 when dir does not exist); with verbose, each
 * one is printed. */
int tu_count_files_v(const char *dir, int verbose);
#define tu_count_files(dir) tu_count_files_v((dir), 1)
int tu_path_exists(const char *path);
/* 1 when path does not exist; else 0, after listing what is still there on stderr (so a
 * failed "nothing left behind" assertion says what was left). */
int tu_gone(const char *path);

/* A real small file system for room checks: mounts a fresh tmpfs of `size` (mount(8)
 * syntax, e.g. "64m") on a new directory under /tmp and writes its path to dir (PATH_MAX
 * bytes). 0 on success; -errno (after printing why) when it cannot be mounted, e.g.
 * without CAP_SYS_ADMIN: the caller then skips. tu_tmpfs_unmount undoes it (detached, so
 * a mapping a failed test left behind cannot keep it mounted) and clears dir; a no-op on
 * an empty dir. Use it as the test's cmocka teardown so it runs after a failure too. */
int tu_tmpfs_mount(const char *size, char *dir);
void tu_tmpfs_unmount(char *dir);

/* <base>/tensorpool-<user>, computed independently of the library. */
void tu_user_dir(char *out, size_t cap);
/* <base>/tensorpool-<user>/default/<stream_id> */
void tu_stream_dir(uint32_t stream_id, char *out, size_t cap);
/* <base>/tensorpool-<user>/default/<stream_id>/<epoch>/<file> */
void tu_region_path(uint32_t stream_id, uint64_t epoch, const char *file, char *out, size_t cap);

/* Whole-file read (malloc'ed, caller frees); asserts on failure. */
uint8_t *tu_read_file(const char *path, size_t *len);
/* pwrite of len bytes at off into an existing file; asserts on failure. */
void tu_patch_file(const char *path, off_t off, const void *data, size_t len);

/* Little-endian loads from a byte buffer. */
uint16_t tu_le16(const uint8_t *p);
uint32_t tu_le32(const uint8_t *p);
uint64_t tu_le64(const uint8_t *p);

/* Writers/readers on the test base dir. pool_bytes == 0 means a 4 KiB pool. */
fshm_writer *tu_writer(const char *name, uint32_t nslots, uint32_t pool_bytes);
fshm_reader *tu_reader(const char *name);
/* A registered reader without a descriptor queue (fshm_reader_config.no_queue). */
fshm_reader *tu_reader_no_queue(const char *name);
/* A frame with every field zero, for a wait to fill in. */
fshm_frame tu_frame_zero(void);
fshm_tensor tu_u8_tensor(uint32_t n);
/* Remembers a reader's message queue so that group teardown can mq_unlink it even when
 * a failed assertion skipped fshm_reader_close (tu_reader does this itself). */
void tu_track(fshm_reader *r);
void tu_track_name(const char *queue);

/* Fills buf with a pattern unique to seq and checks it. */
void tu_fill(void *buf, size_t n, uint64_t seq);
int tu_check(const void *buf, size_t n, uint64_t seq);
/* Publishes an n-byte uint8 frame filled by tu_fill(seq = writer's next seq). */
int tu_publish(fshm_writer *w, size_t n);

/* Child-process helpers: children never return into cmocka. */
pid_t tu_fork(void);   /* flushes stdio first */
void tu_signal_ready(int fd, const void *msg, size_t len);
/* Reads exactly len bytes from fd with a timeout; 0 on success. */
int tu_wait_ready(int fd, void *msg, size_t len, int timeout_ms);
/* The pid of a child that exited at once and was reaped: a process id known to be dead
 * (until the kernel hands it out again, which a test's few forks do not reach). */
pid_t tu_dead_pid(void);
/* SIGKILLs and reaps a child. */
void tu_kill_child(pid_t pid);
/* Waits for a child to exit and returns its exit status (or 128+signal). */
int tu_wait_child(pid_t pid, int timeout_ms);

void tu_sleep_ms(int ms);
uint64_t tu_now_ns(void);

#endif
