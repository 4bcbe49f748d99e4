/*
 * frameshm virtual camera: serves a frameshm stream as a PipeWire Video/Source node, so
 * that applications opening cameras through PipeWire (GStreamer's pipewiresrc, browsers,
 * OBS...) and V4L2 applications under PipeWire's V4L2 layer (pw-v4l2) see it as a camera.
 *
 * One fixed format, taken from the stream's tensor (or given): uint8 (H,W) GRAY8,
 * (H,W,2) YUYV/UYVY, (H,W,3) RGB/BGR, (H,W,4) RGBA/BGRA/RGBx/BGRx, (H*3/2,W) NV12/I420
 * (asked for explicitly), uint16 (H,W) GRAY16_LE. The frame rate announced is the
 * producer's (measured from the stream) unless given.
 *
 * The node drives its own graph: each new frame of the stream is copied (seqlock-checked:
 * never a torn frame) into a PipeWire buffer and one graph cycle is triggered, so clients
 * get frames at the producer's rate. The stream is read only while at least one client
 * streams from the node; several clients share the node's output (one copy serves all).
 * When the stream's producer goes away the node stays up and resumes when it returns.
 *
 * Threads: a worker thread owns the frameshm reader and PipeWire's thread loop runs the
 * node; the caller only opens, polls events, reads info and closes (each from any single
 * thread). Errors: negative codes as everywhere in frameshm, fshm_last_error() has the
 * message; a failure inside the worker after open is reported by fshm_pwcam_next_event().
 *
 * Built without libpipewire-0.3 (no FSHM_HAVE_PIPEWIRE), every entry point that would need
 * PipeWire fails with FSHM_E_PW_NOLIB; the format helper still works.
 */
#ifndef FSHM_PWCAM_H
#define FSHM_PWCAM_H

#include <stddef.h>
#include <stdint.h>

#include <frameshm/frameshm.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FSHM_E_PW_NOLIB (-1301)        /* built without PipeWire */
#define FSHM_E_PW_UNSUPPORTED (-1302)  /* the stream's frames are no video format we serve */
#define FSHM_E_PW (-1303)              /* PipeWire failed: no daemon, connection lost, node error */

/* A served video layout (fshm_pwcam_layout_for). */
typedef struct fshm_pwcam_layout {
    char format[8];        /* "GRAY8", "RGB", "YUYV", ... (the names fshm_pwcam_layout_for takes) */
    uint32_t spa_format;   /* enum spa_video_format value (0 when built without PipeWire) */
    uint32_t width, height;
    uint32_t stride;       /* bytes per row (of the first plane) */
    uint32_t frame_bytes;  /* bytes of one frame: what every served frame must carry */
    int16_t dtype;         /* the tensor it is served from */
    uint8_t ndims;
    int32_t dims[3];
} fshm_pwcam_layout;

/* The layout a frame of tensor `t` (NULL: only from `format`/width/height) is served as.
 * format: NULL/"" = chosen from the tensor; else one of GRAY8 GRAY16 RGB BGR RGBA BGRA RGBX
 * BGRX YUYV UYVY NV12 I420 (case-insensitive), which must fit the tensor. width/height: 0 =
 * from the tensor; else must match it. Returns 0, -EINVAL or FSHM_E_PW_UNSUPPORTED. */
int fshm_pwcam_layout_for(const fshm_tensor *t, const char *format, uint32_t width,
                          uint32_t height, fshm_pwcam_layout *out);

typedef struct fshm_pwcam fshm_pwcam;

