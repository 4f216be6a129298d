/*
 * bitmirror_rbd: librbd for the `rbd` block driver (src/block/drivers/rbd.ts wraps it through
 * src/block/rbd-native.ts). A separate addon from bitmirror_native so that machines without
 * librbd-dev still build and run everything else: binding.gyp builds this target only when
 * <rbd/librbd.h> is there, and the rbd driver says so clearly when the addon is missing.
 *
 * Never blocking the event loop:
 *   data path   rbd_aio_read/write/write_zeroes/discard/flush on the caller's Buffer (no copy here;
 *               a reference keeps it alive until librbd is done): librbd calls back on its own
 *               finisher thread; the callback queues the completion and wakes the event loop
 *               through one thread-safe function, which resolves the queued requests' promises in
 *               one batch.
 *   control     connect + open, close, create, remove, resize, stat, diff (block status), image metadata:
 *               librbd only has blocking calls for these (or aio ones for just a few), so they run
 *               on libuv's thread pool (napi_async_work) and resolve their promise when done.
 * Every call resolves with a result or a negative errno; open and create resolve an object saying
 * which step failed, so the driver can word QEMU's message for that step.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <node_api.h>

/* ---- small N-API helpers ---------------------------------------------------------------------- */

typedef struct {
  char **list;
  uint32_t n;
} ctl_req_settings;

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "bitmirror_rbd: too few arguments");
    return -1;
  }
  return 0;
}

static int get_u64(napi_env env, napi_value v, uint64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || d < 0 || d > 9007199254740992.0 || d != (double)(uint64_t)d) {
    napi_throw_type_error(env, NULL, "bitmirror_rbd: expected a non-negative safe integer");
    return -1;
  }
  *out = (uint64_t)d;
  return 0;
}

/* A string argument, or NULL for null/undefined. The caller frees it. */
static int get_str(napi_env env, napi_value v, char **out) {
  napi_valuetype t;
  *out = NULL;
  if (napi_typeof(env, v, &t) != napi_ok) return -1;
  if (t == napi_null || t == napi_undefined) return 0;
  size_t len;
  if (t != napi_string || napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) {
    napi_throw_type_error(env, NULL, "bitmirror_rbd: expected a string or null");
    return -1;
  }
  *out = malloc(len + 1);
  if (!*out) return -1;
  napi_get_value_string_utf8(env, v, *out, len + 1, &len);
  return 0;
}

/* An array of strings (name, value, name, value …) or null: the rados_conf_set pairs of a connect. */
static int get_settings(napi_env env, napi_value v, ctl_req_settings *out) {
  napi_valuetype t;
  bool is_array = false;
  out->list = NULL;
  out->n = 0;
  if (napi_typeof(env, v, &t) != napi_ok) return -1;
  if (t == napi_null || t == napi_undefined) return 0;
  if (napi_is_array(env, v, &is_array) != napi_ok || !is_array || napi_get_array_length(env, v, &out->n) != napi_ok) {
    napi_throw_type_error(env, NULL, "bitmirror_rbd: expected an array of strings or null");
    return -1;
  }
  out->list = calloc(out->n ? out->n : 1, sizeof(char *));
  if (!out->list) return -1;
  for (uint32_t i = 0; i < out->n; i++) {
    napi_value e;
    if (napi_get_element(env, v, i, &e) != napi_ok || get_str(env, e, &out->list[i]) || !out->list[i]) {
      bool pending = false;
      napi_is_exception_pending(env, &pending);
      if (!pending) napi_throw_type_error(env, NULL, "bitmirror_rbd: expected an array of strings");
      for (uint32_t j = 0; j < out->n; j++) free(out->list[j]);
      free(out->list);
      out->list = NULL;
      out->n = 0;
      return -1;
    }
  }
  return 0;
}

static napi_value num(napi_env env, double d) {
  napi_value r;
  napi_create_double(env, d, &r);
  return r;
}

static void set_num(napi_env env, napi_value obj, const char *key, double d) {
  napi_set_named_property(env, obj, key, num(env, d));
}

