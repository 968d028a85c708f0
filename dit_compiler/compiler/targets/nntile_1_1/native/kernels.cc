// ditc's own CPU kernels for the NNTile 1.1 target: StarPU codelets on the tiles of NNTile tensors.
//
// NNTile 1.1.0's softmax (`maxsumexp` + `softmax_inplace`) and GELU-tanh kernels are scalar loops over
// `exp` with a serial compensated sum. These are fp32 replacements written so that GCC vectorises them
// (`-O3 -march=native -fopenmp-simd`): a polynomial `exp` without branches, and plain reductions.
// Each function below takes NNTile `Tensor_fp32` objects (NNTile's pybind11 types: this module is built
// with the compiler and pybind11 NNTile was built with) and submits one task per tile on the tiles'
// StarPU handles, so StarPU orders them with NNTile's own tasks on the same data (sequential
// consistency). Softmax and its backward run over axis 0 of a column-major tile: a "column" is the
// contiguous run of axis-0 elements (the keys of one query, batch item and head); where axis 0 spans
// several tiles, one softmax task takes all of them, so each column is still done in one pass.
//
// Built and cached by `dit_compiler.targets.nntile_1_1.native` (see its docstring); nothing here is
// NNTile's code: it uses NNTile's headers for the tensor type and its header-only `Codelet`.

#include <nntile/tensor/tensor.hh>
#include <pybind11/pybind11.h>

#include <cmath>
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

// A column's part in one tile: exp(x - m) in place, and the sum of what it wrote.
inline float exp_sum(float *x, Index k, float m)
{
    float s = 0.0f;
#pragma omp simd reduction(+:s)
    for(Index i = 0; i < k; ++i)
    {
        const float e = exp_(x[i] - m);
        x[i] = e;
        s += e;
    }
    return s;
}

inline void scale(float *x, Index k, float alpha)
{
#pragma omp simd
    for(Index i = 0; i < k; ++i)
    {
        x[i] *= alpha;
    }
}

