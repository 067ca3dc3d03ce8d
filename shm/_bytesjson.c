/* shm._bytesjson: the compiled codec of JSON byte arrays (see shm/bytesjson.py).
 *
 * encode(data) writes bytes as a compact array ("[104,105]"), four table bytes per input byte.
 *
 * decode(text, start, stop) parses the elements of text[start:stop], the region between an
 * array's brackets, and returns (bytes, -1, -1), or (None, element, offset) for the first
 * element it cannot read: its 0-based index and the offset where it begins. Python then names
 * the problem (shm.bytesjson._diagnose); this file decides only valid or not, by the same rules:
 * 1-3 digits, no leading zero, at most 255, JSON whitespace around elements, nothing else.
 *
 * Canonical text ("104,105,") is read 16 characters at a time with SSSE3 where the CPU has it
 * (parse_blocks); a scalar loop that picks an element's length with conditional moves takes the
 * rest, and whitespace, the last element and errors go through a plain scan of one element.
 * Neither function holds the GIL while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static inline int
is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static inline int
is_digit(unsigned char c)
{
    return (unsigned char)(c - '0') <= 9;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_BLOCKS 1
#include <immintrin.h>

/* compact[m]: the positions of the set bits of m, in order, then 0x80 (pshufb writes 0). */
static uint64_t compact[256];

static void
fill_compact(void)
{
    for (int m = 0; m < 256; m++) {
        uint64_t entry = 0x8080808080808080ULL;
        int k = 0;
        for (int bit = 0; bit < 8; bit++) {
            if (m & (1 << bit)) {
                entry &= ~(0xFFULL << (8 * k));
                entry |= (uint64_t)bit << (8 * k);
                k++;
            }
        }
        compact[m] = entry;
    }
}

/* Decode canonical text 16 characters at a time with SSSE3, every lane at once: lane i holds
 * the character s[i] and looks back at s[i-1], s[i-2], s[i-3]. A comma lane ends an element
 * whose last digit is s[i-1]; its tens and hundreds count while the characters before are
 * digits. Value = c + 10 t + 100 h in wrapping bytes (pshufb tables; a non-digit index has bit
 * 7 set and looks up 0), and it is valid when it is at least 0, 10 or 100 for 1, 2 or 3 digits
 * (smaller means a leading zero, or 256-299 wrapped) and h <= 2. A run of 4 digits, an empty
 * element or any other character makes the block invalid. The comma lanes' values are then
 * packed to the output 8 lanes at a time (compact[]).
 *
 * s[0] begins an element, s[-1] is its comma, and s[-3..-1] are readable. Returns how many
 * characters it consumed (up to just after a comma) and appends values to out[*count...]
 * (writing up to 8 bytes beyond them); stops at the first block that is not canonical. */
