// ditc's own CPU kernels for the NNTile 1.1 target: StarPU codelets on the tiles of NNTile tensors.
//
// NNTile 1.1.0's softmax (`maxsumexp` + `softmax_inplace`) and GELU-tanh kernels are scalar loops over
// `exp` with a serial compensated sum. These are fp32 replacements written so that GCC vectorises them
// (`-O3 -march=native -fopenmp-simd`): a polynomial `exp` without branches, and plain reductions.
// Each function below takes NNTile `Tensor_fp32` objects (NNTile's pybind11 types: this module is built
// with the compiler and pybind11 NNTile was built with) and submits one task per tile on the tiles'
// StarPU handles, so StarPU orders them with NNTile's own tasks on the same data (sequential
// consistency). Softmax and its backward run over axis 0 of a column-major tile: a "column" is the
// contiguous run of axis-0 elements (the keys of one query, batch item and head).
//
// Built and cached by `dit_compiler.targets.nntile_1_1.native` (see its docstring); nothing here is
// NNTile's code: it uses NNTile's headers for the tensor type and its header-only `Codelet`.

#include <nntile/tensor/tensor.hh>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using nntile::Index;
using Tensor = nntile::tensor::Tensor<nntile::fp32_t>;
using Codelet = nntile::starpu::Codelet;

constexpr float INF = std::numeric_limits<float>::infinity();

// -- exp without branches (vectorisable) -------------------------------------------------------------
// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 split in two parts (Cody-Waite), exp(r) by
// Cephes' degree-6 polynomial on |r| <= ln(2)/2 (relative error about 1e-7). Exact at the ends that
// matter for a softmax: exp(-inf) = 0 and exp(NaN) = NaN; results below FLT_MIN flush to 0 and above
// exp(88.376) are +inf.
constexpr float EXP_LO = -87.33654f, EXP_HI = 88.3762626647949f;

inline float exp_(float x)
{
    float xc = x > EXP_LO ? x : EXP_LO;   // NaN takes EXP_LO here: no undefined conversion below
    xc = xc < EXP_HI ? xc : EXP_HI;
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const std::uint32_t bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const float y = p * scale;
    return x > EXP_HI ? INF : (x >= EXP_LO ? y : (x != x ? x : 0.0f));
}

// -- per-tile kernels -------------------------------------------------------------------------------
inline float column_max(const float *x, Index k)
{
    float m = -INF;
#pragma omp simd reduction(max:m)
    for(Index i = 0; i < k; ++i)
    {
        m = x[i] > m ? x[i] : m;
    }
    return m;
}

// softmax of each column in place: its max, then exp and sum, then the scale, while the column (a few
// KiB at most) stays in L1: one pass over memory. A column of -inf gives NaN, as torch's softmax does.
void softmax_tile(float *x, Index columns, Index k)
{
    for(Index c = 0; c < columns; ++c, x += k)
    {
        const float m = column_max(x, k);
        float s = 0.0f;
#pragma omp simd reduction(+:s)
        for(Index i = 0; i < k; ++i)
        {
            const float e = exp_(x[i] - m);
            x[i] = e;
            s += e;
        }
        const float inv = 1.0f / s;
#pragma omp simd
        for(Index i = 0; i < k; ++i)
        {
            x[i] *= inv;
        }
    }
}

// The first level of a softmax whose columns span several tiles: each column's (max, sum of exp(x - max))
// over this tile, combined online into the pair in `stats` ([2, columns], written fresh for the first
// tile). A part that is all -inf contributes (-inf, 0).
void softmax_stats_tile(const float *x, float *stats, Index columns, Index k, bool first)
{
    for(Index c = 0; c < columns; ++c, x += k, stats += 2)
    {
        const float m = column_max(x, k);
        float s = 0.0f;
        if(m != -INF)
        {
#pragma omp simd reduction(+:s)
            for(Index i = 0; i < k; ++i)
            {
                s += exp_(x[i] - m);
            }
        }
        if(first)
        {
            stats[0] = m;
            stats[1] = s;
        }
        else if(m > stats[0])
        {
            stats[1] = stats[1] * exp_(stats[0] - m) + s;
            stats[0] = m;
        }
        else if(m != -INF)
        {
            stats[1] += s * exp_(m - stats[0]);
        }
    }
}

