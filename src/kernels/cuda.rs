//! What the CUDA kernels share (`cuda` feature only): the PTX modules build.rs compiles from
//! `cuda/*.cu` (loaded once per device through candle's custom-module cache), counted launches,
//! device pointers of tensors, device buffers as tensors, cuBLASLt GEMMs with bias epilogues, and
//! the device allocator's high-water mark.
//!
//! Everything runs on candle's stream of the device, so it is ordered with candle's own kernels.
//! Pointers are taken with cudarc's read intent, also for the buffers a kernel writes (fresh
//! outputs, the optimiser's state): on one stream, order is all that matters, and the
//! [`SyncOnDrop`] records are kept until the launch is enqueued.

use super::LAUNCHES;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys as lt_sys};
use candle_core::cuda_backend::cudarc::driver::{
    result as drv, sys, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One `.cu` file's PTX.
pub(crate) struct Module {
    pub name: &'static str,
    pub ptx: &'static str,
}

macro_rules! module {
    ($file:literal) => {
        Module {
            name: concat!("dpo_sam_", $file),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
        }
    };
}

pub(crate) const NORM: Module = module!("norm");
pub(crate) const SOFTMAX: Module = module!("softmax");
pub(crate) const ROTARY: Module = module!("rotary");
pub(crate) const DENSE: Module = module!("dense");
pub(crate) const ADAMW: Module = module!("adamw");
pub(crate) const INIT: Module = module!("init");
pub(crate) const ATTENTION: Module = module!("attention");
pub(crate) const OUTPUT: Module = module!("output");

/// The kernel instance for a storage type: `name_f32`, `name_bf16`, `name_f16`.
pub(crate) fn typed(name: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("{name}: no CUDA kernel for {other:?}"),
    };
    Ok(format!("{name}_{suffix}"))
}

/// A kernel argument: every kernel here takes device addresses and scalars.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

/// Launches kernel `name` of `module` on the device's stream, and counts the launch.
///
/// # Safety
/// `args` must match the kernel's parameters, and the buffers they address must hold what the
/// kernel reads and writes under `cfg`.
pub(crate) unsafe fn run(
    dev: &CudaDevice,
    module: &Module,
    name: &str,
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    let func = dev.get_or_load_custom_func(name, module.name, module.ptx)?;
    let mut builder = func.builder();
    for arg in args {
        match arg {
            Arg::Ptr(v) => builder.arg(v),
            Arg::I32(v) => builder.arg(v),
            Arg::I64(v) => builder.arg(v),
            Arg::F32(v) => builder.arg(v),
            Arg::F64(v) => builder.arg(v),
        };
    }
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    builder.launch(cfg).w()?;
    Ok(())
}

/// One block per row, with about 8 elements per thread (32 ≤ threads ≤ 1024).
pub(crate) fn rows_config(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: ((d / 8).next_multiple_of(32).clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride loop over `n` elements, 256 threads a block.
pub(crate) fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Column sums over `cols` columns: 32 × 16 threads per 32-column stripe (`COL_ROWS` in
/// common.cuh).
pub(crate) fn columns_config(cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 16, 1),
        shared_mem_bytes: 0,
    }
}

/// The CUDA storage of a tensor, held read-locked while a kernel is enqueued.
pub(crate) struct Held<'a> {
    guard: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    /// `t`, which must be contiguous and on a CUDA device.
    pub fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        if !matches!(&*guard, Storage::Cuda(_)) {
            bail!("expected a CUDA tensor");
        }
        if !layout.is_contiguous() {
            bail!("expected a contiguous tensor");
        }
        Ok(Self { guard, layout })
    }

    pub fn storage(&self) -> &CudaStorage {
        match &*self.guard {
            Storage::Cuda(s) => s,
            _ => unreachable!("checked in Held::new"),
        }
    }

    /// The device address of the tensor's first element.
    pub fn ptr<'s>(&'s self, stream: &'s CudaStream) -> Result<(u64, SyncOnDrop<'s>)> {
        ptr(self.storage(), self.layout, stream)
    }
}

/// The device address of the first element of a contiguous `layout` in `storage`.
pub(crate) fn ptr<'s>(
    storage: &'s CudaStorage,
    layout: &Layout,
    stream: &'s CudaStream,
) -> Result<(u64, SyncOnDrop<'s>)> {
    let Some((start, _)) = layout.contiguous_offsets() else {
        bail!("expected a contiguous tensor");
    };
    at(storage, start, stream)
}

