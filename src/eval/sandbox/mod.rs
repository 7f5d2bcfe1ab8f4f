//! Runs untrusted, model-generated Python programs (HumanEval / MBPP solutions followed by their
//! tests), one `python3 -I` per sample, and reduces each run to a [`Verdict`].
//!
//! Generated code is treated as hostile, whoever runs the harness. Each sample gets, where the
//! kernel offers them (what was in force is [`Sandbox::protections`], recorded in `metrics.json`):
//! - **Landlock** (`landlock.rs`): it may read only the interpreter's installation and the shared
//!   libraries, `/dev/null` and `/dev/urandom`, and read and write only its own folder; from ABI 4
//!   it can neither bind nor connect TCP, from ABI 6 it can signal no process and reach no
//!   abstract Unix socket outside its own sample.
//! - **seccomp** (`seccomp.rs`): no socket but Unix ones, no new namespaces, no ptrace, no reading
//!   other processes' memory, no io_uring, bpf, keyrings or module loading.
//! - **Namespaces** (`child.rs`; a user namespace first when not root): no network at all (not
//!   even loopback), private size-capped tmpfs mounts over `/tmp` (its working directory),
//!   `/var/tmp`, `/run/lock` and `/dev/shm`, private IPC, and its own PID namespace, in which it
//!   sees and signals only its own processes; when the program ends everything it left behind
//!   (`setsid()` grandchildren included) is killed with the namespace.
//! - **As root**, also its own unprivileged uid and gid (`uid_base + worker`) with no groups, and
//!   after every run a sweep that kills and reaps whatever is left under that uid.
//! - Always: `no_new_privs`, rlimits on address space, CPU time, file size, processes, open files
//!   and core dumps, and a wall-clock timeout that kills its process group.
//!
//! A kernel that can contain neither the filesystem, nor the network, nor signals (see
//! [`Protections::missing`]) makes [`Sandbox::new`] refuse, unless `unsandboxed` is set.
//!
//! A pass means the tests ran to their end: the sandbox appends a last statement that writes a
//! marker, new and random for each run, to a pipe, and only exit status 0 with that marker is
//! [`Verdict::Passed`]. `sys.exit(0)`, `os._exit(0)` or an `atexit` exit before it is a failure.
//! This is against programs that exit early, not against code written to defeat this harness: a
//! program can read its own source.

mod child;
mod landlock;
mod seccomp;

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use child::ChildSetup;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// The stderr kept per sample: its last lines, cut to a length. Enough for a traceback's end;
/// short, so little of what a program printed reaches `items.jsonl`.
pub const TAIL_LINES: usize = 10;
pub const TAIL_BYTES: usize = 1000;
/// What a program-of-thought answer may print and still be read whole.
pub const STDOUT_BYTES: usize = 4096;
/// How long the supervisor sleeps between exit checks.
const SLICE: Duration = Duration::from_millis(5);
/// Automatically claimed uid blocks: `AUTO_UID_START + k * AUTO_UID_BLOCK` for k < `AUTO_UID_BLOCKS`.
pub const AUTO_UID_START: u32 = 60_000;
pub const AUTO_UID_BLOCK: u32 = 64;
const AUTO_UID_BLOCKS: u32 = 16;
/// What a code verdict means, in the keys of finished evaluations: changing it re-grades them.
pub const VERDICTS: &str = "passed = exit 0 after the last statement";
/// The reason given for a program that ended without reaching its last statement.
pub const EARLY_EXIT: &str = "exited before its tests finished";

/// Limits and placement; the defaults suit HumanEval and MBPP.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// A real interpreter (not a shell shim): Landlock lets the program read only its
    /// installation. As root it must be executable by an unprivileged uid (nothing under /root).
    pub python: PathBuf,
    /// Wall-clock limit per sample.
    pub timeout: Duration,
    /// Address space per process (RLIMIT_AS).
    pub memory_bytes: u64,
    /// CPU time per process: a backstop behind `timeout`, so keep it longer.
    pub cpu_seconds: u64,
    /// Largest file a program may write (RLIMIT_FSIZE).
    pub file_size_bytes: u64,
    /// Size cap of each private tmpfs, the working directory included.
    pub scratch_bytes: u64,
    /// Processes and threads per worker uid (RLIMIT_NPROC).
    pub max_processes: u64,
    /// Samples run at once by [`Sandbox::run_all`].
    pub workers: usize,
    /// Root only: first of `workers` consecutive uids (and gids) that nothing else on the
    /// machine may use: the sweep kills whatever runs under them. `None` claims the first free
    /// block of [`AUTO_UID_BLOCK`] uids from [`AUTO_UID_START`], so sandboxes of concurrent
    /// harness processes never share a uid.
    pub uid_base: Option<u32>,
    /// Namespaces; turn off only where the kernel refuses them (also detected).
    pub namespaces: bool,
    /// Run generated code even where the kernel cannot contain it (recorded in the results).
    pub unsandboxed: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        let system = Path::new("/usr/bin/python3");
        Self {
            python: if system.exists() { system.into() } else { "python3".into() },
            timeout: Duration::from_secs(3),
            memory_bytes: 2 << 30,
            cpu_seconds: 10,
            file_size_bytes: 16 << 20,
            scratch_bytes: 64 << 20,
            max_processes: 16,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            uid_base: None,
            namespaces: true,
            unsandboxed: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox config: {0}")]
    Config(String),
    #[error("sandbox uid {0} belongs to an existing user, group or process; choose another uid_base")]
    UidInUse(u32),
    #[error("sandbox uids from {0} are claimed by another running sandbox; choose another uid_base")]
    UidClaimed(u32),
    #[error("no free block of {AUTO_UID_BLOCK} sandbox uids from {AUTO_UID_START}: {0}")]
    NoFreeUids(String),
    #[error("interpreter {} cannot run a trivial program in the sandbox: {reason}", python.display())]
    Interpreter { python: PathBuf, reason: String },
    #[error(
        "refusing to run generated code: this kernel cannot contain it ({0}). Pass --unsandboxed to run it anyway, \
         unprotected beyond what is there"
    )]
    Uncontained(String),
    #[error("cannot start sandbox worker threads: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Exited with status 0 after its last statement.
    Passed,
    /// Its tests failed (an `AssertionError`), or it exited before they finished.
    Failed,
    /// Hit the wall-clock or CPU-time limit.
    Timeout,
    /// Anything else: syntax error, other exception, memory limit, signal, sandbox failure.
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Failed => "failed",
            Verdict::Timeout => "timeout",
            Verdict::Error => "error",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Why, where the verdict alone does not say (an early exit, a timeout).
    pub reason: Option<&'static str>,
    /// The last [`TAIL_LINES`] lines of stderr, at most [`TAIL_BYTES`] (lossy UTF-8), or why the
    /// sandbox failed.
    pub stderr_tail: String,
    /// The last [`STDOUT_BYTES`] of stdout, when asked for ([`Sandbox::run_all_printing`]).
    pub stdout: Option<String>,
    /// `None` when killed by a signal or never started.
    pub exit_code: Option<i32>,
    pub seconds: f64,
}