__attribute__((target("ssse3,popcnt"))) static Py_ssize_t
parse_blocks(const unsigned char *s, Py_ssize_t n, unsigned char *out, Py_ssize_t *count,
             Py_ssize_t capacity)
{
    const __m128i zero_char = _mm_set1_epi8('0');
    const __m128i nine = _mm_set1_epi8(9);
    const __m128i two = _mm_set1_epi8(2);
    const __m128i comma_char = _mm_set1_epi8(',');
    const __m128i tens = _mm_setr_epi8(0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 0, 0, 0, 0, 0, 0);
    const __m128i hundreds = _mm_setr_epi8(0, 100, (char)200, 44, (char)144, (char)244, 88,
                                           (char)188, 32, (char)132, 0, 0, 0, 0, 0, 0);
    const __m128i ten = _mm_set1_epi8(10);
    const __m128i hundred = _mm_set1_epi8(100);
    const __m128i eight = _mm_set1_epi8(8);
    Py_ssize_t done = 0;
    unsigned char *o = out + *count;
    for (Py_ssize_t base = 0; base + 16 <= n; base += 16) {
        /* A block yields at most 8 values, unless its bytes change while it is read (a
         * bytearray or a mapped segment written meanwhile): never let the text set the bound. */
        if (o - out + 16 > capacity) {
            break;
        }
        const unsigned char *at = s + base;
        __m128i c0 = _mm_loadu_si128((const __m128i *)at);
        __m128i d0 = _mm_sub_epi8(c0, zero_char);
        __m128i d1 = _mm_sub_epi8(_mm_loadu_si128((const __m128i *)(at - 1)), zero_char);
        __m128i d2 = _mm_sub_epi8(_mm_loadu_si128((const __m128i *)(at - 2)), zero_char);
        __m128i d3 = _mm_sub_epi8(_mm_loadu_si128((const __m128i *)(at - 3)), zero_char);
        __m128i is0 = _mm_cmpeq_epi8(_mm_min_epu8(d0, nine), d0);
        __m128i is1 = _mm_cmpeq_epi8(_mm_min_epu8(d1, nine), d1);
        __m128i is2 = _mm_cmpeq_epi8(_mm_min_epu8(d2, nine), d2);
        __m128i is3 = _mm_cmpeq_epi8(_mm_min_epu8(d3, nine), d3);
        __m128i comma = _mm_cmpeq_epi8(c0, comma_char);
        __m128i is23 = _mm_and_si128(is2, is3);
        /* Bad lanes: neither digit nor comma; four digits in a row; a comma after a
         * non-digit (an empty element). */
        __m128i bad = _mm_andnot_si128(_mm_or_si128(is0, comma), _mm_set1_epi8(-1));
        bad = _mm_or_si128(bad, _mm_and_si128(_mm_and_si128(is0, is1), is23));
        bad = _mm_or_si128(bad, _mm_andnot_si128(is1, comma));
        /* Values at comma lanes (others are ignored). */
        __m128i t = _mm_or_si128(d2, _mm_andnot_si128(is2, _mm_set1_epi8(-1)));
        __m128i h = _mm_or_si128(d3, _mm_andnot_si128(is23, _mm_set1_epi8(-1)));
        __m128i value = _mm_add_epi8(d1, _mm_shuffle_epi8(tens, t));
        value = _mm_add_epi8(value, _mm_shuffle_epi8(hundreds, h));
        __m128i floor = _mm_max_epu8(_mm_and_si128(is2, ten), _mm_and_si128(is23, hundred));
        __m128i too_small = _mm_xor_si128(_mm_cmpeq_epi8(_mm_max_epu8(value, floor), value),
                                          _mm_set1_epi8(-1));
        __m128i h_digit = _mm_and_si128(d3, is23);
        __m128i too_big = _mm_xor_si128(_mm_cmpeq_epi8(_mm_min_epu8(h_digit, two), h_digit),
                                        _mm_set1_epi8(-1));
        bad = _mm_or_si128(bad, _mm_and_si128(comma, _mm_or_si128(too_small, too_big)));
        if (_mm_movemask_epi8(bad)) {
            break;
        }
        unsigned mask = (unsigned)_mm_movemask_epi8(comma);
        unsigned low = mask & 0xFF, high = mask >> 8;
        __m128i pick = _mm_loadl_epi64((const __m128i *)&compact[low]);
        _mm_storel_epi64((__m128i *)o, _mm_shuffle_epi8(value, pick));
        o += __builtin_popcount(low);
        pick = _mm_add_epi8(_mm_loadl_epi64((const __m128i *)&compact[high]), eight);
        _mm_storel_epi64((__m128i *)o, _mm_shuffle_epi8(value, pick));
        o += __builtin_popcount(high);
        done = base + 32 - __builtin_clz(mask); /* just after the block's last comma */
    }
    *count = o - out;
    return done;
}

static int use_blocks;
#endif

/* Decode the elements in s[0:n] into out; return their count, or -1 with *bad_element and
 * *bad_offset set. out has room for `capacity` values, (n + 1) / 2 + 8: every element but the
 * last takes at least two characters, and the compaction writes 8 bytes at a time. */
static Py_ssize_t
parse(const unsigned char *s, Py_ssize_t n, unsigned char *out, Py_ssize_t capacity,
      Py_ssize_t *bad_element, Py_ssize_t *bad_offset)
{
    Py_ssize_t p = 0;
    Py_ssize_t count = 0;
    for (;;) {
        Py_ssize_t limit = n;
#if HAVE_BLOCKS
        if (p >= 3 && use_blocks) {
            p += parse_blocks(s + p, n - p, out, &count, capacity);
        }
        if (n - p > 128) {
            limit = p + 64; /* past what parse_blocks refused, then back to it */
        }
#endif
        int unusual = 0;
        /* Canonical elements, while four characters are left to look at. */
        while (p + 4 <= limit && count < capacity) {
            unsigned d0 = (unsigned)s[p] - '0';
            unsigned d1 = (unsigned)s[p + 1] - '0';
            unsigned d2 = (unsigned)s[p + 2] - '0';
            unsigned short1 = d1 > 9;
            unsigned short2 = d2 > 9;
            unsigned two = d0 * 10 + d1;
            unsigned length = short1 ? 1 : (short2 ? 2 : 3);
            unsigned value = short1 ? d0 : (short2 ? two : two * 10 + d2);
            unsigned bad = (d0 > 9) | (s[p + length] != ',') | ((length > 1) & (d0 == 0))
                           | (value > 255);
            if (bad) {
                unusual = 1;
                break;
            }
            out[count++] = (unsigned char)value;
            p += length + 1;
        }
        if (!unusual && limit < n) {
            continue;
        }
        /* One element, the slow way. */
        Py_ssize_t start = p;
        while (p < n && is_space(s[p])) {
            p++;
        }
        if (p == n || !is_digit(s[p])) {
            goto fail;
        }
        Py_ssize_t digits = p;
        unsigned value = 0;
        while (p < n && is_digit(s[p]) && p - digits < 4) {
            value = value * 10 + (s[p] - '0');
            p++;
        }
        /* The loop stops after a fourth digit: more than three digits is that case. */
        if (p - digits > 3 || (p - digits > 1 && s[digits] == '0') || value > 255
            || count >= capacity) {
            goto fail;
        }
        out[count] = (unsigned char)value;
        while (p < n && is_space(s[p])) {
            p++;
        }
        if (p == n) {
            return count + 1;
        }
        if (s[p] != ',') {
            goto fail;
        }
        count++;
        p++;
        continue;
    fail:
        *bad_element = count;
        *bad_offset = start;
        return -1;
    }
}

