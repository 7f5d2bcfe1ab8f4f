//! Training on an existing distributed engine (`training.engine: trl`): the stage hands over
//! exactly the tokens, loss mask and micro-batch order our trainer would use, runs
//! `engines/sft.py` through `accelerate launch` (one CPU process, DDP, DeepSpeed ZeRO-3 or
//! FSDP), and takes back a Hugging Face folder it checks before the stage may finish.
//!
//! The contract (version [`CONTRACT`]), all inside the stage folder:
//! - in, under `engine/`: `train.parquet` (`input_ids`, `loss_mask` per example, as
//!   [`crate::model::LoadedModel::encode_pair`] made them), `batches.json` (each step's
//!   micro-batches), `train_config.json` (lr, schedule, warm-up steps, AdamW, clipping,
//!   precision, seed, the loss definition, the base model folder); a GGUF base is exported to
//!   `engine/base/` first;
//! - out: `model/` (a Hugging Face folder), `train_log.jsonl` in our trainer's format, exit 0.
//!
//! The harness then loads `model/`, checks its config and tokenizer against the base, and
//! computes the weight drift, as for its own runs.

use super::{batch_order, data::SftData, export, read_log, sorted_vars, write_log, Finished, Prepared, TrainConfig, TrainReport};
use crate::model::{self, LoadOptions};
use crate::{Error, Result};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const CONTRACT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Native,
    Trl,
}

impl Engine {
    pub fn is_native(&self) -> bool {
        *self == Engine::Native
    }
}

impl std::str::FromStr for Engine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(Engine::Native),
            "trl" => Ok(Engine::Trl),
            other => Err(Error::Invalid(format!("training engine `{other}`: expected native or trl"))),
        }
    }
}

/// Where the engine's files live: `HARNESS_ENGINES_DIR`, else this repository's `engines/`.
pub fn engines_dir() -> PathBuf {
    std::env::var_os("HARNESS_ENGINES_DIR").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("engines"), PathBuf::from)
}

/// The accelerate config a run names (`cpu` by default): a file of `engines/accelerate/`, or a path.
pub fn accelerate_config(config: &TrainConfig) -> Result<PathBuf> {
    let name = config.accelerate.as_deref().unwrap_or("cpu");
    let builtin = engines_dir().join("accelerate").join(format!("{name}.yaml"));
    let path = if builtin.exists() { builtin } else { PathBuf::from(name) };
    if !path.exists() {
        return Err(Error::Invalid(format!(
            "training.accelerate `{name}`: neither a config in {} (cpu, zero3, fsdp) nor a file",
            engines_dir().join("accelerate").display()
        )));
    }
    Ok(path)
}

/// What an accelerate config asks for, as the plan and the hand-off need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub on_cpu: bool,
    /// DeepSpeed (ZeRO) or FSDP: weights, gradients and optimiser state split over processes.
    pub sharded: bool,
    pub deepspeed: bool,
}

impl Launch {
    /// Read from the config's own `use_cpu` and `distributed_type`, whatever its file is called.
    pub fn of(config: &TrainConfig) -> Result<Launch> {
        let path = accelerate_config(config)?;
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value = |key: &str| {
            text.lines()
                .map(|l| l.split('#').next().unwrap_or_default().trim())
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')).map(|v| v.trim().trim_matches(['\'', '"']).to_string()))
                .unwrap_or_default()
        };
        let kind = value("distributed_type").to_ascii_uppercase();
        let deepspeed = kind == "DEEPSPEED";
        Ok(Launch { on_cpu: value("use_cpu") == "true", sharded: deepspeed || kind == "FSDP", deepspeed })
    }
}

/// The pinned requirement files of a run: the base set, plus DeepSpeed where the config uses it.
fn requirement_files(config: &TrainConfig) -> Result<Vec<PathBuf>> {
    let mut files = vec![engines_dir().join("requirements.txt")];
    if Launch::of(config)?.deepspeed {
        files.push(engines_dir().join("requirements-gpu.txt"));
    }
    Ok(files)
}

/// What a trl run's result depends on beyond its settings: the pins and the engine script.
/// The train stage's key records it.
pub fn fingerprint(config: &TrainConfig) -> Result<String> {
    let mut text = String::new();
    for path in requirement_files(config)? {
        text.push_str(&pins(&std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?));
        text.push('\0');
    }
    // The script verbatim: in Python, indentation is behaviour.
    let script = engines_dir().join("sft.py");
    text.push_str(&std::fs::read_to_string(&script).map_err(|e| Error::io(&script, e))?);
    Ok(crate::util::sha256_bytes(text.as_bytes()))
}

