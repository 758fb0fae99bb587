//! cuDNN's fused attention forward (feature `cudnn`) on the packed layout: an alternative to
//! FlashAttention 2 that PyTorch's measurements put at 1.5x its speed on Hopper, in
//! equal-length batches (README, "Attention kernels").
//!
//! The C++ side (`sdpa.cpp`, the cuDNN frontend's graph API) loads libcudnn at run time, so a
//! binary built with the feature starts, and uses FlashAttention, where cuDNN is absent. Which
//! kernel runs: FlashAttention 2 unless `ESMBED_ATTENTION=cudnn` (cuDNN measured equal, not
//! faster, on whole jobs: README, "Attention kernels").
//!
//! Per pack, the sequence lengths (i32) and each strided tensor's ragged offsets (i32 element
//! offsets of the sequence starts) go to the device once and serve every layer ([`PackIndex`]).
//!
//! A graph is built per shape, so shapes are bucketed: the longest length to a power of two,
//! the sequence count to [`batch_bucket`] with zero-length sequences after the real ones (cuDNN
//! 9.6 and later take them; TransformerEngine pads its ragged batches the same way). Every graph
//! of one head layout runs the same engine (`sdpa.cpp` pins it from a fixed shape), so a
//! sequence's numbers do not depend on the pack it is in.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Storage, Tensor, WithDType};

use crate::error::Result;

/// Mirrors `EsmbedSdpa` in `sdpa.cpp`.
#[repr(C)]
struct Args {
    device: i32,
    stream: *mut c_void,
    q: *const c_void,
    k: *const c_void,
    v: *const c_void,
    o: *mut c_void,
    seq_len: *const i32,
    q_offsets: *const i32,
    k_offsets: *const i32,
    v_offsets: *const i32,
    o_offsets: *const i32,
    b: i64,
    h: i64,
    s: i64,
    d: i64,
    strides: [[i64; 2]; 4],
    bf16: i32,
    scale: f32,
    workspace: *mut c_void,
    workspace_bytes: i64,
}

extern "C" {
    fn esmbed_cudnn_open(error: *mut c_char, len: usize) -> i64;
    fn esmbed_cudnn_sdpa(
        args: *const Args,
        needed: *mut i64,
        error: *mut c_char,
        len: usize,
    ) -> i32;
    fn esmbed_cudnn_graphs() -> i64;
}

const OK: i32 = 0;
const UNSUPPORTED: i32 = 1;
const WORKSPACE: i32 = 2;

/// The sequences' bound `s` in a graph is the pack's longest sequence rounded up to a power of
/// two, at least this, so that packs of similar lengths share a graph (the padding mask stops
/// at each real length).
const LENGTH_BUCKET: usize = 64;

/// The length bound of the shape the engine is pinned from (`PIN_S` in `sdpa.cpp`).
const PINNED_BOUND: usize = 1024;

/// The first cuDNN that takes zero-length sequences in a ragged batch (a padded sequence count).
const PADDED_BATCHES: i64 = 90600;

/// Which attention kernel the user asked for (`ESMBED_ATTENTION`), read once.
fn requested() -> Option<&'static str> {
    static CHOICE: OnceLock<Option<String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| std::env::var("ESMBED_ATTENTION").ok())
        .as_deref()
}

/// The loaded backend's version (e.g. 91900), or why cuDNN is not used; logged once.
fn backend() -> std::result::Result<i64, &'static str> {
    static STATE: OnceLock<std::result::Result<i64, String>> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        if requested() != Some("cudnn") {
            return Err("FlashAttention unless ESMBED_ATTENTION=cudnn".into());
        }
        let mut error = [0 as c_char; 512];
        // SAFETY: `error` is a writable buffer of the length passed; the call loads libcudnn
        // once per process and writes a NUL-terminated reason into `error` when it cannot.
        let version = unsafe { esmbed_cudnn_open(error.as_mut_ptr(), error.len()) };
        if version > 0 {
            tracing::info!("attention: cuDNN {version} (fused SDPA)");
            Ok(version)
        } else {
            // SAFETY: the C side always NUL-terminates `error`.
            let why = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy();
            tracing::info!("attention: FlashAttention 2 (cuDNN not loaded: {why})");
            Err(why.into_owned())
        }
    });
    state.as_ref().copied().map_err(String::as_str)
}

