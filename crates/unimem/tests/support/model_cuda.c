/*
 * A model of the CUDA driver API on the CPU, for unimem's tests only. It is not CUDA and
 * proves nothing about a GPU: it lets the CUDA backend's own logic (binding, staging,
 * completion through host functions, events, stream waits, pooled reuse, frees) run where
 * no GPU exists, against the ordering rules of the driver API:
 *
 * - each stream runs its commands in order, on its own thread, after the call returns;
 * - an event completes when the stream reaches the point where it was recorded;
 *   cuStreamWaitEvent holds a stream until then; cuEventSynchronize and
 *   cuStreamSynchronize block the caller; cuEventQuery says whether it has completed;
 * - host functions (cuLaunchHostFunc) and stream callbacks (cuStreamAddCallback) run on the
 *   stream's thread, in order with its other commands;
 * - fresh memory is filled with 0xA5, not zeroed (the driver does not zero it);
 * - calls that need a context fail without a current one (CUDA_ERROR_INVALID_CONTEXT),
 *   and enqueueing on a stream of another context fails (CUDA_ERROR_INVALID_HANDLE);
 * - peer access is a bit per ordered pair of contexts: cuCtxEnablePeerAccess sets it
 *   (CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, 704, where it was set;
 *   CUDA_ERROR_PEER_ACCESS_UNSUPPORTED, 217, for a pair that cuDeviceCanAccessPeer says
 *   cannot), cuCtxDisablePeerAccess clears it (CUDA_ERROR_PEER_ACCESS_NOT_ENABLED, 705,
 *   where it was not set). Copies do not look at it: cuMemcpyPeerAsync needs none;
 * - these abort the process with a message: a device command outside every live
 *   allocation, or on freed memory (or memory whose cuMemFreeAsync is already queued);
 *   freeing memory that is not live (a second free included) or with the wrong call
 *   (cuMemFree on page-locked host memory, cuMemFreeHost on device memory); any use of a
 *   destroyed stream or event (a second destroy included: streams and events are never
 *   freed, so a stale handle is caught rather than followed); any driver call from inside
 *   a host function or stream callback.
 *
 * Fault injection. Every exported cu* function first counts its call and asks whether it
 * must fail instead of working (ENTER):
 *
 *   void unimem_model_fail(const char *call, int nth, int result, int sticky);
 *       From the nth call of `call` on (nth = 1: its next call, counting from now), that
 *       function returns `result` without doing anything, on every call until
 *       unimem_model_clear(). Up to MAX_FAULTS faults at once; where several have come
 *       due for one function, the one set last decides.
 *   void unimem_model_clear(void);
 *       Removes every fault, mends a broken context, zeroes the call counts.
 *   unsigned long long unimem_model_calls(const char *call);
 *       How many times `call` was called since the last clear (failed calls included).
 *
 * and at load time from UNIMEM_MODEL_CUDA_FAULT=call:nth:result[:sticky][,...], for
 * failures during discovery.
 *
 * A sticky fault (sticky = 1) models a sticky context error, such as
 * CUDA_ERROR_ILLEGAL_ADDRESS (700) or CUDA_ERROR_LAUNCH_FAILED (719). Once it has fired,
 * the context is broken (every context: the model keeps one flag) until
 * unimem_model_clear():
 *
 * - every later call that needs a context returns that error and does nothing (a destroy
 *   or free that fails so leaks its handle, as it would on the driver); the calls that
 *   need none still work: cuInit, cuDevice*, cuDevicePrimaryCtx*, cuCtxSetCurrent,
 *   cuCtxGetCurrent, cuDeviceGetDefaultMemPool;
 * - a thread already blocked in cuEventSynchronize, cuStreamSynchronize or
 *   cuCtxSynchronize returns the error when its wait ends;
 * - streams keep moving, so that nothing waiting on them hangs, but every command queued
 *   before the break and reached after it does no work: copies, fills and frees are
 *   dropped, host functions are not called ("the function will not be called in the event
 *   of an error in the CUDA context"), stream waits do not hold, events still complete,
 *   and stream callbacks are still called, with the error as their status. This holds for
 *   such commands even when they are reached after unimem_model_clear().
 *
 * Fault state is one per process: a test that injects faults must not share its process
 * with other tests that use the model.
 *
 * Built by tests/cuda.rs as libcuda.so and found first through LD_LIBRARY_PATH.
 * UNIMEM_MODEL_CUDA_DEVICES sets the number of devices (1 to 4; default 1).
 * UNIMEM_MODEL_CUDA_PEERS sets the topology: the ordered pairs of devices for which
 * cuDeviceCanAccessPeer says yes, as "device>peer" separated by commas ("0>1,1>0,2>3":
 * 0 and 1 reach each other, 2 reaches 3, 3 reaches nobody; "" for no pair at all); unset,
 * every pair of distinct devices can access each other's memory. A malformed value aborts.
 * tests/support/model_faults.rs finds the fault functions at run time.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_READY = 600,
    PEER_ACCESS_UNSUPPORTED = 217,
    PEER_ACCESS_ALREADY_ENABLED = 704,
    PEER_ACCESS_NOT_ENABLED = 705,
    NOT_SUPPORTED = 801,
};

#define MAX_DEVICES 4
#define TOTAL_MEMORY (8ull << 30)
#define ALIGN 256

struct ctx {
    int device;
    int retained;
    unsigned peers_enabled;
    size_t used;
};

static struct ctx contexts[MAX_DEVICES];
static pthread_mutex_t global = PTHREAD_MUTEX_INITIALIZER;
static __thread struct ctx *current;
static __thread int in_host_function;

static void fail(const char *call, const char *what) {
    fprintf(stderr, "model CUDA: %s: %s\n", call, what);
    abort();
}

static int device_count(void) {
    const char *env = getenv("UNIMEM_MODEL_CUDA_DEVICES");
    int n = env ? atoi(env) : 1;
    return n < 1 ? 1 : n > MAX_DEVICES ? MAX_DEVICES : n;
}

/* Whether `device` can access `peer`'s memory: a pair listed in UNIMEM_MODEL_CUDA_PEERS,
 * or any two distinct devices where it is unset. */
