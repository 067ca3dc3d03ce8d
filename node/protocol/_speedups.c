/* node.protocol._speedups: the supervisor's per-frame loops in C (see framing.py and codec.py).
 *
 * split_frames(data, pos, limit, spill_from, out) appends to the list `out` the payloads of
 * the whole frames in data[pos:] (a 4-byte big-endian length, then that many bytes) and returns
 * the offset where it stopped: at the first frame that is not whole in `data`, is above `limit`
 * or is of `spill_from` bytes or more (and not empty). FrameDecoder.feed handles that frame and
 * every partial one as before; this only takes its loop over the whole small frames.
 *
 * assign_task_ids(payloads) returns, for each payload, what codec.assign_task_id returns: the id
 * of an AssignTask as every master writes it ({"AssignTask":{"id":"...), or None (another
 * payload, an id with an escape, or one that is not UTF-8).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *
split_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "split_frames(data, pos, limit, spill_from, out)");
        return NULL;
    }
    PyObject *data = args[0];
    PyObject *out = args[4];
    if (!PyBytes_Check(data) || !PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "split_frames() takes bytes and a list");
        return NULL;
    }
    Py_ssize_t numbers[3];
    for (int i = 0; i < 3; i++) {
        numbers[i] = PyLong_AsSsize_t(args[i + 1]);
        if (numbers[i] == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_ssize_t pos = numbers[0], limit = numbers[1], spill_from = numbers[2];
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t end = PyBytes_GET_SIZE(data);
    if (pos < 0 || pos > end) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    while (end - pos >= 4) {
        /* Compared as unsigned 64-bit numbers: a length of 2**31 or more stays positive where
         * Py_ssize_t has 32 bits (limit and spill_from are never negative). */
        uint64_t length = (uint64_t)s[pos] << 24 | (uint64_t)s[pos + 1] << 16
                          | (uint64_t)s[pos + 2] << 8 | (uint64_t)s[pos + 3];
        if (limit < 0 || spill_from < 0 || length > (uint64_t)limit
            || (length >= (uint64_t)spill_from && length > 0)
            || (uint64_t)(end - pos - 4) < length) {
            break;
        }
        PyObject *payload =
            PyBytes_FromStringAndSize((const char *)s + pos + 4, (Py_ssize_t)length);
        if (payload == NULL) {
            return NULL;
        }
        int failed = PyList_Append(out, payload);
        Py_DECREF(payload);
        if (failed) {
            return NULL;
        }
        pos += 4 + (Py_ssize_t)length;
    }
    return PyLong_FromSsize_t(pos);
}

static const char ASSIGN_HEAD[] = "{\"AssignTask\":{\"id\":\"";
#define ASSIGN_HEAD_LENGTH (sizeof(ASSIGN_HEAD) - 1)

static PyObject *
assign_task_id(PyObject *payload)
{
    if (!PyBytes_Check(payload)) {
        Py_RETURN_NONE;
    }
    const char *s = PyBytes_AS_STRING(payload);
    Py_ssize_t n = PyBytes_GET_SIZE(payload);
    if (n < (Py_ssize_t)ASSIGN_HEAD_LENGTH + 1 || memcmp(s, ASSIGN_HEAD, ASSIGN_HEAD_LENGTH) != 0) {
        Py_RETURN_NONE;
    }
    const char *start = s + ASSIGN_HEAD_LENGTH;
    const char *stop = s + n;
    const char *p = start;
    while (p < stop && *p != '"' && *p != '\\') {
        p++;
    }
    if (p == stop || *p != '"') {
        Py_RETURN_NONE;
    }
    PyObject *ident = PyUnicode_DecodeUTF8(start, p - start, "strict");
    if (ident == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            return NULL;
        }
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return ident;
}

static PyObject *
assign_task_ids(PyObject *module, PyObject *payloads)
{
    if (!PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "assign_task_ids() takes a list");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    PyObject *ids = PyList_New(count);
    if (ids == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *ident = assign_task_id(PyList_GET_ITEM(payloads, i));
        if (ident == NULL) {
            Py_DECREF(ids);
            return NULL;
        }
        PyList_SET_ITEM(ids, i, ident);
    }
    return ids;
}

/* The marks `claim_tasks` looks for: a new Compute's variant right after its id. */
static const char COMPUTE_AFTER_ID[] = "\",\"task\":{\"Compute\":";
#define COMPUTE_AFTER_ID_LENGTH (sizeof(COMPUTE_AFTER_ID) - 1)