/// The kernel's name when cuDNN was asked for and loads (for reports); after a refusal
/// ([`give_up`]), both kernels'.
pub fn kernel() -> Option<&'static str> {
    backend().ok()?;
    Some(match gave_up() {
        false => "cudnn-sdpa",
        true => "cudnn-sdpa, then flash-attention-2",
    })
}

/// Whether cuDNN's attention is the one in use (for run metadata and benchmarks).
pub fn in_use() -> bool {
    backend().is_ok() && !gave_up()
}

/// A pack's index tensors for cuDNN, made on first use on the pack's device, for `batch`
/// sequences: the pack's, then zero-length ones.
#[derive(Default)]
pub(crate) struct PackIndex {
    seq_len: OnceLock<Tensor>,
    offsets: Mutex<HashMap<usize, Tensor>>,
}

impl PackIndex {
    fn seq_len(
        &self,
        segments: &[(usize, usize)],
        batch: usize,
        device: &candle_core::Device,
    ) -> Result<&Tensor> {
        if let Some(t) = self.seq_len.get() {
            return Ok(t);
        }
        // u32 on the device, read as int32 by cuDNN: lengths are far below 2³¹.
        let lens = segments.iter().map(|&(_, len)| len as u32);
        let lens: Vec<u32> = lens.chain(std::iter::repeat(0)).take(batch).collect();
        let t = Tensor::from_vec(lens, batch, device)?;
        Ok(self.seq_len.get_or_init(|| t))
    }

    /// `[batch + 1]` element offsets (int32) of the sequence starts for a tensor whose rows are
    /// `stride` elements apart; the padding sequences start (and end) where the pack ends.
    fn offsets(
        &self,
        segments: &[(usize, usize)],
        batch: usize,
        stride: usize,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let mut map = self.offsets.lock().expect("cuDNN offsets");
        if let Some(t) = map.get(&stride) {
            return Ok(t.clone());
        }
        let end = segments.last().map_or(0, |&(start, len)| start + len);
        let starts = segments.iter().map(|&(start, _)| start);
        let starts = starts.chain(std::iter::repeat(end)).take(batch + 1);
        // u32 on the device, read as int32 by cuDNN (`attend` checked they fit).
        let offsets: Vec<u32> = starts.map(|s| (s * stride) as u32).collect();
        let t = Tensor::from_vec(offsets, batch + 1, device)?;
        map.insert(stride, t.clone());
        Ok(t)
    }
}

/// The sequence count a graph is built for: the next power of two up to 512, then the next
/// multiple of 512 (a job's packs then share a handful of graphs).
fn batch_bucket(b: usize) -> usize {
    if b <= 512 {
        b.next_power_of_two()
    } else {
        b.div_ceil(512) * 512
    }
}

