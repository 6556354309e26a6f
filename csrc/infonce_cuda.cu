// CUDA kernels of the fused InfoNCE op (contract: pnr_kernels/ops/infonce.py, infonce_cuda.h).
//
// Each (row tile x key tile) block of logits is built in shared memory from kChunk-wide slices of
// the embedding dimension: with WMMA tensor-core fragments (16x16x16, float32 accumulation) for
// bfloat16/float16, with float32 FMAs for float32.
//   forward:  one thread block owns a tile of kTileRows rows of one row set and one key split
//             (grid: row tiles x row sets x splits) and walks its split's key tiles of every key
//             block with an online log-sum-exp per row (two threads per row, combined with a warp
//             shuffle), writing a partial lse per split;
//   backward: two kernels, each owning what it writes, so that no atomics are needed and the
//             gradients are bitwise reproducible run to run (like the Triton backward):
//             rows kernel (grid: row tiles x row sets x splits): walks its split's key tiles of
//               every key block, recomputes the logits tile, turns it into W = g * exp(scale *
//               logit - lse) (masked entries 0) and accumulates  d rows tile += scale * W @ keys
//               tile  into its split's partial gradient;
//             keys kernel (grid: key tiles x key blocks): walks every row tile of every row set,
//               recomputes the tile and W the same way and accumulates  d keys tile += scale *
//               W^T @ rows tile.
//             The price is a second recomputation of the logits where both the rows and the keys
//             of a pair need a gradient (8 instead of 6 M M_k D multiply-adds of backward).
//             W is held as (g / g_max) * p with g_max the largest finite |g| of the row tile, so
//             that its entries lie in [-1, 1] and keep their precision when rounded to
//             bfloat16/float16 for the tensor-core products; the products are multiplied back by
//             scale * g_max. A non-finite g stays non-finite in W.
// Non-finite values: every max propagates NaN (nan_max; fmaxf would drop it), so a NaN logit
// gives a NaN lse and a NaN or Inf in g non-finite gradients, exactly where the reference has them.
// Key splits (infonce_key_splits): with few rows against many keys (MoCo-PNR: 256 rows against 2 x
// 65536 queue entries would be 8 blocks) the key tiles of every key block are split across blocks,
// flash-decoding style, as the Triton forward and dRow do: split s walks tiles [s t, (s + 1) t) of
// each block (t = ceil(tiles / splits)); the binding merges the partial lse with logsumexp and sums
// the partial row gradients, both in a fixed order (deterministic). One split when the row tiles
// alone fill the GPU.
// Nothing of size rows x keys exists outside shared memory.
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cuda_common.cuh"
#include "infonce_cuda.h"
#include "safe_math.h"