static void set_str(napi_env env, napi_value obj, const char *key, const char *s) {
  napi_value v;
  napi_create_string_utf8(env, s, NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, obj, key, v);
}

/* ---- an open image -------------------------------------------------------------------------- */

typedef struct {
  rados_t cluster;
  rados_ioctx_t ioctx;
  rbd_image_t image;
  int closed; /* set by close(): later calls fail with -EBADF */
} rbd_handle;

static rbd_handle *get_handle(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || !p) {
    napi_throw_type_error(env, NULL, "bitmirror_rbd: expected an image handle");
    return NULL;
  }
  return p;
}

/* ---- control calls on the thread pool ------------------------------------------------------- */

typedef enum { OP_OPEN, OP_CLOSE, OP_CREATE, OP_REMOVE, OP_RESIZE, OP_STAT, OP_DIFF, OP_META_GET, OP_META_SET, OP_META_REMOVE, OP_META_LIST } op_kind;

#define MAX_EXTENTS 64

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  op_kind op;
  rbd_handle *h;
  /* connect/open/create */
  char *conf, *user, *pool, *ns, *image, *snap, *key;
  /* rados_conf_set pairs applied after the conf file (mon_host, key, auth_client_required …) */
  char **settings;
  uint32_t n_settings; /* strings: twice the pairs */
  int failed_setting;  /* which pair failed, when stage is "setting" */
  int read_only;
  uint64_t size, order;
  /* results */
  int ret;
  const char *stage; /* which step failed: conf, connect, pool, namespace, open, create, remove */
  rbd_image_info_t info;
  uint64_t features, flags;
  /* diff: extents of [off, off+len) */
  uint64_t off, len;
  int n_extents;
  uint64_t ext_off[MAX_EXTENTS], ext_len[MAX_EXTENTS];
  int ext_exists[MAX_EXTENTS];
  /* metadata */
  char *value;
  size_t value_len;
  char *keys; /* list: key\0value\0... as librbd returns them */
  size_t keys_len, vals_len;
  char *vals;
} ctl_req;

static void free_req(ctl_req *r) {
  for (uint32_t i = 0; i < r->n_settings; i++) {
    /* a value may be a key: wipe it before the memory goes back to the allocator */
    if (r->settings[i]) { explicit_bzero(r->settings[i], strlen(r->settings[i])); free(r->settings[i]); }
  }
  free(r->settings);
  free(r->conf); free(r->user); free(r->pool); free(r->ns); free(r->image); free(r->snap); free(r->key);
  free(r->value); free(r->keys); free(r->vals);
  free(r);
}

/* Connect to the cluster and open the pool (and namespace); r->stage names the step that failed. */
static int connect_pool(ctl_req *r, rados_t *cluster, rados_ioctx_t *ioctx) {
  int ret = rados_create(cluster, r->user);
  if (ret < 0) { r->stage = "connect"; return ret; }
  /* Zero-copy writes for an open image: librbd takes a reference to the caller's Buffer instead of
     copying it (a memcpy of every byte written, on the event loop, otherwise). Safe here: the addon
     keeps the Buffer alive until the completion reaches the event loop, and librbd holds a completion
     back until it has dropped its last reference to the memory. Set before the conf file is read, so
     an administrator's rbd_disable_zero_copy_writes there still wins. */
  if (r->op == OP_OPEN) rados_conf_set(*cluster, "rbd_disable_zero_copy_writes", "false");
  /* As QEMU: a given conf file must be read; without one, the default search path is tried quietly. */
  ret = rados_conf_read_file(*cluster, r->conf);
  if (ret < 0 && r->conf) { r->stage = "conf"; goto fail; }
  for (uint32_t i = 0; i + 1 < r->n_settings; i += 2) {
    ret = rados_conf_set(*cluster, r->settings[i], r->settings[i + 1]);
    if (ret < 0) { r->stage = "setting"; r->failed_setting = (int)(i / 2); goto fail; }
  }
  ret = rados_connect(*cluster);
  if (ret < 0) { r->stage = "connect"; goto fail; }
  ret = rados_ioctx_create(*cluster, r->pool, ioctx);
  if (ret < 0) { r->stage = "pool"; goto fail; }
  if (r->ns && r->ns[0]) {
    bool exists = false;
    ret = rbd_namespace_exists(*ioctx, r->ns, &exists);
    if (ret < 0 || !exists) { r->stage = "namespace"; ret = ret < 0 ? ret : -ENOENT; rados_ioctx_destroy(*ioctx); goto fail; }
  }
  rados_ioctx_set_namespace(*ioctx, r->ns ? r->ns : "");
  return 0;
fail:
  rados_shutdown(*cluster);
  return ret;
}