static int can_access(int device, int peer) {
    if (device == peer) return 0;
    const char *p = getenv("UNIMEM_MODEL_CUDA_PEERS");
    if (!p) return 1;
    int found = 0;
    while (*p) {
        int from, to, used = 0;
        if (sscanf(p, " %d > %d %n", &from, &to, &used) != 2 || used == 0 || (p[used] && p[used] != ','))
            fail("UNIMEM_MODEL_CUDA_PEERS", "expected ordered pairs such as \"0>1,1>0\"");
        found |= from == device && to == peer;
        p += used;
        if (*p == ',') p++;
    }
    return found;
}

/* ---- fault injection: call counts, injected faults, the sticky error */

#define NAME_BYTES 48 /* the "%47" in faults_from_environment */
#define MAX_NAMES 128
#define MAX_FAULTS 16

struct counter {
    char call[NAME_BYTES];
    unsigned long long calls;
};

struct fault {
    char call[NAME_BYTES];
    unsigned long long from; /* fails from this call count on */
    CUresult result;
    int sticky;
};

static pthread_mutex_t faults_lock = PTHREAD_MUTEX_INITIALIZER;
static struct counter counters[MAX_NAMES];
static int n_counters;
static struct fault faults[MAX_FAULTS];
static int n_faults;
static CUresult broken;     /* the sticky error while the context is broken, else OK */
static unsigned breaks;     /* how many times it broke, ever (not reset by a clear) */
static CUresult last_break; /* the error of the latest break */

/* The counter of `call`, made on first use. Call with faults_lock held. */
static struct counter *counter(const char *call) {
    for (int i = 0; i < n_counters; i++)
        if (strcmp(counters[i].call, call) == 0) return &counters[i];
    if (strlen(call) >= NAME_BYTES) fail(call, "a function name too long for the model's fault table");
    if (n_counters == MAX_NAMES) fail(call, "more function names than the model's fault table holds");
    struct counter *c = &counters[n_counters++];
    snprintf(c->call, sizeof c->call, "%s", call);
    c->calls = 0;
    return c;
}

/* Counts a call of `call` and says what it must return instead of working: the sticky
 * error once the context is broken (if the call needs a context), or an injected fault
 * that has come due (which breaks the context if it is sticky); OK to go on. */
static CUresult hook(const char *call, int needs_context) {
    pthread_mutex_lock(&faults_lock);
    unsigned long long n = ++counter(call)->calls;
    CUresult r = needs_context ? broken : OK;
    for (int i = n_faults - 1; i >= 0 && r == OK; i--) { /* the latest fault set wins */
        if (n < faults[i].from || strcmp(faults[i].call, call) != 0) continue;
        r = faults[i].result;
        if (faults[i].sticky && broken == OK) {
            broken = last_break = r;
            breaks++;
        }
    }
    pthread_mutex_unlock(&faults_lock);
    return r;
}