// The second level: x = exp(x - max) / sum with the column's combined pair.
void softmax_apply_tile(const float *stats, float *x, Index columns, Index k)
{
    for(Index c = 0; c < columns; ++c, x += k, stats += 2)
    {
        const float m = stats[0], inv = 1.0f / stats[1];
#pragma omp simd
        for(Index i = 0; i < k; ++i)
        {
            x[i] = exp_(x[i] - m) * inv;
        }
    }
}

// Softmax backward given sum_keys(p * dp) per column (the layer computes it): dp = p * (dp - sum).
void softmax_backward_tile(const float *p, const float *sum, float *dp, Index columns, Index k)
{
    for(Index c = 0; c < columns; ++c, p += k, dp += k)
    {
        const float s = sum[c];
#pragma omp simd
        for(Index i = 0; i < k; ++i)
        {
            dp[i] = p[i] * (dp[i] - s);
        }
    }
}

// GELU-tanh: 0.5 x (1 + tanh(u)) = x sigma(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
constexpr float GELU_C0 = 0.7978845608028654f, GELU_C1 = 0.044715f;

void gelutanh_tile(const float *x, float *y, Index n)
{
#pragma omp simd
    for(Index i = 0; i < n; ++i)
    {
        const float v = x[i];
        y[i] = v / (1.0f + exp_(-2.0f * GELU_C0 * (v + GELU_C1 * v * v * v)));
    }
}

// dx = beta dx + dy (sigma + 2 x sigma (1 - sigma) u'), sigma = sigma(2u); dx is not read when beta = 0.
void gelutanh_backward_tile(const float *x, const float *dy, float *dx, Index n, float beta)
{
#pragma omp simd
    for(Index i = 0; i < n; ++i)
    {
        const float v = x[i], v2 = v * v;
        const float sigma = 1.0f / (1.0f + exp_(-2.0f * GELU_C0 * (v + GELU_C1 * v2 * v)));
        const float grad = sigma + 2.0f * v * sigma * (1.0f - sigma) * GELU_C0 * (1.0f + 3.0f * GELU_C1 * v2);
        dx[i] = (beta == 0.0f ? 0.0f : beta * dx[i]) + dy[i] * grad;
    }
}

// -- StarPU codelets --------------------------------------------------------------------------------
struct Args
{
    Index columns;  // columns of a tile (element-wise kernels: its elements)
    Index k;        // elements per column (element-wise kernels: 1)
    float beta;     // GELU backward: weight of the old gradient
    int first;      // softmax statistics: the first tile of its columns (writes, does not combine)
};

inline float *ptr(void *buffer)
{
    return reinterpret_cast<float *>(STARPU_VARIABLE_GET_PTR(buffer));
}

inline const Args &args_of(void *cl_args)
{
    return *reinterpret_cast<const Args *>(cl_args);
}

void cpu_softmax(void *buffers[], void *cl_args) noexcept
{
    const Args &a = args_of(cl_args);
    softmax_tile(ptr(buffers[0]), a.columns, a.k);
}

void cpu_softmax_stats(void *buffers[], void *cl_args) noexcept
{
    const Args &a = args_of(cl_args);
    softmax_stats_tile(ptr(buffers[0]), ptr(buffers[1]), a.columns, a.k, a.first != 0);
}

void cpu_softmax_apply(void *buffers[], void *cl_args) noexcept
{
    const Args &a = args_of(cl_args);
    softmax_apply_tile(ptr(buffers[0]), ptr(buffers[1]), a.columns, a.k);
}

void cpu_softmax_backward(void *buffers[], void *cl_args) noexcept
{
    const Args &a = args_of(cl_args);
    softmax_backward_tile(ptr(buffers[0]), ptr(buffers[1]), ptr(buffers[2]), a.columns, a.k);
}

void cpu_gelutanh(void *buffers[], void *cl_args) noexcept
{
    gelutanh_tile(ptr(buffers[0]), ptr(buffers[1]), args_of(cl_args).columns);
}

void cpu_gelutanh_backward(void *buffers[], void *cl_args) noexcept
{
    const Args &a = args_of(cl_args);
    gelutanh_backward_tile(ptr(buffers[0]), ptr(buffers[1]), ptr(buffers[2]), a.columns, a.beta);
}

