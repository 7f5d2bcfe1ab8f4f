//! `grape_harness`: score candidate responses with a target model, select SFT data,
//! fine-tune, evaluate, and compare selectors (GRAPE and its baselines).

pub mod bench;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod generate;
pub mod model;
pub mod pool;
pub mod report;
pub mod score;
pub mod select;
pub mod shard;
pub mod train;
pub mod util;

pub use error::{Error, Result};
