// The one translation unit NVRTC compiles: cupyflash/jit.py inlines the local headers below (so their text
// is part of CuPy's cache key) and instantiates templates through name_expressions.
#include "flash_fwd.cuh"
#include "flash_bwd.cuh"
#include "tile_classes.cuh"
#include "key_mask.cuh"
#include "unseen_rows.cuh"
