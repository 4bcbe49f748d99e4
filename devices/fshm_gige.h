/*
 * frameshm GigE Vision capture through Aravis (libaravis-0.8): open a camera by id, set
 * pixel format, region, frame rate and packet size, stream into a pool of Aravis buffers
 * and deliver each frame with one copy straight into a destination (a frameshm stream
 * slot), counting lost frames (frame-id gaps, incomplete buffers, stream underruns).
 *
 * Camera ids:
 *   "192.168.1.20"  an IPv4 address: opened directly (GVCP to that address only; the local
 *                   interface is the one the kernel routes to it) - no discovery broadcast
 *   "Fake_1"        Aravis' in-process fake camera (serial "1"; "Fake_<serial>" in general):
 *                   no network at all, the unit-test camera
 *   anything else   an Aravis device id / camera name ("<vendor>-<serial>", "<serial>"...),
 *                   found by Aravis' discovery, which broadcasts on every interface
 *
 * Built without Aravis (no FSHM_HAVE_ARAVIS), every call that needs a camera fails with
 * FSHM_E_GIGE_NOLIB and a message saying how to get it.
 *
 * Errors: negative errno values (-ENOENT no such camera / no answer, -EBUSY another
 * application controls the camera, -ENODEV the camera went away or we lost control of it
 * (heartbeat lost, camera rebooted), -ETIMEDOUT no frame in time, -EINVAL bad argument) or
 * the codes below; fshm_last_error() has the message.
 *
 * Disconnects: Aravis' "control-lost" signal (its heartbeat thread) marks the camera gone;
 * besides, a read that times out after the camera has been silent for
 * FSHM_GIGE_PROBE_AFTER_NS reads the camera's control-channel privilege register: no
 * answer, or an answer saying we are no longer its controller (the camera restarted), is
 * -ENODEV too. Once gone, only close() is useful; open the camera again when it is back.
 *
 * Not thread-safe per camera.
 */
#ifndef FSHM_GIGE_H
#define FSHM_GIGE_H

#include <stddef.h>
#include <stdint.h>

#include <frameshm/frameshm.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FSHM_E_GIGE_NOLIB (-1201)        /* built without Aravis */
#define FSHM_E_GIGE_UNSUPPORTED (-1202)  /* pixel format / region / rate not accepted */
#define FSHM_E_GIGE_ARAVIS (-1203)       /* any other Aravis error (message has its text) */

#define FSHM_GIGE_MAX_BUFFERS 64
#define FSHM_GIGE_DEFAULT_BUFFERS 8
#define FSHM_GIGE_PROBE_AFTER_NS 1000000000ull
/* Closing a camera that sent nothing for this long does not wait for it to answer. */
#define FSHM_GIGE_SILENT_CLOSE_NS 300000000ull

/* 1 if this build has Aravis. */
int fshm_gige_have_aravis(void);

typedef struct fshm_gige_cam fshm_gige_cam;

typedef struct fshm_gige_info {
    char id[128];            /* the id it was opened with */
    char device_id[128];     /* Aravis' device id */
    char vendor[64];
    char model[64];
    char serial[64];
    char protocol[16];       /* "GigEVision", "Fake", "USB3Vision" */
    char address[64];        /* GigE: the camera's IP address, else "" */
} fshm_gige_info;

/* Opens (and takes control of) the camera; see the id forms above. */
int fshm_gige_open(const char *id, fshm_gige_cam **out);
void fshm_gige_get_info(const fshm_gige_cam *c, fshm_gige_info *out);

typedef struct fshm_gige_request {
    const char *pixel_format; /* GenICam name: "Mono8", "Mono16", "RGB8", "BayerRG8"...; NULL
                               * or "" = the camera's current one */
    uint32_t x, y;            /* region offset (used when width/height are given) */
    uint32_t width, height;   /* 0 = the camera's current size; otherwise exact or an error */
    double fps;               /* 0 = leave the camera's rate (triggers are cleared anyway) */
    uint32_t packet_size;     /* GigE: bytes per stream packet; 0 = negotiate (auto) */
    uint32_t nbuffers;        /* Aravis buffers in the pool; 0 = FSHM_GIGE_DEFAULT_BUFFERS */
} fshm_gige_request;

typedef struct fshm_gige_format {
    char pixel_format[32];    /* GenICam name */
    uint32_t pixel_format_code; /* PFNC code (ArvPixelFormat) */
    uint32_t bits_per_pixel;
    uint32_t x, y, width, height;
    double fps;               /* rate the camera reports (0: unknown) */
    uint32_t frame_rate_available; /* 1: the camera paces frames itself (AcquisitionFrameRate) */
    uint32_t packet_size;     /* GigE stream packet size in force (0: not GigE) */
    uint32_t payload;         /* bytes the camera sends per frame */
    uint32_t frame_bytes;     /* bytes of a delivered frame (packed, = width*height*bpp) */
    uint32_t nbuffers;
    fshm_tensor tensor;       /* (h, w) uint8/uint16 or (h, w, 3) uint8 */
} fshm_gige_format;

/* Clears triggers, sets pixel format, region, rate and packet size (always all of them:
 * GigE cameras keep settings between sessions), allocates the buffer pool, creates the
 * stream and starts acquisition. */
int fshm_gige_start(fshm_gige_cam *c, const fshm_gige_request *req);
void fshm_gige_get_format(const fshm_gige_cam *c, fshm_gige_format *out);

/* Asks the camera for fps frames per second (0: back to the rate asked at start). Returns
 * 1 when the camera paces frames itself, 0 when it has no rate control (the caller paces). */
int fshm_gige_set_rate(fshm_gige_cam *c, double fps);

