#define _GNU_SOURCE
/* The GPU check of tests/engine/test_gpu_real.py: query the GPU and run a vector add through the
 * CUDA driver API, loaded at run time from the libcuda.so.1 that `--nv` binds in; the kernel is
 * PTX, JIT-compiled by the driver's libnvidia-ptxjitcompiler, so the image carries no CUDA
 * toolkit. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream;
typedef unsigned long long CUdeviceptr;

static const char ptx[] =
    ".version 7.0\n.target sm_50\n.address_size 64\n"
    ".visible .entry vadd(.param .u64 a, .param .u64 b, .param .u64 c, .param .u32 n)\n{\n"
    ".reg .pred %p<2>;\n.reg .b32 %r<6>;\n.reg .f32 %f<4>;\n.reg .b64 %rd<11>;\n"
    "ld.param.u64 %rd1, [a];\nld.param.u64 %rd2, [b];\nld.param.u64 %rd3, [c];\n"
    "ld.param.u32 %r2, [n];\nmov.u32 %r3, %ctaid.x;\nmov.u32 %r4, %ntid.x;\nmov.u32 %r5, %tid.x;\n"
    "mad.lo.s32 %r1, %r3, %r4, %r5;\nsetp.ge.s32 %p1, %r1, %r2;\n@%p1 bra DONE;\n"
    "cvta.to.global.u64 %rd4, %rd1;\ncvta.to.global.u64 %rd5, %rd2;\ncvta.to.global.u64 %rd6, %rd3;\n"
    "mul.wide.s32 %rd7, %r1, 4;\nadd.s64 %rd8, %rd4, %rd7;\nadd.s64 %rd9, %rd5, %rd7;\n"
    "add.s64 %rd10, %rd6, %rd7;\nld.global.f32 %f1, [%rd8];\nld.global.f32 %f2, [%rd9];\n"
    "add.f32 %f3, %f1, %f2;\nst.global.f32 [%rd10], %f3;\nDONE:\nret;\n}\n";

static void *lib;
static void *sym(const char *name) {
    void *p = dlsym(lib, name);
    if (!p) { fprintf(stderr, "cudacheck: %s missing from libcuda\n", name); exit(3); }
    return p;
}
#define CALL(f, ...) do { CUresult r = ((CUresult(*)())sym(#f))(__VA_ARGS__); \
    if (r) { fprintf(stderr, "cudacheck: %s failed: error %d\n", #f, r); return 4; } } while (0)

int main(void) {
    lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { fprintf(stderr, "cudacheck: %s\n", dlerror()); return 2; }
    Dl_info info;
    if (dladdr(sym("cuInit"), &info)) printf("libcuda loaded from %s\n", info.dli_fname);
    int ver = 0, count = 0, major = 0, minor = 0;
    CALL(cuInit, 0);
    CALL(cuDriverGetVersion, &ver);
    CALL(cuDeviceGetCount, &count);
    printf("CUDA driver API %d.%d, %d device(s)\n", ver / 1000, ver % 1000 / 10, count);
    CUdevice dev;
    char name[256];
    size_t mem = 0;
    CALL(cuDeviceGet, &dev, 0);
    CALL(cuDeviceGetName, name, (int)sizeof name, dev);
    CALL(cuDeviceTotalMem_v2, &mem, dev);
    CALL(cuDeviceGetAttribute, &major, 75, dev);
    CALL(cuDeviceGetAttribute, &minor, 76, dev);
    printf("device 0: %s, compute capability %d.%d, %zu MiB\n", name, major, minor, mem >> 20);
    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    CALL(cuDevicePrimaryCtxRetain, &ctx, dev);
    CALL(cuCtxSetCurrent, ctx);
    CALL(cuModuleLoadData, &mod, ptx);
    CALL(cuModuleGetFunction, &fn, mod, "vadd");
    unsigned n = 1 << 20;
    size_t bytes = n * sizeof(float);
    float *a = malloc(bytes), *b = malloc(bytes), *c = malloc(bytes);
    for (unsigned i = 0; i < n; i++) { a[i] = (float)i; b[i] = 2.0f * i; c[i] = -1; }
    CUdeviceptr da, db, dc;
    CALL(cuMemAlloc_v2, &da, bytes);
    CALL(cuMemAlloc_v2, &db, bytes);
    CALL(cuMemAlloc_v2, &dc, bytes);
    CALL(cuMemcpyHtoD_v2, da, a, bytes);
    CALL(cuMemcpyHtoD_v2, db, b, bytes);
    void *args[] = {&da, &db, &dc, &n};
    CALL(cuLaunchKernel, fn, (n + 255) / 256, 1, 1, 256, 1, 1, 0, (CUstream)0, args, (void **)0);
    CALL(cuCtxSynchronize);
    CALL(cuMemcpyDtoH_v2, c, dc, bytes);
    unsigned bad = 0;
    for (unsigned i = 0; i < n; i++) bad += c[i] != 3.0f * i;
    printf("vector add of %u floats on the GPU (PTX JIT-compiled by the driver): %s\n", n,
           bad ? "WRONG" : "correct");
    return bad ? 5 : 0;
}