namespace pnr_kernels {
namespace {

constexpr int kTileRows = 64;
constexpr int kTileKeys = 64;
constexpr int kChunk = 32;      // embedding columns per shared-memory slice
constexpr int kThreads = 128;   // 4 warps; two threads per tile row
constexpr int kPad = 8;         // keeps WMMA pointers 32-byte aligned and spreads banks
constexpr int kLogitsPad = 4;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kBFloat16TensorCores = true;
#else
constexpr bool kBFloat16TensorCores = false;
#endif

template <typename T>
constexpr bool uses_tensor_cores() {
  return std::is_same_v<T, __half> || (std::is_same_v<T, __nv_bfloat16> && kBFloat16TensorCores);
}

template <typename T>
struct TileStorage {
  alignas(32) T rows[kTileRows][kChunk + kPad];
  alignas(32) T keys[kTileKeys][kChunk + kPad];
  alignas(32) float logits[kTileRows][kTileKeys + kLogitsPad];
};

// Loads columns k0 .. k0 + kChunk of matrix rows first .. first + count into dst (zero outside),
// walking whichever index is contiguous in memory fastest so that loads coalesce.
template <typename T>
__device__ void load_slice(T (*dst)[kChunk + kPad], const StridedMatrix& m, int64_t first, int count, int64_t k0) {
  static_assert(kTileRows == kTileKeys, "one slice loader serves both operands");
  const bool rows_contiguous = m.row_stride == 1 && m.col_stride != 1;
  for (int idx = threadIdx.x; idx < kTileRows * kChunk; idx += kThreads) {
    const int r = rows_contiguous ? idx % kTileRows : idx / kChunk;
    const int c = rows_contiguous ? idx / kTileRows : idx % kChunk;
    const int64_t col = k0 + c;
    dst[r][c] = (r < count && col < m.cols) ? load_element<T>(m, first + r, col) : from_float<T>(0.f);
  }
}

// storage.logits = rows tile . keys tile^T (unscaled), float32; ends synchronised.
template <typename T>
__device__ void tile_logits(TileStorage<T>& storage, const StridedMatrix& rows, int64_t i0, int tm,
                            const StridedMatrix& keys, int64_t j0, int tn) {
  const int64_t dim = rows.cols;
  if constexpr (uses_tensor_cores<T>()) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;  // rows 16 * warp .. + 16, all kTileKeys keys
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTileKeys / 16];
    for (auto& f : acc) wmma::fill_fragment(f, 0.f);
    for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
      load_slice(storage.rows, rows, i0, tm, k0);
      load_slice(storage.keys, keys, j0, tn, k0);
      __syncthreads();
      for (int kk = 0; kk < kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, &storage.rows[16 * warp][kk], kChunk + kPad);
        for (int n = 0; n < kTileKeys / 16; ++n) {
          // keys[j][k] read as the column-major (k, j) operand: the product is rows . keys^T
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, &storage.keys[16 * n][kk], kChunk + kPad);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
      __syncthreads();
    }
    for (int n = 0; n < kTileKeys / 16; ++n) {
      wmma::store_matrix_sync(&storage.logits[16 * warp][16 * n], acc[n], kTileKeys + kLogitsPad,
                              wmma::mem_row_major);
    }
  } else {
    // Each thread: rows 4 * (t / 8) .. + 4, keys t % 8 + 8 * n (n < 8).
    const int row0 = 4 * (threadIdx.x / 8), key0 = threadIdx.x % 8;
    float acc[4][8] = {};
    for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
      load_slice(storage.rows, rows, i0, tm, k0);
      load_slice(storage.keys, keys, j0, tn, k0);
      __syncthreads();
      for (int kk = 0; kk < kChunk; ++kk) {
        float a[4], b[8];
        for (int i = 0; i < 4; ++i) a[i] = to_float(storage.rows[row0 + i][kk]);
        for (int n = 0; n < 8; ++n) b[n] = to_float(storage.keys[key0 + 8 * n][kk]);
        for (int i = 0; i < 4; ++i)
          for (int n = 0; n < 8; ++n) acc[i][n] = fmaf(a[i], b[n], acc[i][n]);
      }
      __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
      for (int n = 0; n < 8; ++n) storage.logits[row0 + i][key0 + 8 * n] = acc[i][n];
  }
  __syncthreads();
}

// How many of total items a tile starting at `first` holds.
__device__ __forceinline__ int tile_extent(int64_t total, int64_t first, int tile) {
  return total - first < tile ? static_cast<int>(total - first) : tile;
}

// Whether key column c of the tile (keys j0 ..) counts for tile row `row` (rows i0 ..).
__device__ __forceinline__ bool counts(int c, int tn, bool exclude_diagonal, int64_t i0, int row, int64_t j0) {
  return c < tn && !(exclude_diagonal && i0 + row == j0 + c);
}

// Keys [first, last) of a key block of `count` keys that split `split` of `splits` walks: whole
// tiles, as evenly as they go (trailing splits may get none).
struct KeyRange {
  int64_t first, last;
};
__host__ __device__ __forceinline__ KeyRange split_range(int64_t count, int split, int splits) {
  const int64_t per_split = ceil_div(ceil_div(count, kTileKeys), splits) * kTileKeys;
  const int64_t first = split * per_split;
  return {first, first + per_split < count ? first + per_split : count};
}

