//! dpo-sam: preference optimisation (DPO and its relatives) with logits-SAM, on candle.
//!
//! One module per concern; `main.rs` maps each subcommand onto one of them.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod diagnostics;
pub mod eval;
pub mod generate;
pub mod gpucheck;
pub mod hub;
pub mod kernels;
pub mod losses;
pub mod models;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod refcache;
pub mod sam;
pub mod score;
pub mod tokenizer;
pub mod toy;
pub mod train;
