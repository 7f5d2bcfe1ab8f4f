//! The trl training engine (`engines/sft.py` through accelerate) against our own trainer on
//! stories260K, f32, on the CPU: the same tokens and micro-batches give the same per-step
//! losses and nearly the same weights; two processes (gloo) reach one process's weights; a
//! killed engine run resumes; an experiment trains through it end to end; and bad set-ups
//! fail with one clear error.
//!
//! The engine's Python environment is created on first use (pinned torch, transformers and
//! accelerate from PyPI; minutes, once per machine). Where it cannot be, the tests say why.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{have, one_error_line, succeeded, tiny_pool, STORIES};

/// 12 story-like SFT examples.
fn sft_file(dir: &Path) -> PathBuf {
    let pairs = [
        ("Tell me about a cat.", "The cat sat on the mat and was happy all day long."),
        ("Who is Lily?", "Lily is a little girl who likes to play in the park with her dog."),
        ("Say hi.", "Hi! It is a sunny day and the birds sing."),
        ("What did Tom find?", "Tom found a shiny red ball under the big bed."),
        ("Where is the ball?", "The ball is in the garden next to the tree."),
        ("Why was Sue sad?", "Sue was sad because she lost her toy."),
        ("What is in the box?", "There is a little toy car in the box."),
        ("Who is Ben?", "Ben is a boy who likes to run and jump."),
        ("What did mom say?", "Mom said it was time to go to bed."),
        ("Where did the bird go?", "The bird flew up to the sky and sang a song."),
        ("What is big?", "The tree is very big and green."),
        ("Tell me a story.", "Once upon a time there was a kind fox who helped everyone."),
    ];
    let text: String = pairs
        .iter()
        .map(|(p, r)| {
            let row = serde_json::json!({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]});
            format!("{row}\n")
        })
        .collect();
    let path = dir.join("sft.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// `harness train` on the shared settings: 3 epochs of 2-micro-batch steps, 12+ steps.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train", "--model", "stories260k", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--lr", "0.002", "--epochs", "3", "--micro-batch-tokens", "48", "--grad-accum", "2", "--max-len", "64",
        "--seed", "1", "--warmup-ratio", "0.1", "--weight-decay", "0.01",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn harness(args: &[String], cache: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_harness"));
    command.args(args).env("HARNESS_CACHE_DIR", cache);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn log(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every weight of a trained model folder, by name.
fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let tensors = candle_core::safetensors::load(out.join("model/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut named: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// ‖a − b‖₂ / ‖b − base‖₂ over the weights both have: how far apart two runs ended, against
/// how far training moved.
fn relative_gap(a: &Path, b: &Path, base: &[(String, Vec<f32>)]) -> f64 {
    let (a, b) = (weights(a), weights(b));
    let (mut gap, mut moved) = (0.0f64, 0.0f64);
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let start = &base.iter().find(|(n, _)| n == name).unwrap().1;
        for ((x, y), s) in x.iter().zip(y).zip(start) {
            gap += ((x - y) as f64).powi(2);
            moved += ((y - s) as f64).powi(2);
        }
    }
    (gap / moved).sqrt()
}

/// Runs the trl engine once; `None` (and why) where its environment cannot be had here.
fn engine_available(data: &Path, out: &Path, cache: &Path) -> Option<Output> {
    let output = harness(&train_args(data, out, &["--engine", "trl"]), cache, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && (stderr.contains("virtual environment") || stderr.contains("pinned requirements")) {
        eprintln!("skipped: the trl engine's Python environment cannot be created here: {}", stderr.trim());
        return None;
    }
    Some(output)
}

#[test]
fn trl_engine_trains_as_the_native_trainer_one_or_two_processes_and_resumes() {
    if !have(&[STORIES]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = sft_file(dir.path());
    let [native, trl, two, killed] = ["native", "trl", "two", "killed"].map(|n| dir.path().join(n));

    let started = Instant::now();
    let Some(output) = engine_available(&data, &trl, &cache) else { return };
    succeeded(&output);
    let trl_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    succeeded(&harness(&train_args(&data, &native, &[]), &cache, &[]));
    let native_seconds = started.elapsed().as_secs_f64();
    eprintln!("one run: native trainer {native_seconds:.1} s, trl engine {trl_seconds:.1} s (both including start-up)");

    // Same tokens, same batches: every step's loss within 1e-3 relative, the same counts.
    let (ours, theirs) = (log(&native), log(&trl));
    assert!(ours.len() >= 10, "{} steps", ours.len());
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        let (x, y) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-3 * x.abs(), "step {}: loss {x} (native) vs {y} (trl)", a["step"]);
        assert_eq!(a["response_tokens"], b["response_tokens"], "step {}", a["step"]);
        assert_eq!(a["tokens"], b["tokens"], "step {}", a["step"]);
        let (lr_a, lr_b) = (a["lr"].as_f64().unwrap(), b["lr"].as_f64().unwrap());
        assert!((lr_a - lr_b).abs() <= 1e-12 + 1e-9 * lr_a, "step {}: lr {lr_a} vs {lr_b}", a["step"]);
    }
    // The final weights: the runs' gap is a small fraction of how far training moved them.
    let base = {
        let tensors = candle_core::safetensors::load(trl.join("engine/base/model.safetensors"), &candle_core::Device::Cpu).unwrap();
        let mut named: Vec<(String, Vec<f32>)> = tensors
            .into_iter()
            .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    };
    let gap = relative_gap(&trl, &native, &base);
    eprintln!("final weights: |trl - native| / |native - base| = {gap:.2e}");
    assert!(gap < 1e-4, "the engines' weights differ by {gap:.2e} of the distance trained");
    // Evaluated under the template it trained under, as our own export writes it.
    let template = |out: &Path| -> Value {
        serde_json::from_str::<Value>(&std::fs::read_to_string(out.join("model/tokenizer_config.json")).unwrap()).unwrap()["chat_template"].clone()
    };
    assert!(template(&trl).is_string() && template(&trl) == template(&native));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(trl.join("report.json")).unwrap()).unwrap();
    assert!(report["weight_l2_distance"].as_f64().unwrap() > 0.0);

    // Data parallel on the CPU: two gloo processes, the same global batch, the same weights.
    succeeded(&harness(&train_args(&data, &two, &["--engine", "trl", "--processes", "2"]), &cache, &[]));
    let dp_gap = relative_gap(&two, &trl, &base);
    eprintln!("two processes against one: {dp_gap:.2e} of the distance trained");
    assert!(dp_gap < 1e-4, "two processes end {dp_gap:.2e} away from one");
    for (a, b) in log(&two).iter().zip(&log(&trl)) {
        let (x, y) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {}: {x} vs {y}", a["step"]);
    }

    // A killed engine run resumes from its last checkpoint to the uninterrupted weights.
    let args = train_args(&data, &killed, &["--engine", "trl", "--save-every", "4"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(&args)
        .env("HARNESS_CACHE_DIR", &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let steps = std::fs::read_to_string(killed.join("train_log.jsonl")).map_or(0, |t| t.lines().count());
        let saved = std::fs::read_dir(killed.join("engine/checkpoints")).map_or(0, |d| d.flatten().filter(|e| !e.file_name().to_string_lossy().ends_with(".tmp")).count());
        if steps >= 6 && saved >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the engine never got going");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The whole process group: accelerate's launcher and the training process.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = Command::new("pkill").args(["-9", "-f", killed.join("engine").to_str().unwrap()]).status();
    child.wait().unwrap();
    assert!(!killed.join("report.json").exists(), "killed after it finished");
    let resumed = succeeded(&harness(&args, &cache, &[]));
    assert!(resumed.contains("resumed at step"), "{resumed}");
    let steps: Vec<u64> = log(&killed).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=theirs.len() as u64).collect::<Vec<_>>(), "each step logged once");
    let resume_gap = relative_gap(&killed, &trl, &base);
    assert!(resume_gap < 1e-5, "the resumed run ends {resume_gap:.2e} away");
}

#[test]
fn an_experiment_trains_through_the_trl_engine() {
    if !have(&[STORIES, "../shared/data/eval/gsmplus-testmini.jsonl.gz"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let pool = tiny_pool(dir.path());
    let yaml = format!(
        "name: engine\nseed: 2\ntargets: [{{name: stories260K, model: stories260k}}]\npool: {{path: {}}}\n\
         selectors: [{{name: random}}, {{name: strongest, params: {{source: alpha}}}}]\n\
         training: {{engine: trl, lr: 0.001, micro_batch_tokens: 96, max_len: 128}}\n\
         evaluation: {{benchmarks: [gsmplus], limit: 2, max_new_tokens: 4, base: false}}\n",
        pool.display()
    );
    let path = dir.path().join("engine.yaml");
    std::fs::write(&path, yaml).unwrap();
    let runs = dir.path().join("runs");
    let args: Vec<String> = ["run", path.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()].map(String::from).to_vec();
    let plan = succeeded(&harness(&[args.clone(), vec!["--dry-run".into()]].concat(), &cache, &[]));
    assert!(plan.contains("training: trl (cpu, f32) on 1 process(s)"), "{plan}");
    let output = harness(&args, &cache, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && stderr.contains("virtual environment") {
        eprintln!("skipped: the trl engine's Python environment cannot be created here: {stderr}");
        return;
    }
    let table = succeeded(&output);
    assert!(table.contains("random") && table.contains("strongest") && table.contains("gsmplus"), "{table}");
    let results: Value = serde_json::from_str(&std::fs::read_to_string(runs.join("engine/report/results.json")).unwrap()).unwrap();
    for row in results["rows"].as_array().unwrap() {
        assert!(row["train"]["weight_l2_distance"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["metrics"]["gsmplus"].is_object(), "{row}");
    }
    let trained: Vec<PathBuf> = std::fs::read_dir(runs.join("engine/train")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(trained.iter().all(|d| d.join("engine/train.parquet").exists() && d.join("engine/train_config.json").exists()));
}

#[test]
fn engine_failures_are_one_clear_error_and_nothing_is_finished() {
    if !have(&[STORIES]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = sft_file(dir.path());
    let out = |name: &str| dir.path().join(name);
    let trl = |name: &str| train_args(&data, &out(name), &["--engine", "trl", "--max-steps", "2"]);

    // A GPU configuration that cannot fit is refused before anything starts, with the numbers.
    let args = [trl("z"), ["--accelerate", "zero3", "--processes", "2"].map(String::from).to_vec()].concat();
    let e = one_error_line(&harness(&args, &cache, &[("HARNESS_GPU_MEMORY_GB", "0.0001")]));
    assert!(e.contains("refused") && e.contains("DOES NOT FIT") && e.contains("optimizer"), "{e}");
    assert!(!out("z").join("engine").exists(), "nothing was handed over");

    // No Python where one is named.
    let e = one_error_line(&harness(&trl("a"), &cache, &[("HARNESS_ENGINE_PYTHON", "/nonexistent/python3")]));
    assert!(e.contains("HARNESS_ENGINE_PYTHON=/nonexistent/python3: no such file") && e.contains(out("a").to_str().unwrap()), "{e}");

    // An environment that cannot be installed: its log is named.
    let envs = dir.path().join("envs");
    let e = one_error_line(&harness(&trl("b"), &cache, &[("HARNESS_ENGINE_ENVS", envs.to_str().unwrap()), ("HARNESS_PYTHON", "/bin/false")]));
    assert!(e.contains("creating the engine's virtual environment failed") && e.contains(".install.log") && e.contains(out("b").to_str().unwrap()), "{e}");

    // Engine scripts that fail: exiting non-zero, and writing a model with another tokenizer.
    let fake = |name: &str, script: &str| {
        let engines = dir.path().join(name);
        std::fs::create_dir_all(engines.join("accelerate")).unwrap();
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines");
        for file in ["requirements.txt", "accelerate/cpu.yaml"] {
            std::fs::copy(real.join(file), engines.join(file)).unwrap();
        }
        std::fs::write(engines.join("sft.py"), script).unwrap();
        engines
    };
    let exits = fake("exits", "import sys\nprint('engine: out of memory')\nsys.exit(3)\n");
    let output = harness(&trl("c"), &cache, &[("HARNESS_ENGINES_DIR", exits.to_str().unwrap())]);
    if String::from_utf8_lossy(&output.stderr).contains("virtual environment") {
        eprintln!("skipped: the trl engine's Python environment cannot be created here");
        return;
    }
    let e = one_error_line(&output);
    assert!(e.contains("exited with") && e.contains("engine.log") && e.contains("out of memory") && e.contains(out("c").to_str().unwrap()), "{e}");
    assert!(!out("c").join("report.json").exists());

    let retokenized = fake(
        "tokenizer",
        "import json, os, shutil, sys\n\
         engine = sys.argv[1]\n\
         config = json.load(open(os.path.join(engine, 'train_config.json')))\n\
         model = os.path.join(os.path.dirname(os.path.abspath(engine)), 'model')\n\
         shutil.copytree(config['base_model'], model, dirs_exist_ok=True)\n\
         t = json.load(open(os.path.join(model, 'tokenizer.json')))\n\
         vocab = t['model']['vocab']\n\
         if isinstance(vocab, dict):\n    a, b = sorted(vocab)[-2:]; vocab[a], vocab[b] = vocab[b], vocab[a]\n\
         else:\n    vocab[-1], vocab[-2] = vocab[-2], vocab[-1]\n\
         json.dump(t, open(os.path.join(model, 'tokenizer.json'), 'w'))\n",
    );
    let e = one_error_line(&harness(&trl("d"), &cache, &[("HARNESS_ENGINES_DIR", retokenized.to_str().unwrap())]));
    assert!(e.contains("tokenizer differs from the base model's") && e.contains("engine.log"), "{e}");
    assert!(!out("d").join("report.json").exists());

    // A launch command of one's own (engines/slurm-multinode.sh is one) gets its fields filled in.
    let launch = "{python} -m accelerate.commands.launch --quiet --config_file {accelerate} --num_processes {processes} \
                  --main_process_port {port} {script} {engine_dir}";
    let args = [trl("e"), vec!["--launch".into(), launch.into()]].concat();
    succeeded(&harness(&args, &cache, &[]));
    assert_eq!(log(&out("e")).len(), 2);
}
