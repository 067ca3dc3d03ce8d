/* workers._fastpath: the worker's hot path in C (see workers/tasks.py, TaskRunner.run_payload).
 *
 * plain_result(payload) answers the commonest task of all, a Compute with a plain expression
 * exactly as masters write it:
 *
 *     {"AssignTask":{"id":"t1","task":{"Compute":{"expression":"1+2*3"}}}}
 *  -> {"TaskResult":{"id":"t1","result":{"Number":7.0}}}
 *
 * It accepts exactly what tasks.py's _PLAIN_COMPUTE regex accepts (an id of printable ASCII
 * without quotes or backslashes; unsigned numbers joined by + - * / %, with spaces around them)
 * and computes as workers.expr.evaluate_plain does: numbers read by Python's own correctly
 * rounded reader, products left to right within each term, then the terms left to right, in
 * IEEE doubles (x / 0 and fmod as Rust's f64 gives them). It returns None for anything else,
 * and also for what only the Python path formats (a result that is not finite, or whose
 * shortest form has an exponent, where Python and serde_json write it differently) or refuses
 * (an expression above max_expression_bytes): None always means "take the Python path", which
 * stays the reference. Tests compare the two on generated tasks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <time.h>
#include <string.h>

static const char TASK_HEAD[] = "{\"AssignTask\":{\"id\":\"";
static const char TASK_MIDDLE[] = "\",\"task\":{\"Compute\":{\"expression\":\"";
static const char TASK_TAIL[] = "\"}}}}";
static const char RESULT_HEAD[] = "{\"TaskResult\":{\"id\":\"";
static const char RESULT_MIDDLE[] = "\",\"result\":{\"Number\":";
static const char RESULT_TAIL[] = "}}}";
#define LITERAL_LENGTH(s) (sizeof(s) - 1)

static Py_ssize_t max_expression_bytes = 10000;

static inline int
is_digit(char c)
{
    return (unsigned char)(c - '0') <= 9;
}

/* Skip a number of the plain grammar, digits ("." digits*)? ([eE][+-]?digits)?, at s[p:end];
 * return where it ends, or -1 when there is none. */
static Py_ssize_t
number_end(const char *s, Py_ssize_t p, Py_ssize_t end)
{
    if (p >= end || !is_digit(s[p])) {
        return -1;
    }
    while (p < end && is_digit(s[p])) {
        p++;
    }
    if (p < end && s[p] == '.') {
        p++;
        while (p < end && is_digit(s[p])) {
            p++;
        }
    }
    if (p < end && (s[p] == 'e' || s[p] == 'E')) {
        Py_ssize_t q = p + 1;
        if (q < end && (s[q] == '+' || s[q] == '-')) {
            q++;
        }
        if (q >= end || !is_digit(s[q])) {
            return p; /* "1e" is the number 1 and then an "e" the grammar refuses */
        }
        while (q < end && is_digit(s[q])) {
            q++;
        }
        p = q;
    }
    return p;
}

/* Evaluate the plain expression s[0:n]; 0 and *value on success, -1 when it is not one (no
 * Python error set), -2 on a Python error. */
static int
evaluate(const char *s, Py_ssize_t n, double *value)
{
    double total = 0.0, term = 0.0;
    char adding = 0; /* the + or - between total and term; 0 before the first */
    char pending = 0; /* the operator before the number being read; 0 for the first */
    Py_ssize_t p = 0;
    for (;;) {
        while (p < n && s[p] == ' ') {
            p++;
        }
        Py_ssize_t end = number_end(s, p, n);
        if (end < 0) {
            return -1;
        }
        char *parsed_end = NULL;
        double number = PyOS_string_to_double(s + p, &parsed_end, NULL);
        if (number == -1.0 && PyErr_Occurred()) {
            return -2;
        }
        if (parsed_end != s + end) {
            return -1; /* not read as the grammar reads it: leave it to Python */
        }
        switch (pending) {
        case 0:
            term = number;
            break;
        case '*':
            term *= number;
            break;
        case '/':
            term /= number; /* IEEE: x / 0 is inf of the right sign, 0 / 0 nan, as in Rust */
            break;
        case '%':
            term = fmod(term, number); /* Rust's % on f64; nan where C's fmod gives nan */
            break;
        default: /* + or -: the term before is complete */
            if (!adding) {
                total = term;
            }
            else if (adding == '+') {
                total += term;
            }
            else {
                total -= term;
            }
            adding = pending;
            term = number;
        }
        p = end;
        while (p < n && s[p] == ' ') {
            p++;
        }
        if (p == n) {
            break;
        }
        char op = s[p];
        if (op != '+' && op != '-' && op != '*' && op != '/' && op != '%') {
            return -1;
        }
        pending = op;
        p++;
    }
    if (!adding) {
        *value = term;
    }
    else {
        *value = adding == '+' ? total + term : total - term;
    }
    return 0;
}