// softmax of each column in place, the column split over `parts` tiles (column lengths k[p]): its max,
// then exp and sum, then the scale, while the column (a few KiB) stays in L1: one pass over memory. (An
// online running max would read it once less, from L1, for a second exp per element.) A column of -inf
// gives NaN, as torch's softmax does.
void softmax_columns(float *const *parts_data, const Index *k, Index parts, Index columns)
{
    for(Index c = 0; c < columns; ++c)
    {
        float m = -INF;
        for(Index p = 0; p < parts; ++p)
        {
            const float mp = column_max(parts_data[p] + c * k[p], k[p]);
            m = mp > m ? mp : m;
        }
        float s = 0.0f;
        for(Index p = 0; p < parts; ++p)
        {
            s += exp_sum(parts_data[p] + c * k[p], k[p], m);
        }
        for(Index p = 0; p < parts; ++p)
        {
            scale(parts_data[p] + c * k[p], k[p], 1.0f / s);
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

// AdamW on one tile (torch.optim.AdamW's update; the caller folds the bias corrections into the
// constants): m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p = decay p - step m / (sqrt(v) + eps).
// On the first step (`first`) the old moments are not read. One pass over the four arrays, against
// five NNTile tasks a tile and their passes.
struct AdamArgs
{
    Index n;
    float b1, b2, decay, step, eps;
    bool first;
};

template<bool FIRST>
void adamw_loop(const AdamArgs &a, const float *g, float *m, float *v, float *p)
{
    const float b1 = a.b1, b2 = a.b2, c1 = 1.0f - a.b1, c2 = 1.0f - a.b2;
#pragma omp simd
    for(Index i = 0; i < a.n; ++i)
    {
        const float gi = g[i];
        const float mi = (FIRST ? 0.0f : b1 * m[i]) + c1 * gi;
        const float vi = (FIRST ? 0.0f : b2 * v[i]) + c2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = a.decay * p[i] - a.step * mi / (std::sqrt(vi) + a.eps);
    }
}

void adamw_tile(const AdamArgs &a, const float *g, float *m, float *v, float *p)
{
    if(a.first)
    {
        adamw_loop<true>(a, g, m, v, p);
    }
    else
    {
        adamw_loop<false>(a, g, m, v, p);
    }
}

// -- StarPU codelets --------------------------------------------------------------------------------
// Arguments: [columns, k, beta] for softmax backward (columns of k elements) and GELU-tanh (n elements:
// columns = n, k = 1); for softmax [columns, parts, k of each part] (`SoftmaxArgs`).
struct Args
{
    Index columns;
    Index k;
    float beta;     // GELU backward: weight of the old gradient
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
    const Index *a = static_cast<const Index *>(cl_args);
    const Index columns = a[0], parts = a[1];
    std::vector<float *> data(parts);
    for(Index p = 0; p < parts; ++p)
    {
        data[p] = ptr(buffers[p]);
    }
    softmax_columns(data.data(), a + 2, parts, columns);
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

void cpu_adamw(void *buffers[], void *cl_args) noexcept
{
    adamw_tile(*reinterpret_cast<const AdamArgs *>(cl_args), ptr(buffers[0]), ptr(buffers[1]), ptr(buffers[2]),
               ptr(buffers[3]));
}

uint32_t footprint(starpu_task *task)
{
    return starpu_hash_crc32c_be_n(task->cl_arg, task->cl_arg_size, 0);
}

Codelet cl_softmax, cl_softmax_backward, cl_gelutanh, cl_gelutanh_backward, cl_adamw;

void init_codelets()
{
    cl_softmax.init("ditc_softmax_fp32", footprint, {cpu_softmax}, {});
    cl_softmax_backward.init("ditc_softmax_backward_fp32", footprint, {cpu_softmax_backward}, {});
    cl_gelutanh.init("ditc_gelutanh_fp32", footprint, {cpu_gelutanh}, {});
    cl_gelutanh_backward.init("ditc_gelutanh_backward_fp32", footprint, {cpu_gelutanh_backward}, {});
    cl_adamw.init("ditc_adamw_fp32", footprint, {cpu_adamw}, {});
}

starpu_data_handle_t handle(const Tensor &t, Index tile)
{
    return static_cast<starpu_data_handle_t>(t.get_tile_handle(tile));
}

// One task on `data` (handles and access modes), with a copy of `size` bytes of `args` (StarPU frees it).
void submit(Codelet &cl, const void *args, size_t size, std::vector<starpu_data_descr> data)
{
    void *copy = std::malloc(size);
    std::memcpy(copy, args, size);
    if(starpu_task_insert(&cl, STARPU_DATA_MODE_ARRAY, data.data(), static_cast<int>(data.size()),
                          STARPU_CL_ARGS, copy, size, 0) != 0)
    {
        throw std::runtime_error(std::string("ditc kernels: StarPU refused a ") + cl.name + " task");
    }
}

void submit(Codelet &cl, const Args &a, std::vector<starpu_data_descr> data)
{
    submit(cl, &a, sizeof(a), std::move(data));
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

// `small` is `big` without axis 0, tiles included.
void check_slice(const Tensor &small, const Tensor &big, const char *what)
{
    const std::vector<Index> shape(big.shape.begin() + 1, big.shape.end());
    const std::vector<Index> tile(big.basetile_shape.begin() + 1, big.basetile_shape.end());
    if(small.shape != shape || small.basetile_shape != tile)
    {
        throw std::invalid_argument(std::string(what) + ": " + show(small) + " is not " + show(big) +
                                    " without axis 0");
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
    return Args{tile.nelems / tile.shape[0], tile.shape[0], 0.0f};
}

// -- what Python calls ------------------------------------------------------------------------------
void softmax_async(const Tensor &x)
{
    const Index parts = x.grid.shape[0];
    for(Index first = 0; first < x.grid.nelems; first += parts)  // the tiles of axis 0 are consecutive
    {
        std::vector<Index> args{columns_of(x, first).columns, parts};
        std::vector<starpu_data_descr> data;
        for(Index i = first; i < first + parts; ++i)
        {
            args.push_back(x.get_tile_traits(i).shape[0]);
            data.push_back({handle(x, i), STARPU_RW});
        }
        submit(cl_softmax, args.data(), args.size() * sizeof(Index), std::move(data));
    }
}

void softmax_backward_async(const Tensor &probs, const Tensor &sumprod, const Tensor &grad)
{
    check_like(probs, grad, "softmax backward");
    check_slice(sumprod, probs, "softmax backward sums");
    for(Index i = 0; i < probs.grid.nelems; ++i)
    {
        submit(cl_softmax_backward, columns_of(probs, i), {{handle(probs, i), STARPU_R},
                                                           {handle(sumprod, rest_of(probs, i)), STARPU_R},
                                                           {handle(grad, i), STARPU_RW}});
    }
}

void gelutanh_async(const Tensor &x, const Tensor &y)
{
    check_like(x, y, "gelutanh");
    for(Index i = 0; i < x.grid.nelems; ++i)
    {
        const Args a{x.get_tile_traits(i).nelems, 1, 0.0f};
        submit(cl_gelutanh, a, {{handle(x, i), STARPU_R}, {handle(y, i), STARPU_W}});
    }
}

void gelutanh_backward_async(const Tensor &x, const Tensor &dy, float beta, const Tensor &dx)
{
    check_like(x, dy, "gelutanh backward");
    check_like(x, dx, "gelutanh backward");
    for(Index i = 0; i < x.grid.nelems; ++i)
    {
        const Args a{x.get_tile_traits(i).nelems, 1, beta};
        submit(cl_gelutanh_backward, a, {{handle(x, i), STARPU_R}, {handle(dy, i), STARPU_R},
                                         {handle(dx, i), beta == 0.0f ? STARPU_W : STARPU_RW}});
    }
}

void adamw_async(const Tensor &grad, const Tensor &m, const Tensor &v, const Tensor &p, float b1, float b2,
                 bool first, float decay, float step, float eps)
{
    check_like(grad, m, "adamw moment 1");
    check_like(grad, v, "adamw moment 2");
    check_like(grad, p, "adamw parameter");
    const auto moment = first ? STARPU_W : STARPU_RW;
    for(Index i = 0; i < p.grid.nelems; ++i)
    {
        const AdamArgs a{p.get_tile_traits(i).nelems, b1, b2, decay, step, eps, first};
        submit(cl_adamw, &a, sizeof(a), {{handle(grad, i), STARPU_R}, {handle(m, i), moment},
                                         {handle(v, i), moment}, {handle(p, i), STARPU_RW}});
    }
}

}  // namespace

PYBIND11_MODULE(ditc_nntile_kernels, m)
{
    py::module_::import("nntile.nntile_core");  // NNTile's tensor types, registered by its module
    init_codelets();
    m.doc() = "ditc's fp32 CPU kernels as StarPU codelets on NNTile 1.1 tensors (tasks submitted per tile)";
    m.def("softmax_async", &softmax_async, py::arg("x"),
          "x = softmax(x) over axis 0, in place: one task per tile of the other axes, on all the tiles of "
          "axis 0 there, each column in one pass.");
    m.def("softmax_backward_async", &softmax_backward_async, py::arg("probs"), py::arg("sumprod"), py::arg("grad"),
          "grad = probs * (grad - sumprod), sumprod [x.shape[1:]] the sum over axis 0 of probs * grad.");
    m.def("gelutanh_async", &gelutanh_async, py::arg("x"), py::arg("y"), "y = GELU-tanh(x).");
    m.def("gelutanh_backward_async", &gelutanh_backward_async, py::arg("x"), py::arg("dy"), py::arg("beta"),
          py::arg("dx"), "dx = beta dx + dy GELU-tanh'(x); dx is not read when beta is 0.");
    m.def("adamw_async", &adamw_async, py::arg("grad"), py::arg("m"), py::arg("v"), py::arg("p"), py::arg("b1"),
          py::arg("b2"), py::arg("first"), py::arg("decay"), py::arg("step"), py::arg("eps"),
          "m = b1 m + (1 - b1) grad, v = b2 v + (1 - b2) grad^2, p = decay p - step m / (sqrt(v) + eps), one "
          "task per tile; on the `first` step the old moments are not read (taken as 0).");
}
