/* A stand-in for the CUDA driver library (libcuda.so.1) that does nothing and succeeds.
 *
 * The performance model times Triton's launch path on a machine without a GPU: the JIT's
 * binder, its cache lookup and the C launcher that Triton generates per kernel signature
 * (argument parsing, pointer queries, packing) all run for real; only what the driver would
 * do is missing. Each entry point the launcher and Triton's cuda_utils call returns
 * CUDA_SUCCESS and fills its outputs with plausible values (a pointer is its own device
 * pointer, a kernel may have 1024 threads, the device has plenty of shared memory).
 * Entry points of other Triton versions that are not here are added at build time as
 * functions that only return CUDA_SUCCESS. Built with the soname libcuda.so.1 and loaded
 * before Triton's modules, so theirs resolve here. Never put it where a real program would find it.
 */
#include <stddef.h>
#include <stdint.h>

typedef int CUresult;
typedef void *CUcontext, *CUmodule, *CUfunction;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

static int dummy;

CUresult cuInit(unsigned int flags) { (void)flags; return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuStreamIsCapturing(void *stream, int *status) { (void)stream; *status = 0; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "fake libcuda"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = "FAKE"; return 0; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = &dummy; return 0; }
CUresult cuCtxSetCurrent(CUcontext c) { (void)c; return 0; }
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; return 0; }
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { (void)d; *c = &dummy; return 0; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) { *d = ordinal; return 0; }
/* An H100's values for the attributes Triton reads (CUdevice_attribute numbers). */
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
  (void)d;
  switch (attr) {
    case 1: *v = 1024; break;      /* max threads per block */
    case 8: *v = 49152; break;     /* shared memory per block */
    case 10: *v = 32; break;       /* warp size */
    case 12: *v = 65536; break;    /* registers per block */
    case 13: *v = 1755000; break;  /* clock rate, kHz */
    case 16: *v = 132; break;      /* multiprocessors */
    case 36: *v = 2619000; break;  /* memory clock rate, kHz */
    case 37: *v = 5120; break;     /* memory bus width, bits */
    case 75: *v = 9; break;        /* compute capability */
    case 76: *v = 0; break;
    case 81: *v = 233472; break;   /* shared memory per multiprocessor */
    case 97: *v = 232448; break;   /* shared memory per block, opt-in */
    default: *v = 1;
  }
  return 0;
}
CUresult cuCtxSetLimit(int limit, size_t value) { (void)limit; (void)value; return 0; }
CUresult cuCtxGetLimit(size_t *value, int limit) { (void)limit; *value = 0; return 0; }
CUresult cuModuleLoadData(CUmodule *m, const void *image) { (void)image; *m = &dummy; return 0; }
CUresult cuModuleUnload(CUmodule m) { (void)m; return 0; }
CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  (void)m; (void)name; *f = &dummy; return 0;
}
/* CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK is 0 */
CUresult cuFuncGetAttribute(int *v, int attr, CUfunction f) {
  (void)f; *v = attr == 0 ? 1024 : 0; return 0;
}
CUresult cuFuncSetAttribute(CUfunction f, int attr, int v) { (void)f; (void)attr; (void)v; return 0; }
CUresult cuFuncSetCacheConfig(CUfunction f, int c) { (void)f; (void)c; return 0; }
CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr ptr) {
  (void)attr; *(CUdeviceptr *)data = ptr; return 0;
}
CUresult cuPointerGetAttributes(unsigned n, int *attrs, void **data, CUdeviceptr ptr) {
  (void)n; (void)attrs; (void)data; (void)ptr; return 0;
}
CUresult cuLaunchKernelEx(const void *config, CUfunction f, void **params, void **extra) {
  (void)config; (void)f; (void)params; (void)extra; return 0;
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, void *stream, void **params,
                        void **extra) {
  (void)f; (void)gx; (void)gy; (void)gz; (void)bx; (void)by; (void)bz; (void)shared;
  (void)stream; (void)params; (void)extra; return 0;
}
CUresult cuOccupancyMaxActiveClusters(int *n, CUfunction f, const void *config) {
  (void)f; (void)config; *n = 1; return 0;
}
CUresult cuTensorMapEncodeTiled(void *map, int dtype, unsigned rank, void *addr,
                                const uint64_t *dims, const uint64_t *strides,
                                const unsigned *box, const unsigned *elem_strides, int interleave,
                                int swizzle, int promotion, int fill) {
  (void)map; (void)dtype; (void)rank; (void)addr; (void)dims; (void)strides; (void)box;
  (void)elem_strides; (void)interleave; (void)swizzle; (void)promotion; (void)fill; return 0;
}