/// The lines that matter of a requirements file: comments and blanks dropped.
fn pins(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect::<Vec<_>>().join("\n")
}

/// The engine's Python: `HARNESS_ENGINE_PYTHON` as given, else a virtual environment created
/// once from the pinned requirements under `~/.cache/grape-harness-engine/<hash>` (shared by
/// every run and test on the machine; concurrent first uses wait for one install).
pub fn python(config: &TrainConfig) -> Result<PathBuf> {
    if let Some(given) = std::env::var_os("HARNESS_ENGINE_PYTHON") {
        let given = PathBuf::from(given);
        if !given.exists() {
            return Err(Error::Invalid(format!("HARNESS_ENGINE_PYTHON={}: no such file", given.display())));
        }
        return Ok(given);
    }
    let mut pinned = String::new();
    let files = requirement_files(config)?;
    for path in &files {
        pinned.push_str(&pins(&std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?));
        pinned.push('\n');
    }
    let hash = crate::util::sha256_bytes(pinned.as_bytes());
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let root = std::env::var_os("HARNESS_ENGINE_ENVS").map_or_else(|| home.join(".cache/grape-harness-engine"), PathBuf::from);
    let dir = root.join(&hash[..16]);
    let python = dir.join("bin/python");
    let ready = dir.join(".ready");
    if ready.exists() {
        return Ok(python);
    }
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let lock_path = root.join(format!("{}.lock", &hash[..16]));
    let _lock = crate::util::lock_file(&lock_path, true).map_err(|e| Error::io(&lock_path, e))?;
    if ready.exists() {
        return Ok(python);
    }
    let log_path = root.join(format!("{}.install.log", &hash[..16]));
    let system = std::env::var_os("HARNESS_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    tracing::info!("creating the training engine's Python environment in {} (once; torch brings several GB)", dir.display());
    let started = Instant::now();
    let log = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let run = |command: &mut Command, what: &str| -> Result<()> {
        let status = command
            .stdout(log.try_clone().map_err(|e| Error::io(&log_path, e))?)
            .stderr(log.try_clone().map_err(|e| Error::io(&log_path, e))?)
            .status()
            .map_err(|e| Error::Invalid(format!("{what}: cannot run {}: {e}", system.display())))?;
        if !status.success() {
            return Err(Error::Invalid(format!("{what} failed ({status}); see {}", log_path.display())));
        }
        Ok(())
    };
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new(&system).args(["-m", "venv"]).arg(&dir), "creating the engine's virtual environment")?;
    let mut install = Command::new(&python);
    install.args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input"]);
    for file in &files {
        install.arg("-r").arg(file);
    }
    run(&mut install, "installing the engine's pinned requirements")?;
    std::fs::write(&ready, pinned).map_err(|e| Error::io(&ready, e))?;
    tracing::info!("the engine's environment took {:.0} s to install", started.elapsed().as_secs_f64());
    Ok(python)
}

/// `train_config.json`: everything the engine needs to train as our trainer would.
#[derive(Debug, Serialize)]
struct HandOff<'a> {
    contract: u32,
    base_model: &'a Path,
    lr: f64,
    schedule: super::optim::Schedule,
    warmup_steps: usize,
    steps: usize,
    grad_accum: usize,
    micro_batch_tokens: usize,
    max_len: usize,
    adamw: super::optim::AdamWConfig,
    clip_grad_norm: Option<f64>,
    seed: u64,
    save_every: Option<usize>,
    keep_checkpoints: usize,
    device: &'static str,
    precision: &'static str,
    gradient_checkpointing: bool,
    loss: &'static str,
}

const LOSS: &str = "per step: the sum over every response token of all its micro-batches on all processes of \
                    -log p(token | prefix), divided by the step's response-token count";