/// The layers that contained each sample, as recorded beside the results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protections {
    /// Each sample ran under its own unprivileged uid (only when the harness runs as root).
    pub uid_drop: bool,
    /// The Landlock ABI in force: the filesystem from 1, TCP from 4, signals and abstract Unix
    /// sockets from 6.
    pub landlock_abi: Option<u32>,
    pub seccomp: bool,
    /// Namespaces each sample got, of user, pid, net, mount and ipc.
    pub namespaces: Vec<String>,
    /// `--unsandboxed` was given: code ran even where something was missing.
    pub unsandboxed: bool,
}

impl Protections {
    /// What two runs both had: a merge of shards is only as contained as its least contained part.
    pub fn weakest(&self, other: &Protections) -> Protections {
        Protections {
            uid_drop: self.uid_drop && other.uid_drop,
            landlock_abi: self.landlock_abi.zip(other.landlock_abi).map(|(a, b)| a.min(b)),
            seccomp: self.seccomp && other.seccomp,
            namespaces: self.namespaces.iter().filter(|n| other.namespaces.contains(n)).cloned().collect(),
            unsandboxed: self.unsandboxed || other.unsandboxed,
        }
    }

    /// What is left uncontained: each entry names a kind of harm and the layers that would stop it.
    pub fn missing(&self) -> Vec<&'static str> {
        let has = |ns: &str| self.namespaces.iter().any(|n| n == ns);
        let abi = self.landlock_abi.unwrap_or(0);
        let mut missing = Vec::new();
        if abi == 0 && !self.uid_drop {
            missing.push("files: no Landlock, and not root, so no uid to drop to");
        }
        if !has("net") && !(abi >= 4 && self.seccomp) {
            missing.push("network: no network namespace, and no Landlock ABI 4 with seccomp");
        }
        if !has("pid") && !self.uid_drop && abi < 6 {
            missing.push("processes: no PID namespace, not root, and no Landlock ABI 6");
        }
        missing
    }
}

pub struct Sandbox {
    config: SandboxConfig,
    /// Root only: each worker runs under its own uid, swept after every sample.
    drop_uid: bool,
    /// Root only: the first worker uid, and the lock that claims the block while we live.
    uid_base: u32,
    _claim: Option<fs::File>,
    /// Whether the namespaces are in use; `new` turns them off if the kernel refuses them.
    namespaces: bool,
    landlock: Option<landlock::Policy>,
    seccomp: Option<Arc<seccomp::Filters>>,
    /// Indexes of idle workers; a worker's uid is `uid_base + index`.
    idle: Mutex<Vec<u32>>,
    freed: Condvar,
    pool: rayon::ThreadPool,
}

/// A worker index, returned to the idle list on drop.
struct Slot<'a> {
    sandbox: &'a Sandbox,
    index: u32,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.sandbox.idle.lock().unwrap_or_else(PoisonError::into_inner).push(self.index);
        self.sandbox.freed.notify_one();
    }
}

/// What every program may read besides the interpreter's own folders: shared libraries, the
/// loader's cache and harmless devices.
const SYSTEM_READABLE: [&str; 8] =
    ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache", "/dev/urandom", "/dev/zero"];

/// Prints the folders the interpreter reads: its binary, its library folder and its import path.
const INTERPRETER_PATHS: &str = "import json, os, sys, sysconfig\n\
    paths = sysconfig.get_paths()\n\
    print(json.dumps([os.path.realpath(sys.executable), sysconfig.get_config_var('LIBDIR') or '', \
    *(paths[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')), *sys.path]))\n";