static int
held_anywhere(PyObject *ident, PyObject *const *dicts, Py_ssize_t ndicts)
{
    for (Py_ssize_t k = 0; k < ndicts; k++) {
        int found = PyDict_Contains(dicts[k], ident);
        if (found != 0) {
            return found; /* 1, or -1 with an error set */
        }
    }
    return 0;
}

static PyObject *
claim_tasks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "claim_tasks() takes ids, payloads, start, held, answered, answered_before");
        return NULL;
    }
    PyObject *ids = args[0], *payloads = args[1], *held = args[3];
    if (!PyList_Check(ids) || !PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "claim_tasks(): ids and payloads must be lists");
        return NULL;
    }
    for (int k = 3; k < 6; k++) {
        if (!PyDict_Check(args[k])) {
            PyErr_SetString(PyExc_TypeError, "claim_tasks(): held and answered must be dicts");
            return NULL;
        }
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(ids);
    if (PyList_GET_SIZE(payloads) != count) {
        PyErr_SetString(PyExc_ValueError, "claim_tasks(): ids and payloads differ in length");
        return NULL;
    }
    if (start < 0 || start > count) {
        PyErr_SetString(PyExc_ValueError, "claim_tasks(): start out of range");
        return NULL;
    }
    Py_ssize_t i = start;
    for (; i < PyList_GET_SIZE(ids) && i < PyList_GET_SIZE(payloads); i++) {
        PyObject *ident = PyList_GET_ITEM(ids, i);
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        if (!PyUnicode_CheckExact(ident) || !PyBytes_CheckExact(payload)) {
            break;
        }
        /* The variant follows the id as the master writes it (an id with escapes or non-ASCII
           text is longer on the wire than its length in characters: the slow path finds it). */
        Py_ssize_t at = (Py_ssize_t)ASSIGN_HEAD_LENGTH + PyUnicode_GET_LENGTH(ident);
        if (PyBytes_GET_SIZE(payload) - at < (Py_ssize_t)COMPUTE_AFTER_ID_LENGTH
            || memcmp(PyBytes_AS_STRING(payload) + at, COMPUTE_AFTER_ID, COMPUTE_AFTER_ID_LENGTH)
                   != 0) {
            break;
        }
        Py_INCREF(ident);
        Py_INCREF(payload);
        int found = held_anywhere(ident, args + 3, 3);
        int failed = found < 0 || (found == 0 && PyDict_SetItem(held, ident, payload) < 0);
        Py_DECREF(payload);
        Py_DECREF(ident);
        if (failed) {
            return NULL;
        }
        if (found) {
            break;
        }
    }
    return PyLong_FromSsize_t(i);
}

static PyObject *
frames_of(PyObject *module, PyObject *payloads)
{
    if (!PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "frames_of() takes a list");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(payload)) {
            PyErr_SetString(PyExc_TypeError, "frames_of() takes a list of bytes");
            return NULL;
        }
        Py_ssize_t size = PyBytes_GET_SIZE(payload);
        if (size > 0xFFFFFFFFLL || total > PY_SSIZE_T_MAX - 4 - size) {
            PyErr_SetString(PyExc_OverflowError, "frames_of(): a payload or the total is too long");
            return NULL;
        }
        total += 4 + size;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        return NULL;
    }
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    /* The list cannot change meanwhile: nothing here runs Python code. */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        Py_ssize_t size = PyBytes_GET_SIZE(payload);
        w[0] = (unsigned char)(size >> 24);
        w[1] = (unsigned char)(size >> 16);
        w[2] = (unsigned char)(size >> 8);
        w[3] = (unsigned char)size;
        memcpy(w + 4, PyBytes_AS_STRING(payload), (size_t)size);
        w += 4 + size;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"split_frames", (PyCFunction)(void (*)(void))split_frames, METH_FASTCALL,
     "split_frames(data, pos, limit, spill_from, out) -> int\n\n"
     "Append the payloads of the whole frames in data[pos:] to out; return where it stopped."},
    {"assign_task_ids", assign_task_ids, METH_O,
     "assign_task_ids(payloads) -> list[str | None]\n\n"
     "codec.assign_task_id of each payload."},
    {"claim_tasks", (PyCFunction)(void (*)(void))claim_tasks, METH_FASTCALL,
     "claim_tasks(ids, payloads, start, held, answered, answered_before) -> int\n\n"
     "dispatch.python_claim_tasks in C."},
    {"frames_of", frames_of, METH_O,
     "frames_of(payloads) -> bytes\n\nframing.python_frames_of in C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "node.protocol._speedups",
    "The supervisor's per-frame loops in C (see node/protocol/framing.py).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