/// Attention of `q`, `k`, `v` `[T, heads, d]` (strided views allowed, head dim contiguous; `q`
/// already scaled) over the pack's `segments` (checked by the caller to tile `T`), or `None`
/// where cuDNN is not in use or does not take this shape (the caller runs FlashAttention).
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
    max_len: usize,
    index: &PackIndex,
) -> Result<Option<Tensor>> {
    let (tokens, heads, d) = q.dims3()?;
    // What a model fixes (dtype, head width, layout): the same answer for every pack.
    let taken = matches!(q.dtype(), DType::BF16 | DType::F16)
        && d.is_multiple_of(8)
        && d <= 256
        && k.dims() == q.dims()
        && v.dims() == q.dims()
        && [q, k, v]
            .iter()
            .all(|t| t.dtype() == q.dtype() && t.stride()[2] == 1);
    let Ok(version) = backend() else {
        return Ok(None);
    };
    if !taken || gave_up() {
        return Ok(None);
    }
    // The offsets are int32 element offsets into the widest-strided tensor: a pack too large
    // for them ends cuDNN for the process, as a refused shape does.
    let widest = [q, k, v].iter().map(|t| t.stride()[0]).max().unwrap_or(0);
    if tokens.saturating_mul(widest.max(heads * d)) >= i32::MAX as usize {
        let shape = Shape {
            b: segments.len(),
            h: heads,
            s: bound(max_len),
            d,
        };
        give_up(
            shape,
            &format!(
                "{tokens} tokens overflow its int32 offsets; a smaller --tokens-per-batch keeps it"
            ),
        );
        return Ok(None);
    }
    let b = match version >= PADDED_BATCHES {
        true => batch_bucket(segments.len()),
        false => segments.len(),
    };
    let device = q.device();
    let seq_len = index.seq_len(segments, b, device)?;
    let offsets = [q, k, v]
        .map(|t| index.offsets(segments, b, t.stride()[0], device))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let o_offsets = index.offsets(segments, b, heads * d, device)?;
    let mut shape = Shape {
        b,
        h: heads,
        s: bound(max_len),
        d,
    };
    let attempt = |shape: Shape| match q.dtype() {
        DType::BF16 => run::<half::bf16>([q, k, v], seq_len, &offsets, &o_offsets, shape),
        _ => run::<half::f16>([q, k, v], seq_len, &offsets, &o_offsets, shape),
    };
    let mut out = attempt(shape)?;
    if out.is_err() && shape.s < PINNED_BOUND && max_len <= PINNED_BOUND {
        // The pinned engine took this bound when it was chosen; a looser bound is the same
        // computation (the padding mask stops at each sequence's length).
        shape.s = PINNED_BOUND;
        out = attempt(shape)?;
    }
    match out {
        Ok(storage) => Ok(Some(Tensor::from_storage(
            Storage::Cuda(storage),
            (tokens, heads, d),
            BackpropOp::none(),
            false,
        ))),
        Err(why) => {
            give_up(shape, &why);
            Ok(None)
        }
    }
}

/// The graph's bound on sequence lengths for a pack whose longest sequence is `max_len`:
/// `ESMBED_CUDNN_FIXED_S=1` makes it one value (the pinned bound, 1024) for every pack of ESM-2's
/// crop.
fn bound(max_len: usize) -> usize {
    static FIXED: OnceLock<bool> = OnceLock::new();
    let fixed = *FIXED.get_or_init(|| std::env::var("ESMBED_CUDNN_FIXED_S").as_deref() == Ok("1"));
    let floor = if fixed { PINNED_BOUND } else { LENGTH_BUCKET };
    max_len.next_power_of_two().max(floor)
}

/// The graph's dimensions: `b` sequences (padding ones included) of at most `s` tokens, `h`
/// heads of `d`.
#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    h: usize,
    s: usize,
    d: usize,
}

/// One device's scratch memory for cuDNN, grown to what the largest graph asked for. One
/// stream per device (candle's) means one attention at a time uses it.
fn workspace(dev: &CudaDevice, bytes: usize) -> Result<std::sync::MutexGuard<'static, Workspaces>> {
    static SPACES: OnceLock<Mutex<Workspaces>> = OnceLock::new();
    let mut spaces = SPACES
        .get_or_init(Default::default)
        .lock()
        .expect("cuDNN workspaces");
    let ordinal = dev.cuda_stream().context().ordinal();
    let big_enough = spaces.0.get(&ordinal).is_some_and(|w| w.len() >= bytes);
    if !big_enough {
        // SAFETY: scratch memory, written and read only by cuDNN.
        let slice = unsafe { dev.alloc::<u8>(bytes.max(1))? };
        spaces.0.insert(ordinal, slice);
    }
    Ok(spaces)
}