impl Sandbox {
    /// Checks the configuration and runs a trivial program through the full sandbox, so a broken
    /// interpreter or kernel setup fails here rather than as an error verdict on every sample.
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        if config.workers == 0 || config.timeout.is_zero() {
            return Err(SandboxError::Config("workers and timeout must be non-zero".into()));
        }
        let workers = u32::try_from(config.workers).map_err(|_| SandboxError::Config("too many workers".into()))?;
        // SAFETY: geteuid has no preconditions.
        let drop_uid = unsafe { libc::geteuid() } == 0;
        let (uid_base, claim) = match (drop_uid, config.uid_base) {
            (false, _) => (0, None),
            (true, Some(base)) => {
                check_uids(base, workers)?;
                (base, Some(claim_uids(base)?.ok_or(SandboxError::UidClaimed(base))?))
            }
            (true, None) => claim_free_uids(workers)?,
        };
        if drop_uid {
            // Orphans of sandboxed programs without a PID namespace are re-parented to us so the
            // sweep reaps them at once; left to a lazy init their zombies would linger and count
            // against the worker uid's RLIMIT_NPROC.
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } != 0 {
                warn!(error = %io::Error::last_os_error(), "cannot become child subreaper");
            }
        }
        let python = config.python.clone();
        let error = |reason| SandboxError::Interpreter { python: python.clone(), reason };
        let landlock = match landlock::abi() {
            Some(abi) => {
                let mut readable = interpreter_paths(&config.python).map_err(error)?;
                readable.extend(SYSTEM_READABLE.iter().map(PathBuf::from));
                let mut paths: Vec<(&Path, landlock::Access)> =
                    readable.iter().map(|p| (p.as_path(), landlock::Access::Read)).collect();
                paths.push((Path::new("/dev/null"), landlock::Access::Full));
                Some(landlock::Policy::new(abi, &paths))
            }
            None => None,
        };
        let seccomp = match seccomp::available() {
            true => seccomp::Filters::new().map_err(|e| error(format!("seccomp filter: {e}")))?.map(Arc::new),
            false => None,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers)
            .thread_name(|i| format!("sandbox-{i}"))
            .build()?;
        let mut sandbox = Self {
            drop_uid,
            uid_base,
            _claim: claim,
            namespaces: config.namespaces,
            landlock,
            seccomp,
            idle: Mutex::new((0..workers).rev().collect()),
            freed: Condvar::new(),
            pool,
            config,
        };
        match sandbox.probe() {
            Ok(()) => {}
            // Only a child that could not start falls back: one that ran (and, say, timed out
            // on a loaded machine) must not quietly cost the namespaces.
            Err((false, first)) if sandbox.namespaces => {
                sandbox.namespaces = false;
                sandbox.probe().map_err(|(_, second)| error(format!("{first}; without namespaces: {second}")))?;
                warn!(reason = %first, "sandbox namespaces unavailable");
            }
            Err((_, reason)) => return Err(error(reason)),
        }
        let protections = sandbox.protections();
        let missing = protections.missing().join("; ");
        match (sandbox.config.unsandboxed, missing.is_empty()) {
            (false, false) => return Err(SandboxError::Uncontained(missing)),
            (true, false) => warn!("--unsandboxed: generated code runs uncontained here: {missing}"),
            (true, true) => warn!("--unsandboxed given, though every layer is in force"),
            (false, true) => {}
        }
        debug!(?protections, "sandbox ready");
        Ok(sandbox)
    }

    /// The layers each sample runs under.
    pub fn protections(&self) -> Protections {
        let mut namespaces = Vec::new();
        if self.namespaces {
            if !self.drop_uid {
                namespaces.push("user".to_string());
            }
            namespaces.extend(["pid", "net", "mount", "ipc"].map(String::from));
        }
        Protections {
            uid_drop: self.drop_uid,
            landlock_abi: self.landlock.as_ref().map(landlock::Policy::abi),
            seccomp: self.seccomp.is_some(),
            namespaces,
            unsandboxed: self.config.unsandboxed,
        }
    }

    /// `Err((started, reason))`: whether the child got as far as the interpreter, and why not.
    fn probe(&self) -> Result<(), (bool, String)> {
        let slot = self.acquire();
        // It checks that the interpreter starts, not how fast: a loaded machine must not fail it.
        let timeout = self.config.timeout.max(Duration::from_secs(30));
        match self.execute(slot.index, "pass\n", timeout, false) {
            Err(e) => Err((false, e.to_string())),
            Ok(outcome) if outcome.verdict == Verdict::Passed => Ok(()),
            Ok(outcome) => Err((true, format!("{}: {}", outcome.verdict, outcome.stderr_tail.trim()))),
        }
    }

    /// Runs one program on the first idle worker, waiting for one if all are busy.
    pub fn run(&self, program: &str) -> Outcome {
        self.run_with(program, false)
    }

    fn run_with(&self, program: &str, capture_stdout: bool) -> Outcome {
        let slot = self.acquire();
        let started = Instant::now();
        self.execute(slot.index, program, self.config.timeout, capture_stdout).unwrap_or_else(|e| Outcome {
            verdict: Verdict::Error,
            reason: None,
            stderr_tail: format!("sandbox: cannot start {}: {e}", self.config.python.display()),
            stdout: None,
            exit_code: None,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Runs up to `workers` programs at once; outcomes come back in input order, and `on_done`
    /// is called after each program finishes (for a progress bar).
    pub fn run_all(&self, programs: &[String], on_done: impl Fn() + Sync) -> Vec<Outcome> {
        self.run_many(programs, false, on_done)
    }

    /// [`Sandbox::run_all`], keeping the end of what each program printed: a program of
    /// thought's answer.
    pub fn run_all_printing(&self, programs: &[String], on_done: impl Fn() + Sync) -> Vec<Outcome> {
        self.run_many(programs, true, on_done)
    }

    fn run_many(&self, programs: &[String], capture_stdout: bool, on_done: impl Fn() + Sync) -> Vec<Outcome> {
        self.pool.install(|| {
            // One program per task: runs take seconds, so balance beats batching.
            programs
                .par_iter()
                .with_max_len(1)
                .map(|program| {
                    let outcome = self.run_with(program, capture_stdout);
                    on_done();
                    outcome
                })
                .collect()
        })
    }

    fn acquire(&self) -> Slot<'_> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(index) = idle.pop() {
                return Slot { sandbox: self, index };
            }
            idle = self.freed.wait(idle).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// `Err` only when the child could not be started.
    fn execute(&self, index: u32, program: &str, timeout: Duration, capture_stdout: bool) -> io::Result<Outcome> {
        let config = &self.config;
        // Cannot overflow: `check_uids` bounded the range (and without root the uid is unused).
        let uid = self.uid_base.wrapping_add(index);
        let (marker_read, marker_write) = pipe()?;
        let marker = new_marker()?;
        // At top level, after everything else; `os` is always loaded.
        let source = format!("{program}\n__import__('os').write({}, b'{marker}')\n", marker_write.as_raw_fd());
        let host_dir = match self.namespaces {
            true => None,
            false => Some(HostDir::create(&source, self.drop_uid.then_some(uid))?),
        };
        let ruleset = match &self.landlock {
            Some(policy) => {
                let ruleset = policy.ruleset()?;
                if let Some(dir) = &host_dir {
                    let folder = fs::File::open(&dir.path)?;
                    landlock::add_rule(
                        ruleset.as_raw_fd(),
                        folder.as_raw_fd(),
                        landlock::Access::Full,
                        true,
                        policy.abi(),
                    )?;
                }
                Some((ruleset, policy.abi()))
            }
            None => None,
        };
        let home = host_dir.as_ref().map_or(Path::new("/tmp"), |dir| dir.path.as_path());
        let mut command = Command::new(&config.python);
        command
            .args(["-I", "-B", "main.py"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("HOME", home)
            .env("TMPDIR", home)
            .stdin(Stdio::null())
            .stdout(if capture_stdout { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped());
        if let Some(dir) = &host_dir {
            command.current_dir(&dir.path);
        }
        // SAFETY: getuid and getgid have no preconditions.
        let (my_uid, my_gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let (owner, group) = if self.drop_uid { (uid, uid) } else { (my_uid, my_gid) };
        let scratch = match self.namespaces {
            true => Some((
                cstring(format!("size={},mode=0700,uid={owner},gid={group}", config.scratch_bytes))?,
                source.into_bytes(),
            )),
            false => None,
        };
        let setup = ChildSetup {
            uid: self.drop_uid.then_some(uid),
            user_maps: match self.namespaces && !self.drop_uid {
                true => Some((cstring(format!("{my_uid} {my_uid} 1\n"))?, cstring(format!("{my_gid} {my_gid} 1\n"))?)),
                false => None,
            },
            scratch,
            limits: ChildSetup::limits(
                config.memory_bytes,
                config.cpu_seconds,
                config.file_size_bytes,
                config.max_processes,
            ),
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
            marker_fd: marker_write.as_raw_fd(),
            landlock: ruleset.as_ref().map(|(fd, abi)| (fd.as_raw_fd(), *abi)),
            seccomp: self.seccomp.clone(),
        };
        // SAFETY: `ChildSetup::apply` only makes async-signal-safe libc calls and never allocates.
        unsafe { command.pre_exec(move || setup.apply()) };
        let started = Instant::now();
        let mut child = command.spawn()?;
        // The child has its copies; ours would keep the marker pipe open.
        drop((marker_write, ruleset));
        let run = supervise(&mut child, started, timeout);
        if self.drop_uid {
            sweep_uid(uid);
        }
        drop(host_dir);
        let outcome = run.outcome(read_marker(&marker_read) == marker.as_bytes());
        debug!(uid, verdict = %outcome.verdict, seconds = outcome.seconds, "sandboxed program finished");
        Ok(outcome)
    }
}

/// The interpreter's binary and folders, as it reports them (run outside the sandbox: only our
/// own fixed program runs here).
fn interpreter_paths(python: &Path) -> Result<Vec<PathBuf>, String> {
    let output = Command::new(python)
        .args(["-I", "-c", INTERPRETER_PATHS])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start it: {e}"))?;
    if !output.status.success() {
        return Err(format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()));
    }
    let paths: Vec<String> =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("cannot read its paths: {e}"))?;
    Ok(paths.into_iter().filter(|p| !p.is_empty()).map(PathBuf::from).collect())
}

fn cstring(text: String) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(text).map_err(io::Error::other)
}

/// Both ends close on exec; the child clears the flag on the write end it hands on.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned these descriptors to us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// 128 random bits, hex: no program can guess it.
fn new_marker() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    // SAFETY: `bytes` is a valid buffer of its length.
    if unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) } != bytes.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What the program wrote to the marker pipe (at most a little more than a marker).
