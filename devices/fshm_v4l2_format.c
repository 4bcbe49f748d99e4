/* V4L2 formats: the table of what frameshm can deliver, enumeration (native and converted
 * formats, sizes, intervals), setting the device format, and the layouts of native and
 * delivered frames. */
#include "fshm_v4l2_impl.h"

static const fmt_info FORMATS[] = {
    {FSHM_FOURCC('Y', 'U', 'Y', 'V'), FK_PACKED, 2, 2, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('Y', 'V', 'Y', 'U'), FK_PACKED, 2, 2, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('U', 'Y', 'V', 'Y'), FK_PACKED, 2, 2, 1, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('V', 'Y', 'U', 'Y'), FK_PACKED, 2, 2, 1, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('R', 'G', 'B', '3'), FK_PACKED, 3, 3, 0x10, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('B', 'G', 'R', '3'), FK_PACKED, 3, 3, 0x12, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('R', 'G', 'B', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('B', 'G', 'R', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('A', 'R', '2', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('X', 'R', '2', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('A', 'B', '2', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('X', 'B', '2', '4'), FK_PACKED, 4, 4, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('R', 'G', 'B', 'P'), FK_PACKED, 2, 2, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('G', 'R', 'E', 'Y'), FK_PACKED, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('Y', '1', '6', ' '), FK_PACKED, 2, 1, 0xff, FSHM_DTYPE_UINT16},
    {FSHM_FOURCC('N', 'V', '1', '2'), FK_NV, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('N', 'V', '2', '1'), FK_NV, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('Y', 'U', '1', '2'), FK_YUV420, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('Y', 'V', '1', '2'), FK_YUV420, 1, 1, 0, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('M', 'J', 'P', 'G'), FK_COMPRESSED, 0, 0, 0xff, FSHM_DTYPE_UINT8},
    {FSHM_FOURCC('J', 'P', 'E', 'G'), FK_COMPRESSED, 0, 0, 0xff, FSHM_DTYPE_UINT8},
};

const fmt_info *cam_fmt_lookup(uint32_t fourcc)
{
    static const fmt_info opaque = {0, FK_OPAQUE, 0, 0, 0xff, FSHM_DTYPE_UINT8};
    for (size_t i = 0; i < sizeof FORMATS / sizeof FORMATS[0]; i++)
        if (FORMATS[i].fourcc == fourcc)
            return &FORMATS[i];
    return &opaque;
}


/* ---- enumeration ---- */

/* Native formats; returns the count (0 on error). */
int cam_native_formats(fshm_v4l2_cam *c, struct v4l2_fmtdesc *out, int max)
{
    int n = 0;
    for (uint32_t i = 0; i < MAX_FMTS && n < max; i++) {
        struct v4l2_fmtdesc d;
        memset(&d, 0, sizeof d);
        d.index = i;
        d.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        if (cam_ioctl(c, VIDIOC_ENUM_FMT, &d))
            break;
        out[n++] = d;
    }
    return n;
}

int cam_is_native(const struct v4l2_fmtdesc *nat, int n, uint32_t fourcc)
{
    for (int i = 0; i < n; i++)
        if (nat[i].pixelformat == fourcc)
            return 1;
    return 0;
}

/* Native formats frameshm can take GRAY8 from without libv4lconvert, best first. */
const uint32_t cam_grey_sources[] = {
    FSHM_FOURCC('Y', 'U', 'Y', 'V'), FSHM_FOURCC('U', 'Y', 'V', 'Y'), FSHM_FOURCC('Y', 'V', 'Y', 'U'),
    FSHM_FOURCC('V', 'Y', 'U', 'Y'), FSHM_FOURCC('N', 'V', '1', '2'), FSHM_FOURCC('N', 'V', '2', '1'),
    FSHM_FOURCC('Y', 'U', '1', '2'), FSHM_FOURCC('Y', 'V', '1', '2'), FSHM_FOURCC('R', 'G', 'B', '3'),
    FSHM_FOURCC('B', 'G', 'R', '3'),
};
const size_t cam_n_grey_sources = sizeof cam_grey_sources / sizeof cam_grey_sources[0];

uint32_t cam_grey_source(const struct v4l2_fmtdesc *nat, int n)
{
    for (size_t k = 0; k < cam_n_grey_sources; k++)
        if (cam_is_native(nat, n, cam_grey_sources[k]))
            return cam_grey_sources[k];
    return 0;
}

#ifdef FSHM_HAVE_LIBV4L2
/* The native format libv4lconvert would convert from to get `fourcc` (0: none). */
static uint32_t libv4l_source(fshm_v4l2_cam *c, uint32_t fourcc, uint32_t w, uint32_t h)
{
    struct v4l2_format dst, src;
    memset(&dst, 0, sizeof dst);
    memset(&src, 0, sizeof src);
    dst.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    dst.fmt.pix.pixelformat = fourcc;
    dst.fmt.pix.width = w ? w : 640;
    dst.fmt.pix.height = h ? h : 480;
    dst.fmt.pix.field = V4L2_FIELD_ANY;
    if (v4lconvert_try_format(c->cv, &dst, &src) || dst.fmt.pix.pixelformat != fourcc)
        return 0;
    return src.fmt.pix.pixelformat;
}
#endif

const uint32_t cam_converted[] = {
    FSHM_FOURCC('R', 'G', 'B', '3'), FSHM_FOURCC('B', 'G', 'R', '3'), FCC_GREY,
    FSHM_FOURCC('Y', 'U', '1', '2'), FSHM_FOURCC('Y', 'V', '1', '2'),
};
const size_t cam_n_converted = sizeof cam_converted / sizeof cam_converted[0];

/* Source a converted format would be made from (0: cannot be produced). */
static uint32_t converted_source(fshm_v4l2_cam *c, const struct v4l2_fmtdesc *nat, int n, uint32_t fourcc,
                                 uint32_t w, uint32_t h)
{
    if (fourcc == FCC_GREY) {
        uint32_t s = cam_grey_source(nat, n);
        if (s)
            return s;
    }
#ifdef FSHM_HAVE_LIBV4L2
    return libv4l_source(c, fourcc == FCC_GREY ? FCC_YU12 : fourcc, w, h);
#else
    (void)c, (void)w, (void)h;
    return 0;
#endif
}

int fshm_v4l2_enum_formats(fshm_v4l2_cam *c, fshm_v4l2_fmtdesc *out, int max)
{
    if (c->gone)
        return cam_gone_error(c);
    struct v4l2_fmtdesc nat[MAX_FMTS];
    int n = cam_native_formats(c, nat, MAX_FMTS), total = 0;
    for (int i = 0; i < n; i++, total++) {
        if (total >= max)
            continue;
        fshm_v4l2_fmtdesc *d = &out[total];
        memset(d, 0, sizeof *d);
        d->fourcc = nat[i].pixelformat;
        d->flags = (nat[i].flags & V4L2_FMT_FLAG_COMPRESSED) || cam_fmt_lookup(d->fourcc)->kind == FK_COMPRESSED
                       ? FSHM_V4L2_FMT_COMPRESSED : 0;
        memcpy(d->description, nat[i].description, sizeof d->description - 1);
    }
    for (size_t k = 0; k < cam_n_converted; k++) {
        uint32_t f = cam_converted[k];
        if (cam_is_native(nat, n, f))
            continue;
        uint32_t src = converted_source(c, nat, n, f, 0, 0);
        if (!src)
            continue;
        if (total < max) {
            fshm_v4l2_fmtdesc *d = &out[total];
            memset(d, 0, sizeof *d);
            d->fourcc = f;
            d->flags = FSHM_V4L2_FMT_CONVERTED;
            d->source_fourcc = src;
            snprintf(d->description, sizeof d->description, "%s (from %s)", fshm_v4l2_fourcc_str(f),
                     fshm_v4l2_fourcc_str(src));
        }
        total++;
    }
    return total;
}

int fshm_v4l2_enum_sizes(fshm_v4l2_cam *c, uint32_t fourcc, fshm_v4l2_frmsize *out, int max)
{
    if (c->gone)
        return cam_gone_error(c);
    struct v4l2_fmtdesc nat[MAX_FMTS];
    int n = cam_native_formats(c, nat, MAX_FMTS), total = 0;
    if (!cam_is_native(nat, n, fourcc)) {
        uint32_t src = converted_source(c, nat, n, fourcc, 0, 0);
        if (!src)
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s cannot deliver %s", c->path,
                                  fshm_v4l2_fourcc_str(fourcc));
        fourcc = src;
    }
    for (uint32_t i = 0; i < 256; i++) {
        struct v4l2_frmsizeenum s;
        memset(&s, 0, sizeof s);
        s.index = i;
        s.pixel_format = fourcc;
        if (cam_ioctl(c, VIDIOC_ENUM_FRAMESIZES, &s))
            break;
        if (total < max) {
            fshm_v4l2_frmsize *o = &out[total];
            memset(o, 0, sizeof *o);
            if (s.type == V4L2_FRMSIZE_TYPE_DISCRETE) {
                o->discrete = 1;
                o->width = s.discrete.width;
                o->height = s.discrete.height;
            } else {
                o->min_width = s.stepwise.min_width;
                o->max_width = s.stepwise.max_width;
                o->step_width = s.type == V4L2_FRMSIZE_TYPE_CONTINUOUS ? 1 : s.stepwise.step_width;
                o->min_height = s.stepwise.min_height;
                o->max_height = s.stepwise.max_height;
                o->step_height = s.type == V4L2_FRMSIZE_TYPE_CONTINUOUS ? 1 : s.stepwise.step_height;
            }
        }
        total++;
        if (s.type != V4L2_FRMSIZE_TYPE_DISCRETE)
            break;   /* a range is the only entry */
    }
    return total;
}

int fshm_v4l2_enum_intervals(fshm_v4l2_cam *c, uint32_t fourcc, uint32_t width, uint32_t height,
                             fshm_v4l2_frmival *out, int max)
{
    if (c->gone)
        return cam_gone_error(c);
    struct v4l2_fmtdesc nat[MAX_FMTS];
    int n = cam_native_formats(c, nat, MAX_FMTS), total = 0;
    if (!cam_is_native(nat, n, fourcc)) {
        uint32_t src = converted_source(c, nat, n, fourcc, width, height);
        if (!src)
            return 0;
        fourcc = src;
    }
    for (uint32_t i = 0; i < 256; i++) {
        struct v4l2_frmivalenum v;
        memset(&v, 0, sizeof v);
        v.index = i;
        v.pixel_format = fourcc;
        v.width = width;
        v.height = height;
        if (cam_ioctl(c, VIDIOC_ENUM_FRAMEINTERVALS, &v))
            break;   /* ENOTTY on devices that cannot say (PipeWire's emulation) */
        if (total < max) {
            fshm_v4l2_frmival *o = &out[total];
            memset(o, 0, sizeof *o);
            if (v.type == V4L2_FRMIVAL_TYPE_DISCRETE) {
                o->discrete = 1;
                o->num = v.discrete.numerator;
                o->den = v.discrete.denominator;
            } else {
                o->num = v.stepwise.min.numerator;
                o->den = v.stepwise.min.denominator;
                o->max_num = v.stepwise.max.numerator;
                o->max_den = v.stepwise.max.denominator;
                o->step_num = v.stepwise.step.numerator;
                o->step_den = v.stepwise.step.denominator;
            }
        }
        total++;
        if (v.type != V4L2_FRMIVAL_TYPE_DISCRETE)
            break;
    }
    return total;
}

/* "640x480, 320x240" of what the device offers for fourcc (for error messages). */
void cam_sizes_text(fshm_v4l2_cam *c, uint32_t fourcc, char *out, size_t cap)
{
    fshm_v4l2_frmsize s[16];
    int n = fshm_v4l2_enum_sizes(c, fourcc, s, 16);
    size_t len = 0;
    out[0] = 0;
    for (int i = 0; i < n && i < 16 && len < cap; i++) {
        if (s[i].discrete)
            len += snprintf(out + len, cap - len, "%s%ux%u", i ? ", " : "", s[i].width, s[i].height);
        else
            len += snprintf(out + len, cap - len, "%s%u..%ux%u..%u", i ? ", " : "", s[i].min_width,
                            s[i].max_width, s[i].min_height, s[i].max_height);
    }
    if (n <= 0)
        snprintf(out, cap, "(the device does not list sizes)");
}

void cam_formats_text(fshm_v4l2_cam *c, char *out, size_t cap)
{
    fshm_v4l2_fmtdesc f[32];
    int n = fshm_v4l2_enum_formats(c, f, 32);
    size_t len = 0;
    out[0] = 0;
    for (int i = 0; i < n && i < 32 && len < cap; i++)
        len += snprintf(out + len, cap - len, "%s%s%s", i ? ", " : "", fshm_v4l2_fourcc_str(f[i].fourcc),
                        (f[i].flags & FSHM_V4L2_FMT_CONVERTED) ? " (converted)" : "");
}

/* ---- negotiation ---- */

int cam_set_native_format(fshm_v4l2_cam *c, uint32_t fourcc, uint32_t w, uint32_t h, int exact_size,
                             uint32_t want_fourcc)
{
    struct v4l2_format f;
    memset(&f, 0, sizeof f);
    f.type = V4L2_BUF_TYPE_VIDEO_CAPTURE;
    f.fmt.pix.pixelformat = fourcc;
    f.fmt.pix.width = w;
    f.fmt.pix.height = h;
    f.fmt.pix.field = V4L2_FIELD_ANY;
    int rc = cam_ioctl(c, VIDIOC_S_FMT, &f);
    if (rc)
        return cam_ioctl_error(c, rc, "VIDIOC_S_FMT");
    char sizes[256];
    if (f.fmt.pix.pixelformat != fourcc)
        return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s does not deliver %s (the driver chose %s)", c->path,
                              fshm_v4l2_fourcc_str(fourcc), fshm_v4l2_fourcc_str(f.fmt.pix.pixelformat));
    if (exact_size && (f.fmt.pix.width != w || f.fmt.pix.height != h)) {
        cam_sizes_text(c, fourcc, sizes, sizeof sizes);
        return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED,
                              "%s cannot deliver %s at %ux%u (the driver offered %ux%u); sizes for %s: %s",
                              c->path, fshm_v4l2_fourcc_str(want_fourcc), w, h, f.fmt.pix.width, f.fmt.pix.height,
                              fshm_v4l2_fourcc_str(fourcc), sizes);
    }
    if (f.fmt.pix.width == 0 || f.fmt.pix.height == 0)
        return fshm_set_error(-EINVAL, "%s reported a %ux%u format", c->path, f.fmt.pix.width, f.fmt.pix.height);
    c->native = f;
    return 0;
}


/* Corrects bytesperline that contradicts the mapped buffers (PipeWire's emulation reports
 * 4 bytes per pixel for RGB24) and computes the packed cam_layout. */
int cam_layout(fshm_v4l2_cam *c, size_t min_len)
{
    const fmt_info *fi = c->nfi;
    uint32_t w = c->native.fmt.pix.width, h = c->native.fmt.pix.height;
    uint32_t bpl = c->native.fmt.pix.bytesperline;
    uint64_t need;
    switch (fi->kind) {
    case FK_PACKED: {
        uint32_t row = w * fi->bpp;
        if (bpl < row)
            bpl = row;
        need = (uint64_t)bpl * (h - 1) + row;
        if (need > min_len) {
            if ((uint64_t)row * h > min_len)
                return fshm_set_error(-EINVAL, "%s: %u-byte buffers cannot hold %ux%u %s frames", c->path,
                                      (unsigned)min_len, w, h, fshm_v4l2_fourcc_str(fi->fourcc));
            bpl = row;
        }
        break;
    }
    case FK_NV: case FK_YUV420:
        if ((w | h) & 1)
            return fshm_set_error(FSHM_E_V4L2_UNSUPPORTED, "%s: odd 4:2:0 size %ux%u", c->path, w, h);
        if (bpl < w)
            bpl = w;
        if ((uint64_t)bpl * h * 3 / 2 > min_len) {
            if ((uint64_t)w * h * 3 / 2 > min_len)
                return fshm_set_error(-EINVAL, "%s: buffers too small for %ux%u %s", c->path, w, h,
                                      fshm_v4l2_fourcc_str(fi->fourcc));
            bpl = w;
        }
        break;
    default:
        bpl = 0;
        break;
    }
    c->native.fmt.pix.bytesperline = bpl;
    c->fmt.native_bytesperline = bpl;
    return 0;
}

/* Output cam_layout (packed) of the delivered format. */
int cam_out_tensor(fshm_v4l2_cam *c, uint32_t fourcc, size_t min_len)
{
    const fmt_info *fi = cam_fmt_lookup(fourcc);
    uint32_t w = c->fmt.width, h = c->fmt.height;
    fshm_tensor *t = &c->fmt.tensor;
    memset(t, 0, sizeof *t);
    t->dtype = fi->dtype;
    t->major_order = FSHM_ORDER_ROW;
    uint64_t bytes;
    switch (fi->kind) {
    case FK_PACKED:
        t->dims[0] = (int32_t)h;
        t->dims[1] = (int32_t)w;
        t->ndims = 2;
        if (fi->channels > 1) {
            t->dims[2] = fi->channels;
            t->ndims = 3;
        }
        bytes = (uint64_t)w * h * fi->bpp;
        c->fmt.bytesperline = w * fi->bpp;
        break;
    case FK_NV: case FK_YUV420:
        t->dims[0] = (int32_t)(h * 3 / 2);
        t->dims[1] = (int32_t)w;
        t->ndims = 2;
        bytes = (uint64_t)w * h * 3 / 2;
        c->fmt.bytesperline = w;
        break;
    default: {
        /* Compressed / unknown: variable-size 1-D bytes, at most the driver's sizeimage. */
        uint64_t si = c->native.fmt.pix.sizeimage;
        bytes = si && si <= min_len ? si : min_len;
        t->dims[0] = (int32_t)bytes;
        t->ndims = 1;
        c->fmt.bytesperline = 0;
        c->fmt.compressed = 1;
        break;
    }
    }
    if (bytes > 0x7fffffffull)
        return fshm_set_error(-EINVAL, "%ux%u frames are too large", w, h);
    c->fmt.frame_bytes = (uint32_t)bytes;
    return 0;
}