// lse: (splits, R, M); split blockIdx.z writes its partial lse (-inf where it has no key).
template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(InfoNCERowSets rows, InfoNCEKeyBlocks keys, float* lse) {
  __shared__ TileStorage<T> storage;
  const int r = blockIdx.y;
  lse += static_cast<int64_t>(blockIdx.z) * rows.count * rows.set[0].rows;
  const StridedMatrix a = rows.set[r];
  const float scale = rows.scale[r];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int tm = tile_extent(a.rows, i0, kTileRows);
  const int row = threadIdx.x / 2, first_col = (threadIdx.x % 2) * (kTileKeys / 2);
  float running_max = -INFINITY, running_sum = 0.f;
  for (int k = 0; k < keys.count; ++k) {
    const StridedMatrix b = keys.block[k];
    const bool exclude = keys.exclude_diagonal[k];
    const KeyRange range = split_range(b.rows, blockIdx.z, gridDim.z);
    for (int64_t j0 = range.first; j0 < range.last; j0 += kTileKeys) {
      const int tn = tile_extent(b.rows, j0, kTileKeys);
      tile_logits(storage, a, i0, tm, b, j0, tn);
      float tile_max = -INFINITY;
      for (int c = first_col; c < first_col + kTileKeys / 2; ++c) {
        if (counts(c, tn, exclude, i0, row, j0)) tile_max = nan_max(tile_max, scale * storage.logits[row][c]);
      }
      tile_max = nan_max(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      const float new_max = nan_max(running_max, tile_max);
      // new_max == -inf: every logit so far is masked, nothing to add (and -inf - -inf is NaN).
      // A NaN new_max makes the sum, and so lse, NaN.
      // The shuffle stays outside the branch: every lane of the warp must reach it.
      float sum = 0.f;
      if (new_max != -INFINITY) {
        for (int c = first_col; c < first_col + kTileKeys / 2; ++c) {
          if (counts(c, tn, exclude, i0, row, j0)) sum += expf(scale * storage.logits[row][c] - new_max);
        }
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      if (new_max != -INFINITY) {
        running_sum = running_sum * expf(running_max - new_max) + sum;
        running_max = new_max;
      }
      __syncthreads();  // the next tile overwrites storage.logits
    }
  }
  // running_sum == 0 (no key in this split, or all masked): -inf + log(0) = -inf
  if (first_col == 0 && row < tm) lse[r * a.rows + i0 + row] = running_max + logf(running_sum);
}

// W in the element type, the tensor-core operand of the backward products.
template <typename T>
struct TensorCoreWeights {
  alignas(32) T w[kTileRows][kTileKeys + kPad];
};
struct NoWeights {};
template <typename T>
using WeightStorage = std::conditional_t<uses_tensor_cores<T>(), TensorCoreWeights<T>, NoWeights>;

// Thread t's share of a (kTileRows, kChunk) product: output row/key t / 2, 16 of the columns.
__device__ __forceinline__ int product_output() { return threadIdx.x / 2; }
__device__ __forceinline__ int product_first_dim() { return (threadIdx.x % 2) * (kChunk / 2); }

// d rows slice += factor * W @ keys slice and d keys slice += factor * W^T @ rows slice for the
// embedding columns k0 .. k0 + kChunk, with WMMA fragments; storage.logits is the scratch the
// fragments are stored to (each warp stores and reads back its own 16 outputs). The calling kernel
// owns the rows (rows kernel) or the keys (keys kernel) it accumulates into, and each element is
// written by one thread: plain read-modify-writes, no atomics.
template <typename T>
__device__ void tensor_core_gradients(TileStorage<T>& storage, const TensorCoreWeights<T>& weights,
                                      float* row_grad, float* key_grad, int64_t i0, int tm, int64_t j0, int tn,
                                      int64_t k0, int64_t dim, float factor) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, out = product_output(), first_dim = product_first_dim();
  auto* scratch = reinterpret_cast<float(*)[kChunk + kLogitsPad]>(&storage.logits[0][0]);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kChunk / 16];
  if (row_grad != nullptr) {  // warp: rows 16 * warp .. + 16
    for (auto& f : acc) wmma::fill_fragment(f, 0.f);
    for (int jj = 0; jj < kTileKeys; jj += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> w;
      wmma::load_matrix_sync(w, &weights.w[16 * warp][jj], kTileKeys + kPad);
      for (int n = 0; n < kChunk / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, &storage.keys[jj][16 * n], kChunk + kPad);
        wmma::mma_sync(acc[n], w, b, acc[n]);
      }
    }
    for (int n = 0; n < kChunk / 16; ++n) {
      wmma::store_matrix_sync(&scratch[16 * warp][16 * n], acc[n], kChunk + kLogitsPad, wmma::mem_row_major);
    }
    __syncwarp();
    for (int d = 0; d < kChunk / 2 && out < tm; ++d) {
      const int64_t col = k0 + first_dim + d;
      if (col < dim) row_grad[(i0 + out) * dim + col] += factor * scratch[out][first_dim + d];
    }
    __syncwarp();
  }
  if (key_grad != nullptr) {  // warp: keys 16 * warp .. + 16
    for (auto& f : acc) wmma::fill_fragment(f, 0.f);
    for (int ii = 0; ii < kTileRows; ii += 16) {
      // W^T as a column-major (key, row) operand: element (j, i) is weights.w[i][j]
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> wt;
      wmma::load_matrix_sync(wt, &weights.w[ii][16 * warp], kTileKeys + kPad);
      for (int n = 0; n < kChunk / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, &storage.rows[ii][16 * n], kChunk + kPad);
        wmma::mma_sync(acc[n], wt, b, acc[n]);
      }
    }
    for (int n = 0; n < kChunk / 16; ++n) {
      wmma::store_matrix_sync(&scratch[16 * warp][16 * n], acc[n], kChunk + kLogitsPad, wmma::mem_row_major);
    }
    __syncwarp();
    for (int d = 0; d < kChunk / 2 && out < tn; ++d) {
      const int64_t col = k0 + first_dim + d;
      if (col < dim) key_grad[(j0 + out) * dim + col] += factor * scratch[out][first_dim + d];
    }
    __syncwarp();
  }
}

