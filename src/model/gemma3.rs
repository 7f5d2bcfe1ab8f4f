//! Gemma 3 (text): q/k norms, sandwich norms around attention and MLP, GeGLU, embeddings
//! scaled by sqrt(hidden), and sliding-window layers with their own rope base.

use super::config::ModelConfig;
use super::layers::{embedding_and_head, Attention, KvCache, Mlp, Mode, RmsNorm, Rope, Step};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    sliding: bool,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &ModelConfig, sliding: bool) -> Result<Self> {
        let norm = |name: &str| RmsNorm::load(vb.pp(name), cfg.hidden_size, cfg.rms_norm_eps, true);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, true)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            sliding,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
    embed_scale: f64,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    global_rope: Rope,
    local_rope: Rope,
    sliding_window: Option<usize>,
    final_logit_softcapping: Option<f64>,
}

impl Model {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let vb_m = vb.pp("model");
        let (embed_tokens, lm_head) = embedding_and_head(&vb, cfg)?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(vb_m.pp(format!("layers.{i}")), cfg, cfg.sliding_layers[i]))
            .collect::<Result<_>>()?;
        let rope = |theta: f64, scaling| {
            Rope::new(cfg.head_dim, theta, scaling, cfg.max_position_embeddings, vb.dtype(), vb.device())
        };
        Ok(Self {
            embed_tokens,
            embed_scale: (cfg.hidden_size as f64).sqrt(),
            layers,
            norm: RmsNorm::load(vb_m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps, true)?,
            lm_head,
            global_rope: rope(cfg.rope_theta, cfg.rope_scaling.as_ref())?,
            local_rope: rope(cfg.rope_local_theta.unwrap_or(10_000.0), None)?,
            sliding_window: cfg.sliding_window,
            final_logit_softcapping: cfg.final_logit_softcapping,
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
        let mut x = (self.embed_tokens.forward(input_ids)? * self.embed_scale)?;
        let step = Step::new(b, t, lengths, cache.as_deref(), self.sliding_window, x.dtype(), x.device())?;
        let global = self.global_rope.select(&step.positions)?;
        let local = self.local_rope.select(&step.positions)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x, mode)?;
            let h = layer.self_attn.forward(
                &h,
                if layer.sliding { &local } else { &global },
                step.mask_for(layer.sliding),
                cache.as_deref_mut().map(|c| (c, i)),
                mode,
            )?;
            x = (x + layer.post_attention_layernorm.forward(&h, mode)?)?;
            let h = layer.pre_feedforward_layernorm.forward(&x, mode)?;
            let h = layer.mlp.forward(&h)?;
            x = (x + layer.post_feedforward_layernorm.forward(&h, mode)?)?;
        }
        if let Some(cache) = cache {
            step.commit(cache);
        }
        self.norm.forward(&x, mode)
    }

    pub fn vocab_size(&self) -> Result<usize> {
        self.lm_head.weight().dim(0)
    }

    /// Vocabulary logits for hidden-state rows `(N, H) -> (N, V)`, soft-capped if configured.
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = super::layers::linear(hidden, &self.lm_head)?;
        match self.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }
}
