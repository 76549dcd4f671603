/*
 * Crop-aware baseline JPEG decoding for rine (Apache-2.0), over the system libjpeg-turbo.
 *
 * decode_bands(data, out, width, height, channels, bands, col0, col1) decodes only the
 * rows in `bands` (sorted, disjoint (start, stop) pairs) and the columns [col0, col1),
 * writing them one band after another into `out` (uint8 [sum of band heights, col1 - col0,
 * channels]). It returns None on success, or a one-line reason (str) whenever the result
 * might not equal a full decode by Pillow: the caller then decodes with Pillow.
 *
 * Why each rule holds:
 * - the column window is widened by one iMCU on each side before jpeg_crop_scanline, and
 *   the row window starts at least one iMCU above the first wanted row: the fancy chroma
 *   upsampling of a wanted pixel then sees the same neighbours as in a full decode;
 * - the rows below the last band are not decoded, but the bytes after the point where
 *   decoding stopped are scanned: the first marker there (restart markers aside) must be
 *   EOI, else the file may be truncated or hold a marker that makes Pillow's full decode
 *   fail, and the caller asks Pillow (see tail_is_eoi's caller);
 * - any libjpeg warning (truncation, corrupt data) or error ends the decode here
 *   (longjmp out of the error manager) and the caller falls back to Pillow, which gives
 *   today's result or today's error: libjpeg-turbo only warns on some inputs where
 *   Pillow raises.
 * Sizes above 65535 (MAX_SIDE) are refused, and the size of `out` is computed with checked
 * multiplication, so no argument can overflow the arithmetic.
 * The GIL is released while libjpeg runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#define MAX_BANDS 16
/* A JPEG's sides are 16-bit (SOF's X and Y): anything larger is a caller's error. Sizes are
 * parsed as Py_ssize_t ("n", overflow-checked) and held to this, so a width of 2**32 + 517
 * is refused instead of read as 517 (the "I" format truncates silently). */
#define MAX_SIDE 65535

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX + 16]; /* room for the "warning: " prefix */
} crop_error_mgr;

