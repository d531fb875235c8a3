/*
 * A model of the CUDA driver API on the CPU, for unimem's tests only. It is not CUDA and
 * proves nothing about a GPU: it lets the CUDA backend's own logic (binding, staging,
 * completion through host functions, events, stream waits, pooled reuse, frees) run where
 * no GPU exists, against the ordering rules of the driver API:
 *
 * - each stream runs its commands in order, on its own thread, after the call returns;
 * - an event completes when the stream reaches the point where it was recorded;
 *   cuStreamWaitEvent holds a stream until then; cuEventSynchronize and
 *   cuStreamSynchronize block the caller;
 * - fresh memory is filled with 0xA5, not zeroed (the driver does not zero it);
 * - calls that need a context fail without a current one (CUDA_ERROR_INVALID_CONTEXT),
 *   and enqueueing on a stream of another context fails (CUDA_ERROR_INVALID_HANDLE);
 * - a device command outside every live allocation, or on freed memory, and any driver
 *   call from inside a host function, abort the process with a message.
 *
 * Built by tests/cuda.rs as libcuda.so and found first through LD_LIBRARY_PATH.
 * UNIMEM_MODEL_CUDA_DEVICES sets the number of devices (1 to 4; default 1); every pair
 * of devices can access each other's memory.
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
    PEER_ACCESS_ALREADY_ENABLED = 704,
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

#define ENTER()                                                        \
    do {                                                               \
        if (in_host_function) fail(__func__, "called from a host function"); \
    } while (0)

static int device_count(void) {
    const char *env = getenv("UNIMEM_MODEL_CUDA_DEVICES");
    int n = env ? atoi(env) : 1;
    return n < 1 ? 1 : n > MAX_DEVICES ? MAX_DEVICES : n;
}

/* ---- allocations: a registry of live ranges, so that every device command is checked */

struct allocation {
    uintptr_t start;
    size_t bytes;
    struct ctx *owner;
    struct allocation *next;
};

static struct allocation *live;

