//! The Llama family: Llama 2/3, SmolLM2, stories (TinyLlamas), Mistral (sliding-window
//! attention) and Qwen2 (biased q/k/v projections). They differ only in switches that
//! `ModelConfig` carries, so one implementation serves all of them.

use super::backward::{head_loss_and_grad, GradientSums, Gradients};
use super::config::ModelConfig;
use super::layers::{embedding_and_head, Attention, KvCache, Mlp, Mode, RmsNorm, Rope, Step};
use super::TrainingBatch;
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

    /// Whether `loss_and_grads_by_hand` covers this model: f32 weights on the CPU, where
    /// its kernels run, and no Gemma-style norms or caps.
    pub fn backward_by_hand_applies(&self) -> bool {
        let weights = self.embed_tokens.embeddings();
        weights.device().is_cpu()
            && weights.dtype() == candle_core::DType::F32
            && self.layers.iter().all(|l| l.self_attn.plain() && l.mlp.plain())
    }

    /// Σ weight · log p(target) over a batch's targets and its gradient with respect to
    /// every weight, by the hand-written backward pass of `backward.rs`: the same numbers as
    /// `forward(.., Mode::Train)` and autograd.
    pub fn loss_and_grads_by_hand(&self, batch: &TrainingBatch, weight: f64) -> Result<(f64, Gradients)> {
        let (b, t) = batch.input_ids.dims2()?;
        let embeddings = self.embed_tokens.embeddings();
        let ids = batch.input_ids.flatten_all()?;
        let mut x = embeddings.detach().index_select(&ids, 0)?;
        let step = Step::new(b, t, &batch.lengths, None, self.sliding_window, x.dtype(), x.device())?;
        let rope = self.rope.select(&step.positions)?;
        let mut saved = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let h = layer.input_layernorm.forward_detached(&x)?;
            let mask = step.mask_for(layer.sliding);
            let (attention, attention_saved) = layer.self_attn.forward_saving(&h, (b, t), &rope, mask)?;
            let mid = (&x + attention)?;
            let (mlp, mlp_saved) = layer.mlp.forward_saving(&layer.post_attention_layernorm.forward_detached(&mid)?)?;
            let out = (&mid + mlp)?;
            saved.push((std::mem::replace(&mut x, out), attention_saved, mid, mlp_saved));
        }
        let mut grads = GradientSums::default();
        let hidden = self.norm.forward_detached(&x)?;
        let (loss, d_hidden) = head_loss_and_grad(&hidden, &self.lm_head, &batch.rows, &batch.targets, weight, &mut grads)?;
        drop(hidden);
        let mut dx = self.norm.backward(&x, &d_hidden, &mut grads)?;
        for (layer, (x, attention_saved, mid, mlp_saved)) in self.layers.iter().zip(saved).rev() {
            // The norms' outputs are recomputed (one cheap pass) rather than kept per layer.
            let h = layer.post_attention_layernorm.forward_detached(&mid)?;
            let dh = layer.mlp.backward(&h, mlp_saved, &dx, &mut grads)?;
            let d_mid = (dx + layer.post_attention_layernorm.backward(&mid, &dh, &mut grads)?)?;
            let h = layer.input_layernorm.forward_detached(&x)?;
            let dh = layer.self_attn.backward(&h, attention_saved, &d_mid, (b, t), &rope, &mut grads)?;
            dx = (d_mid + layer.input_layernorm.backward(&x, &dh, &mut grads)?)?;
        }
        grads.add(embeddings, embeddings.zeros_like()?.index_add(&ids, &dx, 0)?)?;
        Ok((loss, grads.done()))
    }

    pub fn vocab_size(&self) -> Result<usize> {
        self.lm_head.weight().dim(0)
    }

    /// Vocabulary logits for hidden-state rows `(N, H) -> (N, V)`.
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        super::layers::linear(hidden, &self.lm_head)
    }
}