static void
on_error(j_common_ptr cinfo)
{
    crop_error_mgr *err = (crop_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void
on_message(j_common_ptr cinfo, int level)
{
    /* level < 0 is a warning (corrupt or truncated data): treated as an error, so that
       the caller decides with Pillow. Trace messages (level >= 0) are ignored. */
    if (level < 0) {
        crop_error_mgr *err = (crop_error_mgr *)cinfo->err;
        char text[JMSG_LENGTH_MAX];
        (*cinfo->err->format_message)(cinfo, text);
        snprintf(err->message, sizeof(err->message), "warning: %s", text);
        longjmp(err->jump, 1);
    }
}

typedef struct {
    const unsigned char *data;
    size_t size;
    unsigned char *out;
    JDIMENSION width, height, col0, col1;
    int channels;
    int n_bands;
    JDIMENSION band_start[MAX_BANDS], band_stop[MAX_BANDS];
    const char *reason; /* static text, or NULL when `message` holds it */
} crop_job;

/* Reads one scanline into `row` (the cropped width); the decoder's own line counter moves. */
static void
read_line(struct jpeg_decompress_struct *cinfo, JSAMPROW row)
{
    JSAMPROW rows[1] = {row};
    if (jpeg_read_scanlines(cinfo, rows, 1) != 1) {
        /* Cannot happen with a memory source (it never suspends); refuse rather than loop. */
        ERREXIT(cinfo, JERR_INPUT_EMPTY);
    }
}

/* Whether the first marker left in the input, restart markers aside, is EOI. */
static int
tail_is_eoi(struct jpeg_decompress_struct *cinfo)
{
    const unsigned char *p = cinfo->src->next_input_byte;
    const unsigned char *end = p + cinfo->src->bytes_in_buffer;
    int marker = cinfo->unread_marker; /* read by the entropy decoder already, if any */

    if (marker == 0xD9)
        return 1;
    if (marker != 0 && !(marker >= 0xD0 && marker <= 0xD7))
        return 0;
    while (p + 1 < end) {
        const unsigned char *ff = memchr(p, 0xFF, (size_t)(end - p - 1));
        if (ff == NULL)
            return 0;
        p = ff + 1;
        while (p < end && *p == 0xFF) /* fill bytes before a marker */
            p++;
        if (p >= end)
            return 0;
        if (*p == 0x00 || (*p >= 0xD0 && *p <= 0xD7)) { /* stuffed 0xFF or a restart marker */
            p++;
            continue;
        }
        return *p == 0xD9;
    }
    return 0;
}

/* Returns 0 on success; 1 with job->reason or err->message set otherwise. */
static int
run_job(crop_job *job, crop_error_mgr *err)
{
    struct jpeg_decompress_struct cinfo;
    JSAMPROW volatile row = NULL;
    int ci;

    memset(&cinfo, 0, sizeof(cinfo));
    cinfo.err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->message[0] = '\0';
    job->reason = NULL;

    if (setjmp(err->jump)) {
        free(row);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (unsigned char *)job->data, (unsigned long)job->size);
    jpeg_read_header(&cinfo, TRUE);

    if (cinfo.image_width != job->width || cinfo.image_height != job->height) {
        job->reason = "libjpeg reads another size than Pillow";
    } else if (cinfo.data_precision != 8) {
        job->reason = "not 8-bit";
    } else if (cinfo.progressive_mode || jpeg_has_multiple_scans(&cinfo)) {
        job->reason = "progressive or multi-scan";
    } else if (cinfo.arith_code) {
        job->reason = "arithmetic coding";
    } else if (job->channels == 3 && !(cinfo.num_components == 3 && cinfo.jpeg_color_space == JCS_YCbCr)) {
        job->reason = "not YCbCr";
    } else if (job->channels == 1 && !(cinfo.num_components == 1 && cinfo.jpeg_color_space == JCS_GRAYSCALE)) {
        job->reason = "not greyscale";
    } else if (job->channels != 1 && job->channels != 3) {
        job->reason = "channels must be 1 or 3";
    } else if (cinfo.CCIR601_sampling) {
        job->reason = "CCIR601 sampling";
    }
    for (ci = 0; job->reason == NULL && ci < cinfo.num_components; ci++) {
        jpeg_component_info *comp = &cinfo.comp_info[ci];
        /* The usual layouts only: luma 1 or 2 in each direction, chroma 1x1. */
        if (ci == 0 ? (comp->h_samp_factor > 2 || comp->v_samp_factor > 2)
                    : (comp->h_samp_factor != 1 || comp->v_samp_factor != 1))
            job->reason = "unusual sampling factors";
    }
    if (job->reason != NULL) {
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }

    cinfo.out_color_space = job->channels == 3 ? JCS_RGB : JCS_GRAYSCALE;
    cinfo.dct_method = JDCT_ISLOW; /* libjpeg's default, as Pillow leaves it */
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);

    {
        JDIMENSION imcu_w = (JDIMENSION)cinfo.max_h_samp_factor * DCTSIZE;
        JDIMENSION imcu_h = (JDIMENSION)cinfo.max_v_samp_factor * DCTSIZE;
        JDIMENSION x0 = job->col0 > imcu_w ? job->col0 - imcu_w : 0;
        JDIMENSION x1 = job->col1 + imcu_w < job->width ? job->col1 + imcu_w : job->width;
        JDIMENSION xoff = x0, xwidth = x1 - x0;
        size_t out_row = (size_t)(job->col1 - job->col0) * job->channels;
        unsigned char *dst = job->out;
        int b;

        if (xoff != 0 || xwidth != cinfo.output_width)
            jpeg_crop_scanline(&cinfo, &xoff, &xwidth); /* moves xoff down to an iMCU edge */
        if (xoff > job->col0 || xoff + xwidth < job->col1 || cinfo.output_width != xwidth) {
            job->reason = "jpeg_crop_scanline gave an unexpected window";
            jpeg_destroy_decompress(&cinfo);
            return 1;
        }
        row = (JSAMPROW)malloc((size_t)xwidth * job->channels);
        if (row == NULL)
            ERREXIT1(&cinfo, JERR_OUT_OF_MEMORY, 0);

        for (b = 0; b < job->n_bands; b++) {
            JDIMENSION start = job->band_start[b], stop = job->band_stop[b];
            /* Resume at an iMCU edge at least one iMCU above the band. */
            JDIMENSION resume = start > imcu_h ? ((start - imcu_h) / imcu_h) * imcu_h : 0;
            if (resume > cinfo.output_scanline)
                jpeg_skip_scanlines(&cinfo, resume - cinfo.output_scanline);
            while (cinfo.output_scanline < stop) {
                JDIMENSION y = cinfo.output_scanline;
                read_line(&cinfo, row);
                if (y >= start) {
                    memcpy(dst, row + (size_t)(job->col0 - xoff) * job->channels, out_row);
                    dst += out_row;
                }
            }
        }
        /* The rows below the last band are not decoded. What Pillow's full decode could
           still do there is fail, and it fails only on a marker inside or after the rest
           of the scan (a duplicate SOF, a second SOS, ...) or on data that ends before EOI
           (truncation); corrupt entropy-coded data only warns, and leaves the rows above
           it as they are. So the first marker after the scan, other than a restart
           marker, must be EOI; otherwise the caller asks Pillow. */
        if (!tail_is_eoi(&cinfo)) {
            job->reason = "no EOI marker right after the scan (truncated, or more markers)";
            free(row);
            row = NULL;
            jpeg_destroy_decompress(&cinfo);
            return 1;
        }
    }
    free(row);
    row = NULL;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* 0 <= value <= MAX_SIDE, else a ValueError naming `what`. */
static int
check_side(Py_ssize_t value, const char *what)
{
    if (value < 0 || value > MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "%s must be within [0, %d], got %zd", what, MAX_SIDE, value);
        return 0;
    }
    return 1;
}

/* *product = a * b, or 0 on overflow of Py_ssize_t (a, b >= 0). */
static int
checked_mul(Py_ssize_t a, Py_ssize_t b, Py_ssize_t *product)
{
    if (a != 0 && b > PY_SSIZE_T_MAX / a)
        return 0;
    *product = a * b;
    return 1;
}

static PyObject *
decode_bands(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    Py_ssize_t width, height, col0, col1;
    int channels, status, b;
    PyObject *bands, *seq = NULL, *result = NULL;
    crop_job job;
    crop_error_mgr err;
    Py_ssize_t n, rows = 0, row_bytes, need;

    if (!PyArg_ParseTuple(args, "y*w*nniOnn", &data, &out, &width, &height, &channels, &bands, &col0, &col1))
        return NULL;
    memset(&job, 0, sizeof(job));
    if (!check_side(width, "width") || !check_side(height, "height") || !check_side(col0, "col0")
        || !check_side(col1, "col1"))
        goto done;
    seq = PySequence_Fast(bands, "bands must be a sequence of (start, stop) pairs");
    if (seq == NULL)
        goto done;
    n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_BANDS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d bands, got %zd", MAX_BANDS, n);
        goto done;
    }
    for (b = 0; b < n; b++) {
        Py_ssize_t start, stop;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, b), "nn", &start, &stop))
            goto done;
        if (!check_side(start, "a band's start") || !check_side(stop, "a band's stop"))
            goto done;
        if (start >= stop || stop > height || (b > 0 && start < job.band_stop[b - 1])) {
            PyErr_SetString(PyExc_ValueError, "bands must be sorted, disjoint, non-empty and inside the image");
            goto done;
        }
        job.band_start[b] = (JDIMENSION)start;
        job.band_stop[b] = (JDIMENSION)stop;
        rows += stop - start;
    }
    if (col0 >= col1 || col1 > width || (channels != 1 && channels != 3)) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= col0 < col1 <= width and 1 or 3 channels");
        goto done;
    }
    /* rows <= height and col1 - col0 <= width: at most 65535 * 65535 * 3, which needs more
       than 32 bits; checked, so that a 32-bit Py_ssize_t cannot wrap either */
    if (!checked_mul(rows, col1 - col0, &row_bytes) || !checked_mul(row_bytes, channels, &need)) {
        PyErr_SetString(PyExc_ValueError, "the window is too large for this platform");
        goto done;
    }
    if (!PyBuffer_IsContiguous(&out, 'C') || out.len != need) {
        PyErr_SetString(PyExc_ValueError, "out must be a C-contiguous buffer of rows * (col1 - col0) * channels bytes");
        goto done;
    }
    job.data = data.buf;
    job.size = (size_t)data.len;
    job.out = out.buf;
    job.width = (JDIMENSION)width;
    job.height = (JDIMENSION)height;
    job.col0 = (JDIMENSION)col0;
    job.col1 = (JDIMENSION)col1;
    job.channels = channels;
    job.n_bands = (int)n;

    Py_BEGIN_ALLOW_THREADS
    status = run_job(&job, &err);
    Py_END_ALLOW_THREADS

    if (status == 0) {
        result = Py_NewRef(Py_None);
    } else {
        result = PyUnicode_FromString(job.reason != NULL ? job.reason : err.message);
    }
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_bands", decode_bands, METH_VARARGS,
     "decode_bands(data, out, width, height, channels, bands, col0, col1) -> None | str\n\n"
     "Decode rows `bands` ((start, stop) pairs) and columns [col0, col1) of a baseline JPEG\n"
     "into `out` (uint8 [rows, col1 - col0, channels]); None on success, else the reason\n"
     "the caller must decode the file another way."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg_crop", "Crop-aware baseline JPEG decoding (libjpeg-turbo).", -1, methods,
};

PyMODINIT_FUNC
PyInit__jpeg_crop(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#ifdef LIBJPEG_TURBO_VERSION
#define RINE_STR2(x) #x
#define RINE_STR(x) RINE_STR2(x)
    if (PyModule_AddStringConstant(m, "LIBJPEG_TURBO_VERSION", RINE_STR(LIBJPEG_TURBO_VERSION)) < 0) {
#else
    if (PyModule_AddStringConstant(m, "LIBJPEG_TURBO_VERSION", "unknown") < 0) {
#endif
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