fn read_marker(pipe: &OwnedFd) -> Vec<u8> {
    let mut buf = [0u8; 64];
    // SAFETY: reading into a valid buffer from a non-blocking pipe we own.
    let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    buf[..usize::try_from(n).unwrap_or(0)].to_vec()
}

/// How a program ended, before the marker is checked.
struct Run {
    status: io::Result<ExitStatus>,
    timed_out: bool,
    stderr_tail: String,
    stdout: Option<String>,
    seconds: f64,
}

impl Run {
    /// `finished`: the program's last statement wrote its marker.
    fn outcome(self, finished: bool) -> Outcome {
        let tail = &self.stderr_tail;
        let failed_assert = tail.lines().any(|line| line.starts_with("AssertionError"));
        // An uncaught exception (or a syntax error) names itself on stderr.
        let raised = tail
            .lines()
            .any(|line| line.contains("Error") || line.contains("Exception") || line.starts_with("Traceback"));
        let (verdict, reason) = match &self.status {
            _ if self.timed_out => (Verdict::Timeout, Some("ran past its time limit")),
            Ok(status) if status.signal() == Some(libc::SIGXCPU) => (Verdict::Timeout, Some("used up its CPU time")),
            Ok(status) if status.success() && finished => (Verdict::Passed, None),
            Ok(status) if status.code().is_some() && failed_assert => (Verdict::Failed, Some("a test failed")),
            Ok(status) if status.success() || (status.code().is_some() && !raised) => {
                (Verdict::Failed, Some(EARLY_EXIT))
            }
            _ => (Verdict::Error, None),
        };
        let exit_code = self.status.ok().and_then(|status| status.code());
        Outcome { verdict, reason, stderr_tail: self.stderr_tail, stdout: self.stdout, exit_code, seconds: self.seconds }
    }
}

/// Waits for the child or the deadline, keeping the ends of its stderr (and stdout, when
/// captured), then kills its process group either way.
fn supervise(child: &mut Child, started: Instant, timeout: Duration) -> Run {
    let mut stderr = Tail::new(child.stderr.take().map(OwnedFd::from), 2 * TAIL_BYTES);
    let mut stdout = Tail::new(child.stdout.take().map(OwnedFd::from), 2 * STDOUT_BYTES);
    let deadline = started + timeout;
    let timed_out = loop {
        if has_exited(child.id()) {
            break false;
        }
        let now = Instant::now();
        if now >= deadline {
            break true;
        }
        Tail::pump([&mut stderr, &mut stdout], (deadline - now).min(SLICE));
    };
    let seconds = started.elapsed().as_secs_f64();
    // The child is not reaped yet, so its pid, which is also its process group id, cannot have
    // been reused: this kills only what is left of its group (and with the PID namespace's
    // first process, all the namespace holds).
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory preconditions; a negative pid names a process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let status = child.wait();
    Tail::pump([&mut stderr, &mut stdout], Duration::ZERO);
    let stdout = stdout.pipe_seen.then(|| {
        let bytes = &stdout.bytes[stdout.bytes.len().saturating_sub(STDOUT_BYTES)..];
        String::from_utf8_lossy(bytes).into_owned()
    });
    Run { status, timed_out, stderr_tail: scrub_tail(&stderr.bytes), stdout, seconds }
}

/// The last [`TAIL_LINES`] lines, at most [`TAIL_BYTES`], starting on a character boundary.
fn scrub_tail(tail: &[u8]) -> String {
    let body = tail.strip_suffix(b"\n").unwrap_or(tail);
    let newlines = body.iter().enumerate().rev().filter(|&(_, &b)| b == b'\n');
    let lines_start = newlines.map(|(i, _)| i + 1).nth(TAIL_LINES - 1).unwrap_or(0);
    let mut start = lines_start.max(tail.len().saturating_sub(TAIL_BYTES));
    while tail.get(start).is_some_and(|b| b & 0xC0 == 0x80) {
        start += 1;
    }
    String::from_utf8_lossy(&tail[start..]).into_owned()
}

/// Checks for exit without reaping (`WNOWAIT`), so the pid stays reserved until its group is
/// killed.
fn has_exited(pid: u32) -> bool {
    loop {
        // SAFETY: siginfo_t is plain data; `info` is a valid out-pointer and WNOHANG never blocks.
        let (rc, info) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let options = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            (libc::waitid(libc::P_PID, pid, &mut info, options), info)
        };
        if rc == 0 {
            // SAFETY: waitid filled `info` (si_pid stays 0 while the child runs).
            return unsafe { info.si_pid() } != 0;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return true;
        }
    }
}

/// The end of what a pipe carried, kept to a bound so a flooding program cannot exhaust our
/// memory.
struct Tail {
    pipe: Option<fs::File>,
    bytes: Vec<u8>,
    /// `bytes` is cut back to half of this when it grows past it.
    keep: usize,
    pipe_seen: bool,
}