static unsigned breaks_so_far(void) {
    pthread_mutex_lock(&faults_lock);
    unsigned b = breaks;
    pthread_mutex_unlock(&faults_lock);
    return b;
}

/* The sticky error if the context is broken now, or broke after `then` (breaks_so_far()
 * when a command was queued); else OK. */
static CUresult broken_since(unsigned then) {
    pthread_mutex_lock(&faults_lock);
    CUresult r = broken != OK ? broken : breaks != then ? last_break : OK;
    pthread_mutex_unlock(&faults_lock);
    return r;
}

/* The sticky error while the context is broken, else OK. */
static CUresult sticky_error(void) {
    pthread_mutex_lock(&faults_lock);
    CUresult r = broken;
    pthread_mutex_unlock(&faults_lock);
    return r;
}

void unimem_model_fail(const char *call, int nth, int result, int sticky) {
    if (!call || nth < 1 || result == OK) fail("unimem_model_fail", "needs a function name, nth >= 1 and an error");
    pthread_mutex_lock(&faults_lock);
    if (n_faults == MAX_FAULTS) fail("unimem_model_fail", "more faults at once than the model's table holds");
    struct fault *f = &faults[n_faults++];
    snprintf(f->call, sizeof f->call, "%s", call);
    f->from = counter(call)->calls + (unsigned)nth;
    f->result = result;
    f->sticky = sticky != 0;
    pthread_mutex_unlock(&faults_lock);
}

void unimem_model_clear(void) {
    pthread_mutex_lock(&faults_lock);
    n_faults = 0;
    n_counters = 0;
    broken = OK;
    pthread_mutex_unlock(&faults_lock);
}

unsigned long long unimem_model_calls(const char *call) {
    pthread_mutex_lock(&faults_lock);
    unsigned long long n = counter(call)->calls;
    pthread_mutex_unlock(&faults_lock);
    return n;
}

/* UNIMEM_MODEL_CUDA_FAULT=call:nth:result[:sticky][,call:nth:result[:sticky]...] */
__attribute__((constructor)) static void faults_from_environment(void) {
    const char *p = getenv("UNIMEM_MODEL_CUDA_FAULT");
    while (p && *p) {
        char call[NAME_BYTES];
        int nth, result, sticky = 0, used = 0;
        if (sscanf(p, "%47[^:,]:%d:%d%n:%d%n", call, &nth, &result, &used, &sticky, &used) < 3 ||
            (p[used] != ',' && p[used] != '\0'))
            fail("UNIMEM_MODEL_CUDA_FAULT", "expected call:nth:result[:sticky], comma-separated");
        unimem_model_fail(call, nth, result, sticky);
        p += used + (p[used] == ',');
    }
}

/* At the start of every exported cu* function. */
#define ENTER_WITH(needs_context)                                                              \
    do {                                                                                       \
        if (in_host_function) fail(__func__, "called from a host function or stream callback"); \
        CUresult injected_ = hook(__func__, needs_context);                                    \
        if (injected_ != OK) return injected_;                                                 \
    } while (0)
#define ENTER() ENTER_WITH(1)        /* a call that needs a context */
#define ENTER_DEVICE() ENTER_WITH(0) /* a call that works in a broken context */

/* ---- allocations: a registry of live ranges, so that every device command is checked */

struct allocation {
    uintptr_t start;
    size_t bytes;
    struct ctx *owner; /* NULL for page-locked host memory */
    int freeing;       /* a cuMemFreeAsync of it is queued */
    struct allocation *next;
};

static struct allocation *live;

static void *allocate(size_t bytes, struct ctx *owner) {
    if (bytes == 0) return NULL;
    if (owner && owner->used + bytes > TOTAL_MEMORY) return NULL;
    void *p = aligned_alloc(ALIGN, (bytes + ALIGN - 1) / ALIGN * ALIGN);
    if (!p) return NULL;
    memset(p, 0xA5, bytes);
    struct allocation *a = calloc(1, sizeof *a);
    a->start = (uintptr_t)p;
    a->bytes = bytes;
    a->owner = owner;
    pthread_mutex_lock(&global);
    a->next = live;
    live = a;
    if (owner) owner->used += bytes;
    pthread_mutex_unlock(&global);
    return p;
}

