/* Virtual-camera layouts, needing no PipeWire (the no-PipeWire build has them too): the table
 * of the video formats served (name, SPA format, dtype, channels, bytes per pixel),
 * fshm_pwcam_layout_for (a stream's tensor or a given format and size -> the node's format,
 * size, stride and frame length), and the tensor helpers the node shares (dtype and shape
 * text, the packed row-major check, format names). */
#include "fshm_pwcam_impl.h"

#ifdef FSHM_HAVE_PIPEWIRE
#define SPA(x) (x)
#else
#define SPA(x) 0
#endif

/* ---- layouts (no PipeWire needed) ---- */

enum { KIND_PACKED = 0, KIND_420 = 1 };

static const struct {
    const char *name;
    uint32_t spa;
    int16_t dtype;
    uint8_t channels;   /* last dimension (1: a 2-D frame) */
    uint8_t bpp;        /* bytes per pixel of the first plane */
    uint8_t kind;
} formats[] = {
    {"GRAY8", SPA(SPA_VIDEO_FORMAT_GRAY8), FSHM_DTYPE_UINT8, 1, 1, KIND_PACKED},
    {"GRAY16", SPA(SPA_VIDEO_FORMAT_GRAY16_LE), FSHM_DTYPE_UINT16, 1, 2, KIND_PACKED},
    {"RGB", SPA(SPA_VIDEO_FORMAT_RGB), FSHM_DTYPE_UINT8, 3, 3, KIND_PACKED},
    {"BGR", SPA(SPA_VIDEO_FORMAT_BGR), FSHM_DTYPE_UINT8, 3, 3, KIND_PACKED},
    {"RGBA", SPA(SPA_VIDEO_FORMAT_RGBA), FSHM_DTYPE_UINT8, 4, 4, KIND_PACKED},
    {"BGRA", SPA(SPA_VIDEO_FORMAT_BGRA), FSHM_DTYPE_UINT8, 4, 4, KIND_PACKED},
    {"RGBX", SPA(SPA_VIDEO_FORMAT_RGBx), FSHM_DTYPE_UINT8, 4, 4, KIND_PACKED},
    {"BGRX", SPA(SPA_VIDEO_FORMAT_BGRx), FSHM_DTYPE_UINT8, 4, 4, KIND_PACKED},
    {"YUYV", SPA(SPA_VIDEO_FORMAT_YUY2), FSHM_DTYPE_UINT8, 2, 2, KIND_PACKED},
    {"UYVY", SPA(SPA_VIDEO_FORMAT_UYVY), FSHM_DTYPE_UINT8, 2, 2, KIND_PACKED},
    {"NV12", SPA(SPA_VIDEO_FORMAT_NV12), FSHM_DTYPE_UINT8, 1, 1, KIND_420},
    {"I420", SPA(SPA_VIDEO_FORMAT_I420), FSHM_DTYPE_UINT8, 1, 1, KIND_420},
};
#define NFORMATS (sizeof formats / sizeof formats[0])
#define SUPPORTED_TEXT                                                                             \
    "uint8 (H,W) GRAY8, (H,W,2) YUYV/UYVY, (H,W,3) RGB/BGR, (H,W,4) RGBA/BGRA/RGBX/BGRX, "          \
    "(H*3/2,W) NV12/I420 (asked for), uint16 (H,W) GRAY16"

const char *pwc_dtype_name(int d)
{
    static const char *names[] = {"unknown", "uint8",   "int8",    "uint16", "int16",
                                  "uint32",  "int32",   "uint64",  "int64",  "float32",
                                  "float64", "bool",    "?",       "bytes"};
    return d >= 0 && d < (int)(sizeof names / sizeof names[0]) ? names[d] : "?";
}

void pwc_shape_text(const fshm_tensor *t, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "(");
    for (int i = 0; i < t->ndims && i < FSHM_MAX_DIMS && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %d" : "%d", t->dims[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, t->ndims == 1 ? ",)" : ")");
}

/* Row-major and packed: strides 0 (inferred) or exactly the contiguous ones. */
int pwc_contiguous(const fshm_tensor *t)
{
    if (t->major_order && t->major_order != FSHM_ORDER_ROW)
        return 0;
    int64_t want = fshm_dtype_size(t->dtype);
    for (int i = t->ndims - 1; i >= 0; i--) {
        if (t->strides[i] && t->strides[i] != want)
            return 0;
        want *= t->dims[i];
    }
    return 1;
}

