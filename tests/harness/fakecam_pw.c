/* fakecam_pw: a PipeWire Video/Source node offering a fixed list of formats, so that
 * PipeWire's V4L2 emulation (pw-v4l2) exposes them as VIDIOC_ENUM_FMT / ENUM_FRAMESIZES
 * entries. Adapted from shared/v4l2-testing for frameshm's own tests.
 *
 * Build: cc -O2 -Wall -o fakecam_pw fakecam_pw.c $(pkg-config --cflags --libs libpipewire-0.3)
 * Usage: fakecam_pw NAME FMT:WxH@FPS [FMT:WxH@FPS ...]   FMT in YUYV,UYVY,RGB3,BGR3,GREY,NV12,YU12
 * Prints "ready node.id=N serial=S" on stdout once the node exists and the registry
 * knows its object.serial (PIPEWIRE_V4L2_TARGET=S then picks exactly this camera).
 *
 * Frame content (tests/harness/pattern.py computes the same bytes):
 *   byte i of the frame (rows of `stride` bytes) = (i % stride + i / stride + 4 * n) & 0xff,
 *   then a luma "barcode" of the counter n in rows 8..15 (32 bits, LSB first, 8 pixels per bit,
 *   from x = 8; luma 235 for 1, 16 for 0, chroma 128) that survives YUV->RGB conversion,
 *   then a second barcode in rows 16..23 with the frame's capture time, CLOCK_MONOTONIC
 *   microseconds modulo 2^32 (benchmarks measure camera -> consumer latency with it, the
 *   emulation's own V4L2 timestamps being taken at VIDIOC_DQBUF),
 *   then bytes 0..3 = n as a little-endian u32 (readable in raw frames).
 * NOTE (PipeWire 0.3.65): one instance serves ONE capture session reliably; the buffers a
 * pw-v4l2 client holds when it closes are never returned to the node.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <spa/param/video/format-utils.h>
#include <pipewire/pipewire.h>

#define MAX_FMTS 16
static const struct { const char *fcc; uint32_t spa; } fmtdefs[] = {
	{ "YUYV", SPA_VIDEO_FORMAT_YUY2 }, { "UYVY", SPA_VIDEO_FORMAT_UYVY },
	{ "RGB3", SPA_VIDEO_FORMAT_RGB },  { "BGR3", SPA_VIDEO_FORMAT_BGR },
	{ "GREY", SPA_VIDEO_FORMAT_GRAY8 }, { "NV12", SPA_VIDEO_FORMAT_NV12 },
	{ "YU12", SPA_VIDEO_FORMAT_I420 },
};

struct data {
	struct pw_main_loop *loop;
	struct pw_context *context;
	struct pw_core *core;
	struct pw_registry *registry;
	struct spa_hook registry_listener;
	struct spa_source *timer;
	struct pw_stream *stream;
	struct spa_hook stream_listener;
	struct spa_video_info_raw format;
	uint32_t size, stride, seq, node_id;
	int paused, announced;
	const char *serial;
	char serial_buf[32];
};

static uint32_t frame_size(uint32_t f, uint32_t w, uint32_t h, uint32_t *stride)
{
	switch (f) {
	case SPA_VIDEO_FORMAT_YUY2: case SPA_VIDEO_FORMAT_UYVY: *stride = w * 2; return w * h * 2;
	case SPA_VIDEO_FORMAT_RGB: case SPA_VIDEO_FORMAT_BGR: *stride = w * 3; return w * h * 3;
	case SPA_VIDEO_FORMAT_GRAY8: *stride = w; return w * h;
	default: *stride = w; return w * h * 3 / 2; /* NV12, I420 */
	}
}

/* Writes the counter as 32 luma bars so that it can be read back after libv4l2 converted
 * the frame to RGB/BGR/grey (the raw bytes 0..3 do not survive a colour conversion). */
static void barcode(struct data *d, uint8_t *p, uint32_t y0, uint32_t value)
{
	uint32_t w = d->format.size.width, h = d->format.size.height;
	if (w < 8 + 32 * 8 || h < y0 + 8)
		return;
	for (uint32_t y = y0; y < y0 + 8; y++) {
		uint8_t *row = p + (size_t)y * d->stride;
		for (uint32_t x = 8; x < 8 + 32 * 8; x++) {
			uint8_t luma = ((value >> ((x - 8) / 8)) & 1) ? 235 : 16;
			switch (d->format.format) {
			case SPA_VIDEO_FORMAT_YUY2: row[2 * x] = luma; row[2 * x + 1] = 128; break;
			case SPA_VIDEO_FORMAT_UYVY: row[2 * x + 1] = luma; row[2 * x] = 128; break;
			case SPA_VIDEO_FORMAT_RGB: case SPA_VIDEO_FORMAT_BGR:
				row[3 * x] = row[3 * x + 1] = row[3 * x + 2] = luma; break;
			default: row[x] = luma; break;   /* GREY, and the Y plane of NV12/I420 */
			}
		}
	}
}