uint32_t footprint(starpu_task *task)
{
    const Args &a = args_of(task->cl_arg);
    uint32_t hash = starpu_hash_crc32c_be_n(&a.columns, sizeof(a.columns), 0);
    return starpu_hash_crc32c_be_n(&a.k, sizeof(a.k), hash);
}

Codelet cl_softmax, cl_softmax_stats, cl_softmax_apply, cl_softmax_backward, cl_gelutanh, cl_gelutanh_backward;

void init_codelets()
{
    cl_softmax.init("ditc_softmax_fp32", footprint, {cpu_softmax}, {});
    cl_softmax_stats.init("ditc_softmax_stats_fp32", footprint, {cpu_softmax_stats}, {});
    cl_softmax_apply.init("ditc_softmax_apply_fp32", footprint, {cpu_softmax_apply}, {});
    cl_softmax_backward.init("ditc_softmax_backward_fp32", footprint, {cpu_softmax_backward}, {});
    cl_gelutanh.init("ditc_gelutanh_fp32", footprint, {cpu_gelutanh}, {});
    cl_gelutanh_backward.init("ditc_gelutanh_backward_fp32", footprint, {cpu_gelutanh_backward}, {});
}

starpu_data_handle_t handle(const Tensor &t, Index tile)
{
    return static_cast<starpu_data_handle_t>(t.get_tile_handle(tile));
}

// One task; StarPU frees the arguments. `buffers` are (mode, handle) pairs.
void submit(Codelet &cl, const Args &a, std::initializer_list<std::pair<int, starpu_data_handle_t>> buffers)
{
    auto *copy = static_cast<Args *>(std::malloc(sizeof(Args)));
    *copy = a;
    starpu_task *task = starpu_task_create();
    task->cl = &cl;
    task->cl_arg = copy;
    task->cl_arg_size = sizeof(Args);
    task->cl_arg_free = 1;
    task->nbuffers = static_cast<int>(buffers.size());
    int i = 0;
    for(const auto &[mode, h] : buffers)
    {
        task->handles[i] = h;
        task->modes[i] = static_cast<starpu_data_access_mode>(mode);
        ++i;
    }
    if(starpu_task_submit(task) != 0)
    {
        throw std::runtime_error(std::string("ditc kernels: StarPU refused a ") + cl.name + " task");
    }
}

// -- checks, with messages that name the tensors ------------------------------------------------------
std::string show(const Tensor &t)
{
    std::ostringstream out;
    for(size_t i = 0; i < t.shape.size(); ++i)
    {
        out << (i ? "," : "[") << t.shape[i];
    }
    out << "]/";
    for(size_t i = 0; i < t.basetile_shape.size(); ++i)
    {
        out << (i ? "," : "[") << t.basetile_shape[i];
    }
    out << "]";
    return out.str();
}

void check_like(const Tensor &a, const Tensor &b, const char *what)
{
    if(a.shape != b.shape || a.basetile_shape != b.basetile_shape)
    {
        throw std::invalid_argument(std::string(what) + ": shapes and tiles differ, " + show(a) + " vs " +
                                    show(b));
    }
}

// `small` is `big` with axis 0 replaced by `lead` elements in one tile (lead 0: axis 0 removed).
void check_slice(const Tensor &small, const Tensor &big, Index lead, const char *what)
{
    std::vector<Index> shape(big.shape.begin() + 1, big.shape.end());
    std::vector<Index> tile(big.basetile_shape.begin() + 1, big.basetile_shape.end());
    if(lead > 0)
    {
        shape.insert(shape.begin(), lead);
        tile.insert(tile.begin(), lead);
    }
    if(small.shape != shape || small.basetile_shape != tile)
    {
        throw std::invalid_argument(std::string(what) + ": " + show(small) + " is not " + show(big) +
                                    (lead ? " with axis 0 as 2" : " without axis 0"));
    }
}

// The tile of a tensor over the other axes matching tile `i` of a tensor tiled [g0, rest...] (column
// major: tile i = i0 + g0 * rest).
inline Index rest_of(const Tensor &t, Index i)
{
    return i / t.grid.shape[0];
}