#[derive(Default)]
struct Workspaces(HashMap<usize, CudaSlice<u8>>);

/// The CUDA storage of `t` and where `t` starts in it.
fn storage<'a>(
    guard: &'a (candle_core::StorageRef<'_>, &candle_core::Layout),
) -> Result<(&'a CudaStorage, usize)> {
    match &*guard.0 {
        Storage::Cuda(s) => Ok((s, guard.1.start_offset())),
        _ => Err(crate::Error::internal(
            "cuDNN attention: a tensor off the GPU",
        )),
    }
}

fn run<T: CudaDType + DeviceRepr + WithDType>(
    qkv: [&Tensor; 3],
    seq_len: &Tensor,
    offsets: &[Tensor],
    o_offsets: &Tensor,
    shape: Shape,
) -> Result<std::result::Result<CudaStorage, String>> {
    let guards = qkv.map(|t| t.storage_and_layout());
    let index: Vec<_> = [seq_len, &offsets[0], &offsets[1], &offsets[2], o_offsets]
        .iter()
        .map(|t| t.storage_and_layout())
        .collect();
    let (qs, _) = storage(&guards[0])?;
    let dev = qs.device().clone();
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let mut ptrs = Vec::with_capacity(8);
    let mut keep = Vec::with_capacity(8);
    for guard in &guards {
        let (s, start) = storage(guard)?;
        let (p, g) = s.as_cuda_slice::<T>()?.device_ptr(&stream);
        ptrs.push(p + (start * std::mem::size_of::<T>()) as u64);
        keep.push(g);
    }
    let mut index_ptrs = Vec::with_capacity(5);
    for guard in &index {
        let (s, start) = storage(guard)?;
        let (p, g) = s.as_cuda_slice::<u32>()?.device_ptr(&stream);
        index_ptrs.push(p + (start * 4) as u64);
        keep.push(g);
    }
    let Shape { b, h, s, d } = shape;
    // SAFETY: every element is written by cuDNN before anything reads it.
    let mut out = unsafe { dev.alloc::<T>(guards[0].1.shape().elem_count())? };
    let strides = [0, 1, 2].map(|i| {
        [
            guards[i].1.stride()[0] as i64,
            guards[i].1.stride()[1] as i64,
        ]
    });
    let ordinal = stream.context().ordinal();
    let args = |o: u64, workspace: u64, workspace_bytes: usize| Args {
        device: ordinal as i32,
        stream: stream.cu_stream() as *mut c_void,
        q: ptrs[0] as *const c_void,
        k: ptrs[1] as *const c_void,
        v: ptrs[2] as *const c_void,
        o: o as *mut c_void,
        seq_len: index_ptrs[0] as *const i32,
        q_offsets: index_ptrs[1] as *const i32,
        k_offsets: index_ptrs[2] as *const i32,
        v_offsets: index_ptrs[3] as *const i32,
        o_offsets: index_ptrs[4] as *const i32,
        b: b as i64,
        h: h as i64,
        s: s as i64,
        d: d as i64,
        strides: [
            strides[0],
            strides[1],
            strides[2],
            [(h * d) as i64, d as i64],
        ],
        bf16: i32::from(T::DTYPE == DType::BF16),
        scale: 1.0,
        workspace: workspace as *mut c_void,
        workspace_bytes: workspace_bytes as i64,
    };
    let graphs_before = graphs();
    let started = std::time::Instant::now();
    let mut space_bytes = 0;
    let (status, message) = loop {
        let (status, needed, message) = {
            let spaces = workspace(&dev, space_bytes)?;
            let space = spaces.0.get(&ordinal).expect("workspace just made");
            let (w_ptr, _w) = space.device_ptr(&stream);
            let (o_ptr, _o) = out.device_ptr_mut(&stream);
            // SAFETY: the tensors behind every pointer are held by `guards` and `index` (and
            // their device-pointer guards in `keep`, `_w`, `_o`) on this stream's device: q, k,
            // v with the strides and `b` ragged sequences the caller checked, `seq_len` [b],
            // the offsets [b + 1] int32 (`b` padded with empty sequences), `out` [T, h, d]
            // contiguous, the workspace's length.
            unsafe { call(&args(o_ptr, w_ptr, space.len())) }
        };
        match status {
            WORKSPACE if space_bytes < needed => space_bytes = needed,
            _ => break (status, message),
        }
    };
    drop(keep);
    if graphs() > graphs_before {
        tracing::debug!(
            target: "esmbed::cudnn",
            "attention graph {} ({b} sequences ≤ {s}, {h}×{d}): built in {:.1} ms, {} {}",
            graphs(),
            started.elapsed().as_secs_f64() * 1e3,
            if status == UNSUPPORTED { "unsupported" } else { "plan" },
            message
        );
    }
    match status {
        OK => Ok(Ok(CudaStorage::wrap_cuda_slice(out, dev))),
        UNSUPPORTED => Ok(Err(message)),
        _ => Err(crate::Error::internal(message)),
    }
}

