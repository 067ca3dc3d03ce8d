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

static PyObject *
plain_result(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        Py_RETURN_NONE; /* a mapped segment or a bytearray: never a small plain task */
    }
    const char *s = PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    Py_ssize_t fixed = LITERAL_LENGTH(TASK_HEAD) + LITERAL_LENGTH(TASK_MIDDLE)
                       + LITERAL_LENGTH(TASK_TAIL);
    if (n < fixed || memcmp(s, TASK_HEAD, LITERAL_LENGTH(TASK_HEAD)) != 0
        || memcmp(s + n - LITERAL_LENGTH(TASK_TAIL), TASK_TAIL, LITERAL_LENGTH(TASK_TAIL)) != 0) {
        Py_RETURN_NONE;
    }
    /* The id: printable ASCII without '"' or '\\', up to the first quote. */
    Py_ssize_t id_start = LITERAL_LENGTH(TASK_HEAD);
    Py_ssize_t p = id_start;
    while (p < n && s[p] != '"') {
        unsigned char c = (unsigned char)s[p];
        if (c < 0x20 || c > 0x7e || c == '\\') {
            Py_RETURN_NONE;
        }
        p++;
    }
    Py_ssize_t id_end = p;
    if (n - id_end < (Py_ssize_t)(LITERAL_LENGTH(TASK_MIDDLE) + LITERAL_LENGTH(TASK_TAIL))
        || memcmp(s + id_end, TASK_MIDDLE, LITERAL_LENGTH(TASK_MIDDLE)) != 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t expression_start = id_end + LITERAL_LENGTH(TASK_MIDDLE);
    Py_ssize_t expression_length = n - LITERAL_LENGTH(TASK_TAIL) - expression_start;
    if (expression_length > max_expression_bytes) {
        Py_RETURN_NONE;
    }
    double value;
    int status = evaluate(s + expression_start, expression_length, &value);
    if (status == -2) {
        return NULL;
    }
    if (status < 0 || !isfinite(value)) {
        Py_RETURN_NONE;
    }
    char *number = PyOS_double_to_string(value, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (number == NULL) {
        return NULL;
    }
    if (strchr(number, 'e') != NULL) {
        PyMem_Free(number);
        Py_RETURN_NONE;
    }
    Py_ssize_t number_length = (Py_ssize_t)strlen(number);
    Py_ssize_t id_length = id_end - id_start;
    PyObject *result = PyBytes_FromStringAndSize(
        NULL, LITERAL_LENGTH(RESULT_HEAD) + id_length + LITERAL_LENGTH(RESULT_MIDDLE)
                  + number_length + LITERAL_LENGTH(RESULT_TAIL));
    if (result == NULL) {
        PyMem_Free(number);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(result);
    memcpy(out, RESULT_HEAD, LITERAL_LENGTH(RESULT_HEAD));
    out += LITERAL_LENGTH(RESULT_HEAD);
    memcpy(out, s + id_start, id_length);
    out += id_length;
    memcpy(out, RESULT_MIDDLE, LITERAL_LENGTH(RESULT_MIDDLE));
    out += LITERAL_LENGTH(RESULT_MIDDLE);
    memcpy(out, number, number_length);
    out += number_length;
    memcpy(out, RESULT_TAIL, LITERAL_LENGTH(RESULT_TAIL));
    PyMem_Free(number);
    return result;
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