static void *allocate(size_t bytes, struct ctx *owner) {
    if (bytes == 0) return NULL;
    if (owner && owner->used + bytes > TOTAL_MEMORY) return NULL;
    void *p = aligned_alloc(ALIGN, (bytes + ALIGN - 1) / ALIGN * ALIGN);
    if (!p) return NULL;
    memset(p, 0xA5, bytes);
    struct allocation *a = malloc(sizeof *a);
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

static int release(uintptr_t start) {
    pthread_mutex_lock(&global);
    for (struct allocation **a = &live; *a; a = &(*a)->next) {
        if ((*a)->start == start) {
            struct allocation *gone = *a;
            *a = gone->next;
            if (gone->owner) gone->owner->used -= gone->bytes;
            pthread_mutex_unlock(&global);
            free((void *)start);
            free(gone);
            return OK;
        }
    }
    pthread_mutex_unlock(&global);
    return INVALID_VALUE;
}

/* Aborts unless [p, p + n) lies inside one live allocation. */
static void check_range(const char *call, uintptr_t p, size_t n) {
    pthread_mutex_lock(&global);
    for (struct allocation *a = live; a; a = a->next) {
        if (p >= a->start && p - a->start <= a->bytes && n <= a->bytes - (p - a->start)) {
            pthread_mutex_unlock(&global);
            return;
        }
    }
    pthread_mutex_unlock(&global);
    fail(call, "a device range outside every live allocation (freed, or out of bounds)");
}

/* ---- events and streams */

struct event {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct ctx *ctx;
    unsigned long long recorded, completed;
    int refs;
};

static void event_unref(struct event *e) {
    pthread_mutex_lock(&e->lock);
    int left = --e->refs;
    pthread_mutex_unlock(&e->lock);
    if (left == 0) {
        pthread_mutex_destroy(&e->lock);
        pthread_cond_destroy(&e->cond);
        free(e);
    }
}

enum kind { COPY, SET8, SET32, HOST_FUNCTION, RECORD, WAIT, FREE };

struct op {
    enum kind kind;
    void *dst;
    const void *src;
    size_t n;
    unsigned value;
    void (*fn)(void *);
    void *data;
    struct event *event;
    unsigned long long generation;
    const char *call;
    int check_dst, check_src;
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
 * cuCtxSynchronize can walk them. */
static struct stream *streams;

static void run(struct op *op) {
    /* Checked again when the stream gets there: the memory may have been freed since. */
    if (op->check_dst) check_range(op->call, (uintptr_t)op->dst, op->kind == SET32 ? op->n * 4 : op->n);
    if (op->check_src) check_range(op->call, (uintptr_t)op->src, op->n);
    switch (op->kind) {
    case COPY: memcpy(op->dst, op->src, op->n); break;
    case SET8: memset(op->dst, (int)op->value, op->n); break;
    case SET32:
        for (size_t i = 0; i < op->n; i++) ((unsigned *)op->dst)[i] = op->value;
        break;
    case HOST_FUNCTION:
        in_host_function = 1;
        op->fn(op->data);
        in_host_function = 0;
        break;
    case RECORD:
        pthread_mutex_lock(&op->event->lock);
        if (op->event->completed < op->generation) op->event->completed = op->generation;
        pthread_cond_broadcast(&op->event->cond);
        pthread_mutex_unlock(&op->event->lock);
        event_unref(op->event);
        break;
    case WAIT:
        pthread_mutex_lock(&op->event->lock);
        while (op->event->completed < op->generation) pthread_cond_wait(&op->event->cond, &op->event->lock);
        pthread_mutex_unlock(&op->event->lock);
        event_unref(op->event);
        break;
    case FREE:
        if (release((uintptr_t)op->dst) != OK) fail("cuMemFreeAsync", "freeing memory that is not allocated");
        break;
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

/* Checks that `s` is a live stream of the current context, for an enqueueing call. */
static CUresult usable(struct stream *s) {
    if (!current) return INVALID_CONTEXT;
    if (!s || s->destroyed || s->ctx != current) return INVALID_HANDLE;
    return OK;
}

static void enqueue(struct stream *s, struct op op) {
    struct op *o = malloc(sizeof *o);
    *o = op;
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

CUresult cuInit(unsigned flags) { (void)flags; ENTER(); return OK; }

CUresult cuDeviceGetCount(int *count) { ENTER(); *count = device_count(); return OK; }

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    ENTER();
    if (ordinal < 0 || ordinal >= device_count()) return INVALID_VALUE;
    *device = ordinal;
    return OK;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    ENTER();
    snprintf(name, (size_t)len, "unimem model CUDA device %d (CPU, not a GPU)", device);
    return OK;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) { (void)device; ENTER(); *bytes = TOTAL_MEMORY; return OK; }

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    (void)device;
    ENTER();
    /* MANAGED_MEMORY, CONCURRENT_MANAGED_ACCESS, MEMORY_POOLS_SUPPORTED */
    *value = attribute == 83 || attribute == 89 || attribute == 115;
    return OK;
}

CUresult cuDeviceCanAccessPeer(int *can, CUdevice device, CUdevice peer) {
    ENTER();
    *can = device != peer;
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(struct ctx **ctx, CUdevice device) {
    ENTER();
    if (device < 0 || device >= device_count()) return INVALID_VALUE;
    pthread_mutex_lock(&global);
    contexts[device].device = device;
    contexts[device].retained++;
    pthread_mutex_unlock(&global);
    *ctx = &contexts[device];
    return OK;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    ENTER();
    pthread_mutex_lock(&global);
    CUresult r = contexts[device].retained > 0 ? (contexts[device].retained--, OK) : INVALID_CONTEXT;
    pthread_mutex_unlock(&global);
    return r;
}

CUresult cuCtxSetCurrent(struct ctx *ctx) { ENTER(); current = ctx; return OK; }

CUresult cuCtxGetCurrent(struct ctx **ctx) { ENTER(); *ctx = current; return OK; }

CUresult cuCtxSynchronize(void) {
    ENTER();
    if (!current) return INVALID_CONTEXT;
    pthread_mutex_lock(&global);
    struct stream *first = streams;
    pthread_mutex_unlock(&global);
    for (struct stream *s = first; s; s = s->next_stream)
        if (s->ctx == current) drain(s);
    return OK;
}

CUresult cuCtxEnablePeerAccess(struct ctx *peer, unsigned flags) {
    ENTER();
    if (!current) return INVALID_CONTEXT;
    if (flags != 0 || !peer || peer == current) return INVALID_VALUE;
    pthread_mutex_lock(&global);
    unsigned bit = 1u << peer->device;
    CUresult r = current->peers_enabled & bit ? PEER_ACCESS_ALREADY_ENABLED : OK;
    current->peers_enabled |= bit;
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
    if (!s || s->destroyed) return INVALID_HANDLE;
    pthread_mutex_lock(&s->lock);
    s->destroyed = 1; /* the queued work still runs, then the thread ends */
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return OK;
}

CUresult cuStreamSynchronize(struct stream *s) {
    ENTER();
    if (!s || s->destroyed) return INVALID_HANDLE;
    drain(s);
    return OK;
}

CUresult cuEventCreate(struct event **out, unsigned flags) {
    (void)flags;
    ENTER();
    if (!current) return INVALID_CONTEXT;
    struct event *e = calloc(1, sizeof *e);
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    e->ctx = current;
    e->refs = 1;
    *out = e;
    return OK;
}

CUresult cuEventRecord(struct event *e, struct stream *s) {
    ENTER();
    CUresult r = usable(s);
    if (r != OK) return r;
    if (!e || e->ctx != s->ctx) return INVALID_HANDLE;
    pthread_mutex_lock(&e->lock);
    unsigned long long generation = ++e->recorded;
    e->refs++;
    pthread_mutex_unlock(&e->lock);
    enqueue(s, (struct op){ .kind = RECORD, .event = e, .generation = generation });
    return OK;
}

CUresult cuStreamWaitEvent(struct stream *s, struct event *e, unsigned flags) {
    ENTER();
    if (!s || s->destroyed || !e || flags != 0) return INVALID_HANDLE;
    pthread_mutex_lock(&e->lock);
    unsigned long long generation = e->recorded;
    int pending = e->completed < generation;
    if (pending) e->refs++;
    pthread_mutex_unlock(&e->lock);
    if (pending) enqueue(s, (struct op){ .kind = WAIT, .event = e, .generation = generation });
    return OK;
}

CUresult cuEventSynchronize(struct event *e) {
    ENTER();
    if (!e) return INVALID_HANDLE;
    pthread_mutex_lock(&e->lock);
    unsigned long long target = e->recorded;
    while (e->completed < target) pthread_cond_wait(&e->cond, &e->lock);
    pthread_mutex_unlock(&e->lock);
    return OK;
}

CUresult cuEventDestroy_v2(struct event *e) {
    ENTER();
    if (!e) return INVALID_HANDLE;
    event_unref(e); /* freed once the commands that use it have run */
    return OK;
}

CUresult cuLaunchHostFunc(struct stream *s, void (*fn)(void *), void *data) {
    ENTER();
    CUresult r = usable(s);
    if (r != OK) return r;
    if (!fn) return INVALID_VALUE;
    enqueue(s, (struct op){ .kind = HOST_FUNCTION, .fn = fn, .data = data });
    return OK;
}

/* ---- memory */

CUresult cuMemAlloc_v2(CUdeviceptr *out, size_t bytes) {
    ENTER();
    if (!current) return INVALID_CONTEXT;
    void *p = allocate(bytes, current);
    if (!p) return bytes ? OUT_OF_MEMORY : INVALID_VALUE;
    *out = (CUdeviceptr)(uintptr_t)p;
    return OK;
}

CUresult cuMemFree_v2(CUdeviceptr p) { ENTER(); return release((uintptr_t)p); }

CUresult cuDeviceGetDefaultMemPool(void **pool, CUdevice device) {
    ENTER();
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
    CUresult r = usable(s);
    if (r != OK) return r;
    if (pool != current) return INVALID_VALUE;
    return cuMemAlloc_v2(out, bytes);
}

CUresult cuMemFreeAsync(CUdeviceptr p, struct stream *s) {
    ENTER();
    CUresult r = usable(s);
    if (r != OK) return r;
    check_range("cuMemFreeAsync", (uintptr_t)p, 0);
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

CUresult cuMemFreeHost(void *p) { ENTER(); return release((uintptr_t)p); }

CUresult cuMemAllocManaged(CUdeviceptr *out, size_t bytes, unsigned flags) {
    (void)flags;
    return cuMemAlloc_v2(out, bytes);
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
    CUresult r = usable(s);
    if (r != OK) return r;
    if (flags != 0) return INVALID_VALUE;
    check_range("cuMemPrefetchAsync", (uintptr_t)p, n);
    return OK;
}

static CUresult copy(const char *call, void *dst, const void *src, size_t n, struct stream *s, int check_dst,
                     int check_src) {
    ENTER();
    CUresult r = usable(s);
    if (r != OK) return r;
    if (check_dst) check_range(call, (uintptr_t)dst, n);
    if (check_src) check_range(call, (uintptr_t)src, n);
    enqueue(s, (struct op){ .kind = COPY, .dst = dst, .src = src, .n = n, .call = call, .check_dst = check_dst,
                            .check_src = check_src });
    return OK;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, struct stream *s) {
    return copy("cuMemcpyHtoDAsync", (void *)(uintptr_t)dst, src, n, s, 1, 0);
}

CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, struct stream *s) {
    return copy("cuMemcpyDtoHAsync", dst, (const void *)(uintptr_t)src, n, s, 0, 1);
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, struct stream *s) {
    return copy("cuMemcpyDtoDAsync", (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, s, 1, 1);
}

CUresult cuMemcpyPeerAsync(CUdeviceptr dst, struct ctx *dst_ctx, CUdeviceptr src, struct ctx *src_ctx, size_t n,
                           struct stream *s) {
    if (!dst_ctx || !src_ctx) return INVALID_CONTEXT;
    return copy("cuMemcpyPeerAsync", (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, s, 1, 1);
}

CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char value, size_t n, struct stream *s) {
    ENTER();
    CUresult r = usable(s);
    if (r != OK) return r;
    check_range("cuMemsetD8Async", (uintptr_t)p, n);
    enqueue(s, (struct op){ .kind = SET8, .dst = (void *)(uintptr_t)p, .value = value, .n = n,
                            .call = "cuMemsetD8Async", .check_dst = 1 });
    return OK;
}

CUresult cuMemsetD32Async(CUdeviceptr p, unsigned value, size_t n, struct stream *s) {
    ENTER();
    CUresult r = usable(s);
    if (r != OK) return r;
    if (n > SIZE_MAX / 4) return INVALID_VALUE;
    check_range("cuMemsetD32Async", (uintptr_t)p, n * 4);
    enqueue(s, (struct op){ .kind = SET32, .dst = (void *)(uintptr_t)p, .value = value, .n = n,
                            .call = "cuMemsetD32Async", .check_dst = 1 });
    return OK;
}
