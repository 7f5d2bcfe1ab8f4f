//! Runs untrusted, model-generated Python programs (HumanEval / MBPP solutions followed by their
//! tests), one `python3` process per sample, and reduces each run to a [`Verdict`].
//!
//! Generated code is treated as hostile. When the harness runs as root (the normal case here and
//! in CI) each sample gets:
//! - its own unprivileged uid and gid (`uid_base + worker`), no supplementary groups and
//!   `no_new_privs`, so it cannot touch root's files and `RLIMIT_NPROC` counts only its worker;
//! - new network, mount and IPC namespaces: no network at all (not even loopback), and private
//!   size-capped tmpfs mounts over `/tmp` (its working directory), `/var/tmp`, `/run/lock` and
//!   `/dev/shm` that vanish with it, as do any SysV/POSIX IPC objects it made;
//! - rlimits on address space, CPU time, file size, processes, open files and core dumps;
//! - a wall-clock timeout that kills its process group, and after every run a sweep that kills
//!   and reaps every process of its uid, so grandchildren that left the group with `setsid()`
//!   die too.
//!
//! Not contained even then: reading world-readable files and other processes' `/proc` entries,
//! connecting to filesystem Unix sockets that any user may write to, and sharing CPU, memory
//! bandwidth and page cache with the host. If the kernel refuses the namespaces (a container
//! without `CAP_SYS_ADMIN`), [`Sandbox::new`] warns and falls back to a host temp directory with
//! network access, and files left in world-writable directories or IPC objects outlive the sample.
//! When not root there is no uid to drop to, hence no namespaces either: the program runs as the
//! harness's user (it may write, signal or trace whatever that user can), `RLIMIT_NPROC` counts all
//! of that user's processes, and only the process group is killed, so a `setsid()` grandchild
//! survives.

use std::ffi::{CStr, CString};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tracing::{debug, warn};

/// Enough for a traceback; bounded so a program flooding stderr cannot exhaust our memory.
const TAIL_BYTES: usize = 2000;
const OPEN_FILES: u64 = 128;
/// How long the supervisor sleeps between exit checks.
const SLICE: Duration = Duration::from_millis(5);
/// World-writable directories hidden behind a private tmpfs; the first is the working directory.
const SCRATCH_DIRS: [&CStr; 4] = [c"/tmp", c"/var/tmp", c"/run/lock", c"/dev/shm"];
/// Automatically claimed uid blocks: `AUTO_UID_START + k * AUTO_UID_BLOCK` for k < `AUTO_UID_BLOCKS`.
pub const AUTO_UID_START: u32 = 60_000;
pub const AUTO_UID_BLOCK: u32 = 64;
const AUTO_UID_BLOCKS: u32 = 16;