impl Tail {
    fn new(pipe: Option<OwnedFd>, keep: usize) -> Self {
        if let Some(fd) = &pipe {
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                if flags >= 0 {
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
                }
            }
        }
        Self { pipe_seen: pipe.is_some(), pipe: pipe.map(fs::File::from), bytes: Vec::new(), keep }
    }

    /// Waits up to `wait` for any pipe to hold something, then moves what they hold into
    /// their tails; a pipe at end of file is dropped.
    fn pump<const N: usize>(tails: [&mut Tail; N], wait: Duration) {
        // poll skips negative descriptors: a closed pipe is -1, so the wait still happens.
        let mut polls = tails.each_ref().map(|t| libc::pollfd {
            fd: t.pipe.as_ref().map_or(-1, |p| p.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        });
        let millis = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `polls` is a valid array of its length.
        unsafe { libc::poll(polls.as_mut_ptr(), N as libc::nfds_t, millis) };
        for tail in tails {
            tail.drain();
        }
    }

    fn drain(&mut self) {
        let Some(pipe) = self.pipe.as_mut() else { return };
        let mut buf = [0u8; 8192];
        // Bounded, so a program flooding a pipe cannot keep the supervisor from its deadline.
        for _ in 0..16 {
            match pipe.read(&mut buf) {
                Ok(0) => {
                    self.pipe = None;
                    return;
                }
                Ok(n) => {
                    self.bytes.extend_from_slice(&buf[..n]);
                    if self.bytes.len() > self.keep {
                        self.bytes.drain(..self.bytes.len() - self.keep / 2);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        self.pipe = None;
                    }
                    return;
                }
            }
        }
    }
}

/// A process found in /proc.
#[derive(Debug)]
struct Proc {
    pid: libc::pid_t,
    parent: libc::pid_t,
    /// The first of its real, effective, saved and filesystem uids that matched.
    uid: u32,
    zombie: bool,
}

fn processes(owned: impl Fn(u32) -> bool) -> Vec<Proc> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let status = fs::read_to_string(entry.path().join("status")).ok()?;
            let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name)).map(str::trim);
            let uid = field("Uid:")?.split_whitespace().filter_map(|u| u.parse().ok()).find(|&u| owned(u))?;
            Some(Proc {
                pid,
                uid,
                parent: field("PPid:").and_then(|p| p.parse().ok()).unwrap_or(0),
                zombie: field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X')),
            })
        })
        .collect()
}

/// Kills and reaps every process of a worker uid, however it got there: grandchildren that left
/// the process group with `setsid()` included.
fn sweep_uid(uid: u32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    loop {
        let found = processes(|u| u == uid);
        let live = found.iter().any(|p| !p.zombie);
        if live {
            kill_all_as(uid);
        }
        let mut reaped = false;
        for orphan in found.iter().filter(|p| p.zombie && p.parent == me) {
            // SAFETY: an adopted orphan (we are subreaper) that std knows nothing about.
            reaped |= unsafe { libc::waitpid(orphan.pid, ptr::null_mut(), libc::WNOHANG) } > 0;
        }
        if !live && !reaped {
            return;
        }
        if Instant::now() > deadline {
            warn!(uid, survivors = ?found, "sandbox sweep could not clear the worker uid");
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends SIGKILL to every process of `uid` from a forked helper running as that uid: `kill(-1)`
/// then reaches exactly the processes that uid may signal, atomically with respect to fork.
fn kill_all_as(uid: u32) {
    if uid == 0 {
        return;
    }
    // SAFETY: the helper makes raw syscalls only and leaves with _exit.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let id = libc::c_long::from(uid);
            let dropped =
                libc::syscall(libc::SYS_setresuid, id, id, id) == 0 && libc::getuid() == uid && libc::geteuid() == uid;
            // Never kill(-1) as root.
            if dropped {
                libc::kill(-1, libc::SIGKILL);
            }
            libc::_exit(i32::from(!dropped));
        }
        while pid > 0
            && libc::waitpid(pid, ptr::null_mut(), 0) == -1
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
}

/// Takes the lock that marks the block of uids from `base` as in use by this process; the
/// kernel drops it when we exit, however we exit. `None`: another process holds it.
fn claim_uids(base: u32) -> Result<Option<fs::File>, SandboxError> {
    let path = std::env::temp_dir().join(format!("grape-sandbox-uids-{base}.lock"));
    crate::util::lock_file(&path, false)
        .map_err(|e| SandboxError::Config(format!("cannot lock {}: {e}", path.display())))
}

/// The first automatic block that no other sandbox holds and no user or process uses.
fn claim_free_uids(workers: u32) -> Result<(u32, Option<fs::File>), SandboxError> {
    if workers > AUTO_UID_BLOCK {
        return Err(SandboxError::Config(format!(
            "{workers} workers do not fit an automatic block of {AUTO_UID_BLOCK} uids; set uid_base"
        )));
    }
    let mut last = String::from("every block is claimed");
    for base in (0..AUTO_UID_BLOCKS).map(|k| AUTO_UID_START + k * AUTO_UID_BLOCK) {
        let Some(claim) = claim_uids(base)? else { continue };
        // Checked under the lock: a block with live processes was left by a killed harness.
        match check_uids(base, workers) {
            Ok(()) => return Ok((base, Some(claim))),
            Err(e) => last = e.to_string(),
        }
    }
    Err(SandboxError::NoFreeUids(last))
}

/// The worker uids must belong to nobody: the sweep kills whatever runs under them, and the
/// program gets whatever files and groups they own.
fn check_uids(base: u32, workers: u32) -> Result<(), SandboxError> {
    let range = base.checked_add(workers).filter(|_| base >= 1000).map(|end| base..end).ok_or_else(|| {
        SandboxError::Config(format!("uid_base {base} (+{workers} workers) must be an unused uid >= 1000"))
    })?;
    for file in ["/etc/passwd", "/etc/group"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        let mut ids = text.lines().filter_map(|line| line.split(':').nth(2)?.parse::<u32>().ok());
        if let Some(id) = ids.find(|id| range.contains(id)) {
            return Err(SandboxError::UidInUse(id));
        }
    }
    match processes(|u| range.contains(&u)).into_iter().find(|p| !p.zombie) {
        Some(p) => Err(SandboxError::UidInUse(p.uid)),
        None => Ok(()),
    }
}

/// The working directory when the namespaces (and their private /tmp) are unavailable.
struct HostDir {
    path: PathBuf,
    /// Root chowns the directory to the worker uid; otherwise the program runs as us.
    owner: Option<u32>,
}

impl HostDir {
    fn create(program: &str, owner: Option<u32>) -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("grape-sandbox-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        let dir = Self { path, owner };
        fs::write(dir.path.join("main.py"), program)?;
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&dir.path, Some(uid), Some(uid))?;
        }
        Ok(dir)
    }
}

