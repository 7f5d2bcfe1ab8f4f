//! The Llama family: Llama 2/3, SmolLM2, stories (TinyLlamas), Mistral (sliding-window
//! attention) and Qwen2 (biased q/k/v projections). They differ only in switches that
//! `ModelConfig` carries, so one implementation serves all of them.

use super::config::ModelConfig;
use super::layers::{embedding_and_head, Attention, KvCache, Mlp, Mode, RmsNorm, Rope, Step};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    sliding: bool,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &ModelConfig, sliding: bool) -> Result<Self> {
        let norm = |name: &str| RmsNorm::load(vb.pp(name), cfg.hidden_size, cfg.rms_norm_eps, false);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, false)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            sliding,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    sliding_window: Option<usize>,
}

impl Model {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let vb_m = vb.pp("model");
        let (embed_tokens, lm_head) = embedding_and_head(&vb, cfg)?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(vb_m.pp(format!("layers.{i}")), cfg, cfg.sliding_layers[i]))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(vb_m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps, false)?,
            lm_head,
            rope: Rope::new(
                cfg.head_dim,
                cfg.rope_theta,
                cfg.rope_scaling.as_ref(),
                cfg.max_position_embeddings,
                vb.dtype(),
                vb.device(),
            )?,
            sliding_window: cfg.sliding_window,
        })
    }

    /// Final-norm hidden states `(B, T, H)` for every position of a right-padded batch.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let mut x = self.embed_tokens.forward(input_ids)?;
        let step = Step::new(b, t, lengths, cache.as_deref(), self.sliding_window, x.dtype(), x.device())?;
        let rope = self.rope.select(&step.positions)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x, mode)?;
            let h = layer.self_attn.forward(
                &h,
                &rope,
                step.mask_for(layer.sliding),
                cache.as_deref_mut().map(|c| (c, i)),
                mode,
            )?;
            x = (x + h)?;
            let h = layer.mlp.forward(&layer.post_attention_layernorm.forward(&x, mode)?)?;
            x = (x + h)?;
        }
        if let Some(cache) = cache {
            step.commit(cache);
        }
        self.norm.forward(&x, mode)
    }

    pub fn vocab_size(&self) -> Result<usize> {
        self.lm_head.weight().dim(0)
    }

    /// Vocabulary logits for hidden-state rows `(N, H) -> (N, V)`.
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}
