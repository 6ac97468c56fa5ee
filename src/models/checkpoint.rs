//! Activation checkpointing per transformer block (`training.gradient_checkpointing`).
//!
//! candle keeps every intermediate of the forward pass alive until the backward, through the
//! graph. With checkpointing, each block runs on a detached view of its input and only its
//! output's values are kept, as the result of a custom op whose argument is the block's input;
//! the block's graph is dropped at once. In the backward, that op runs the block again from its
//! input, now a `Var`, with the real weights, backpropagates the incoming gradient through it,
//! returns the input's gradient and adds the block weights' gradients to a [`GradSink`], which
//! [`super::Model::backward`] merges into the step's `GradStore`. The recomputation repeats the
//! forward's operations on the same values, so the gradients equal the unchecked ones.
//!
//! What is kept per block is its input (`[b, t, hidden]`); the backward needs one block's
//! intermediates at a time on top. The recomputation reads the weights at backward time, so
//! they must not change between a forward and its backward (full SAM restores W only after the
//! backward at W + e, and the optimiser steps after it).

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor,
    TensorId, Var,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Where the recomputations leave the gradients of the trainable weights (by tensor id) until
/// [`GradSink::drain`] hands them over after the backward.
#[derive(Clone)]
pub struct GradSink {
    grads: Arc<Mutex<HashMap<TensorId, Tensor>>>,
    /// The trainable weights: a recomputation's `GradStore` also holds gradients of constants
    /// (masks, rotary tables), which are not wanted.
    trainable: Arc<HashSet<TensorId>>,
}

impl GradSink {
    pub fn new(trainable: impl IntoIterator<Item = TensorId>) -> Self {
        Self {
            grads: Arc::default(),
            trainable: Arc::new(trainable.into_iter().collect()),
        }
    }

    fn add(&self, id: TensorId, g: &Tensor) -> Result<()> {
        let mut grads = self.grads.lock().expect("grad sink lock poisoned");
        let sum = match grads.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g.clone(),
        };
        grads.insert(id, sum);
        Ok(())
    }

    /// Takes every gradient collected since the last call.
    pub fn drain(&self) -> HashMap<TensorId, Tensor> {
        std::mem::take(&mut *self.grads.lock().expect("grad sink lock poisoned"))
    }
}

/// A block as a function of its input; constants (masks, rotary tables) captured.
type BlockFn<B> = dyn Fn(&B, &Tensor) -> Result<Tensor> + Send + Sync;

/// Runs `x` through `blocks` in order; with a sink, checkpointing each block.
pub fn run_blocks<B: Send + Sync + 'static>(
    mut x: Tensor,
    blocks: &[Arc<B>],
    sink: Option<&GradSink>,
    forward: impl Fn(&B, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let Some(sink) = sink else {
        for block in blocks {
            x = forward(block, &x)?;
        }
        return Ok(x);
    };
    let forward: Arc<BlockFn<B>> = Arc::new(forward);
    // With frozen embeddings (LoRA) the first block's input records no graph, and candle would
    // not record the checkpoint op on it either: the blocks' adapters would get no gradient.
    // (A forward without a backward, such as the adapters-off reference, then builds a graph
    // that it drops at once.)
    if !x.track_op() {
        x = Var::from_tensor(&x)?.into_inner();
    }
    for block in blocks {
        let y = forward(block, &x.detach())?;
        let op = Checkpointed {
            block: block.clone(),
            forward: forward.clone(),
            sink: sink.clone(),
            output: Mutex::new(Some(y)),
        };
        x = x.apply_op1(op)?;
    }
    Ok(x)
}

/// The custom op standing for one checkpointed block: its forward hands out the values already
/// computed, its backward recomputes.
struct Checkpointed<B> {
    block: Arc<B>,
    forward: Arc<BlockFn<B>>,
    sink: GradSink,
    /// The block's output, taken (and so freed, with its graph) by the op's forward.
    output: Mutex<Option<Tensor>>,
}

impl<B> Checkpointed<B> {
    fn take_output(&self) -> Result<Tensor> {
        match self.output.lock().expect("checkpoint lock poisoned").take() {
            Some(y) => Ok(y),
            None => bail!("checkpointed block: forward ran twice"),
        }
    }
}

/// A contiguous copy of a storage region (what the op's forward must return: owned storage).
fn copy<S>(s: &S, layout: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element is written by `copy_strided_src` just below.
    let mut dst = unsafe { s.device().alloc_uninit(layout.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, layout)?;
    Ok((dst, layout.shape().clone()))
}

impl<B: Send + Sync> CustomOp1 for Checkpointed<B> {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => copy(s, layout),
            _ => bail!("checkpointed block: output not on the CPU"),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => copy(s, layout),
            _ => bail!("checkpointed block: output not on the CUDA device"),
        }
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => copy(s, layout),
            _ => bail!("checkpointed block: output not on the Metal device"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = (self.forward)(&self.block, x.as_tensor())?;
        // d/dy Σ y ⊙ g = g exactly, so the block sees the incoming gradient unchanged.
        let grads = (y * grad_res)?.sum_all()?.backward()?;
        // Gradients of leaves carry the graph that computed them, which holds the recomputed
        // intermediates: detached, so that those are freed now rather than after the backward.
        for id in grads.get_ids() {
            if self.sink.trainable.contains(id) {
                self.sink
                    .add(*id, &grads.get_id(*id).expect("listed id").detach())?;
            }
        }
        Ok(grads.get(x.as_tensor()).map(Tensor::detach))
    }
}
