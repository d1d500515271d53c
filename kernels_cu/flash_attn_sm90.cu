// The Hopper translation unit: cupyflash/jit.py compiles it apart from flash_attn.cu, with -arch=sm_90a (wgmma,
// TMA and setmaxnreg exist only there), inlining its local headers as for flash_attn.cu.
#include "flash_fwd_sm90.cuh"
#include "flash_bwd_sm90.cuh"
#include "flash_bwd_sm90_wide.cuh"