typedef struct fshm_pwcam_config {
    fshm_stream_addr addr;       /* the frameshm stream to serve */
    const char *node_name;       /* NULL = "frameshm-<stream>" */
    const char *description;     /* NULL = "frameshm <stream>" */
    const char *format;          /* NULL = from the stream's frames (see layout_for) */
    uint32_t width, height;      /* 0 = from the stream's frames */
    uint32_t fps_num, fps_den;   /* 0 = measured from the producer's timestamps */
    /* How long to wait for the frames the format/rate are learned from (<0: forever).
     * Unused when format, width, height and fps are all given. */
    int64_t learn_timeout_ns;
    uint32_t buffers;            /* PipeWire buffers to ask for; 0 = 8 */
    const char *consumer;        /* consumer label in `frameshm ls`; NULL = "virtualcam" */
    const char *remote;          /* PipeWire remote; NULL = default ($PIPEWIRE_REMOTE) */
    const char *driver;          /* driver model: read the stream through this driver's socket
                                  * (addr.stream_id or addr.name); NULL = no driver */
} fshm_pwcam_config;

enum fshm_pwcam_event_kind {
    FSHM_PWCAM_EV_READY = 1,         /* the node is published: info has its id and serial */
    FSHM_PWCAM_EV_CLIENT_ON = 2,     /* a client linked to the node (peer_* set) */
    FSHM_PWCAM_EV_CLIENT_OFF = 3,    /* a link to the node went away */
    FSHM_PWCAM_EV_STREAMING = 4,     /* clients stream: reading the frameshm stream */
    FSHM_PWCAM_EV_IDLE = 5,          /* no client streams: not reading any more */
    FSHM_PWCAM_EV_PRODUCER_GONE = 6, /* no frames: the stream's producer is dead or closed */
    FSHM_PWCAM_EV_PRODUCER_BACK = 7, /* frames again */
    FSHM_PWCAM_EV_WARNING = 8,       /* frames skipped (format changed, corrupt, ...) */
};

typedef struct fshm_pwcam_event {
    int kind;
    uint32_t clients;          /* links from the node after this event */
    uint32_t link_id;          /* CLIENT_ON/OFF */
    uint32_t peer_node_id;     /* CLIENT_ON/OFF: the node linked to */
    char peer[96];             /* CLIENT_ON/OFF: its node.name / application.name */
    char text[256];            /* one line for a log */
} fshm_pwcam_event;

typedef struct fshm_pwcam_info {
    char stream[FSHM_NAME_MAX + 1];
    char node_name[128];
    char description[128];
    uint32_t node_id;          /* SPA_ID_INVALID (0xffffffff) until READY */
    uint64_t serial;           /* object.serial, 0 until READY */
    int ready, failed, streaming;
    fshm_pwcam_layout layout;  /* valid once ready */
    uint32_t fps_num, fps_den;
    int fps_measured;          /* 1: measured from the stream, 0: given (or the fallback) */
    uint32_t clients;
    uint64_t served;           /* frames handed to PipeWire */
    uint64_t no_buffer;        /* frames dropped: every PipeWire buffer was with clients */
    uint64_t torn;             /* copies discarded: the producer overwrote the slot meanwhile */
    uint64_t mismatched;       /* frames skipped: shape/type differ from the served layout */
    uint64_t last_seq;         /* seq of the newest frame served */
    uint64_t last_timestamp_ns;
    uint64_t events_lost;      /* events dropped because nobody polled */
} fshm_pwcam_info;

/* 1 when built with PipeWire. */
int fshm_pwcam_have_pipewire(void);
/* Checks the configuration (and, unless format/size/rate are all given, that the stream
 * exists: -ENOENT otherwise), then starts the worker, which learns the format, connects to
 * PipeWire and publishes the node; READY (or an error) follows through next_event. */
int fshm_pwcam_open(const fshm_pwcam_config *cfg, fshm_pwcam **out);
/* Next event, waiting up to timeout_ns (<0: forever): 1 with *ev filled, 0 when none came,
 * or the worker's fatal error (any code, -ETIMEDOUT included: e.g. no frame to learn the
 * format from; every call after a failure returns it again). */
int fshm_pwcam_next_event(fshm_pwcam *c, int64_t timeout_ns, fshm_pwcam_event *ev);
void fshm_pwcam_get_info(fshm_pwcam *c, fshm_pwcam_info *out);
/* Removes the node, closes the reader, joins the threads. */
void fshm_pwcam_close(fshm_pwcam *c);

#ifdef __cplusplus
}
#endif
#endif
