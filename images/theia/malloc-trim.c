/* malloc-trim.c - a Node-API addon with one function: trim() runs glibc's malloc_trim(0).
 *
 *   gcc -O2 -shared -fPIC -o malloc-trim.node malloc-trim.c     (images/theia/build does this)
 *   require('/opt/theia/malloc-trim.node').trim()   // -> true if memory went back to the kernel
 *
 * Why: an idle Theia backend keeps ~40 MiB of freed C heap (the bundled 9 MB main.js is read and
 * converted at start-up, sockets and buffers come and go): glibc returns only the top of the heap
 * by itself, and only above a threshold that grows with the largest block freed so far. With no
 * swap that memory never leaves. malloc_trim(0) hands every free page of every arena back to the
 * kernel (MADV_DONTNEED); the process keeps running and simply faults pages in again when it needs
 * them. gc-preload.js calls it after the full GC on SIGUSR2 (the idle ladder's GC rung).
 *
 * No node headers or node-gyp needed: the few Node-API functions used are declared here (Node-API
 * is a stable C ABI) and resolved from the node binary when the addon is loaded.
 */
#include <malloc.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct napi_env__ *napi_env;
typedef struct napi_value__ *napi_value;
typedef struct napi_callback_info__ *napi_callback_info;
typedef int napi_status; /* an enum in node_api.h; napi_ok == 0 */
typedef napi_value (*napi_callback)(napi_env env, napi_callback_info info);

extern napi_status napi_create_function(napi_env env, const char *name, size_t length, napi_callback cb,
                                        void *data, napi_value *result);
extern napi_status napi_set_named_property(napi_env env, napi_value object, const char *name, napi_value value);
extern napi_status napi_get_boolean(napi_env env, bool value, napi_value *result);

#define NAPI_AUTO_LENGTH ((size_t)-1)

static napi_value trim(napi_env env, napi_callback_info info) {
    (void)info;
    napi_value result = NULL;
    napi_get_boolean(env, malloc_trim(0) != 0, &result);
    return result;
}

__attribute__((visibility("default"))) napi_value napi_register_module_v1(napi_env env, napi_value exports) {
    napi_value fn = NULL;
    if (napi_create_function(env, "trim", NAPI_AUTO_LENGTH, trim, NULL, &fn) == 0) {
        napi_set_named_property(env, exports, "trim", fn);
    }
    return exports;
}

/* The Node-API version this addon was written against (Node reads it when present). */
__attribute__((visibility("default"))) int32_t node_api_module_get_api_version_v1(void) { return 8; }