impl Drop for HostDir {
    /// `rm` rather than `remove_dir_all`: the program controls the tree's depth and permissions,
    /// and a crash deleting it must not take the harness down.
    fn drop(&mut self) {
        let run = |program: &str, args: [&str; 2]| {
            let status = Command::new(program).args(args).arg(&self.path).stderr(Stdio::null()).status();
            status.is_ok_and(|s| s.success())
        };
        // Running as us, the program may have left directories we cannot enter.
        let removed = run("rm", ["-rf", "--"])
            || (self.owner.is_none() && run("chmod", ["-R", "u+rwx"]) && run("rm", ["-rf", "--"]));
        if !removed {
            warn!(path = %self.path.display(), "cannot remove sandbox working directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::AtomicUsize;

    // Each test owns a disjoint uid range, so one test's sweep never touches another's programs.

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn config(uid_base: u32) -> SandboxConfig {
        SandboxConfig { uid_base: Some(uid_base), workers: 1, ..SandboxConfig::default() }
    }

    fn sandbox(config: SandboxConfig) -> Sandbox {
        Sandbox::new(config).expect("sandbox starts")
    }

    /// Hostile tests need the uid switch: without it RLIMIT_NPROC and the sweep do not bind.
    fn root_sandbox(test: &str, config: SandboxConfig) -> Option<Sandbox> {
        if !is_root() {
            eprintln!("skipped: {test} needs root to run programs under an unprivileged uid");
            return None;
        }
        let sandbox = sandbox(config);
        assert!(sandbox.drop_uid);
        Some(sandbox)
    }

    /// Every process, zombies included, with `uid` among its uids; read independently of the
    /// sweep's own scan.
    fn owned_by(uid: u32) -> Vec<String> {
        let uid = uid.to_string();
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(status) = fs::read_to_string(entry.path().join("status")) else { continue };
            let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
            if uids.split_whitespace().skip(1).any(|u| u == uid) {
                found.push(status.lines().take(3).collect::<Vec<_>>().join(" "));
            }
        }
        found
    }

    /// A directory outside the sandbox's scratch mounts that other uids can traverse.
    fn visible_dir(mode: u32) -> tempfile::TempDir {
        let dir = tempfile::Builder::new().prefix(".sandbox-test-").tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        dir
    }

    #[test]
    fn verdicts_and_stderr_tail() {
        let sandbox = sandbox(config(62_000));
        let flood = "import sys\nsys.stderr.write('x' * 10_000_000 + 'END')\nsys.exit(2)\n";
        let many_lines =
            "import sys\nfor i in range(100):\n    print(f'line {i}', file=sys.stderr)\nraise ValueError('last')\n";
        let cases = [
            ("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", Verdict::Passed, "", None),
            ("assert 1 + 1 == 3, 'maths'\n", Verdict::Failed, "AssertionError: maths", Some("a test failed")),
            ("def f(:\n    pass\n", Verdict::Error, "SyntaxError", None),
            ("import json\njson.loads('{')\n", Verdict::Error, "JSONDecodeError", None),
            ("x = 1\0\n\u{fffd}é\n", Verdict::Error, "SyntaxError", None),
            ("import os\nos.kill(os.getpid(), 9)\n", Verdict::Error, "", None),
            (flood, Verdict::Failed, "xxxEND", Some(EARLY_EXIT)),
            (many_lines, Verdict::Error, "ValueError: last", None),
            ("import time, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)\n", Verdict::Timeout, "", Some("ran past its time limit")),
        ];
        for (program, verdict, needle, reason) in cases {
            let outcome = sandbox.run(program);
            assert_eq!(outcome.verdict, verdict, "{program:?}: {}", outcome.stderr_tail);
            assert_eq!(outcome.reason, reason, "{program:?}");
            assert!(outcome.stderr_tail.contains(needle), "{program:?}: {}", outcome.stderr_tail);
            assert!(outcome.stderr_tail.len() <= TAIL_BYTES, "{}", outcome.stderr_tail.len());
            assert!(outcome.stderr_tail.lines().count() <= TAIL_LINES, "{}", outcome.stderr_tail);
        }
    }

    #[test]
    fn a_pass_needs_the_last_statement() {
        let sandbox = sandbox(config(62_050));
        let exits = [
            "import sys\nsys.exit(0)\n",
            "import os\nos._exit(0)\n",
            "raise SystemExit\n",
            "exit()\n",
            "quit()\n",
            "def main():\n    return 0\nimport sys\nsys.exit(main())\n",
            "import sys\nsys.exit(3)\n",
        ];
        for program in exits {
            let outcome = sandbox.run(&format!("{program}assert False, 'the tests ran'\n"));
            assert_eq!(
                (outcome.verdict, outcome.reason),
                (Verdict::Failed, Some(EARLY_EXIT)),
                "{program:?}: {}",
                outcome.stderr_tail
            );
        }
        // The tests ran and failed; an exit handler then ends the process with status 0.
        let atexit = "import atexit, os\natexit.register(lambda: os._exit(0))\nassert 1 == 2\n";
        let outcome = sandbox.run(atexit);
        assert_eq!(
            (outcome.verdict, outcome.reason),
            (Verdict::Failed, Some("a test failed")),
            "{}",
            outcome.stderr_tail
        );
        // Closing the marker's pipe costs the pass.
        assert_ne!(sandbox.run("import os\nos.closerange(3, 128)\n").verdict, Verdict::Passed);
        // A marker of its own making is not the run's.
        let forged = "import os\nfor fd in range(3, 20):\n    try: os.write(fd, b'0' * 32)\n    except OSError: pass\nos._exit(0)\n";
        assert_eq!(sandbox.run(forged).verdict, Verdict::Failed);
    }

    #[test]
    fn tail_keeps_the_last_lines_within_bounds() {
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        let tail = scrub_tail(text.as_bytes());
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.starts_with("line 40\n") && tail.ends_with("line 49\n"), "{tail}");
        let long = format!("{}é{}", "a".repeat(5000), "b".repeat(TAIL_BYTES - 1));
        let tail = scrub_tail(long.as_bytes());
        assert!(tail.len() <= TAIL_BYTES && tail.chars().all(|c| c == 'b'), "{}", tail.len());
        assert_eq!(scrub_tail(b"one\ntwo"), "one\ntwo");
    }

    #[test]
    fn protections_are_recorded_and_required() {
        let sandbox = sandbox(config(62_060));
        let protections = sandbox.protections();
        assert!(protections.missing().is_empty(), "{protections:?}");
        assert_eq!(protections.landlock_abi, landlock::abi());
        let bare =
            Protections { uid_drop: false, landlock_abi: None, seccomp: false, namespaces: vec![], unsandboxed: false };
        assert_eq!(bare.missing().len(), 3);
        let landlock_only = Protections { landlock_abi: Some(6), seccomp: true, ..bare.clone() };
        assert!(landlock_only.missing().is_empty());
        let old_landlock = Protections { landlock_abi: Some(3), ..landlock_only.clone() };
        assert_eq!(old_landlock.missing().len(), 2, "{:?}", old_landlock.missing());
        let merged = protections.weakest(&old_landlock);
        assert_eq!(merged.landlock_abi, landlock::abi().map(|abi| abi.min(3)));
        assert!(merged.namespaces.is_empty() && merged.uid_drop == (protections.uid_drop && old_landlock.uid_drop));
    }

    #[test]
    fn infinite_loop_times_out() {
        let sandbox = sandbox(SandboxConfig { timeout: Duration::from_secs(1), ..config(62_100) });
        let outcome = sandbox.run("while True:\n    pass\n");
        assert_eq!(outcome.verdict, Verdict::Timeout, "{}", outcome.stderr_tail);
        assert!((1.0..2.0).contains(&outcome.seconds), "{}", outcome.seconds);
    }

    #[test]
    fn fork_bomb_is_bounded_and_swept() {
        let uid = 62_200;
        let Some(sandbox) = root_sandbox("fork_bomb_is_bounded_and_swept", config(uid)) else { return };
        // At most 300 forks whose children sleep 30 s, should RLIMIT_NPROC not bind.
        let bomb = "import os, sys, time\nforks = 0\ntry:\n    for _ in range(300):\n        if os.fork() == 0:\n            \
                    time.sleep(30)\n            os._exit(0)\n        forks += 1\nfinally:\n    sys.stderr.write(f'forks={forks}\\n')\n";
        let outcome = sandbox.run(bomb);
        assert_eq!(outcome.verdict, Verdict::Error, "{}", outcome.stderr_tail);
        assert!(outcome.stderr_tail.contains("BlockingIOError"), "{}", outcome.stderr_tail);
        let forks: u64 =
            outcome.stderr_tail.split("forks=").nth(1).and_then(|s| s.lines().next()?.parse().ok()).unwrap();
        assert!(forks < 16, "{forks} forks");
        assert_eq!(owned_by(uid), Vec::<String>::new());
        // The uid's process budget is whole again: no survivors, no unreaped zombies.
        let forker =
            "import os\npids = [os.fork() or os._exit(0) for _ in range(12)]\nfor p in pids:\n    os.waitpid(p, 0)\n";
        let outcome = sandbox.run(forker);
        assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.stderr_tail);
    }