/* Marks the allocation that starts at `start` as being freed; aborts unless it is live,
 * not already being freed, and of the kind (`host` or device) that `call` frees. */
static void claim_free(const char *call, uintptr_t start, int host) {
    pthread_mutex_lock(&global);
    struct allocation *a = live;
    while (a && a->start != start) a = a->next;
    const char *wrong = !a || a->freeing ? "freeing memory that is not live (never allocated, freed, or its free queued)"
                        : (a->owner == NULL) == host ? NULL
                        : host                       ? "freeing device memory as page-locked host memory"
                                                     : "freeing page-locked host memory as device memory";
    if (!wrong) a->freeing = 1;
    pthread_mutex_unlock(&global);
    if (wrong) fail(call, wrong);
}

/* Frees an allocation claimed by claim_free. */
static void release(uintptr_t start) {
    pthread_mutex_lock(&global);
    struct allocation **a = &live;
    while (*a && (*a)->start != start) a = &(*a)->next;
    struct allocation *gone = *a;
    *a = gone->next;
    if (gone->owner) gone->owner->used -= gone->bytes;
    pthread_mutex_unlock(&global);
    free((void *)start);
    free(gone);
}

/* Aborts unless [p, p + n) lies inside one live allocation. Memory whose cuMemFreeAsync is
 * queued counts as live only for a command that was queued before that free (`queued`). */
static void check_range(const char *call, uintptr_t p, size_t n, int queued) {
    pthread_mutex_lock(&global);
    for (struct allocation *a = live; a; a = a->next) {
        if (p >= a->start && p - a->start <= a->bytes && n <= a->bytes - (p - a->start) && (queued || !a->freeing)) {
            pthread_mutex_unlock(&global);
            return;
        }
    }
    pthread_mutex_unlock(&global);
    fail(call, "a device range outside every live allocation (freed, or out of bounds)");
}

/* ---- events and streams */

/* Events, like streams, are never freed: a destroyed one is kept, marked, so that a later
 * use of its handle (a second destroy included) is caught rather than followed. */
struct event {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct ctx *ctx;
    unsigned long long recorded, completed;
    int destroyed;
};

/* Aborts if `e` was destroyed. */
static void check_event(const char *call, struct event *e) {
    pthread_mutex_lock(&e->lock);
    int destroyed = e->destroyed;
    pthread_mutex_unlock(&e->lock);
    if (destroyed) fail(call, "an event used after cuEventDestroy (a second destroy included)");
}

static void complete(struct event *e, unsigned long long generation) {
    pthread_mutex_lock(&e->lock);
    if (e->completed < generation) e->completed = generation;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
}

enum kind { COPY, SET8, SET32, HOST_FUNCTION, CALLBACK, RECORD, WAIT, FREE };

struct stream;

struct op {
    enum kind kind;
    void *dst;
    const void *src;
    size_t n;
    unsigned value;
    void (*fn)(void *);
    void (*callback)(struct stream *, CUresult, void *);
    struct stream *stream;
    void *data;
    struct event *event;
    unsigned long long generation;
    const char *call;
    int check_dst, check_src;
    unsigned breaks; /* breaks_so_far() when queued */
    struct op *next;
};

struct stream {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct op *head, *tail;
    unsigned long long submitted, done;
    int destroyed;
    struct ctx *ctx;
    struct stream *next_stream;
};

/* Streams are never freed (a destroyed one drains and its thread ends), so that
 * cuCtxSynchronize can walk them and a stale handle is caught. */
static struct stream *streams;

static void call_host(struct op *op, CUresult status) {
    in_host_function = 1;
    if (op->kind == HOST_FUNCTION) op->fn(op->data);
    else op->callback(op->stream, status, op->data);
    in_host_function = 0;
}

/* A command reached after the context broke: the stream moves on, so that nothing waiting
 * on it hangs, but does no work. Copies, fills, frees and host functions are dropped; a
 * wait does not hold; an event still completes; a stream callback is called with the
 * error (as the driver does). */
static void run_broken(struct op *op, CUresult status) {
    if (op->kind == RECORD) complete(op->event, op->generation);
    if (op->kind == CALLBACK) call_host(op, status);
}

