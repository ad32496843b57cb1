/* Minimal Cortex-M start-up for running sqil's generated C under QEMU (mps2-an386 Cortex-M4,
 * mps2-an500 Cortex-M7): a vector table whose reset handler enables the FPU (when built for
 * one) and enters newlib's semihosting C runtime (rdimon: stdio and exit through the host). */
#include <stdint.h>

extern void _start(void);
extern uint32_t __stack;

static void fault(void)
{
    for (;;) {
    }
}

void Reset_Handler(void)
{
#if defined(__ARM_FP)
    /* CPACR: full access to CP10 and CP11. */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm__ volatile("dsb\n isb" ::: "memory");
#endif
    _start();
    fault();
}

__attribute__((section(".vectors"), used)) static const void *const vectors[16] = {
    &__stack, (const void *)Reset_Handler, (const void *)fault, (const void *)fault,
    (const void *)fault, (const void *)fault, (const void *)fault, 0, 0, 0, 0,
    (const void *)fault, (const void *)fault, 0, (const void *)fault, (const void *)fault,
};