static int diff_cb(uint64_t off, size_t len, int exists, void *arg) {
  ctl_req *r = arg;
  if (r->n_extents >= MAX_EXTENTS) return -EAGAIN; /* enough for one answer: stop iterating */
  r->ext_off[r->n_extents] = off;
  r->ext_len[r->n_extents] = len;
  r->ext_exists[r->n_extents] = exists;
  r->n_extents++;
  return 0;
}

static void ctl_execute(napi_env env, void *data) {
  (void)env;
  ctl_req *r = data;
  rbd_handle *h = r->h;
  if (r->op != OP_OPEN && r->op != OP_CREATE && r->op != OP_REMOVE && (!h || h->closed)) { r->ret = -EBADF; return; }
  switch (r->op) {
  case OP_OPEN: {
    h = calloc(1, sizeof(*h));
    if (!h) { r->ret = -ENOMEM; return; }
    r->ret = connect_pool(r, &h->cluster, &h->ioctx);
    if (r->ret < 0) { free(h); return; }
    r->ret = r->read_only ? rbd_open_read_only(h->ioctx, r->image, &h->image, r->snap)
                          : rbd_open(h->ioctx, r->image, &h->image, r->snap);
    if (r->ret < 0) { r->stage = "open"; rados_ioctx_destroy(h->ioctx); rados_shutdown(h->cluster); free(h); return; }
    r->h = h;
    break;
  }
  case OP_CREATE: {
    rados_t cluster;
    rados_ioctx_t ioctx;
    r->ret = connect_pool(r, &cluster, &ioctx);
    if (r->ret < 0) return;
    int order = (int)r->order;
    r->ret = rbd_create(ioctx, r->image, r->size, &order);
    if (r->ret < 0) r->stage = "create";
    rados_ioctx_destroy(ioctx);
    rados_shutdown(cluster);
    break;
  }
  case OP_REMOVE: {
    /* Deletes every object of the image: may take long, hence the thread pool. Fails with -EBUSY
       while any client (a watcher) still has the image open. */
    rados_t cluster;
    rados_ioctx_t ioctx;
    r->ret = connect_pool(r, &cluster, &ioctx);
    if (r->ret < 0) return;
    r->ret = rbd_remove(ioctx, r->image);
    if (r->ret < 0) r->stage = "remove";
    rados_ioctx_destroy(ioctx);
    rados_shutdown(cluster);
    break;
  }
  case OP_CLOSE:
    r->ret = rbd_close(h->image);
    rados_ioctx_destroy(h->ioctx);
    rados_shutdown(h->cluster);
    h->closed = 1;
    break;
  case OP_RESIZE:
    r->ret = rbd_resize(h->image, r->size);
    break;
  case OP_STAT:
    r->ret = rbd_stat(h->image, &r->info, sizeof(r->info));
    if (r->ret >= 0) r->ret = rbd_get_features(h->image, &r->features);
    if (r->ret >= 0) r->ret = rbd_get_flags(h->image, &r->flags);
    break;
  case OP_DIFF:
    /* whole_object = true: answered from the object map when fast-diff is valid (QEMU does the same). */
    r->ret = rbd_diff_iterate2(h->image, NULL, r->off, r->len, 1, 1, diff_cb, r);
    if (r->ret == -EAGAIN) r->ret = 0;
    break;
  case OP_META_GET: {
    size_t len = 4096;
    for (;;) {
      free(r->value);
      r->value = malloc(len);
      if (!r->value) { r->ret = -ENOMEM; return; }
      r->ret = rbd_metadata_get(h->image, r->key, r->value, &len);
      if (r->ret != -ERANGE) break;
    }
    r->value_len = r->ret >= 0 ? len : 0;
    break;
  }
  case OP_META_SET:
    r->ret = rbd_metadata_set(h->image, r->key, r->value);
    break;
  case OP_META_REMOVE:
    r->ret = rbd_metadata_remove(h->image, r->key);
    break;
  case OP_META_LIST: {
    /* Every key and value of the image (the driver picks its own keys out). */
    size_t klen = 4096, vlen = 65536;
    for (;;) {
      free(r->keys); free(r->vals);
      r->keys = malloc(klen);
      r->vals = malloc(vlen);
      if (!r->keys || !r->vals) { r->ret = -ENOMEM; return; }
      r->ret = rbd_metadata_list(h->image, "", 0, r->keys, &klen, r->vals, &vlen);
      if (r->ret != -ERANGE) break;
    }
    r->keys_len = r->ret >= 0 ? klen : 0;
    r->vals_len = r->ret >= 0 ? vlen : 0;
    break;
  }
  }
}

