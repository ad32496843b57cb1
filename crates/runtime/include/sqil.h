/* sqil runtime C ABI. Generated from crates/runtime/src/capi.rs by `sqil_runtime::capi::c_header`:
 * do not edit; a test fails if this file drifts. Link with libsqil_runtime. */
#ifndef SQIL_H
#define SQIL_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SqilPolicy SqilPolicy;

/* Loads a compiled policy (sqil compile --target cpu); NULL on error. */
SqilPolicy *sqil_policy_load(const char *path);
/* Observation floats per state. */
size_t sqil_policy_obs_size(const SqilPolicy *p);
/* Actions for `batch` states (row-major); returns floats written or -1 on error. */
int sqil_policy_act(const SqilPolicy *p, const float *obs, size_t batch, float *actions, size_t capacity);
/* Frees a policy; NULL is ignored. */
void sqil_policy_free(SqilPolicy *p);
/* The last error message on this thread, or "". */
const char *sqil_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SQIL_H */