/// Trains `prepared` with the trl engine into `out` (a stage folder), resuming the engine's
/// own checkpoints there; the same report as our trainer's.
pub fn train(prepared: &Prepared, config: &TrainConfig, out: &Path, progress: bool) -> Result<TrainReport> {
    super::validate(config)?;
    let started = Instant::now();
    let engine_dir = out.join("engine");
    std::fs::create_dir_all(&engine_dir).map_err(|e| Error::io(&engine_dir, e))?;
    let order = batch_order(&prepared.data.examples, config);
    write_examples(&engine_dir.join("train.parquet"), &prepared.data)?;
    let batches: Vec<serde_json::Value> =
        order.steps.iter().map(|(epoch, micro)| serde_json::json!({"epoch": epoch, "micro_batches": micro})).collect();
    write_json(&engine_dir.join("batches.json"), &serde_json::json!({ "steps": batches }))?;
    let base = base_folder(prepared, &engine_dir)?;
    let accelerate = accelerate_config(config)?;
    let on_cpu = Launch::of(config)?.on_cpu;
    let hand_off = HandOff {
        contract: CONTRACT,
        base_model: &base,
        lr: config.lr,
        schedule: config.schedule,
        warmup_steps: order.warmup,
        steps: order.steps.len(),
        grad_accum: config.grad_accum,
        micro_batch_tokens: config.micro_batch_tokens,
        max_len: config.max_len,
        adamw: config.adamw,
        clip_grad_norm: config.clip_grad_norm,
        seed: config.seed,
        save_every: config.save_every,
        keep_checkpoints: config.keep_checkpoints,
        device: if on_cpu { "cpu" } else { "cuda" },
        precision: if on_cpu { "f32" } else { "bf16" },
        gradient_checkpointing: !on_cpu,
        loss: LOSS,
    };
    write_json(&engine_dir.join("train_config.json"), &hand_off)?;

    let python = python(config).map_err(|e| Error::Invalid(format!("the trl engine in {}: {e}", out.display())))?;
    let resumed_from = Some(resumable(&engine_dir)).filter(|&s| s > 0);
    let log_path = engine_dir.join("engine.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let processes = config.processes.unwrap_or(1).max(1);
    let script = engines_dir().join("sft.py");
    let port = free_port().to_string();
    let mut command = match &config.launch {
        Some(template) => {
            let q = |p: &Path| crate::util::shell_quote(&p.to_string_lossy());
            let line = template
                .replace("{python}", &q(&python))
                .replace("{accelerate}", &q(&accelerate))
                .replace("{processes}", &processes.to_string())
                .replace("{port}", &port)
                .replace("{script}", &q(&script))
                .replace("{engine_dir}", &q(&engine_dir));
            let mut sh = Command::new("sh");
            sh.arg("-c").arg(line);
            sh
        }
        None => {
            let mut launch = Command::new(&python);
            launch
                .args(["-m", "accelerate.commands.launch", "--quiet", "--config_file"])
                .arg(&accelerate)
                .args(["--num_processes", &processes.to_string(), "--num_machines", "1", "--main_process_port", &port])
                .arg(&script)
                .arg(&engine_dir);
            launch
        }
    };
    command
        .env("OMP_NUM_THREADS", std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| threads_per(processes)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| Error::io(&log_path, e))?)
        .stderr(log);
    let failed = |what: String| {
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        Error::Invalid(format!(
            "the trl engine in {}: {what}; its log is {} (last lines: {})",
            out.display(),
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    };
    // The launcher dies with the harness (and takes its workers along), so a killed stage
    // leaves no training behind to race its resumption.
    // SAFETY: prctl between fork and exec touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    // An engine run that finished (launched elsewhere, or before the harness was stopped) is
    // checked, not repeated.
    let finished = out.join("model/config.json").exists() && read_log(out).is_ok_and(|l| l.len() == order.steps.len());
    if !finished {
        let mut child = command.spawn().map_err(|e| failed(format!("cannot start {}: {e}", python.display())))?;
        let bar = super::progress_bar(progress, order.steps.len() as u64);
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| failed(e.to_string()))? {
                break status;
            }
            bar.set_position(read_log(out).map_or(0, |l| l.len()) as u64);
            std::thread::sleep(Duration::from_millis(500));
        };
        bar.finish_and_clear();
        if !status.success() {
            return Err(failed(format!("it exited with {status}")));
        }
    }
    // The chat template the run trained under (and the tokenizer, unless the engine wrote
    // one, which is then checked against the base's), as our own export writes them.
    let model_dir = out.join("model");
    let written = if model_dir.join("tokenizer.json").exists() {
        export::tokenizer_config(&prepared.model, &model_dir)
    } else {
        export::tokenizer(&prepared.model, &model_dir)
    };
    written.map_err(|e| failed(e.to_string()))?;
    check_output(prepared, out).map_err(|e| failed(e.to_string()))?;
    let history = read_log(out)?;
    if history.len() != order.steps.len() {
        return Err(failed(format!("train_log.jsonl has {} steps, not {}", history.len(), order.steps.len())));
    }
    write_log(out, &history)?;
    let tokens = history.iter().skip(resumed_from.unwrap_or(0)).map(|l| l.tokens).sum();
    let end = Finished {
        history: &history,
        steps: order.steps.len(),
        resumed_from,
        weight_l2_distance: drift(prepared, &out.join("model"))?,
        tokens,
        started,
    };
    end.report(out, &prepared.data)
}