/* Read and compute a plain Compute payload s[0:n]. On success (1), the id is s[*id_start:*id_end]
 * and *number the result's shortest text (PyMem_Free it); 0: not one (the Python path answers
 * it); -1: an error is set. */
static int
plain_parse(const char *s, Py_ssize_t n, Py_ssize_t *id_start, Py_ssize_t *id_end, char **number)
{
    Py_ssize_t fixed = LITERAL_LENGTH(TASK_HEAD) + LITERAL_LENGTH(TASK_MIDDLE)
                       + LITERAL_LENGTH(TASK_TAIL);
    if (n < fixed || memcmp(s, TASK_HEAD, LITERAL_LENGTH(TASK_HEAD)) != 0
        || memcmp(s + n - LITERAL_LENGTH(TASK_TAIL), TASK_TAIL, LITERAL_LENGTH(TASK_TAIL)) != 0) {
        return 0;
    }
    /* The id: printable ASCII without '"' or '\\', up to the first quote. */
    Py_ssize_t p = LITERAL_LENGTH(TASK_HEAD);
    while (p < n && s[p] != '"') {
        unsigned char c = (unsigned char)s[p];
        if (c < 0x20 || c > 0x7e || c == '\\') {
            return 0;
        }
        p++;
    }
    if (n - p < (Py_ssize_t)(LITERAL_LENGTH(TASK_MIDDLE) + LITERAL_LENGTH(TASK_TAIL))
        || memcmp(s + p, TASK_MIDDLE, LITERAL_LENGTH(TASK_MIDDLE)) != 0) {
        return 0;
    }
    Py_ssize_t expression_start = p + LITERAL_LENGTH(TASK_MIDDLE);
    Py_ssize_t expression_length = n - LITERAL_LENGTH(TASK_TAIL) - expression_start;
    if (expression_length > max_expression_bytes) {
        return 0;
    }
    double value;
    int status = evaluate(s + expression_start, expression_length, &value);
    if (status == -2) {
        return -1;
    }
    if (status < 0 || !isfinite(value)) {
        return 0;
    }
    char *text = PyOS_double_to_string(value, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) {
        return -1;
    }
    if (strchr(text, 'e') != NULL) {
        PyMem_Free(text);
        return 0;
    }
    *id_start = LITERAL_LENGTH(TASK_HEAD);
    *id_end = p;
    *number = text;
    return 1;
}

/* The length of the TaskResult payload for an id and a number of these lengths. */
static inline Py_ssize_t
result_length(Py_ssize_t id_length, Py_ssize_t number_length)
{
    return LITERAL_LENGTH(RESULT_HEAD) + id_length + LITERAL_LENGTH(RESULT_MIDDLE) + number_length
           + LITERAL_LENGTH(RESULT_TAIL);
}