/// One call into `sdpa.cpp`: its status, the workspace it needs (status `WORKSPACE`) and its
/// message.
///
/// # Safety
/// Every pointer in `args` is a live device allocation of the shape `args` describes.
unsafe fn call(args: &Args) -> (i32, usize, String) {
    let mut needed = 0i64;
    let mut error = [0 as c_char; 1024];
    // SAFETY: `args` as the caller vouches; `needed` and `error` are writable, `error` of the
    // length passed, NUL-terminated by the C side whenever it writes it.
    let status = unsafe { esmbed_cudnn_sdpa(args, &mut needed, error.as_mut_ptr(), error.len()) };
    // SAFETY: zero-initialized and NUL-terminated by the C side.
    let message = unsafe { CStr::from_ptr(error.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    (status, needed.max(0) as usize, message)
}

/// Stops using cuDNN for the rest of the process, loudly: a shape the pinned engine does not
/// take runs on FlashAttention, and so must every later pack, or a sequence's numbers would
/// depend on its pack again.
fn give_up(shape: Shape, why: &str) {
    if !GAVE_UP.swap(true, std::sync::atomic::Ordering::Relaxed) {
        let Shape { b, h, s, d } = shape;
        tracing::warn!(
            "cuDNN attention does not take {b} sequences ≤ {s} of {h}×{d} ({why}): FlashAttention \
             runs this and every later pack (earlier packs' vectors differ from FlashAttention's \
             by bf16 rounding); unset ESMBED_ATTENTION for one kernel throughout"
        );
    }
}

/// Set once cuDNN has refused a shape ([`give_up`]).
static GAVE_UP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn gave_up() -> bool {
    GAVE_UP.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many attention graphs the calling thread holds (tests).
pub fn graphs() -> i64 {
    // SAFETY: reads the calling thread's cache size.
    unsafe { esmbed_cudnn_graphs() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_up_to_few_buckets() {
        let buckets: Vec<usize> = [1, 2, 3, 9, 64, 65, 512, 513, 1100]
            .map(batch_bucket)
            .into();
        assert_eq!(buckets, [1, 2, 4, 16, 64, 128, 512, 1024, 1536]);
    }

    #[test]
    fn padding_sequences_are_empty_and_start_where_the_pack_ends() {
        let segments = [(0, 3), (3, 5), (8, 1)];
        let index = PackIndex::default();
        let cpu = candle_core::Device::Cpu;
        let lens = index.seq_len(&segments, 4, &cpu).unwrap();
        assert_eq!(lens.to_vec1::<u32>().unwrap(), [3, 5, 1, 0]);
        let offsets = index.offsets(&segments, 4, 12, &cpu).unwrap();
        assert_eq!(offsets.to_vec1::<u32>().unwrap(), [0, 36, 96, 108, 108]);
    }
}