/// The device address of a whole buffer (a kernel's fresh output).
pub(crate) fn buf<'s>(
    storage: &'s CudaStorage,
    stream: &'s CudaStream,
) -> Result<(u64, SyncOnDrop<'s>)> {
    at(storage, 0, stream)
}

fn at<'s>(
    storage: &'s CudaStorage,
    start: usize,
    stream: &'s CudaStream,
) -> Result<(u64, SyncOnDrop<'s>)> {
    fn typed<'s, T>(
        s: &'s CudaSlice<T>,
        start: usize,
        stream: &'s CudaStream,
    ) -> (u64, SyncOnDrop<'s>) {
        let (p, record) = s.device_ptr(stream);
        (p + (start * std::mem::size_of::<T>()) as u64, record)
    }
    Ok(match &storage.slice {
        CudaStorageSlice::F32(s) => typed(s, start, stream),
        CudaStorageSlice::BF16(s) => typed(s, start, stream),
        CudaStorageSlice::F16(s) => typed(s, start, stream),
        CudaStorageSlice::F64(s) => typed(s, start, stream),
        CudaStorageSlice::U32(s) => typed(s, start, stream),
        CudaStorageSlice::I64(s) => typed(s, start, stream),
        _ => bail!("unsupported storage type {:?}", storage_dtype(storage)),
    })
}

fn storage_dtype(s: &CudaStorage) -> DType {
    use candle_core::backend::BackendStorage;
    s.dtype()
}

/// An uninitialised device buffer of `n` elements (every kernel writing one fills all of it).
pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    // SAFETY: the caller's kernel writes every element before anything reads it.
    unsafe {
        Ok(match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(n)?, dev.clone()),
            DType::F64 => CudaStorage::wrap_cuda_slice(dev.alloc::<f64>(n)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
            other => bail!("alloc: unsupported dtype {other:?}"),
        })
    }
}

/// A constant tensor (no graph) over a device buffer.
pub(crate) fn tensor(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// The CUDA device of a tensor.
pub(crate) fn device_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        other => bail!("expected a CUDA tensor, found one on {other:?}"),
    }
}

/// (major, minor) compute capability of the device.
pub(crate) fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32)> {
    use sys::CUdevice_attribute::*;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    Ok((
        ctx.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .w()?,
        ctx.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .w()?,
    ))
}

/// (bytes allocated now, the most allocated at once since the last [`reset_peak_memory`]) by
/// the device's memory pool. candle allocates every tensor with `cuMemAllocAsync` from the
/// device's current pool (on every GPU with memory pools, Pascal onwards), so these are its
/// `CU_MEMPOOL_ATTR_USED_MEM_CURRENT` and `_HIGH`: memory held by live allocations, as
/// `torch.cuda.memory_allocated` / `max_memory_allocated`. Not counted: the CUDA context,
/// cuBLAS/cuBLASLt workspaces and the pool's cached free memory.
pub fn memory(dev: &CudaDevice) -> Result<(u64, u64)> {
    let pool = mem_pool(dev)?;
    let read = |attr| -> Result<u64> {
        let mut value = 0u64;
        // SAFETY: both attributes are cuuint64_t.
        unsafe { drv::mem_pool::get_attribute(pool, attr, (&mut value as *mut u64).cast()).w()? };
        Ok(value)
    };
    Ok((
        read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
    ))
}

/// Resets the high-water mark of [`memory`] to what is allocated now.
pub fn reset_peak_memory(dev: &CudaDevice) -> Result<()> {
    let pool = mem_pool(dev)?;
    let mut zero = 0u64;
    // SAFETY: the attribute is a cuuint64_t; setting it to 0 is the documented reset.
    unsafe {
        drv::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
        .w()?;
    }
    Ok(())
}

fn mem_pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        bail!("this GPU has no memory pools: candle allocates with cuMemAlloc, whose peak is not tracked");
    }
    // SAFETY: the device handle comes from a live context.
    unsafe { drv::device::get_mem_pool(ctx.cu_device()).w() }
}

