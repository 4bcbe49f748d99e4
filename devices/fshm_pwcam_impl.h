/* The virtual camera's private header: the camera's state (with its lock order) and the
 * helpers its three files share. Everything PipeWire-typed is inside FSHM_HAVE_PIPEWIRE:
 * the layouts build without PipeWire. */
#ifndef FSHM_PWCAM_IMPL_H
#define FSHM_PWCAM_IMPL_H

#include "fshm_pwcam.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <frameshm/frameshm.h>

#ifdef FSHM_HAVE_PIPEWIRE
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <time.h>

#include <pipewire/pipewire.h>
#include <spa/buffer/meta.h>
#include <spa/node/command.h>
#include <spa/param/video/format-utils.h>
#include <spa/utils/result.h>
#endif

/* Shared by fshm_pwcam.c (entry points, lifetime, events, the node and its PipeWire
 * callbacks), fshm_pwcam_layout.c (format table, layouts) and fshm_pwcam_serve.c (the
 * worker: learning, reading, serving). Hidden: the device code is built with
 * -fvisibility=hidden. */

/* fshm_pwcam_layout.c */
const char *pwc_dtype_name(int d);
void pwc_shape_text(const fshm_tensor *t, char *buf, size_t cap);
int pwc_contiguous(const fshm_tensor *t);   /* packed row-major */
int pwc_format_index(const char *name);     /* -1: no such format */

#ifdef FSHM_HAVE_PIPEWIRE

#define EVQ 64

typedef struct peer_node {
    uint32_t id;
    char name[96];
    struct peer_node *next;
} peer_node;

typedef struct link_rec {
    uint32_t id, peer;
    struct link_rec *next;
} link_rec;

struct fshm_pwcam {
    /* configuration (owned copies) */
    char *stream_name, *base_dir, *ns, *node_name, *description, *format, *consumer, *remote;
    char *driver;
    fshm_stream_addr addr;
    uint32_t want_w, want_h, fps_num, fps_den, nbuffers;
    int64_t learn_timeout_ns;

    pthread_t worker;
    int worker_started;

    /* mu guards the fields down to the event queue. Lock order: the thread loop's lock
     * first, then mu (PipeWire callbacks run with the loop lock held and take mu); the
     * worker never takes the loop lock while holding mu. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop, failed, fail_code;
    char fail_msg[512];
    int ready, streaming, fps_measured;
    uint32_t node_id, clients;
    uint64_t serial;
    fshm_pwcam_event ev[EVQ];
    unsigned ev_head, ev_count;
    uint64_t ev_lost;

    /* counters written by the worker, read by get_info */
    _Atomic uint64_t served, no_buffer, torn, mismatched, last_seq, last_ts;

    /* PipeWire objects: used with the thread loop's lock held */
    struct pw_thread_loop *loop;
    struct pw_context *context;
    struct pw_core *core;
    struct spa_hook core_listener;
    struct pw_registry *registry;
    struct spa_hook registry_listener;
    struct pw_proxy *node_proxy;   /* our own node, to suspend it */
    struct pw_stream *stream;
    struct spa_hook stream_listener;
    struct pw_buffer *held;    /* dequeued but not filled (a torn copy): used next */
    int pw_streaming;          /* stream state, as the loop saw it */
    peer_node *nodes;
    link_rec *links;

    /* worker only */
    fshm_reader *reader;
    fshm_pwcam_layout layout;
    int producer_gone, mismatch_warned, error_warned, buffer_warned, starve_warned;
    uint64_t starve_since;     /* first frame with no free buffer in a row, 0 = none */
};

/* fshm_pwcam.c */
struct timespec pwc_abs_in(int64_t ns);   /* CLOCK_MONOTONIC, the clock of c->cv */
__attribute__((format(printf, 3, 4))) void pwc_push_event(fshm_pwcam *c, int kind, const char *fmt, ...);
void pwc_fail(fshm_pwcam *c, int code, const char *msg);   /* the first failure is kept */
int pwc_start(fshm_pwcam *c);             /* creates and connects the node */

/* fshm_pwcam_serve.c */
void *pwc_worker_main(void *arg);         /* the worker thread, started by fshm_pwcam_open */

#endif /* FSHM_HAVE_PIPEWIRE */

#endif