    #[test]
    fn memory_hog_gets_memory_error() {
        // A generous timeout: on a loaded machine touching the first GiB can take seconds, and
        // without the limit the hog would finish (Passed), not time out.
        let config = SandboxConfig { memory_bytes: 1 << 30, timeout: Duration::from_secs(30), ..config(62_300) };
        let sandbox = sandbox(config);
        // Touched 256 MiB chunks, 10 GiB at most should RLIMIT_AS not bind.
        let hog = "chunks = []\nfor _ in range(40):\n    chunks.append(b'x' * (256 << 20))\n";
        let outcome = sandbox.run(hog);
        assert_eq!(outcome.verdict, Verdict::Error, "{}", outcome.stderr_tail);
        // Promptly, not by the timeout (which would be Verdict::Timeout); no wall-clock bound
        // beyond that, which a loaded machine breaks.
        assert!(outcome.stderr_tail.contains("MemoryError"), "{}", outcome.stderr_tail);
    }

    #[test]
    fn cannot_write_home_and_runs_unprivileged() {
        let uid = 62_400;
        let Some(sandbox) = root_sandbox("cannot_write_home_and_runs_unprivileged", config(uid)) else { return };
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let target = Path::new(&home).join(format!("grape-sandbox-probe-{}", std::process::id()));
        let program = format!(
            "import os\nassert (os.getuid(), os.geteuid(), os.getgid(), os.getgroups()) == ({uid}, {uid}, {uid}, [])\n\
             open({target:?}, 'w').write('pwned')\n"
        );
        let outcome = sandbox.run(&program);
        let written = target.exists();
        let _ = fs::remove_file(&target);
        assert_eq!(outcome.verdict, Verdict::Error, "{}", outcome.stderr_tail);
        assert!(outcome.stderr_tail.contains("PermissionError"), "{}", outcome.stderr_tail);
        assert!(!written);
    }