/// Limits and placement; the defaults suit HumanEval and MBPP.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Must be executable by an unprivileged uid (a pyenv shim under /root is not).
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
    /// First of `workers` consecutive uids (and gids) that nothing else on the machine may use:
    /// the sweep kills whatever runs under them. `None` claims the first free block of
    /// [`AUTO_UID_BLOCK`] uids from [`AUTO_UID_START`], so sandboxes of concurrent harness
    /// processes never share a uid.
    pub uid_base: Option<u32>,
    /// Namespaces when root; turn off only where the kernel refuses them (also detected).
    pub namespaces: bool,
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
    #[error("cannot start sandbox worker threads: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Exited with status 0.
    Passed,
    /// Ran and died of an `AssertionError`: the tests failed.
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
    /// The last ~2000 bytes of stderr (lossy UTF-8), or why the sandbox failed.
    pub stderr_tail: String,
    pub seconds: f64,
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
            // Orphans of sandboxed programs are re-parented to us so the sweep reaps them at once;
            // left to a lazy init (as on this machine) their zombies would linger and count
            // against the worker uid's RLIMIT_NPROC.
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } != 0 {
                warn!(error = %io::Error::last_os_error(), "cannot become child subreaper");
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers)
            .thread_name(|i| format!("sandbox-{i}"))
            .build()?;
        let mut sandbox = Self {
            drop_uid,
            uid_base,
            _claim: claim,
            namespaces: drop_uid && config.namespaces,
            idle: Mutex::new((0..workers).rev().collect()),
            freed: Condvar::new(),
            pool,
            config,
        };
        let python = sandbox.config.python.clone();
        let error = |reason| SandboxError::Interpreter { python: python.clone(), reason };
        match sandbox.probe() {
            Ok(()) => {}
            // Only a child that could not start falls back: one that ran (and, say, timed out
            // on a loaded machine) must not quietly cost the namespaces.
            Err((false, first)) if sandbox.namespaces => {
                sandbox.namespaces = false;
                sandbox.probe().map_err(|(_, second)| error(format!("{first}; without namespaces: {second}")))?;
                warn!(reason = %first, "sandbox namespaces unavailable: programs keep network access and the host /tmp");
            }
            Err((_, reason)) => return Err(error(reason)),
        }
        Ok(sandbox)
    }

    /// `Err((started, reason))`: whether the child got as far as the interpreter, and why not.
    fn probe(&self) -> Result<(), (bool, String)> {
        let slot = self.acquire();
        // It checks that the interpreter starts, not how fast: a loaded machine must not fail it.
        let timeout = self.config.timeout.max(Duration::from_secs(30));
        match self.execute(slot.index, "import sys\nsys.exit(0)\n", timeout) {
            Err(e) => Err((false, e.to_string())),
            Ok(outcome) if outcome.verdict == Verdict::Passed => Ok(()),
            Ok(outcome) => Err((true, format!("{}: {}", outcome.verdict, outcome.stderr_tail.trim()))),
        }
    }

    /// Runs one program on the first idle worker, waiting for one if all are busy.
    pub fn run(&self, program: &str) -> Outcome {
        let slot = self.acquire();
        let started = Instant::now();
        self.execute(slot.index, program, self.config.timeout).unwrap_or_else(|e| Outcome {
            verdict: Verdict::Error,
            stderr_tail: format!("sandbox: cannot start {}: {e}", self.config.python.display()),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Runs up to `workers` programs at once; outcomes come back in input order, and `on_done`
    /// is called after each program finishes (for a progress bar).
    pub fn run_all(&self, programs: &[String], on_done: impl Fn() + Sync) -> Vec<Outcome> {
        self.pool.install(|| {
            // One program per task: runs take seconds, so balance beats batching.
            programs
                .par_iter()
                .with_max_len(1)
                .map(|program| {
                    let outcome = self.run(program);
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
    fn execute(&self, index: u32, program: &str, timeout: Duration) -> io::Result<Outcome> {
        let config = &self.config;
        // Cannot overflow: `check_uids` bounded the range (and without root the uid is unused).
        let uid = self.uid_base.wrapping_add(index);
        let host_dir = match self.namespaces {
            true => None,
            false => Some(HostDir::create(program, self.drop_uid.then_some(uid))?),
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
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(dir) = &host_dir {
            command.current_dir(&dir.path);
        }
        let scratch = match self.namespaces {
            true => Some((
                CString::new(format!("size={},mode=0700,uid={uid},gid={uid}", config.scratch_bytes))
                    .map_err(io::Error::other)?,
                program.as_bytes().to_vec(),
            )),
            false => None,
        };
        let setup = ChildSetup {
            uid: self.drop_uid.then_some(uid),
            scratch,
            memory: config.memory_bytes,
            cpu: config.cpu_seconds,
            file_size: config.file_size_bytes,
            processes: config.max_processes,
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
        };
        // SAFETY: `ChildSetup::apply` only makes async-signal-safe libc calls and never allocates.
        unsafe { command.pre_exec(move || setup.apply()) };
        let started = Instant::now();
        let mut child = command.spawn()?;
        let outcome = supervise(&mut child, started, timeout);
        if self.drop_uid {
            sweep_uid(uid);
        }
        drop(host_dir);
        debug!(uid, verdict = %outcome.verdict, seconds = outcome.seconds, "sandboxed program finished");
        Ok(outcome)
    }
}

/// The child's setup between fork and exec, prepared beforehand because it may not allocate.
struct ChildSetup {
    /// Root only: the worker uid (and gid) to switch to.
    uid: Option<libc::uid_t>,
    /// With namespaces: tmpfs mount options, and the program to write into the fresh `/tmp`.
    scratch: Option<(CString, Vec<u8>)>,
    memory: u64,
    cpu: u64,
    file_size: u64,
    processes: u64,
    parent: libc::pid_t,
}

impl ChildSetup {
    fn apply(&self) -> io::Result<()> {
        // prctl reads its optional arguments as unsigned longs.
        const ONE: libc::c_ulong = 1;
        const ZERO: libc::c_ulong = 0;
        // SAFETY: plain syscalls on valid pointers into `self`, static strings or the stack.
        unsafe {
            // Own session and process group, so the whole group can be killed at once.
            check(libc::setsid())?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, ONE, ZERO, ZERO, ZERO))?;
            if let Some((options, _)) = &self.scratch {
                check(libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS | libc::CLONE_NEWIPC))?;
                // Our mounts must not propagate back to the host.
                let flags = libc::MS_REC | libc::MS_PRIVATE;
                check(libc::mount(ptr::null(), c"/".as_ptr(), ptr::null(), flags, ptr::null()))?;
                for (i, dir) in SCRATCH_DIRS.iter().enumerate() {
                    let flags = libc::MS_NOSUID | libc::MS_NODEV;
                    let rc =
                        libc::mount(c"tmpfs".as_ptr(), dir.as_ptr(), c"tmpfs".as_ptr(), flags, options.as_ptr().cast());
                    let error = io::Error::last_os_error();
                    // Only /tmp, the working directory, must exist.
                    if rc != 0 && (i == 0 || error.raw_os_error() != Some(libc::ENOENT)) {
                        return Err(error);
                    }
                }
                check(libc::chdir(c"/tmp".as_ptr()))?;
            }
            let limits = [
                (libc::RLIMIT_AS, self.memory, self.memory),
                (libc::RLIMIT_CPU, self.cpu, self.cpu.saturating_add(1)),
                (libc::RLIMIT_FSIZE, self.file_size, self.file_size),
                (libc::RLIMIT_NPROC, self.processes, self.processes),
                (libc::RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES),
                (libc::RLIMIT_CORE, 0, 0),
            ];
            for (resource, soft, hard) in limits {
                // Never above our own hard limit: raising it needs CAP_SYS_RESOURCE, which root may lack.
                let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                check(libc::getrlimit(resource, &mut current))?;
                let hard = hard.min(current.rlim_max);
                check(libc::setrlimit(resource, &libc::rlimit { rlim_cur: soft.min(hard), rlim_max: hard }))?;
            }
            if let Some(uid) = self.uid {
                check(libc::setgroups(0, ptr::null()))?;
                check(libc::setresgid(uid, uid, uid))?;
                check(libc::setresuid(uid, uid, uid))?;
                // Never run the program as root because an id change silently did not happen.
                if libc::getuid() != uid || libc::geteuid() != uid || libc::getgid() != uid || libc::getegid() != uid {
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
                // Set after the uid change, which clears it; dies with the harness.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong))?;
                if libc::getppid() != self.parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
            if let Some((_, program)) = &self.scratch {
                write_new_file(c"main.py", program)?;
            }
        }
        Ok(())
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// Safe between fork and exec: no allocation.
fn write_new_file(path: &CStr, mut bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and `bytes` is a valid buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC, 0o600);
        check(fd)?;
        while !bytes.is_empty() {
            let written = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
            let error = io::Error::last_os_error();
            match usize::try_from(written) {
                Ok(n) if n > 0 => bytes = bytes.get(n..).unwrap_or_default(),
                _ if error.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    libc::close(fd);
                    return Err(error);
                }
            }
        }
        check(libc::close(fd))
    }
}

/// Waits for the child or the deadline, keeping the tail of its stderr, then kills its process
/// group either way and classifies the run.
fn supervise(child: &mut Child, started: Instant, timeout: Duration) -> Outcome {
    let mut stderr = child.stderr.take();
    if let Some(pipe) = &stderr {
        set_nonblocking(pipe);
    }
    let mut tail = Vec::new();
    let deadline = started + timeout;
    let timed_out = loop {
        if has_exited(child.id()) {
            break false;
        }
        let now = Instant::now();
        if now >= deadline {
            break true;
        }
        let wait = (deadline - now).min(SLICE);
        match stderr.as_mut() {
            Some(pipe) => {
                if !pump(pipe, wait, &mut tail) {
                    stderr = None;
                }
            }
            None => std::thread::sleep(wait),
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    // The child is not reaped yet, so its pid, which is also its process group id, cannot have
    // been reused: this kills only what is left of its group.
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory preconditions; a negative pid names a process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let status = child.wait();
    if let Some(pipe) = stderr.as_mut() {
        pump(pipe, Duration::ZERO, &mut tail);
    }
    // Start on a character boundary rather than with replacement characters.
    let mut start = tail.len().saturating_sub(TAIL_BYTES);
    while tail.get(start).is_some_and(|b| b & 0xC0 == 0x80) {
        start += 1;
    }
    let stderr_tail = String::from_utf8_lossy(&tail[start..]).into_owned();
    let failed_assert = || stderr_tail.lines().any(|line| line.starts_with("AssertionError"));
    let verdict = match status {
        _ if timed_out => Verdict::Timeout,
        Ok(status) if status.success() => Verdict::Passed,
        Ok(status) if status.signal() == Some(libc::SIGXCPU) => Verdict::Timeout,
        Ok(status) if status.code() == Some(1) && failed_assert() => Verdict::Failed,
        _ => Verdict::Error,
    };
    Outcome { verdict, stderr_tail, seconds }
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

fn set_nonblocking(pipe: &ChildStderr) {
    let fd = pipe.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// Moves what the pipe holds (waiting up to `wait` for something) into `tail`, keeping only the
/// end; false at end of file.
fn pump(pipe: &mut ChildStderr, wait: Duration, tail: &mut Vec<u8>) -> bool {
    let mut poll = libc::pollfd { fd: pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let millis = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut poll, 1, millis) };
    let mut buf = [0u8; 8192];
    // Bounded, so a program flooding stderr cannot keep the supervisor from its deadline.
    for _ in 0..16 {
        match pipe.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * TAIL_BYTES {
                    tail.drain(..tail.len() - TAIL_BYTES);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return e.kind() == io::ErrorKind::WouldBlock,
        }
    }
    true
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
        let cases = [
            ("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", Verdict::Passed, ""),
            ("assert 1 + 1 == 3, 'maths'\n", Verdict::Failed, "AssertionError: maths"),
            ("def f(:\n    pass\n", Verdict::Error, "SyntaxError"),
            ("import json\njson.loads('{')\n", Verdict::Error, "JSONDecodeError"),
            ("x = 1\0\n\u{fffd}é\n", Verdict::Error, "SyntaxError"),
            ("import os\nos.kill(os.getpid(), 9)\n", Verdict::Error, ""),
            (flood, Verdict::Error, "xxxEND"),
        ];
        for (program, verdict, needle) in cases {
            let outcome = sandbox.run(program);
            assert_eq!(outcome.verdict, verdict, "{program:?}: {}", outcome.stderr_tail);
            assert!(outcome.stderr_tail.contains(needle), "{program:?}: {}", outcome.stderr_tail);
            assert!(outcome.stderr_tail.len() <= TAIL_BYTES, "{}", outcome.stderr_tail.len());
        }
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
        let Some(sandbox) = root_sandbox("cannot_touch_files_outside", config(62_500)) else { return };
        let dir = visible_dir(0o755);
        let victim = dir.path().join("victim.txt");
        fs::write(&victim, "keep").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        // Reading first shows the file is visible: only permissions stop the removal.
        let program = format!("import os\nassert open({victim:?}).read() == 'keep'\nos.remove({victim:?})\n");
        let outcome = sandbox.run(&program);
        assert_eq!(outcome.verdict, Verdict::Error, "{}", outcome.stderr_tail);
        assert!(outcome.stderr_tail.contains("PermissionError"), "{}", outcome.stderr_tail);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        // Files left in world-writable directories vanish with the sample.
        let name = format!("grape-sandbox-left-{}", std::process::id());
        let dirs = ["/tmp", "/var/tmp", "/dev/shm"];
        let leave = format!("for d in {dirs:?}:\n    open(d + '/{name}', 'w').write('x')\n");
        assert_eq!(sandbox.run(&leave).verdict, Verdict::Passed);
        let find = format!("import os\nassert not any(os.path.exists(d + '/{name}') for d in {dirs:?})\n");
        assert_eq!(sandbox.run(&find).verdict, Verdict::Passed);
        assert!(dirs.iter().all(|d| !Path::new(d).join(&name).exists()));
    }

    #[test]
    fn no_network() {
        let Some(sandbox) = root_sandbox("no_network", config(62_600)) else { return };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        for target in [format!("('127.0.0.1', {port})"), "('1.1.1.1', 80)".to_string()] {
            let program = format!("import socket\nsocket.create_connection({target}, timeout=1).close()\n");
            let outcome = sandbox.run(&program);
            assert_eq!(outcome.verdict, Verdict::Error, "{target}: {}", outcome.stderr_tail);
            assert!(outcome.stderr_tail.contains("OSError"), "{target}: {}", outcome.stderr_tail);
        }
        let accepted = listener.accept();
        assert!(accepted.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock), "{accepted:?}");
    }

    #[test]
    fn setsid_grandchild_is_killed() {
        let uid = 62_700;
        let Some(sandbox) = root_sandbox("setsid_grandchild_is_killed", config(uid)) else { return };
        let dir = visible_dir(0o777);
        // Control: the sandbox can write there, so the marker's absence below means something.
        let control = dir.path().join("control");
        let outcome = sandbox.run(&format!("open({control:?}, 'w').write('x')\n"));
        assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.stderr_tail);
        assert!(control.exists());
        let marker = dir.path().join("marker");
        let program = format!(
            "import os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    os.write(w, b'x')\n    \
             time.sleep(2)\n    open({marker:?}, 'w').write('escaped')\n    os._exit(0)\nos.read(r, 1)\n"
        );
        let outcome = sandbox.run(&program);
        assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.stderr_tail);
        assert_eq!(owned_by(uid), Vec::<String>::new());
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists());
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
