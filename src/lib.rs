//! dpo-sam: preference optimisation (DPO and its relatives) with logits-SAM, on candle.
//!
//! One module per concern; `main.rs` maps each subcommand onto one of them. Imports run one
//! way (`tests/layering.rs` checks it):
//!
//! - commands: `bench`, `eval`, `generate`, `gpucheck`, `merge`, `plot`, `push`, `report`,
//!   `score`, `sharpness`, `toy`, `trl` (`config from-trl`), `train` (whose `mod.rs` is the
//!   command and the loop) and
//!   `data inspect`;
//! - what the training run uses: `plan` (`--dry-run`), `refcache`, `checkpoint`, `card` (the
//!   model card of every saved model), `decode` (evaluation samples; also `generate`'s);
//! - what a step is made of: `sam`, `losses`, `logps`, `diagnostics`, `optim`, `data`, `models`;
//! - `kernels`: the hand-written fused ops, which import nothing of the crate;
//! - `dist`: data parallelism's collective (CPU over TCP, NCCL on GPUs), rendezvous and launcher;
//! - settings and utilities: `config`, `tokenizer`, `upload` (Hub uploads), `hub`,
//!   `tensorboard` (event files), `progress` (bars), `device`.

pub mod bench;
pub mod card;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod decode;
pub mod device;
pub mod diagnostics;
pub mod dist;
pub mod eval;
pub mod generate;
pub mod gpucheck;
pub mod hub;
pub mod kernels;
pub mod logps;
pub mod losses;
pub mod merge;
pub mod models;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod push;
pub mod refcache;
pub mod report;
pub mod retry;
pub mod sam;
pub mod score;
pub mod sharpness;
pub mod tensorboard;
pub mod tokenizer;
pub mod toy;
pub mod train;
pub mod trl;
pub mod upload;