// The same products with float32 FMAs, reading W (float32) from storage.logits.
template <typename T>
__device__ void fma_gradients(TileStorage<T>& storage, float* row_grad, float* key_grad, int64_t i0, int tm,
                              int64_t j0, int tn, int64_t k0, int64_t dim, float factor) {
  const int out = product_output(), first_dim = product_first_dim();
  float acc[kChunk / 2];
  if (row_grad != nullptr && out < tm) {
    for (float& v : acc) v = 0.f;
    for (int j = 0; j < kTileKeys; ++j) {
      const float w = storage.logits[out][j];
      for (int d = 0; d < kChunk / 2; ++d) acc[d] = fmaf(w, to_float(storage.keys[j][first_dim + d]), acc[d]);
    }
    for (int d = 0; d < kChunk / 2; ++d) {
      const int64_t col = k0 + first_dim + d;
      if (col < dim) row_grad[(i0 + out) * dim + col] += factor * acc[d];
    }
  }
  if (key_grad != nullptr && out < tn) {
    for (float& v : acc) v = 0.f;
    for (int i = 0; i < kTileRows; ++i) {
      const float w = storage.logits[i][out];
      for (int d = 0; d < kChunk / 2; ++d) acc[d] = fmaf(w, to_float(storage.rows[i][first_dim + d]), acc[d]);
    }
    for (int d = 0; d < kChunk / 2; ++d) {
      const int64_t col = k0 + first_dim + d;
      if (col < dim) key_grad[(j0 + out) * dim + col] += factor * acc[d];
    }
  }
}

// g_max of a row tile: the largest finite |g| (1 if there is none but a non-finite g, so that the
// non-finite values pass into W unscaled); 0 when no gradient flows through the tile. Every
// thread computes the same value from the same memory.
__device__ __forceinline__ float tile_gradient_scale(const float* tile_g, int tm) {
  float g_max = 0.f;
  bool non_finite = false;
  for (int i = 0; i < tm; ++i) {
    const float g = tile_g[i];
    if (is_finite(g)) {
      g_max = fmaxf(g_max, fabsf(g));
    } else {
      non_finite = true;
    }
  }
  return g_max == 0.f && non_finite ? 1.f : g_max;
}