static void ctl_complete(napi_env env, napi_status status, void *data) {
  ctl_req *r = data;
  napi_value v;
  if (status != napi_ok && r->ret >= 0) r->ret = -ECANCELED;
  switch (r->op) {
  case OP_OPEN:
  case OP_CREATE:
  case OP_REMOVE:
    napi_create_object(env, &v);
    set_num(env, v, "ret", r->ret);
    if (r->stage) set_str(env, v, "stage", r->stage);
    if (r->stage && strcmp(r->stage, "setting") == 0) set_num(env, v, "setting", r->failed_setting);
    if (r->op == OP_OPEN && r->ret >= 0) {
      napi_value ext;
      napi_create_external(env, r->h, NULL, NULL, &ext);
      napi_set_named_property(env, v, "handle", ext);
    }
    break;
  case OP_STAT:
    if (r->ret < 0) { v = num(env, r->ret); break; }
    napi_create_object(env, &v);
    set_num(env, v, "size", (double)r->info.size);
    set_num(env, v, "objectSize", (double)r->info.obj_size);
    set_num(env, v, "features", (double)r->features);
    set_num(env, v, "flags", (double)r->flags);
    break;
  case OP_DIFF:
    if (r->ret < 0) { v = num(env, r->ret); break; }
    napi_create_array_with_length(env, (size_t)r->n_extents * 3, &v);
    for (int i = 0; i < r->n_extents; i++) {
      napi_set_element(env, v, 3 * i, num(env, (double)r->ext_off[i]));
      napi_set_element(env, v, 3 * i + 1, num(env, (double)r->ext_len[i]));
      napi_set_element(env, v, 3 * i + 2, num(env, r->ext_exists[i]));
    }
    break;
  case OP_META_GET:
    if (r->ret < 0) { v = num(env, r->ret); break; }
    napi_create_string_utf8(env, r->value, strnlen(r->value, r->value_len), &v);
    break;
  case OP_META_LIST: {
    if (r->ret < 0) { v = num(env, r->ret); break; }
    napi_create_object(env, &v);
    size_t ki = 0, vi = 0;
    while (ki < r->keys_len && vi < r->vals_len && r->keys[ki]) {
      const char *k = r->keys + ki, *val = r->vals + vi;
      ki += strlen(k) + 1;
      vi += strlen(val) + 1;
      set_str(env, v, k, val);
    }
    break;
  }
  default:
    v = num(env, r->ret);
  }
  napi_resolve_deferred(env, r->deferred, v);
  napi_delete_async_work(env, r->work);
  free_req(r);
}