typedef struct fshm_gige_frame {
    uint64_t frame_id;        /* the camera's block id (GigE: 16-bit, wraps 65535 -> 1) */
    uint64_t timestamp_ns;    /* arrival of the frame's first packet, CLOCK_MONOTONIC */
    uint64_t camera_timestamp;/* the camera's own timestamp (its ticks/ns) */
    size_t bytes;             /* bytes written */
    uint32_t lost_before;     /* frames lost between the previous delivered one and this:
                               * incomplete + id gaps (not flushed ones) */
} fshm_gige_frame;

/* One copy: waits up to timeout_ns (<0: forever) for the next complete frame, copies it
 * into dst (fshm_gige_format.frame_bytes bytes) and gives the Aravis buffer back at once.
 * Incomplete buffers are counted and skipped. -ETIMEDOUT, -ENODEV (gone). */
int fshm_gige_read_into(fshm_gige_cam *c, int64_t timeout_ns, void *dst, size_t capacity,
                        fshm_gige_frame *info);

/* Waits for the next complete frame without delivering it (it stays first in line), and
 * returns its size: callers that loan a slot only once a frame is there. */
int fshm_gige_wait(fshm_gige_cam *c, int64_t timeout_ns);

/* Capture straight into a stream: wait for a frame, loan a slot of w, copy once, give the
 * buffer back, commit with the arrival timestamp. t NULL = the format's tensor. */
int fshm_gige_capture(fshm_gige_cam *c, fshm_writer *w, int64_t timeout_ns, const fshm_tensor *t,
                      uint64_t *seq_out, fshm_gige_frame *info);

/* Discards frames already received more than max_age_ns ago; newer ones stay queued.
 * Returns how many were discarded. */
int fshm_gige_flush(fshm_gige_cam *c, uint64_t max_age_ns);

/* Checks the camera is still there and ours (one register read). 0 or -ENODEV. */
int fshm_gige_probe(fshm_gige_cam *c);

typedef struct fshm_gige_stats {
    uint64_t delivered;       /* frames handed out */
    uint64_t lost;            /* frames never delivered. GigE: incomplete + id_gaps (the
                               * camera numbers every frame it sends, so a frame with no
                               * free buffer is an id gap). Others: incomplete +
                               * max(id_gaps, underruns) (Aravis' in-process fake numbers
                               * only the frames it fills: its drops are underruns only) */
    uint64_t id_gaps;         /* frames that never reached a buffer: missing between the
                               * ids of consecutive complete frames (fshm_gige_loss) */
    uint64_t incomplete;      /* buffers Aravis returned with a status other than success
                               * (or too short) */
    uint64_t underruns;       /* Aravis found no free buffer: per frame, but per packet
                               * on a GigE stream (Aravis 0.8 counts each packet of a
                               * frame it dropped) */
    uint64_t flushed;         /* discarded by fshm_gige_flush */
    uint64_t timeouts;        /* reads that timed out */
    uint64_t resent_packets;  /* GigE: packets recovered by resend requests (Aravis) */
    uint64_t missing_packets; /* GigE: packets never received (Aravis) */
} fshm_gige_stats;
void fshm_gige_get_stats(const fshm_gige_cam *c, fshm_gige_stats *out);

/* ---- lost-frame accounting (pure: no camera, no Aravis; the capture code and tests) ----
 *
 * Fed with every buffer popped off the stream, in the order Aravis returns them (frame-id
 * order). Only a complete buffer's frame id is trusted: Aravis takes a buffer's frame id
 * from the frame's leader packet, so a buffer whose leader was lost comes back incomplete
 * still carrying the id of the frame it held before. The frames between two consecutive
 * complete ones are the incomplete buffers returned in between plus the id gaps: frames
 * that never reached a buffer. 16-bit GigE Vision block ids wrap from 65535 to 1 (0 is
 * never used); 64-bit (extended) ids do not wrap. */

/* A larger forward step between two complete frames, or any step back, means the camera
 * restarted its counter: nothing is counted, the next frame starts afresh. Half the 16-bit
 * id range, as Aravis itself tells late frames from new ones. */
#define FSHM_GIGE_MAX_ID_STEP 32768u

typedef struct fshm_gige_loss {
    uint64_t last_id;         /* the last complete frame's id (0: none yet) */
    uint64_t incomplete_run;  /* incomplete buffers since that frame */
    uint64_t id_gaps;         /* frames that never reached a buffer */
    uint64_t incomplete;      /* buffers returned incomplete */
    uint64_t resyncs;         /* id discontinuities (not counted as lost) */
} fshm_gige_loss;

/* Frames strictly between frame ids prev and id (1..65535 wrap 65535 -> 1 when both fit in
 * 16 bits), or -1 when id does not follow prev: 0 in either, the same id, a step back, or
 * a step of more than FSHM_GIGE_MAX_ID_STEP. */
int64_t fshm_gige_ids_between(uint64_t prev, uint64_t id);

/* Accounts one popped buffer and returns how many frames it shows lost: 1 for an
 * incomplete buffer (its id is ignored), the id gaps before a complete one. The returns
 * add up to incomplete + id_gaps. */
uint64_t fshm_gige_loss_account(fshm_gige_loss *l, int complete, uint64_t frame_id);

/* Stops acquisition and drops the stream (settings stay). */
int fshm_gige_stop(fshm_gige_cam *c);
/* 1 once the camera is known to be gone (control lost / no answer). */
int fshm_gige_gone(const fshm_gige_cam *c);
/* Stops, releases the camera (leaves control) and frees. */
void fshm_gige_close(fshm_gige_cam *c);

#ifdef __cplusplus
}
#endif
#endif