// Recomputes the logits of rows i0.. (set a) x keys j0.. (block b) and stores W / (scale g_max):
// (g / g_max) * exp(scale * logit - lse), 0 where masked or where the row has no key at all; in
// weights.w (tensor cores) or in storage.logits (FMA path). Ends synchronised.
template <typename T>
__device__ void tile_weights(TileStorage<T>& storage, WeightStorage<T>& weights, const StridedMatrix& a, int64_t i0,
                             int tm, const StridedMatrix& b, int64_t j0, int tn, bool exclude, float scale,
                             const float* tile_g, const float* tile_lse, float g_max) {
  const int row = threadIdx.x / 2, first_col = (threadIdx.x % 2) * (kTileKeys / 2);  // two threads per row
  const float row_lse = row < tm ? tile_lse[row] : -INFINITY;
  const float row_g = row < tm ? tile_g[row] / g_max : 0.f;
  tile_logits(storage, a, i0, tm, b, j0, tn);
  for (int c = first_col; c < first_col + kTileKeys / 2; ++c) {
    const bool live = row_lse != -INFINITY && counts(c, tn, exclude, i0, row, j0);
    const float w = live ? row_g * expf(scale * storage.logits[row][c] - row_lse) : 0.f;
    if constexpr (uses_tensor_cores<T>()) {
      weights.w[row][c] = from_float<T>(w);
    } else {
      storage.logits[row][c] = w;
    }
  }
  __syncthreads();
}

// Row gradients: the block owns rows i0 .. i0 + kTileRows of row set blockIdx.y in the partial
// gradient of split blockIdx.z (grads.rows[r] is (splits, M, D)).
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_rows_kernel(InfoNCERowSets rows, InfoNCEKeyBlocks keys,
                                                                 const float* grad_lse, const float* lse,
                                                                 InfoNCEGrads grads) {
  __shared__ TileStorage<T> storage;
  __shared__ WeightStorage<T> weights;
  const int r = blockIdx.y;
  float* row_grad = grads.rows[r];
  if (row_grad == nullptr) return;
  const StridedMatrix a = rows.set[r];
  row_grad += static_cast<int64_t>(blockIdx.z) * a.rows * a.cols;
  const float scale = rows.scale[r];
  const int64_t dim = a.cols;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int tm = tile_extent(a.rows, i0, kTileRows);
  const float* tile_g = grad_lse + r * a.rows + i0;
  const float g_max = tile_gradient_scale(tile_g, tm);
  if (g_max == 0.f) return;  // no gradient flows through this row tile (the same for every thread)
  const float factor = scale * g_max;
  for (int k = 0; k < keys.count; ++k) {
    const StridedMatrix b = keys.block[k];
    const KeyRange range = split_range(b.rows, blockIdx.z, gridDim.z);
    for (int64_t j0 = range.first; j0 < range.last; j0 += kTileKeys) {
      const int tn = tile_extent(b.rows, j0, kTileKeys);
      tile_weights(storage, weights, a, i0, tm, b, j0, tn, keys.exclude_diagonal[k], scale, tile_g,
                   lse + r * a.rows + i0, g_max);
      for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
        load_slice(storage.keys, b, j0, tn, k0);
        __syncthreads();
        if constexpr (uses_tensor_cores<T>()) {
          tensor_core_gradients(storage, weights, row_grad, nullptr, i0, tm, j0, tn, k0, dim, factor);
        } else {
          fma_gradients(storage, row_grad, nullptr, i0, tm, j0, tn, k0, dim, factor);
        }
        __syncthreads();
      }
    }
  }
}