static void run(struct op *op) {
    CUresult status = broken_since(op->breaks);
    if (status != OK) {
        run_broken(op, status);
        return;
    }
    /* Checked again when the stream gets there: the memory may have been freed since. */
    if (op->check_dst) check_range(op->call, (uintptr_t)op->dst, op->kind == SET32 ? op->n * 4 : op->n, 1);
    if (op->check_src) check_range(op->call, (uintptr_t)op->src, op->n, 1);
    switch (op->kind) {
    case COPY: memcpy(op->dst, op->src, op->n); break;
    case SET8: memset(op->dst, (int)op->value, op->n); break;
    case SET32:
        for (size_t i = 0; i < op->n; i++) ((unsigned *)op->dst)[i] = op->value;
        break;
    case HOST_FUNCTION:
    case CALLBACK: call_host(op, OK); break;
    case RECORD: complete(op->event, op->generation); break;
    case WAIT:
        pthread_mutex_lock(&op->event->lock);
        while (op->event->completed < op->generation) pthread_cond_wait(&op->event->cond, &op->event->lock);
        pthread_mutex_unlock(&op->event->lock);
        break;
    case FREE: release((uintptr_t)op->dst); break;
    }
}

static void *worker(void *arg) {
    struct stream *s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->head && !s->destroyed) pthread_cond_wait(&s->cond, &s->lock);
        if (!s->head) break;
        struct op *op = s->head;
        pthread_mutex_unlock(&s->lock);
        run(op);
        pthread_mutex_lock(&s->lock);
        s->head = op->next;
        if (!s->head) s->tail = NULL;
        s->done++;
        pthread_cond_broadcast(&s->cond);
        free(op);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* Aborts if `s` was destroyed. */
static void check_stream(const char *call, struct stream *s) {
    pthread_mutex_lock(&s->lock);
    int destroyed = s->destroyed;
    pthread_mutex_unlock(&s->lock);
    if (destroyed) fail(call, "a stream used after cuStreamDestroy (a second destroy included)");
}

/* Checks that `s` is a live stream of the current context, for an enqueueing call. */
static CUresult usable(const char *call, struct stream *s) {
    if (!current) return INVALID_CONTEXT;
    if (!s) return INVALID_HANDLE;
    check_stream(call, s);
    return s->ctx == current ? OK : INVALID_HANDLE;
}