static PyObject *
decode(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "y*nn:decode", &view, &start, &stop)) {
        return NULL;
    }
    if (start < 0 || stop < start || stop > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start and stop must satisfy 0 <= start <= stop <= len");
        return NULL;
    }
    Py_ssize_t n = stop - start;
    PyObject *result = PyBytes_FromStringAndSize(NULL, (n + 1) / 2 + 8);
    if (result == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t bad_element = -1, bad_offset = -1, count;
    const unsigned char *text = (const unsigned char *)view.buf + start;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    count = parse(text, n, out, (n + 1) / 2 + 8, &bad_element, &bad_offset);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (count < 0) {
        Py_DECREF(result);
        return Py_BuildValue("(Onn)", Py_None, bad_element, start + bad_offset);
    }
    if (_PyBytes_Resize(&result, count) < 0) {
        return NULL;
    }
    return Py_BuildValue("(Nnn)", result, (Py_ssize_t)-1, (Py_ssize_t)-1);
}

/* encode_table[b]: the decimal digits of b and a comma, padded to four bytes; encode_length[b]
 * how many of them count. */
static char encode_table[256][4];
static unsigned char encode_length[256];

static void
fill_encode_table(void)
{
    for (int b = 0; b < 256; b++) {
        char digits[8];
        int length = snprintf(digits, sizeof(digits), "%d,", b);
        memset(encode_table[b], ',', 4);
        memcpy(encode_table[b], digits, (size_t)length);
        encode_length[b] = (unsigned char)length;
    }
}

static PyObject *
encode(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t n = view.len;
    if (n == 0) {
        PyBuffer_Release(&view);
        return PyBytes_FromStringAndSize("[]", 2);
    }
    if (n > (PY_SSIZE_T_MAX - 8) / 4) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    /* At most three digits and a comma per byte, plus "[", and room to copy four bytes at the
     * end; trimmed afterwards. */
    PyObject *result = PyBytes_FromStringAndSize(NULL, 4 * n + 4);
    if (result == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)view.buf;
    char *out = PyBytes_AS_STRING(result);
    Py_ssize_t p = 1;
    Py_BEGIN_ALLOW_THREADS
    out[0] = '[';
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(out + p, encode_table[data[i]], 4);
        p += encode_length[data[i]];
    }
    out[p - 1] = ']'; /* in place of the last comma */
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (_PyBytes_Resize(&result, p) < 0) {
        return NULL;
    }
    return result;
}

static PyObject *
set_blocks(PyObject *module, PyObject *arg)
{
    int enabled = PyObject_IsTrue(arg);
    if (enabled < 0) {
        return NULL;
    }
#if HAVE_BLOCKS
    int was = use_blocks;
    use_blocks = enabled && __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("popcnt");
    return PyBool_FromLong(was);
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"set_blocks", set_blocks, METH_O,
     "set_blocks(enabled) -> bool\n\n"
     "Use the SSSE3 block decoder where the CPU has it (the default), or only the scalar loop\n"
     "(for tests); returns whether the blocks were in use."},
    {"encode", encode, METH_O,
     "encode(data) -> bytes\n\n"
     "The compact JSON array of the bytes of data, as orjson.dumps(list(data)) writes it."},
    {"decode", decode, METH_VARARGS,
     "decode(text, start, stop) -> (bytes, -1, -1) or (None, element, offset)\n\n"
     "Decode the elements of a JSON byte array between offsets start and stop (the region\n"
     "inside its brackets); on invalid text, the index and offset of the first bad element."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "shm._bytesjson",
    "The compiled decoder of JSON byte arrays (see shm.bytesjson).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__bytesjson(void)
{
    fill_encode_table();
#if HAVE_BLOCKS
    __builtin_cpu_init();
    use_blocks = __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("popcnt");
    fill_compact();
#endif
    return PyModule_Create(&module);
}