// Key gradients: the block owns keys j0 .. j0 + kTileKeys of key block blockIdx.y (blocks past the
// end of a shorter key block exit).
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_keys_kernel(InfoNCERowSets rows, InfoNCEKeyBlocks keys,
                                                                 const float* grad_lse, const float* lse,
                                                                 InfoNCEGrads grads) {
  __shared__ TileStorage<T> storage;
  __shared__ WeightStorage<T> weights;
  const int k = blockIdx.y;
  float* key_grad = grads.keys[k];
  const StridedMatrix b = keys.block[k];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileKeys;
  if (key_grad == nullptr || j0 >= b.rows) return;
  const int tn = tile_extent(b.rows, j0, kTileKeys);
  const int64_t dim = b.cols;
  for (int r = 0; r < rows.count; ++r) {
    const StridedMatrix a = rows.set[r];
    const float scale = rows.scale[r];
    for (int64_t i0 = 0; i0 < a.rows; i0 += kTileRows) {
      const int tm = tile_extent(a.rows, i0, kTileRows);
      const float* tile_g = grad_lse + r * a.rows + i0;
      const float g_max = tile_gradient_scale(tile_g, tm);
      if (g_max == 0.f) continue;  // the same for every thread
      tile_weights(storage, weights, a, i0, tm, b, j0, tn, keys.exclude_diagonal[k], scale, tile_g,
                   lse + r * a.rows + i0, g_max);
      for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
        load_slice(storage.rows, a, i0, tm, k0);
        __syncthreads();
        if constexpr (uses_tensor_cores<T>()) {
          tensor_core_gradients(storage, weights, nullptr, key_grad, i0, tm, j0, tn, k0, dim, scale * g_max);
        } else {
          fma_gradients(storage, nullptr, key_grad, i0, tm, j0, tn, k0, dim, scale * g_max);
        }
        __syncthreads();
      }
    }
  }
}

}  // namespace

int infonce_key_splits(const InfoNCERowSets& rows, const InfoNCEKeyBlocks& keys) {
  int device = 0, processors = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // clear the error: one split is always correct
    return 1;
  }
  int64_t key_tiles = 0;
  for (int k = 0; k < keys.count; ++k) key_tiles = std::max(key_tiles, ceil_div(keys.block[k].rows, kTileKeys));
  const int64_t blocks = ceil_div(rows.set[0].rows, kTileRows) * rows.count;
  const int64_t wanted = ceil_div(2 * static_cast<int64_t>(processors), std::max<int64_t>(blocks, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min({wanted, key_tiles, kMaxInfoNCEKeySplits})));
}

const char* infonce_forward_cuda(DType dtype, const InfoNCERowSets& rows, const InfoNCEKeyBlocks& keys, int splits,
                                 float* lse, void* stream) {
  if (rows.set[0].rows == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows.set[0].rows, kTileRows)), rows.count, splits);
  return dispatch_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    forward_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(rows, keys, lse);
    return launch_error();
  });
}

const char* infonce_backward_cuda(DType dtype, const InfoNCERowSets& rows, const InfoNCEKeyBlocks& keys, int splits,
                                  const float* grad_lse, const float* lse, const InfoNCEGrads& grads, void* stream) {
  if (rows.set[0].rows == 0) return nullptr;  // no rows: every gradient is the zeros it starts as
  bool any_rows = false, any_keys = false;
  int64_t key_tiles = 0;
  for (int r = 0; r < rows.count; ++r) any_rows = any_rows || grads.rows[r] != nullptr;
  for (int k = 0; k < keys.count; ++k) {
    if (grads.keys[k] == nullptr) continue;
    any_keys = true;
    key_tiles = std::max(key_tiles, ceil_div(keys.block[k].rows, kTileKeys));
  }
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto element) -> const char* {
    using T = decltype(element);
    if (any_rows) {
      const dim3 grid(static_cast<unsigned>(ceil_div(rows.set[0].rows, kTileRows)), rows.count, splits);
      backward_rows_kernel<T><<<grid, kThreads, 0, s>>>(rows, keys, grad_lse, lse, grads);
      if (const char* error = launch_error()) return error;
    }
    if (any_keys && key_tiles > 0) {
      const dim3 grid(static_cast<unsigned>(key_tiles), keys.count);
      backward_keys_kernel<T><<<grid, kThreads, 0, s>>>(rows, keys, grad_lse, lse, grads);
      if (const char* error = launch_error()) return error;
    }
    return nullptr;
  });
}

}  // namespace pnr_kernels