static napi_value queue_ctl(napi_env env, ctl_req *r) {
  napi_value promise, name;
  napi_create_promise(env, &r->deferred, &promise);
  napi_create_string_utf8(env, "bitmirror_rbd", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, ctl_execute, ctl_complete, r, &r->work);
  napi_queue_async_work(env, r->work);
  return promise;
}

static ctl_req *new_req(op_kind op) {
  ctl_req *r = calloc(1, sizeof(*r));
  if (r) r->op = op;
  return r;
}

/* The settings argument into the request (freed with it). */
static int req_settings(napi_env env, napi_value v, ctl_req *r) {
  ctl_req_settings st;
  if (get_settings(env, v, &st)) return -1;
  r->settings = st.list;
  r->n_settings = st.n;
  return 0;
}

/* open(conf, user, pool, namespace, image, snapshot, readOnly, settings) -> {ret, stage?, setting?, handle?} */
static napi_value js_open(napi_env env, napi_callback_info info) {
  napi_value a[8];
  if (get_args(env, info, 8, a)) return NULL;
  ctl_req *r = new_req(OP_OPEN);
  bool ro = false;
  if (!r || get_str(env, a[0], &r->conf) || get_str(env, a[1], &r->user) || get_str(env, a[2], &r->pool) ||
      get_str(env, a[3], &r->ns) || get_str(env, a[4], &r->image) || get_str(env, a[5], &r->snap) ||
      napi_get_value_bool(env, a[6], &ro) != napi_ok || req_settings(env, a[7], r)) {
    if (r) free_req(r);
    return NULL;
  }
  r->read_only = ro;
  return queue_ctl(env, r);
}

/* create(conf, user, pool, namespace, image, size, order, settings) -> {ret, stage?, setting?} (order 0: librbd's default) */
static napi_value js_create(napi_env env, napi_callback_info info) {
  napi_value a[8];
  if (get_args(env, info, 8, a)) return NULL;
  ctl_req *r = new_req(OP_CREATE);
  if (!r || get_str(env, a[0], &r->conf) || get_str(env, a[1], &r->user) || get_str(env, a[2], &r->pool) ||
      get_str(env, a[3], &r->ns) || get_str(env, a[4], &r->image) || get_u64(env, a[5], &r->size) ||
      get_u64(env, a[6], &r->order) || req_settings(env, a[7], r)) {
    if (r) free_req(r);
    return NULL;
  }
  return queue_ctl(env, r);
}

/* remove(conf, user, pool, namespace, image, settings) -> {ret, stage?, setting?} */
static napi_value js_remove(napi_env env, napi_callback_info info) {
  napi_value a[6];
  if (get_args(env, info, 6, a)) return NULL;
  ctl_req *r = new_req(OP_REMOVE);
  if (!r || get_str(env, a[0], &r->conf) || get_str(env, a[1], &r->user) || get_str(env, a[2], &r->pool) ||
      get_str(env, a[3], &r->ns) || get_str(env, a[4], &r->image) || req_settings(env, a[5], r)) {
    if (r) free_req(r);
    return NULL;
  }
  return queue_ctl(env, r);
}

/* A control call on an open image: (handle, ...) */
static napi_value handle_call(napi_env env, napi_callback_info info, op_kind op, size_t nargs) {
  napi_value a[3];
  if (get_args(env, info, nargs, a)) return NULL;
  rbd_handle *h = get_handle(env, a[0]);
  if (!h) return NULL;
  ctl_req *r = new_req(op);
  if (!r) return NULL;
  r->h = h;
  int bad = 0;
  switch (op) {
  case OP_RESIZE: bad = get_u64(env, a[1], &r->size); break;
  case OP_DIFF: bad = get_u64(env, a[1], &r->off) || get_u64(env, a[2], &r->len); break;
  case OP_META_GET: case OP_META_REMOVE: bad = get_str(env, a[1], &r->key) || !r->key; break;
  case OP_META_SET: bad = get_str(env, a[1], &r->key) || get_str(env, a[2], &r->value) || !r->key || !r->value; break;
  default: break;
  }
  if (bad) {
    free_req(r);
    return NULL;
  }
  return queue_ctl(env, r);
}

