//! The causal language model: decoder architectures, loading, tokenizers, chat templates.

pub mod chat;
pub mod pull;
pub mod tokenizer;