    #[test]
    fn cannot_touch_files_outside() {
        let sandbox = sandbox(config(62_500));
        let dir = visible_dir(0o777);
        let victim = dir.path().join("victim.txt");
        fs::write(&victim, "keep").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o666)).unwrap();
        // Each on its own: a world-writable file is out of reach whoever runs the harness (and
        // wherever the checkout lives: under /tmp it is hidden by the private /tmp).
        let attempts = [
            format!("open({victim:?}).read()\n"),
            format!("open({victim:?}, 'a').write('pwned')\n"),
            format!("import os\nos.remove({victim:?})\n"),
            format!("open({:?}, 'w').write('x')\n", dir.path().join("new.txt")),
            "open('/etc/hostname').read()\n".to_string(),
        ];
        for program in &attempts {
            let outcome = sandbox.run(program);
            assert_eq!(outcome.verdict, Verdict::Error, "{program}: {}", outcome.stderr_tail);
            assert!(outcome.stderr_tail.contains("Error"), "{program}: {}", outcome.stderr_tail);
        }
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Files left in world-writable directories vanish with the sample.
        let name = format!("grape-sandbox-left-{}", std::process::id());
        let dirs = ["/tmp", "/var/tmp", "/dev/shm"];
        let leave =
            format!("for d in {dirs:?}:\n    try: open(d + '/{name}', 'w').write('x')\n    except OSError: pass\n");
        assert_eq!(sandbox.run(&leave).verdict, Verdict::Passed);
        let find = format!("import os\nassert not any(os.path.exists(d + '/{name}') for d in {dirs:?}[1:])\n");
        assert_eq!(sandbox.run(&find).verdict, Verdict::Passed);
        assert!(dirs.iter().all(|d| !Path::new(d).join(&name).exists()));
    }

    #[test]
    fn no_network() {
        let sandbox = sandbox(config(62_600));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let attempts = [
            format!("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"),
            "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1).close()\n".to_string(),
            format!("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('127.0.0.1', {port}))\n"),
            "import socket\nsocket.socket(socket.AF_INET6, socket.SOCK_STREAM).bind(('::1', 0))\n".to_string(),
        ];
        for program in &attempts {
            let outcome = sandbox.run(program);
            assert_eq!(outcome.verdict, Verdict::Error, "{program}: {}", outcome.stderr_tail);
            assert!(outcome.stderr_tail.contains("Error"), "{program}: {}", outcome.stderr_tail);
        }
        let accepted = listener.accept();
        assert!(accepted.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock), "{accepted:?}");
        // Unix socket pairs (multiprocessing's) still work.
        let pair = "import socket\na, b = socket.socketpair()\na.sendall(b'hi')\nassert b.recv(2) == b'hi'\n";
        assert_eq!(sandbox.run(pair).verdict, Verdict::Passed);
    }

    #[test]
    fn setsid_grandchild_is_killed() {
        let uid = 62_700;
        let Some(sandbox) = root_sandbox("setsid_grandchild_is_killed", config(uid)) else { return };
        let program =
            "import os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    os.write(w, b'x')\n    \
                       time.sleep(30)\n    os._exit(0)\nos.read(r, 1)\n";
        let outcome = sandbox.run(program);
        assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.stderr_tail);
        assert_eq!(owned_by(uid), Vec::<String>::new());
    }

    #[test]
    fn signals_reach_only_the_sample() {
        let sandbox = sandbox(config(62_750));
        for program in ["import os\nos.kill(os.getppid(), 9)\n", "import os\nos.kill(1, 9)\n"] {
            // Whatever it hit, the harness lives on to grade it.
            let outcome = sandbox.run(program);
            assert_ne!(outcome.verdict, Verdict::Timeout, "{program}: {}", outcome.stderr_tail);
        }
        // kill(-1) reaches its own processes at most: this test process survives it.
        let outcome = sandbox.run("import os\nos.kill(-1, 9)\n");
        assert_ne!(outcome.verdict, Verdict::Timeout, "{}", outcome.stderr_tail);
        assert_eq!(sandbox.run("pass\n").verdict, Verdict::Passed);
    }

    #[test]
    fn run_all_keeps_input_order() {
        let sandbox = sandbox(SandboxConfig { workers: 4, timeout: Duration::from_secs(1), ..config(62_800) });
        let kinds = [
            ("import time\ntime.sleep(0.3)\n", Verdict::Passed),
            ("assert [] == [1]\n", Verdict::Failed),
            ("raise ValueError('no')\n", Verdict::Error),
            ("while True:\n    pass\n", Verdict::Timeout),
            ("pass\n", Verdict::Passed),
        ];
        let order = [0, 1, 2, 3, 4, 2, 1, 0];
        let programs: Vec<String> = order.iter().map(|&k| kinds[k].0.to_string()).collect();
        let done = AtomicUsize::new(0);
        let outcomes = sandbox.run_all(&programs, || {
            done.fetch_add(1, Ordering::SeqCst);
        });
        let verdicts: Vec<Verdict> = outcomes.iter().map(|o| o.verdict).collect();
        let expected: Vec<Verdict> = order.iter().map(|&k| kinds[k].1).collect();
        assert_eq!(verdicts, expected);
        assert_eq!(done.load(Ordering::SeqCst), programs.len());
    }

    #[test]
    fn without_namespaces_host_dir_is_private_and_removed() {
        let uid = 62_900;
        let config = SandboxConfig { namespaces: false, ..config(uid) };
        let Some(sandbox) = root_sandbox("without_namespaces_host_dir_is_private_and_removed", config) else { return };
        let program = "import os, sys\nsys.stderr.write(os.getcwd())\nos.makedirs('a/b')\nos.chmod('a', 0)\n\
                       if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(30)\nassert os.getuid() == 62900\n";
        let outcome = sandbox.run(program);
        assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.stderr_tail);
        let cwd = PathBuf::from(outcome.stderr_tail.trim());
        assert!(cwd.starts_with(std::env::temp_dir()), "{}", cwd.display());
        assert!(!cwd.exists(), "{} left behind", cwd.display());
        assert_eq!(owned_by(uid), Vec::<String>::new());
        assert!(sandbox.protections().namespaces.is_empty());
    }

    #[test]
    fn concurrent_sandboxes_claim_distinct_uids() {
        if !is_root() {
            eprintln!("skipped: uid claims need root");
            return;
        }
        let auto = || sandbox(SandboxConfig { uid_base: None, ..config(0) });
        let (a, b) = (auto(), auto());
        assert_ne!(a.uid_base, b.uid_base);
        let taken = Sandbox::new(SandboxConfig { uid_base: Some(a.uid_base), ..config(0) });
        assert!(matches!(taken, Err(SandboxError::UidClaimed(base)) if base == a.uid_base), "{:?}", taken.err());
        let base = a.uid_base;
        drop(a);
        // A fork in another test's thread holds a copy of the lock's descriptor until it execs,
        // so the block comes free within moments rather than at once.
        let reclaimed = (0..50).find_map(|_| {
            let attempt = Sandbox::new(config(base));
            if matches!(attempt, Err(SandboxError::UidClaimed(_))) {
                std::thread::sleep(Duration::from_millis(100));
            }
            attempt.ok()
        });
        assert_eq!(reclaimed.map(|s| s.uid_base), Some(base), "a dropped sandbox releases its block");
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let missing = Sandbox::new(SandboxConfig { python: "/nonexistent/python3".into(), ..config(63_000) });
        assert!(matches!(missing, Err(SandboxError::Interpreter { .. })), "{:?}", missing.err());
        let idle = Sandbox::new(SandboxConfig { workers: 0, ..config(63_000) });
        assert!(matches!(idle, Err(SandboxError::Config(_))));
        if !is_root() {
            eprintln!("skipped: uid range checks need root");
            return;
        }
        assert!(matches!(Sandbox::new(config(0)), Err(SandboxError::Config(_))));
        if fs::read_to_string("/etc/passwd").unwrap_or_default().contains(":65534:") {
            let nobody = Sandbox::new(SandboxConfig { uid_base: Some(65_530), workers: 8, ..config(0) });
            assert!(matches!(nobody, Err(SandboxError::UidInUse(65_534))), "{:?}", nobody.err());
        }
    }
}
