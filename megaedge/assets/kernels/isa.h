/* The library's version and instruction set, as runtime/kernels.py checks them at load (a stale build, or an AMX
   build in a process that Linux refused the tile registers). */
#ifndef ME_ISA_H
#define ME_ISA_H
#include "common.h"

int me_abi_version(void) { return 10; }

#ifdef ME_AMX
/* Linux hands out the AMX tile registers (8 KB of state per thread) only to a process that asks; 1: granted,
   -1: refused (kernel before 5.16, or a hypervisor that withholds it), and then the AVX512-VNNI form runs. */
static int amx_state;
static int amx_ready(void) {
    int state = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (state == 0) {
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, state, __ATOMIC_RELEASE);
    }
    return state > 0;
}
#endif

/* 4: AVX512-VNNI with AMX tiles for prompts, 2: AVX512-VNNI, 1: AVX2, 3: ARM dot product, 0: portable C */
int me_isa(void) {
#ifdef ME_AMX
    if (amx_ready()) return 4;
#endif
    return ME_ISA;
}
#endif /* ME_ISA_H */