/// What a cuBLASLt GEMM adds to `D = op(A) · op(B)` (column-major, as cuBLAS sees it).
#[derive(Clone, Copy)]
pub(crate) enum Epilogue {
    None,
    /// D += bias broadcast over columns (bias length = rows of D).
    Bias(u64),
    /// Also write Σ over k of A (`BGRADA`, length = rows of D) or of B (`BGRADB`, length =
    /// columns of D): a bias gradient in the same pass.
    BiasGradA(u64),
    BiasGradB(u64),
}

pub(crate) use super::gemm::Gemm;

/// cuBLASLt's errors as candle's (candle converts cuBLAS's, not cuBLASLt's).
fn lt_err(e: lt::CublasError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// A cuBLASLt handle and workspace per device (32 MiB: NVIDIA's size for Hopper).
struct Lt {
    handle: lt_sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: a cuBLASLt handle may be used from any thread; calls are serialised by candle's
// stream order.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

const LT_WORKSPACE: usize = 32 << 20;

fn lt_handle(dev: &CudaDevice) -> Result<Arc<Lt>> {
    static HANDLES: Mutex<Vec<(DeviceId, Arc<Lt>)>> = Mutex::new(Vec::new());
    let mut handles = HANDLES.lock().expect("cuBLASLt handle lock");
    if let Some((_, lt)) = handles.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(lt.clone());
    }
    let handle = lt::create_handle().map_err(candle_core::Error::wrap)?;
    let workspace = dev.alloc_zeros::<u8>(LT_WORKSPACE)?;
    let lt = Arc::new(Lt { handle, workspace });
    handles.push((dev.id(), lt.clone()));
    Ok(lt)
}

/// Whether cuBLASLt refused a bias-gradient epilogue once (then the column sums run as a
/// kernel of ours instead, every time after).
static BGRAD_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// The largest power of two (≤ 256) dividing an address: cuBLASLt assumes 256-byte aligned
/// operands unless told otherwise, and a view into a larger buffer may be less aligned.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

/// Runs `D = op(A) · op(B)` with `epilogue` in `dtype` (f32 in TF32 when candle's f32 reduced
/// precision is on, which `training.tf32` sets; bf16/f16 with f32 accumulation). Returns false,
/// having done nothing, when cuBLASLt has no algorithm for a bias-gradient epilogue here.
pub(crate) fn gemm(
    dev: &CudaDevice,
    dtype: DType,
    g: Gemm,
    a: u64,
    b: u64,
    d: u64,
    epilogue: Epilogue,
) -> Result<bool> {
    gemm_with(dev, (dtype, dtype), g, a, b, d, false, epilogue)
}

/// `D = op(A) · op(B)`, or `D += …` when `accumulate`, with A and B in `dtype` and D in `out`
/// (f32 from bf16/f16 operands: the tensor cores' f32 accumulator, never rounded to 16 bits).
pub(crate) fn gemm_into(
    dev: &CudaDevice,
    (dtype, out): (DType, DType),
    g: Gemm,
    (a, b, d): (u64, u64, u64),
    accumulate: bool,
) -> Result<()> {
    gemm_with(dev, (dtype, out), g, a, b, d, accumulate, Epilogue::None)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn gemm_with(
    dev: &CudaDevice,
    (dtype, out): (DType, DType),
    g: Gemm,
    a: u64,
    b: u64,
    d: u64,
    accumulate: bool,
    epilogue: Epilogue,
) -> Result<bool> {
    use lt_sys::cublasLtMatmulDescAttributes_t as Desc;
    use lt_sys::cublasLtMatmulPreferenceAttributes_t as Pref;
    let bgrad = matches!(epilogue, Epilogue::BiasGradA(_) | Epilogue::BiasGradB(_));
    if bgrad && BGRAD_UNSUPPORTED.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let storage = |t: DType| {
        Ok(match t {
            DType::F32 => lt_sys::cudaDataType_t::CUDA_R_32F,
            DType::BF16 => lt_sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => lt_sys::cudaDataType_t::CUDA_R_16F,
            other => bail!("cuBLASLt GEMM: unsupported dtype {other:?}"),
        })
    };
    let (data, out_data) = (storage(dtype)?, storage(out)?);
    let compute = match dtype {
        DType::F32 if candle_core::cuda::gemm_reduced_precision_f32() => {
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        }
        _ => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    let lt = lt_handle(dev)?;
    let stream = dev.cuda_stream();
    let (workspace, _record) = lt.workspace.device_ptr(&stream);
    let stored =
        |trans: bool, rows: usize, cols: usize| if trans { (cols, rows) } else { (rows, cols) };
    let (a_rows, a_cols) = stored(g.transa, g.m, g.k);
    let (b_rows, b_cols) = stored(g.transb, g.k, g.n);
    let layout = |data, rows: usize, cols: usize, ld: usize| {
        lt::create_matrix_layout(data, rows as u64, cols as u64, ld as i64).map_err(lt_err)
    };
    let layouts = [
        layout(data, a_rows, a_cols, g.lda)?,
        layout(data, b_rows, b_cols, g.ldb)?,
        layout(out_data, g.m, g.n, g.ldd)?,
    ];
    let desc =
        lt::create_matmul_desc(compute, lt_sys::cudaDataType_t::CUDA_R_32F).map_err(lt_err)?;
    let pref = lt::create_matmul_pref().map_err(lt_err)?;
    let (epi, bias) = match epilogue {
        Epilogue::None => (lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT, None),
        Epilogue::Bias(p) => (lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS, Some(p)),
        Epilogue::BiasGradA(p) => (
            lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADA,
            Some(p),
        ),
        Epilogue::BiasGradB(p) => (
            lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
            Some(p),
        ),
    };
    let result = (|| -> Result<Option<lt_sys::cublasLtMatmulHeuristicResult_t>> {
        // SAFETY: each attribute gets a value of the type cuBLASLt documents for it.
        unsafe {
            let set = |attr: Desc, value: *const std::ffi::c_void, size: usize| {
                lt::set_matmul_desc_attribute(desc, attr, value, size).map_err(lt_err)
            };
            let (ta, tb) = (g.transa as i32, g.transb as i32);
            set(
                Desc::CUBLASLT_MATMUL_DESC_TRANSA,
                (&ta as *const i32).cast(),
                4,
            )?;
            set(
                Desc::CUBLASLT_MATMUL_DESC_TRANSB,
                (&tb as *const i32).cast(),
                4,
            )?;
            set(
                Desc::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epi as *const lt_sys::cublasLtEpilogue_t).cast(),
                std::mem::size_of::<lt_sys::cublasLtEpilogue_t>(),
            )?;
            if let Some(p) = &bias {
                set(
                    Desc::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (p as *const u64).cast(),
                    8,
                )?;
            }
            let size = LT_WORKSPACE;
            lt::set_matmul_pref_attribute(
                pref,
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .map_err(lt_err)?;
            for (attr, p) in [
                (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a),
                (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b),
                (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d),
                (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d),
            ] {
                let align = alignment(p);
                lt::set_matmul_pref_attribute(pref, attr, (&align as *const u32).cast(), 4)
                    .map_err(lt_err)?;
            }
            match lt::get_matmul_algo_heuristic(
                lt.handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref,
            ) {
                Ok(h) => Ok(Some(h)),
                Err(e) if bgrad && e.0 == lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => {
                    Ok(None)
                }
                Err(e) => Err(lt_err(e)),
            }
        }
    })();
    let outcome = match result {
        Ok(Some(heuristic)) => {
            let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
            LAUNCHES.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the pointers address buffers of the shapes the layouts describe, and the
            // workspace is the size the preference allows.
            unsafe {
                lt::matmul(
                    lt.handle,
                    desc,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    a as *const _,
                    layouts[0],
                    b as *const _,
                    layouts[1],
                    d as *const _,
                    layouts[2],
                    d as *mut _,
                    layouts[2],
                    &heuristic.algo,
                    workspace as *mut _,
                    LT_WORKSPACE,
                    stream.cu_stream() as *mut _,
                )
                .map_err(lt_err)
                .map(|()| true)
            }
        }
        Ok(None) => {
            BGRAD_UNSUPPORTED.store(true, Ordering::Relaxed);
            Ok(false)
        }
        Err(e) => Err(e),
    };
    // SAFETY: created above and no longer used.
    unsafe {
        lt::destroy_matmul_pref(pref).map_err(lt_err)?;
        lt::destroy_matmul_desc(desc).map_err(lt_err)?;
        for l in layouts {
            lt::destroy_matrix_layout(l).map_err(lt_err)?;
        }
    }
    outcome
}