/* Write the TaskResult payload at out (result_length bytes); return where it ends. */
static char *
write_result(char *out, const char *id, Py_ssize_t id_length, const char *number,
             Py_ssize_t number_length)
{
    memcpy(out, RESULT_HEAD, LITERAL_LENGTH(RESULT_HEAD));
    out += LITERAL_LENGTH(RESULT_HEAD);
    memcpy(out, id, id_length);
    out += id_length;
    memcpy(out, RESULT_MIDDLE, LITERAL_LENGTH(RESULT_MIDDLE));
    out += LITERAL_LENGTH(RESULT_MIDDLE);
    memcpy(out, number, number_length);
    out += number_length;
    memcpy(out, RESULT_TAIL, LITERAL_LENGTH(RESULT_TAIL));
    return out + LITERAL_LENGTH(RESULT_TAIL);
}

static PyObject *
plain_result(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        Py_RETURN_NONE; /* a mapped segment or a bytearray: never a small plain task */
    }
    const char *s = PyBytes_AS_STRING(arg);
    Py_ssize_t id_start, id_end;
    char *number;
    int status = plain_parse(s, PyBytes_GET_SIZE(arg), &id_start, &id_end, &number);
    if (status <= 0) {
        if (status == 0) {
            Py_RETURN_NONE;
        }
        return NULL;
    }
    Py_ssize_t number_length = (Py_ssize_t)strlen(number);
    PyObject *result = PyBytes_FromStringAndSize(NULL, result_length(id_end - id_start, number_length));
    if (result != NULL) {
        write_result(PyBytes_AS_STRING(result), s + id_start, id_end - id_start, number,
                     number_length);
    }
    PyMem_Free(number);
    return result;
}

/* plain_batch: the progress slot's fields (workers/worker.py, PROGRESS_FIELDS); SKIPPED_FROM
   is written by the Python loop alone, which skips what this loop leaves at the run limit. */
enum {
    STARTED = 0,
    STARTED_AT_NS = 1,
    FINISHED = 2,
    RUN_LIMIT = 3,
    SKIPPED_FROM = 4,
    PROGRESS_FIELDS = 5
};
enum { MAX_BUCKETS = 16 }; /* of a stats histogram: bounds + 1 */