static void on_process(void *userdata)
{
	struct data *d = userdata;
	struct pw_buffer *b = pw_stream_dequeue_buffer(d->stream);
	if (b == NULL)
		return;
	struct spa_data *sd = &b->buffer->datas[0];
	uint8_t *p = sd->data;
	uint32_t n = p ? SPA_MIN(d->size, sd->maxsize) : 0;
	for (uint32_t i = 0; i < n; i++)
		p[i] = (uint8_t)((i % d->stride) + (i / d->stride) + d->seq * 4);
	if (n == d->size) {
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		barcode(d, p, 8, d->seq);
		barcode(d, p, 16, (uint32_t)((uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u));
	}
	if (n >= 4)
		memcpy(p, &d->seq, 4);
	d->seq++;
	sd->chunk->offset = 0;
	sd->chunk->size = n;
	sd->chunk->stride = d->stride;
	pw_stream_queue_buffer(d->stream, b);
}

static void on_timeout(void *userdata, uint64_t expirations)
{
	pw_stream_trigger_process(((struct data *)userdata)->stream);
}

/* "ready" needs both the node id (stream paused) and its serial (registry). */
static void maybe_announce(struct data *d)
{
	if (d->announced || !d->paused || !d->serial)
		return;
	d->announced = 1;
	printf("ready node.id=%u serial=%s\n", d->node_id, d->serial);
	fflush(stdout);
}

static void on_global(void *userdata, uint32_t id, uint32_t permissions, const char *type,
		uint32_t version, const struct spa_dict *props)
{
	struct data *d = userdata;
	const char *s;
	if (d->serial || !props || strcmp(type, PW_TYPE_INTERFACE_Node) != 0)
		return;
	if (d->node_id == SPA_ID_INVALID || id != d->node_id)
		return;
	if ((s = spa_dict_lookup(props, PW_KEY_OBJECT_SERIAL)) == NULL)
		return;
	snprintf(d->serial_buf, sizeof(d->serial_buf), "%s", s);
	d->serial = d->serial_buf;
	maybe_announce(d);
}

static const struct pw_registry_events registry_events = {
	PW_VERSION_REGISTRY_EVENTS,
	.global = on_global,
};

static void on_state_changed(void *userdata, enum pw_stream_state old,
		enum pw_stream_state state, const char *error)
{
	struct data *d = userdata;
	struct pw_loop *l = pw_main_loop_get_loop(d->loop);
	fprintf(stderr, "fakecam: state %s %s\n", pw_stream_state_as_string(state), error ? error : "");
	if (state == PW_STREAM_STATE_PAUSED && old == PW_STREAM_STATE_CONNECTING) {
		d->node_id = pw_stream_get_node_id(d->stream);
		d->paused = 1;
		/* The registry may have announced the node before we knew its id: ask again. */
		if (!d->serial && d->registry == NULL) {
			d->registry = pw_core_get_registry(d->core, PW_VERSION_REGISTRY, 0);
			pw_registry_add_listener(d->registry, &d->registry_listener, &registry_events, d);
		}
		maybe_announce(d);
	}
	if (state == PW_STREAM_STATE_STREAMING) {
		uint32_t num = d->format.framerate.num ? d->format.framerate.num : 30;
		uint32_t den = d->format.framerate.denom ? d->format.framerate.denom : 1;
		uint64_t ns = (uint64_t)den * SPA_NSEC_PER_SEC / num;
		struct timespec t = { 0, 1 }, iv = { ns / SPA_NSEC_PER_SEC, ns % SPA_NSEC_PER_SEC };
		pw_loop_update_timer(l, d->timer, &t, &iv, false);
	} else {
		pw_loop_update_timer(l, d->timer, NULL, NULL, false);
	}
	if (state == PW_STREAM_STATE_ERROR || state == PW_STREAM_STATE_UNCONNECTED)
		pw_main_loop_quit(d->loop);
}

static void on_param_changed(void *userdata, uint32_t id, const struct spa_pod *param)
{
	struct data *d = userdata;
	uint8_t buffer[1024];
	struct spa_pod_builder b = SPA_POD_BUILDER_INIT(buffer, sizeof(buffer));
	const struct spa_pod *params[1];

	if (param == NULL || id != SPA_PARAM_Format)
		return;
	spa_format_video_raw_parse(param, &d->format);
	d->size = frame_size(d->format.format, d->format.size.width, d->format.size.height, &d->stride);
	fprintf(stderr, "fakecam: negotiated fmt=%u %ux%u %u/%u size=%u\n", d->format.format,
		d->format.size.width, d->format.size.height,
		d->format.framerate.num, d->format.framerate.denom, d->size);
	params[0] = spa_pod_builder_add_object(&b,
		SPA_TYPE_OBJECT_ParamBuffers, SPA_PARAM_Buffers,
		SPA_PARAM_BUFFERS_buffers, SPA_POD_CHOICE_RANGE_Int(8, 2, 32),
		SPA_PARAM_BUFFERS_blocks,  SPA_POD_Int(1),
		SPA_PARAM_BUFFERS_size,    SPA_POD_Int(d->size),
		SPA_PARAM_BUFFERS_stride,  SPA_POD_Int(d->stride));
	pw_stream_update_params(d->stream, params, 1);
}

static const struct pw_stream_events stream_events = {
	PW_VERSION_STREAM_EVENTS,
	.process = on_process,
	.state_changed = on_state_changed,
	.param_changed = on_param_changed,
};

static void do_quit(void *userdata, int sig) { pw_main_loop_quit(((struct data *)userdata)->loop); }

int main(int argc, char *argv[])
{
	struct data d = { 0 };
	uint8_t buffer[8192];
	struct spa_pod_builder b = SPA_POD_BUILDER_INIT(buffer, sizeof(buffer));
	const struct spa_pod *params[MAX_FMTS];
	uint32_t n = 0;

	if (argc < 3) {
		fprintf(stderr, "usage: %s NAME FMT:WxH@FPS...\n", argv[0]);
		return 2;
	}
	d.node_id = SPA_ID_INVALID;
	pw_init(&argc, &argv);
	for (int i = 2; i < argc && n < MAX_FMTS; i++) {
		char fcc[5] = { 0 }; unsigned w, h, fps; uint32_t spa = 0;
		if (sscanf(argv[i], "%4[^:]:%ux%u@%u", fcc, &w, &h, &fps) != 4) {
			fprintf(stderr, "bad format spec %s\n", argv[i]); return 2;
		}
		for (size_t k = 0; k < SPA_N_ELEMENTS(fmtdefs); k++)
			if (!strcmp(fmtdefs[k].fcc, fcc)) spa = fmtdefs[k].spa;
		if (!spa) { fprintf(stderr, "unknown fourcc %s\n", fcc); return 2; }
		/* one fixed EnumFormat per entry: pw-v4l2 can't enumerate choices */
		params[n++] = spa_pod_builder_add_object(&b,
			SPA_TYPE_OBJECT_Format, SPA_PARAM_EnumFormat,
			SPA_FORMAT_mediaType,       SPA_POD_Id(SPA_MEDIA_TYPE_video),
			SPA_FORMAT_mediaSubtype,    SPA_POD_Id(SPA_MEDIA_SUBTYPE_raw),
			SPA_FORMAT_VIDEO_format,    SPA_POD_Id(spa),
			SPA_FORMAT_VIDEO_size,      SPA_POD_Rectangle(&SPA_RECTANGLE(w, h)),
			SPA_FORMAT_VIDEO_framerate, SPA_POD_Fraction(&SPA_FRACTION(fps, 1)));
	}
	d.loop = pw_main_loop_new(NULL);
	struct pw_loop *l = pw_main_loop_get_loop(d.loop);
	pw_loop_add_signal(l, SIGINT, do_quit, &d);
	pw_loop_add_signal(l, SIGTERM, do_quit, &d);
	d.timer = pw_loop_add_timer(l, on_timeout, &d);
	d.context = pw_context_new(l, NULL, 0);
	d.core = d.context ? pw_context_connect(d.context, NULL, 0) : NULL;
	if (d.core == NULL) {
		fprintf(stderr, "fakecam: cannot connect to PipeWire\n");
		return 1;
	}
	d.stream = pw_stream_new(d.core, argv[1],
		pw_properties_new(PW_KEY_MEDIA_CLASS, "Video/Source",
				  PW_KEY_NODE_NAME, argv[1],
				  PW_KEY_NODE_DESCRIPTION, argv[1], NULL));
	pw_stream_add_listener(d.stream, &d.stream_listener, &stream_events, &d);
	pw_stream_connect(d.stream, PW_DIRECTION_OUTPUT, PW_ID_ANY,
			  PW_STREAM_FLAG_DRIVER | PW_STREAM_FLAG_MAP_BUFFERS, params, n);
	pw_main_loop_run(d.loop);
	pw_stream_destroy(d.stream);
	if (d.registry)
		pw_proxy_destroy((struct pw_proxy *)d.registry);
	pw_core_disconnect(d.core);
	pw_context_destroy(d.context);
	pw_main_loop_destroy(d.loop);
	pw_deinit();
	return 0;
}
