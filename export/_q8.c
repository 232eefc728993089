/* Q8_0 blocks, byte for byte as gguf-py's numpy quantizer writes them, at a fraction of its cost.
 *
 * export/quants.py's numpy Q8_0 kernel makes about ten passes over each weight and costs 2.3-4 ns a
 * weight; on a 1.1B model that is most of the export's time. Here one pass does the same float32
 * arithmetic in the same order (see quants.py for the rules):
 *
 *   d = amax / 127;  id = d == 0 ? 0 : 1 / d;  q = round_half_away(x * id)
 *
 * - float16 is widened through its bits: sign and magnitude moved into a float32's place, times
 *   2^112, exact for every finite float16 (load_tensor refuses NaN and inf before this runs);
 * - round half away from zero is trunc(q + copysign(0.49999997f, q)), as in quants.py (checked
 *   there for every float32 |q| < 130, all that q can be): roundf would be a libm call a weight;
 * - the scale d is returned as float32 and stored as float16 by numpy, which rounds to nearest
 *   even as gguf-py's astype does.
 * Build flags keep float32 semantics: no -ffast-math, and -ffp-contract=off so that x * id + 0.5
 * is not fused into one rounding. tests/test_export_quants.py checks the bytes against gguf-py.
 *
 * q8_0(src, out, scales, is_f16): src holds n * 32 weights (float16 bits or float32), out n * 34
 * bytes (bytes 2-33 of each block are written), scales n float32. The GIL is released, so the
 * chunks of export/quants.py's thread pool run in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 32
#define TYPE_SIZE 34

static inline float widen(uint16_t h)
{
    uint32_t bits = ((uint32_t)(h & 0x8000u) << 16) | ((uint32_t)(h & 0x7FFFu) << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f * 0x1p112f;
}

/* q and scale of one block of floats x whose largest magnitude is amax. */
static void quantize_block(const float *x, float amax, uint8_t *q, float *scale)
{
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const float half_down = 0.49999997f; /* nextafterf(0.5f, 0.0f) */
    *scale = d;
    if (isinf(id)) {
        /* A float32 block of subnormals: 1 / d overflows and every q would be inf or NaN, which no
         * integer holds (converting one is undefined in C). gguf-py's cast writes 0 bytes. */
        memset(q, 0, BLOCK);
        return;
    }
    for (int j = 0; j < BLOCK; j++) {
        float v = x[j] * id;
        q[j] = (uint8_t)(int8_t)(int32_t)(v + copysignf(half_down, v));
    }
}

/* Every block of src. */
static void quantize_blocks(const uint8_t *in, int is_f16, Py_ssize_t n, uint8_t *blocks, float *d)
{
    /* The largest magnitude of a block is taken on the bits, sign masked off: for finite floats the
     * bit patterns order as the magnitudes, and an integer maximum vectorizes where a float one does not. */
    float x[BLOCK];
    for (Py_ssize_t b = 0; b < n; b++) {
        float amax;
        if (is_f16) {
            uint16_t h[BLOCK], top = 0;
            memcpy(h, in + b * BLOCK * 2, sizeof h);
            for (int j = 0; j < BLOCK; j++) {
                uint16_t m = h[j] & 0x7FFFu;
                top = m > top ? m : top;
            }
            for (int j = 0; j < BLOCK; j++)
                x[j] = widen(h[j]);
            amax = widen(top);
        } else {
            uint32_t bits[BLOCK], top = 0;
            memcpy(bits, in + b * BLOCK * 4, sizeof bits);
            for (int j = 0; j < BLOCK; j++) {
                uint32_t m = bits[j] & 0x7FFFFFFFu;
                top = m > top ? m : top;
            }
            memcpy(x, bits, sizeof x);
            memcpy(&amax, &top, sizeof amax);
        }
        quantize_block(x, amax, blocks + b * TYPE_SIZE + 2, d + b);
    }
}

static PyObject *q8_0(PyObject *self, PyObject *args)
{
    Py_buffer src, out, scales;
    int is_f16;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*w*p", &src, &out, &scales, &is_f16))
        return NULL;
    Py_ssize_t n = scales.len / (Py_ssize_t)sizeof(float);
    Py_ssize_t weight_size = is_f16 ? 2 : 4;
    if (scales.len % (Py_ssize_t)sizeof(float) || src.len != n * BLOCK * weight_size || out.len != n * TYPE_SIZE) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        PyBuffer_Release(&scales);
        PyErr_SetString(PyExc_ValueError, "q8_0: src, out and scales do not hold the same number of blocks");
        return NULL;
    }
    const uint8_t *in = src.buf;
    uint8_t *blocks = out.buf;
    float *d = scales.buf;
    Py_BEGIN_ALLOW_THREADS
    quantize_blocks(in, is_f16, n, blocks, d);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&scales);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"q8_0", q8_0, METH_VARARGS, "q8_0(src, out, scales, is_f16): Q8_0 blocks as gguf-py writes them (see _q8.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_q8", .m_doc = "A one-pass Q8_0 kernel (export/_q8.c)", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__q8(void)
{
    return PyModule_Create(&module);
}