static napi_value js_close(napi_env env, napi_callback_info i) { return handle_call(env, i, OP_CLOSE, 1); }
static napi_value js_resize(napi_env env, napi_callback_info i) { return handle_call(env, i, OP_RESIZE, 2); }
static napi_value js_stat(napi_env env, napi_callback_info i) { return handle_call(env, i, OP_STAT, 1); }
static napi_value js_diff(napi_env env, napi_callback_info i) { return handle_call(env, i, OP_DIFF, 3); }
static napi_value js_meta_get(napi_env env, napi_callback_info i) { return handle_call(env, i, OP_META_GET, 2); }
static napi_value js_meta_set(napi_env env, napi_callback_info i) { return handle_call(env, i, OP_META_SET, 3); }
static napi_value js_meta_remove(napi_env env, napi_callback_info i) { return handle_call(env, i, OP_META_REMOVE, 2); }
static napi_value js_meta_list(napi_env env, napi_callback_info i) { return handle_call(env, i, OP_META_LIST, 1); }

/* ---- the data path: rbd_aio_* completed on the event loop ------------------------------------- */

typedef struct aio_req {
  napi_deferred deferred;
  napi_ref buffer; /* keeps the request's Buffer alive while librbd uses its memory */
  rbd_completion_t completion;
  ssize_t ret;              /* librbd's result, taken on its finisher thread */
  struct aio_req *next;     /* in the list of completed requests */
} aio_req;

static napi_threadsafe_function aio_tsfn;
static size_t aio_in_flight;

/*
 * Completions are handed to the event loop in batches: librbd's finisher thread appends each one to
 * this list and wakes the loop only when the list was empty (no wake-up pending); the loop takes the
 * whole list at once. Under load many completions arrive between two turns of the loop, and they then
 * cost one wake-up (and one round of promise reactions) instead of one each.
 */
static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static aio_req *done_head, *done_tail;
static int done_wake_pending;

/* librbd's finisher thread: take the result, queue the request, wake the loop if it is not already woken. */
static void aio_done(rbd_completion_t c, void *arg) {
  aio_req *r = arg;
  r->ret = rbd_aio_get_return_value(c);
  rbd_aio_release(c);
  r->completion = NULL;
  r->next = NULL;
  pthread_mutex_lock(&done_lock);
  if (done_tail) done_tail->next = r;
  else done_head = r;
  done_tail = r;
  int wake = !done_wake_pending;
  done_wake_pending = 1;
  pthread_mutex_unlock(&done_lock);
  if (wake) napi_call_threadsafe_function(aio_tsfn, NULL, napi_tsfn_nonblocking);
}

/* On the event loop: resolve every queued request's promise with librbd's result (bytes or -errno). */
static void aio_call_js(napi_env env, napi_value js_cb, void *context, void *data) {
  (void)js_cb; (void)context; (void)data;
  if (!env) return; /* the environment is going away */
  pthread_mutex_lock(&done_lock);
  aio_req *r = done_head;
  done_head = done_tail = NULL;
  done_wake_pending = 0;
  pthread_mutex_unlock(&done_lock);
  while (r) {
    aio_req *next = r->next;
    if (r->buffer) napi_delete_reference(env, r->buffer);
    napi_resolve_deferred(env, r->deferred, num(env, (double)r->ret));
    free(r);
    /* Pending I/O keeps the process alive; none in flight lets it exit. */
    if (--aio_in_flight == 0) napi_unref_threadsafe_function(env, aio_tsfn);
    r = next;
  }
}

typedef enum { AIO_READ, AIO_WRITE, AIO_ZERO, AIO_DISCARD, AIO_FLUSH } aio_kind;