/* Index in formats[] of a format name (V4L2's GREY and GStreamer's YUY2 too), -1 if none. */
int pwc_format_index(const char *name)
{
    for (unsigned i = 0; i < NFORMATS; i++)
        if (strcasecmp(name, formats[i].name) == 0)
            return (int)i;
    if (strcasecmp(name, "GREY") == 0)
        return 0;
    if (strcasecmp(name, "YUY2") == 0)
        return pwc_format_index("YUYV");
    return -1;
}

int fshm_pwcam_layout_for(const fshm_tensor *t, const char *format, uint32_t width,
                          uint32_t height, fshm_pwcam_layout *out)
{
    memset(out, 0, sizeof *out);
    int fi = -1;
    if (format && *format && (fi = pwc_format_index(format)) < 0)
        return fshm_set_error(-EINVAL, "unknown virtual-camera format '%s' (one of GRAY8 GRAY16 "
                              "RGB BGR RGBA BGRA RGBX BGRX YUYV UYVY NV12 I420)", format);
    char shape[96];
    if (!t) {
        if (fi < 0 || !width || !height)
            return fshm_set_error(-EINVAL, "without a frame to learn from, the virtual camera needs "
                                  "format, width and height");
    } else {
        pwc_shape_text(t, shape, sizeof shape);
        int last = t->ndims == 3 ? t->dims[2] : 1;
        if (t->ndims < 2 || t->ndims > 3 || !pwc_contiguous(t))
            return fshm_set_error(FSHM_E_PW_UNSUPPORTED, "frames of %s %s (%s) cannot be served as "
                                  "video: the virtual camera serves " SUPPORTED_TEXT,
                                  pwc_dtype_name(t->dtype), shape,
                                  pwc_contiguous(t) ? "need 2 or 3 dimensions" : "not packed row-major");
        if (fi < 0) {
            for (unsigned i = 0; i < NFORMATS && fi < 0; i++)
                if (formats[i].kind == KIND_PACKED && formats[i].dtype == t->dtype &&
                    formats[i].channels == last)
                    fi = (int)i;   /* the first of a group is its default: RGB, RGBA, YUYV */
            if (fi < 0)
                return fshm_set_error(FSHM_E_PW_UNSUPPORTED, "frames of %s %s cannot be served as "
                                      "video: the virtual camera serves " SUPPORTED_TEXT,
                                      pwc_dtype_name(t->dtype), shape);
        }
        if (formats[fi].dtype != t->dtype || formats[fi].channels != last)
            return fshm_set_error(FSHM_E_PW_UNSUPPORTED, "format %s does not fit frames of %s %s "
                                  "(the virtual camera serves " SUPPORTED_TEXT ")",
                                  formats[fi].name, pwc_dtype_name(t->dtype), shape);
        uint32_t rows = (uint32_t)t->dims[0], w = (uint32_t)t->dims[1];
        uint32_t h = rows;
        if (formats[fi].kind == KIND_420) {
            if (rows % 3 || (rows / 3) % 2 || w % 2)
                return fshm_set_error(FSHM_E_PW_UNSUPPORTED, "%s frames are (H*3/2, W) with even H "
                                      "and W; %s is not", formats[fi].name, shape);
            h = rows / 3 * 2;
        }
        if ((width && width != w) || (height && height != h))
            return fshm_set_error(-EINVAL, "the stream's frames are %ux%u (%s), not the %ux%u asked for",
                                  w, h, shape, width ? width : w, height ? height : h);
        width = w;
        height = h;
    }
    if (formats[fi].kind == KIND_420 && (width % 2 || height % 2))
        return fshm_set_error(-EINVAL, "%s needs an even width and height, not %ux%u",
                              formats[fi].name, width, height);
    if (width > 16384 || height > 16384)
        return fshm_set_error(-EINVAL, "%ux%u frames are too large for a virtual camera", width, height);
    snprintf(out->format, sizeof out->format, "%s", formats[fi].name);
    out->spa_format = formats[fi].spa;
    out->width = width;
    out->height = height;
    out->stride = width * formats[fi].bpp;
    out->frame_bytes = formats[fi].kind == KIND_420 ? width * height * 3 / 2 : out->stride * height;
    out->dtype = formats[fi].dtype;
    out->dims[0] = (int32_t)(formats[fi].kind == KIND_420 ? height * 3 / 2 : height);
    out->dims[1] = (int32_t)width;
    out->dims[2] = formats[fi].channels;
    out->ndims = formats[fi].channels > 1 ? 3 : 2;
    return 0;
}