/// Half the cores to each of `processes` (at least one).
fn threads_per(processes: usize) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / processes).max(1).to_string()
}

/// A port no one listens on now, for the processes to meet at.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(29500, |a| a.port())
}

/// One row per example: `input_ids` and `loss_mask`, exactly as encoded for our trainer.
fn write_examples(path: &Path, data: &SftData) -> Result<()> {
    let ids: Vec<Series> = data
        .examples
        .iter()
        .map(|e| Series::new("".into(), e.ids.iter().map(|&t| t as i64).collect::<Vec<i64>>()))
        .collect();
    let masks: Vec<Series> = data.examples.iter().map(|e| Series::new("".into(), e.response_mask.clone())).collect();
    let failed = |e: PolarsError| Error::format(path, format!("cannot write the training examples: {e}"));
    let columns = vec![Column::new("input_ids".into(), ids), Column::new("loss_mask".into(), masks)];
    let mut frame = DataFrame::new(data.examples.len(), columns).map_err(failed)?;
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    ParquetWriter::new(file).finish(&mut frame).map_err(failed)?;
    Ok(())
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("plain data serialises");
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// The base model as a Hugging Face folder: the target's own, or (GGUF) exported once.
fn base_folder(prepared: &Prepared, engine_dir: &Path) -> Result<PathBuf> {
    let weights = &prepared.model.files.weights;
    if weights.is_dir() {
        return std::path::absolute(weights).map_err(|e| Error::io(weights, e));
    }
    let dir = engine_dir.join("base");
    if !dir.join("config.json").exists() {
        let named: Vec<(String, candle_core::Tensor)> =
            sorted_vars(&prepared.vars).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        export::hugging_face(&prepared.model, &named, &dir)?;
    }
    std::path::absolute(&dir).map_err(|e| Error::io(&dir, e))
}

/// The engine's `model/` must be the base model's architecture with the base's tokenizer.
fn check_output(prepared: &Prepared, out: &Path) -> Result<()> {
    let dir = out.join("model");
    if !dir.join("config.json").exists() {
        return Err(Error::Invalid(format!("it wrote no model ({} is missing)", dir.join("config.json").display())));
    }
    let trained = model::inspect(&dir.to_string_lossy(), None)?;
    let base = &prepared.model;
    let (a, b) = (base.config.to_hf_json(), trained.config.to_hf_json());
    if let Some(key) = a.as_object().into_iter().flatten().map(|(k, _)| k).find(|k| a[k.as_str()] != b[k.as_str()]) {
        return Err(Error::Invalid(format!(
            "{}: `{key}` is {} but the base model's is {}",
            dir.join("config.json").display(),
            b[key.as_str()],
            a[key.as_str()]
        )));
    }
    if base.tokenizer.vocabulary() != trained.tokenizer.vocabulary() {
        return Err(Error::Invalid(format!("{}: its tokenizer differs from the base model's", dir.display())));
    }
    if trained.template.source() != base.template.source() {
        return Err(Error::Invalid(format!("{}: its chat template differs from the one it trained under", dir.display())));
    }
    Ok(())
}

/// ‖θ − θ₀‖₂ between the engine's weights and the base's.
fn drift(prepared: &Prepared, dir: &Path) -> Result<f64> {
    let on_cpu = LoadOptions { device: candle_core::Device::Cpu, ..LoadOptions::default() };
    let trained = model::load_trainable(&dir.to_string_lossy(), &on_cpu)?.1;
    let trained: std::collections::HashMap<String, candle_core::Var> = sorted_vars(&trained).into_iter().collect();
    let mut total = 0.0;
    for (name, base) in sorted_vars(&prepared.vars) {
        let after = trained
            .get(&name)
            .ok_or_else(|| Error::Invalid(format!("{}: the trained model has no `{name}`", dir.display())))?;
        let diff = (after.as_tensor().to_dtype(candle_core::DType::F32)? - base.as_tensor().to_dtype(candle_core::DType::F32)?)?;
        total += diff.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// The newest engine checkpoint's step, 0 without one.
fn resumable(engine_dir: &Path) -> usize {
    std::fs::read_dir(engine_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
        .unwrap_or(0)
}