/* (handle, kind, offset, buffer | length, flags) -> Promise<bytes | -errno> */
static napi_value js_aio(napi_env env, napi_callback_info info) {
  napi_value a[5];
  if (get_args(env, info, 5, a)) return NULL;
  rbd_handle *h = get_handle(env, a[0]);
  if (!h) return NULL;
  int32_t kind, flags;
  uint64_t off = 0, len = 0;
  void *data = NULL;
  if (napi_get_value_int32(env, a[1], &kind) != napi_ok || napi_get_value_int32(env, a[4], &flags) != napi_ok ||
      get_u64(env, a[2], &off)) {
    napi_throw_type_error(env, NULL, "bitmirror_rbd: bad aio arguments");
    return NULL;
  }
  bool is_buffer = false;
  napi_is_buffer(env, a[3], &is_buffer);
  if (is_buffer) {
    size_t n;
    napi_get_buffer_info(env, a[3], &data, &n);
    len = n;
  } else if (get_u64(env, a[3], &len)) {
    return NULL;
  }
  aio_req *r = calloc(1, sizeof(*r));
  napi_value promise;
  napi_create_promise(env, &r->deferred, &promise);
  if (h->closed) {
    napi_resolve_deferred(env, r->deferred, num(env, -EBADF));
    free(r);
    return promise;
  }
  if (is_buffer) napi_create_reference(env, a[3], 1, &r->buffer);
  int ret = rbd_aio_create_completion(r, aio_done, &r->completion);
  if (ret >= 0) {
    switch (kind) {
    case AIO_READ: ret = rbd_aio_read(h->image, off, len, data, r->completion); break;
    case AIO_WRITE: ret = rbd_aio_write(h->image, off, len, data, r->completion); break;
    case AIO_ZERO: ret = rbd_aio_write_zeroes(h->image, off, len, r->completion, flags, 0); break;
    case AIO_DISCARD: ret = rbd_aio_discard(h->image, off, len, r->completion); break;
    case AIO_FLUSH: ret = rbd_aio_flush(h->image, r->completion); break;
    default: ret = -EINVAL;
    }
    if (ret < 0) rbd_aio_release(r->completion);
  }
  if (ret < 0) {
    if (r->buffer) napi_delete_reference(env, r->buffer);
    napi_resolve_deferred(env, r->deferred, num(env, ret));
    free(r);
    return promise;
  }
  if (aio_in_flight++ == 0) napi_ref_threadsafe_function(env, aio_tsfn);
  return promise;
}

/* ---- module ----------------------------------------------------------------------------------- */

static napi_value init(napi_env env, napi_value exports) {
  napi_value name;
  napi_create_string_utf8(env, "bitmirror_rbd_aio", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, NULL, NULL, NULL, aio_call_js, &aio_tsfn) != napi_ok) {
    napi_throw_error(env, NULL, "bitmirror_rbd: cannot create the completion queue");
    return NULL;
  }
  napi_unref_threadsafe_function(env, aio_tsfn);
  struct { const char *name; napi_callback fn; } fns[] = {
    {"open", js_open}, {"create", js_create}, {"remove", js_remove}, {"close", js_close}, {"resize", js_resize}, {"stat", js_stat},
    {"diff", js_diff}, {"metadataGet", js_meta_get}, {"metadataSet", js_meta_set},
    {"metadataRemove", js_meta_remove}, {"metadataList", js_meta_list}, {"aio", js_aio},
  };
  for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++) {
    napi_value f;
    napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f);
    napi_set_named_property(env, exports, fns[i].name, f);
  }
  set_num(env, exports, "FEATURE_FAST_DIFF", (double)RBD_FEATURE_FAST_DIFF);
  set_num(env, exports, "FEATURE_OBJECT_MAP", (double)RBD_FEATURE_OBJECT_MAP);
  set_num(env, exports, "FLAG_FAST_DIFF_INVALID", RBD_FLAG_FAST_DIFF_INVALID);
  set_num(env, exports, "FLAG_OBJECT_MAP_INVALID", RBD_FLAG_OBJECT_MAP_INVALID);
  set_num(env, exports, "WRITE_ZEROES_FLAG_THICK_PROVISION", RBD_WRITE_ZEROES_FLAG_THICK_PROVISION);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