inline Args columns_of(const Tensor &t, Index i)
{
    const auto &tile = t.get_tile_traits(i);
    return Args{tile.nelems / tile.shape[0], tile.shape[0], 0.0f, 0};
}

// -- what Python calls ------------------------------------------------------------------------------
void softmax_async(const Tensor &x, const Tensor &stats)
{
    if(x.grid.shape[0] == 1)
    {
        for(Index i = 0; i < x.grid.nelems; ++i)
        {
            submit(cl_softmax, columns_of(x, i), {{STARPU_RW, handle(x, i)}});
        }
        return;
    }
    check_slice(stats, x, 2, "softmax statistics");
    for(Index i = 0; i < x.grid.nelems; ++i)  // axis 0 varies fastest: the first of a column comes first
    {
        Args a = columns_of(x, i);
        a.first = i % x.grid.shape[0] == 0;
        submit(cl_softmax_stats, a, {{STARPU_R, handle(x, i)},
                                     {a.first ? STARPU_W : STARPU_RW, handle(stats, rest_of(x, i))}});
    }
    for(Index i = 0; i < x.grid.nelems; ++i)
    {
        submit(cl_softmax_apply, columns_of(x, i), {{STARPU_R, handle(stats, rest_of(x, i))},
                                                    {STARPU_RW, handle(x, i)}});
    }
}

void softmax_backward_async(const Tensor &probs, const Tensor &sumprod, const Tensor &grad)
{
    check_like(probs, grad, "softmax backward");
    check_slice(sumprod, probs, 0, "softmax backward sums");
    for(Index i = 0; i < probs.grid.nelems; ++i)
    {
        submit(cl_softmax_backward, columns_of(probs, i), {{STARPU_R, handle(probs, i)},
                                                           {STARPU_R, handle(sumprod, rest_of(probs, i))},
                                                           {STARPU_RW, handle(grad, i)}});
    }
}

void gelutanh_async(const Tensor &x, const Tensor &y)
{
    check_like(x, y, "gelutanh");
    for(Index i = 0; i < x.grid.nelems; ++i)
    {
        const Args a{x.get_tile_traits(i).nelems, 1, 0.0f, 0};
        submit(cl_gelutanh, a, {{STARPU_R, handle(x, i)}, {STARPU_W, handle(y, i)}});
    }
}

void gelutanh_backward_async(const Tensor &x, const Tensor &dy, float beta, const Tensor &dx)
{
    check_like(x, dy, "gelutanh backward");
    check_like(x, dx, "gelutanh backward");
    for(Index i = 0; i < x.grid.nelems; ++i)
    {
        const Args a{x.get_tile_traits(i).nelems, 1, beta, 0};
        submit(cl_gelutanh_backward, a, {{STARPU_R, handle(x, i)}, {STARPU_R, handle(dy, i)},
                                         {beta == 0.0f ? STARPU_W : STARPU_RW, handle(dx, i)}});
    }
}

}  // namespace

PYBIND11_MODULE(ditc_nntile_kernels, m)
{
    py::module_::import("nntile.nntile_core");  // NNTile's tensor types, registered by its module
    init_codelets();
    m.doc() = "ditc's fp32 CPU kernels as StarPU codelets on NNTile 1.1 tensors (tasks submitted per tile)";
    m.def("softmax_async", &softmax_async, py::arg("x"), py::arg("stats"),
          "x = softmax(x) over axis 0, in place. Where axis 0 is one tile, one task per tile; otherwise each "
          "column's (max, sum) pairs are combined online across its tiles into `stats` [2, x.shape[1:]] "
          "(tiled as x without axis 0), then applied.");
    m.def("softmax_backward_async", &softmax_backward_async, py::arg("probs"), py::arg("sumprod"), py::arg("grad"),
          "grad = probs * (grad - sumprod), sumprod [x.shape[1:]] the sum over axis 0 of probs * grad.");
    m.def("gelutanh_async", &gelutanh_async, py::arg("x"), py::arg("y"), "y = GELU-tanh(x).");
    m.def("gelutanh_backward_async", &gelutanh_backward_async, py::arg("x"), py::arg("dy"), py::arg("beta"),
          py::arg("dx"), "dx = beta dx + dy GELU-tanh'(x); dx is not read when beta is 0.");
}