static void enqueue(struct stream *s, struct op op) {
    struct op *o = malloc(sizeof *o);
    *o = op;
    o->breaks = breaks_so_far();
    o->next = NULL;
    pthread_mutex_lock(&s->lock);
    if (s->tail) s->tail->next = o; else s->head = o;
    s->tail = o;
    s->submitted++;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

static void drain(struct stream *s) {
    pthread_mutex_lock(&s->lock);
    unsigned long long target = s->submitted;
    while (s->done < target) pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

/* ---- initialisation, devices, contexts */

CUresult cuInit(unsigned flags) { (void)flags; ENTER_DEVICE(); return OK; }

CUresult cuDeviceGetCount(int *count) { ENTER_DEVICE(); *count = device_count(); return OK; }

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    ENTER_DEVICE();
    if (ordinal < 0 || ordinal >= device_count()) return INVALID_VALUE;
    *device = ordinal;
    return OK;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    ENTER_DEVICE();
    snprintf(name, (size_t)len, "unimem model CUDA device %d (CPU, not a GPU)", device);
    return OK;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) {
    (void)device;
    ENTER_DEVICE();
    *bytes = TOTAL_MEMORY;
    return OK;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    (void)device;
    ENTER_DEVICE();
    /* MANAGED_MEMORY, CONCURRENT_MANAGED_ACCESS, MEMORY_POOLS_SUPPORTED */
    *value = attribute == 83 || attribute == 89 || attribute == 115;
    return OK;
}

CUresult cuDeviceCanAccessPeer(int *can, CUdevice device, CUdevice peer) {
    ENTER_DEVICE();
    *can = can_access(device, peer);
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(struct ctx **ctx, CUdevice device) {
    ENTER_DEVICE();
    if (device < 0 || device >= device_count()) return INVALID_VALUE;
    pthread_mutex_lock(&global);
    contexts[device].device = device;
    contexts[device].retained++;
    pthread_mutex_unlock(&global);
    *ctx = &contexts[device];
    return OK;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    ENTER_DEVICE();
    pthread_mutex_lock(&global);
    CUresult r = contexts[device].retained > 0 ? (contexts[device].retained--, OK) : INVALID_CONTEXT;
    pthread_mutex_unlock(&global);
    return r;
}

CUresult cuCtxSetCurrent(struct ctx *ctx) { ENTER_DEVICE(); current = ctx; return OK; }

CUresult cuCtxGetCurrent(struct ctx **ctx) { ENTER_DEVICE(); *ctx = current; return OK; }

CUresult cuCtxSynchronize(void) {
    ENTER();
    if (!current) return INVALID_CONTEXT;
    pthread_mutex_lock(&global);
    struct stream *first = streams;
    pthread_mutex_unlock(&global);
    for (struct stream *s = first; s; s = s->next_stream)
        if (s->ctx == current) drain(s);
    return sticky_error(); /* the context may have broken while we waited */
}

CUresult cuCtxEnablePeerAccess(struct ctx *peer, unsigned flags) {
    ENTER();
    if (!current) return INVALID_CONTEXT;
    if (flags != 0 || !peer || peer == current) return INVALID_VALUE;
    if (!can_access(current->device, peer->device)) return PEER_ACCESS_UNSUPPORTED;
    pthread_mutex_lock(&global);
    unsigned bit = 1u << peer->device;
    CUresult r = current->peers_enabled & bit ? PEER_ACCESS_ALREADY_ENABLED : OK;
    current->peers_enabled |= bit;
    pthread_mutex_unlock(&global);
    return r;
}

CUresult cuCtxDisablePeerAccess(struct ctx *peer) {
    ENTER();
    if (!current) return INVALID_CONTEXT;
    if (!peer || peer == current) return INVALID_VALUE;
    pthread_mutex_lock(&global);
    unsigned bit = 1u << peer->device;
    CUresult r = current->peers_enabled & bit ? OK : PEER_ACCESS_NOT_ENABLED;
    current->peers_enabled &= ~bit;
    pthread_mutex_unlock(&global);
    return r;
}

/* ---- streams and events */

CUresult cuStreamCreate(struct stream **out, unsigned flags) {
    (void)flags;
    ENTER();
    if (!current) return INVALID_CONTEXT;
    struct stream *s = calloc(1, sizeof *s);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->ctx = current;
    pthread_t thread;
    if (pthread_create(&thread, NULL, worker, s) != 0) return OUT_OF_MEMORY;
    pthread_detach(thread);
    pthread_mutex_lock(&global);
    s->next_stream = streams;
    streams = s;
    pthread_mutex_unlock(&global);
    *out = s;
    return OK;
}

CUresult cuStreamDestroy_v2(struct stream *s) {
    ENTER();
    if (!s) return INVALID_HANDLE;
    check_stream(__func__, s);
    pthread_mutex_lock(&s->lock);
    s->destroyed = 1; /* the queued work still runs, then the thread ends */
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return OK;
}

CUresult cuStreamSynchronize(struct stream *s) {
    ENTER();
    if (!s) return INVALID_HANDLE;
    check_stream(__func__, s);
    drain(s);
    return sticky_error();
}

CUresult cuEventCreate(struct event **out, unsigned flags) {
    (void)flags;
    ENTER();
    if (!current) return INVALID_CONTEXT;
    struct event *e = calloc(1, sizeof *e);
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    e->ctx = current;
    *out = e;
    return OK;
}

CUresult cuEventRecord(struct event *e, struct stream *s) {
    ENTER();
    CUresult r = usable(__func__, s);
    if (r != OK) return r;
    if (!e) return INVALID_HANDLE;
    check_event(__func__, e);
    if (e->ctx != s->ctx) return INVALID_HANDLE;
    pthread_mutex_lock(&e->lock);
    unsigned long long generation = ++e->recorded;
    pthread_mutex_unlock(&e->lock);
    enqueue(s, (struct op){ .kind = RECORD, .event = e, .generation = generation });
    return OK;
}

/* The stream waits for the event's latest record before it was called (a record of another
 * context's event included), not for later ones. */
CUresult cuStreamWaitEvent(struct stream *s, struct event *e, unsigned flags) {
    ENTER();
    if (!s || !e || flags != 0) return INVALID_HANDLE;
    check_stream(__func__, s);
    check_event(__func__, e);
    pthread_mutex_lock(&e->lock);
    unsigned long long generation = e->recorded;
    int pending = e->completed < generation;
    pthread_mutex_unlock(&e->lock);
    if (pending) enqueue(s, (struct op){ .kind = WAIT, .event = e, .generation = generation });
    return OK;
}

CUresult cuEventSynchronize(struct event *e) {
    ENTER();
    if (!e) return INVALID_HANDLE;
    check_event(__func__, e);
    pthread_mutex_lock(&e->lock);
    unsigned long long target = e->recorded;
    while (e->completed < target) pthread_cond_wait(&e->cond, &e->lock);
    pthread_mutex_unlock(&e->lock);
    return sticky_error();
}

/* CUDA_SUCCESS once the stream has reached the event's latest record (or it was never
 * recorded), CUDA_ERROR_NOT_READY before. */
CUresult cuEventQuery(struct event *e) {
    ENTER();
    if (!e) return INVALID_HANDLE;
    check_event(__func__, e);
    pthread_mutex_lock(&e->lock);
    CUresult r = e->completed < e->recorded ? NOT_READY : OK;
    pthread_mutex_unlock(&e->lock);
    return r;
}

/* Allowed while the event's records and waits are still queued: they still work. */
CUresult cuEventDestroy_v2(struct event *e) {
    ENTER();
    if (!e) return INVALID_HANDLE;
    check_event(__func__, e);
    pthread_mutex_lock(&e->lock);
    e->destroyed = 1;
    pthread_mutex_unlock(&e->lock);
    return OK;
}

CUresult cuLaunchHostFunc(struct stream *s, void (*fn)(void *), void *data) {
    ENTER();
    CUresult r = usable(__func__, s);
    if (r != OK) return r;
    if (!fn) return INVALID_VALUE;
    enqueue(s, (struct op){ .kind = HOST_FUNCTION, .fn = fn, .data = data });
    return OK;
}

/* Like a host function, but also called after the context broke, with the error as
 * `status`; flags must be 0. */
CUresult cuStreamAddCallback(struct stream *s, void (*callback)(struct stream *, CUresult, void *), void *data,
                             unsigned flags) {
    ENTER();
    CUresult r = usable(__func__, s);
    if (r != OK) return r;
    if (!callback || flags != 0) return INVALID_VALUE;
    enqueue(s, (struct op){ .kind = CALLBACK, .callback = callback, .stream = s, .data = data });
    return OK;
}

/* ---- memory */

static CUresult allocate_device(CUdeviceptr *out, size_t bytes) {
    if (!current) return INVALID_CONTEXT;
    void *p = allocate(bytes, current);
    if (!p) return bytes ? OUT_OF_MEMORY : INVALID_VALUE;
    *out = (CUdeviceptr)(uintptr_t)p;
    return OK;
}

CUresult cuMemAlloc_v2(CUdeviceptr *out, size_t bytes) { ENTER(); return allocate_device(out, bytes); }

CUresult cuMemFree_v2(CUdeviceptr p) {
    ENTER();
    if (!p) return INVALID_VALUE;
    claim_free(__func__, (uintptr_t)p, 0);
    release((uintptr_t)p);
    return OK;
}

CUresult cuDeviceGetDefaultMemPool(void **pool, CUdevice device) {
    ENTER_DEVICE();
    *pool = &contexts[device];
    return OK;
}

CUresult cuMemPoolSetAttribute(void *pool, int attribute, void *value) {
    (void)pool, (void)attribute, (void)value;
    ENTER();
    return OK;
}

CUresult cuMemPoolTrimTo(void *pool, size_t keep) { (void)pool, (void)keep; ENTER(); return OK; }

CUresult cuMemAllocFromPoolAsync(CUdeviceptr *out, size_t bytes, void *pool, struct stream *s) {
    ENTER();
    CUresult r = usable(__func__, s);
    if (r != OK) return r;
    if (pool != current) return INVALID_VALUE;
    return allocate_device(out, bytes);
}

CUresult cuMemFreeAsync(CUdeviceptr p, struct stream *s) {
    ENTER();
    CUresult r = usable(__func__, s);
    if (r != OK) return r;
    claim_free(__func__, (uintptr_t)p, 0);
    enqueue(s, (struct op){ .kind = FREE, .dst = (void *)(uintptr_t)p });
    return OK;
}

CUresult cuMemHostAlloc(void **out, size_t bytes, unsigned flags) {
    (void)flags;
    ENTER();
    if (!current) return INVALID_CONTEXT;
    *out = allocate(bytes, NULL);
    return *out ? OK : bytes ? OUT_OF_MEMORY : INVALID_VALUE;
}

CUresult cuMemFreeHost(void *p) {
    ENTER();
    if (!p) return INVALID_VALUE;
    claim_free(__func__, (uintptr_t)p, 1);
    release((uintptr_t)p);
    return OK;
}

CUresult cuMemAllocManaged(CUdeviceptr *out, size_t bytes, unsigned flags) {
    (void)flags;
    ENTER();
    return allocate_device(out, bytes);
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    ENTER();
    if (!current) return INVALID_CONTEXT;
    pthread_mutex_lock(&global);
    *free_bytes = TOTAL_MEMORY - current->used;
    pthread_mutex_unlock(&global);
    *total = TOTAL_MEMORY;
    return OK;
}

typedef struct { int type; int id; } CUmemLocation;

CUresult cuMemPrefetchAsync_v2(CUdeviceptr p, size_t n, CUmemLocation to, unsigned flags, struct stream *s) {
    (void)to;
    ENTER();
    CUresult r = usable(__func__, s);
    if (r != OK) return r;
    if (flags != 0) return INVALID_VALUE;
    check_range(__func__, (uintptr_t)p, n, 0);
    return OK;
}

/* A copy, once its function has passed ENTER. */
static CUresult copy(const char *call, void *dst, const void *src, size_t n, struct stream *s, int check_dst,
                     int check_src) {
    CUresult r = usable(call, s);
    if (r != OK) return r;
    if (check_dst) check_range(call, (uintptr_t)dst, n, 0);
    if (check_src) check_range(call, (uintptr_t)src, n, 0);
    enqueue(s, (struct op){ .kind = COPY, .dst = dst, .src = src, .n = n, .call = call, .check_dst = check_dst,
                            .check_src = check_src });
    return OK;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, struct stream *s) {
    ENTER();
    return copy(__func__, (void *)(uintptr_t)dst, src, n, s, 1, 0);
}

CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, struct stream *s) {
    ENTER();
    return copy(__func__, dst, (const void *)(uintptr_t)src, n, s, 0, 1);
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, struct stream *s) {
    ENTER();
    return copy(__func__, (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, s, 1, 1);
}

CUresult cuMemcpyPeerAsync(CUdeviceptr dst, struct ctx *dst_ctx, CUdeviceptr src, struct ctx *src_ctx, size_t n,
                           struct stream *s) {
    ENTER();
    if (!dst_ctx || !src_ctx) return INVALID_CONTEXT;
    return copy(__func__, (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, s, 1, 1);
}

CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char value, size_t n, struct stream *s) {
    ENTER();
    CUresult r = usable(__func__, s);
    if (r != OK) return r;
    check_range(__func__, (uintptr_t)p, n, 0);
    enqueue(s, (struct op){ .kind = SET8, .dst = (void *)(uintptr_t)p, .value = value, .n = n,
                            .call = __func__, .check_dst = 1 });
    return OK;
}

CUresult cuMemsetD32Async(CUdeviceptr p, unsigned value, size_t n, struct stream *s) {
    ENTER();
    CUresult r = usable(__func__, s);
    if (r != OK) return r;
    if (n > SIZE_MAX / 4) return INVALID_VALUE;
    check_range(__func__, (uintptr_t)p, n * 4, 0);
    enqueue(s, (struct op){ .kind = SET32, .dst = (void *)(uintptr_t)p, .value = value, .n = n,
                            .call = __func__, .check_dst = 1 });
    return OK;
}

/* The model runs no kernels: loading a module is refused, so that code that would launch
 * one (the `cuda_kernel` example) takes its kernel-free path. */
CUresult cuModuleLoadData(void **module, const void *image) {
    (void)module;
    (void)image;
    ENTER();
    return NOT_SUPPORTED;
}

/* Error strings, as cudarc's `DriverError` formats them. */
CUresult cuGetErrorString(int error, const char **text) {
    switch (error) {
    case OK: *text = "no error"; break;
    case INVALID_VALUE: *text = "invalid argument"; break;
    case OUT_OF_MEMORY: *text = "out of memory"; break;
    case INVALID_CONTEXT: *text = "invalid device context"; break;
    case NOT_SUPPORTED: *text = "operation not supported (the unimem model driver runs no kernels)"; break;
    default: *text = "error (unimem model driver)"; break;
    }
    return OK;
}