static int64_t
monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now); /* what time.monotonic_ns() reads on Linux */
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static PyObject *
plain_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "plain_batch() takes payloads, start, most, budget_ns, "
                                         "progress, seq, max_result_bytes, bounds, counts");
        return NULL;
    }
    PyObject *payloads = args[0];
    if (!PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "plain_batch(): payloads must be a list");
        return NULL;
    }
    Py_ssize_t start, most, max_result;
    long long budget_ns, seq;
    if (((start = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred())
        || ((most = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred())
        || ((budget_ns = PyLong_AsLongLong(args[3])) == -1 && PyErr_Occurred())
        || ((seq = PyLong_AsLongLong(args[5])) == -1 && PyErr_Occurred())
        || ((max_result = PyLong_AsSsize_t(args[6])) == -1 && PyErr_Occurred())) {
        return NULL;
    }
    if (start < 0 || start > PyList_GET_SIZE(payloads) || most < 0 || seq < 0
        || seq > INT64_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "plain_batch(): start, most or seq out of range");
        return NULL;
    }
    Py_buffer progress, bounds, counts;
    if (PyObject_GetBuffer(args[4], &progress, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[7], &bounds, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&progress);
        return NULL;
    }
    if (PyObject_GetBuffer(args[8], &counts, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&bounds);
        PyBuffer_Release(&progress);
        return NULL;
    }
    PyObject *out = NULL, *answer = NULL;
    Py_ssize_t nbounds = bounds.len / (Py_ssize_t)sizeof(int64_t);
    if (progress.len < PROGRESS_FIELDS * (Py_ssize_t)sizeof(int64_t)
        || ((uintptr_t)progress.buf % sizeof(int64_t)) != 0
        || nbounds + 1 > MAX_BUCKETS
        || counts.len < (nbounds + 1) * (Py_ssize_t)sizeof(int64_t)
        || ((uintptr_t)bounds.buf % sizeof(int64_t)) != 0
        || ((uintptr_t)counts.buf % sizeof(int64_t)) != 0) {
        PyErr_SetString(PyExc_ValueError, "plain_batch(): progress, bounds or counts too short, "
                                          "misaligned for int64 fields, or too many bounds");
        goto done;
    }
    volatile int64_t *slot = (volatile int64_t *)progress.buf;
    const int64_t *bound = (const int64_t *)bounds.buf;
    int64_t *count = (int64_t *)counts.buf;
    /* Added to `count` only once the answer is made: a call that fails leaves no trace. */
    int64_t added[MAX_BUCKETS] = {0};
    const int64_t first_seq = seq;
    const int64_t started_before = slot[STARTED], finished_before = slot[FINISHED];
    /* Every result is at most its task's payload + 8 bytes (see result_length), + its prefix. */
    Py_ssize_t stop = PyList_GET_SIZE(payloads);
    if (stop - start > most) {
        stop = start + most;
    }
    Py_ssize_t capacity = 0;
    for (Py_ssize_t i = start; i < stop; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(payload)) {
            stop = i;
            break;
        }
        capacity += PyBytes_GET_SIZE(payload) + 12;
    }
    out = PyBytes_FromStringAndSize(NULL, capacity);
    if (out == NULL) {
        goto done;
    }
    char *write = PyBytes_AS_STRING(out);
    int64_t total_ns = 0;
    int64_t then = monotonic_ns();
    int64_t deadline = then + (budget_ns > 0 ? budget_ns : 0);
    Py_ssize_t i = start;
    for (; i < stop; i++) {
        if (seq + 1 > slot[RUN_LIMIT]) {
            break; /* a drain: the Python loop skips the rest */
        }
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        const char *s = PyBytes_AS_STRING(payload);
        Py_ssize_t id_start, id_end;
        char *number;
        /* Computed before it is recorded as started: a plain expression takes microseconds at
           most, and one that is not for this path is left unrecorded to the Python loop. */
        int status = plain_parse(s, PyBytes_GET_SIZE(payload), &id_start, &id_end, &number);
        if (status <= 0) {
            if (status < 0) {
                if (i == start) {
                    Py_CLEAR(out);
                    goto done;
                }
                /* Out of memory, say: the tasks before it stand (their results are here and
                   the progress slot says they ran); the caller meets the error on this one. */
                PyErr_Clear();
            }
            break;
        }
        Py_ssize_t number_length = (Py_ssize_t)strlen(number);
        Py_ssize_t length = result_length(id_end - id_start, number_length);
        if (length > max_result || length + 4 > capacity - (write - PyBytes_AS_STRING(out))) {
            PyMem_Free(number);
            break;
        }
        slot[STARTED_AT_NS] = then;
        int64_t expected = seq;
        if (!__atomic_compare_exchange_n(&slot[STARTED], &expected, seq + 1, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST)) {
            /* The supervisor took this task back (compare_and_swap): the Python loop sees it
               too, and skips what was taken. */
            PyMem_Free(number);
            break;
        }
        write[0] = (char)((uint32_t)length >> 24);
        write[1] = (char)((uint32_t)length >> 16);
        write[2] = (char)((uint32_t)length >> 8);
        write[3] = (char)length;
        write = write_result(write + 4, s + id_start, id_end - id_start, number, number_length);
        PyMem_Free(number);
        seq++;
        int64_t now = monotonic_ns();
        slot[FINISHED] = seq;
        int64_t took = now - then;
        then = now;
        total_ns += took;
        Py_ssize_t bucket = 0;
        while (bucket < nbounds && took > bound[bucket]) {
            bucket++;
        }
        added[bucket]++;
        if (now >= deadline) {
            i++;
            break; /* the worker's loop flushes results this often */
        }
    }
    if (_PyBytes_Resize(&out, write - PyBytes_AS_STRING(out)) < 0) {
        goto undo; /* out is NULL now */
    }
    answer = Py_BuildValue("(nNL)", i, out, (long long)total_ns);
    out = NULL; /* the tuple holds it (or it was released on failure) */
    if (answer == NULL) {
        goto undo;
    }
    for (Py_ssize_t b = 0; b <= nbounds; b++) {
        count[b] += added[b];
    }
    goto done;
undo:
    /* Out of memory with the answers lost: the slot says again that these tasks never started
       (started first, so they never look running), and the caller runs them again. */
    if (seq > first_seq) {
        int64_t claimed = seq;
        if (!__atomic_compare_exchange_n(&slot[STARTED], &claimed, started_before, 0,
                                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            /* The supervisor took back the tasks after these meanwhile: they cannot be
               unclaimed, nor answered. Dying is what the supervisor accounts for (it retries
               the started ones, pure Computes, once). */
            Py_FatalError("plain_batch(): out of memory after the supervisor took tasks back");
        }
        slot[FINISHED] = finished_before;
    }
done:
    Py_XDECREF(out);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&bounds);
    PyBuffer_Release(&progress);
    return answer;
}

/* compare_and_swap: one int64 field of a writable buffer shared between processes (a progress
   slot), atomically. */
static PyObject *
compare_and_swap(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "compare_and_swap() takes buffer, index, expected, new");
        return NULL;
    }
    Py_ssize_t index;
    long long expected, replacement;
    if (((index = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred())
        || ((expected = PyLong_AsLongLong(args[2])) == -1 && PyErr_Occurred())
        || ((replacement = PyLong_AsLongLong(args[3])) == -1 && PyErr_Occurred())) {
        return NULL;
    }
    Py_buffer buffer;
    if (PyObject_GetBuffer(args[0], &buffer, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    PyObject *answer = NULL;
    if (index < 0 || index >= buffer.len / (Py_ssize_t)sizeof(int64_t)
        || ((uintptr_t)buffer.buf % sizeof(int64_t)) != 0) {
        PyErr_SetString(PyExc_ValueError, "compare_and_swap(): index out of range, or the buffer "
                                          "is misaligned for int64 fields");
    } else {
        int64_t seen = (int64_t)expected;
        answer = PyBool_FromLong(__atomic_compare_exchange_n(
            (int64_t *)buffer.buf + index, &seen, (int64_t)replacement, 0, __ATOMIC_SEQ_CST,
            __ATOMIC_SEQ_CST));
    }
    PyBuffer_Release(&buffer);
    return answer;
}

static PyObject *
set_max_expression_bytes(PyObject *module, PyObject *arg)
{
    Py_ssize_t limit = PyLong_AsSsize_t(arg);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    max_expression_bytes = limit;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"plain_result", plain_result, METH_O,
     "plain_result(payload) -> bytes | None\n\n"
     "The TaskResult payload of a plain Compute AssignTask payload, or None: the Python path\n"
     "answers it (see workers/_fastpath.c)."},
    {"plain_batch", (PyCFunction)(void (*)(void))plain_batch, METH_FASTCALL,
     "plain_batch(payloads, start, most, budget_ns, progress, seq, max_result_bytes, bounds,\n"
     "            counts)\n"
     "    -> (end, frames, nanoseconds)\n\n"
     "Run the plain Computes of payloads[start:start+most] in order, as the worker's loop runs\n"
     "each (progress slot written per task), until one is not plain or budget_ns passed: see\n"
     "workers/worker.py. Their times are added to counts (per bucket of bounds, at most 15). A\n"
     "call that raises leaves the slot and counts as they were."},
    {"compare_and_swap", (PyCFunction)(void (*)(void))compare_and_swap, METH_FASTCALL,
     "compare_and_swap(buffer, index, expected, new) -> bool\n\n"
     "Atomically: if the int64 field buffer[index] is expected, make it new (True); else\n"
     "leave it (False). For a progress slot shared with another process."},
    {"set_max_expression_bytes", set_max_expression_bytes, METH_O,
     "set_max_expression_bytes(limit: int) -> None\n\n"
     "Expressions longer than this go to the Python path (workers.expr.MAX_EXPRESSION_BYTES)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "workers._fastpath",
    "The worker's hot path in C: plain Compute tasks (see workers/tasks.py).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    return PyModule_Create(&module);
}
