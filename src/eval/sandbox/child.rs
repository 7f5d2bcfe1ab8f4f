//! What happens between fork and exec: everything here runs in the forked child of a
//! multithreaded process, so it makes raw system calls only and never allocates.
//!
//! With namespaces the child (P) makes new user (when not root), mount, network, IPC and PID
//! namespaces, mounts the private scratch directories and forks twice: A becomes pid 1 of the
//! new PID namespace and only reaps, B runs the program. P waits for A and leaves with B's
//! status (re-raising B's signal), so the supervisor sees the program's own exit. When A exits
//! the kernel kills whatever else lives in the namespace: `setsid()` grandchildren included.
//! B, as pid 2, can signal nothing outside its namespace, and A ignores its signals.

use super::landlock;
use super::seccomp::Filters;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;

/// World-writable directories hidden behind a private tmpfs; the first is the working directory.
const SCRATCH_DIRS: [&CStr; 4] = [c"/tmp", c"/var/tmp", c"/run/lock", c"/dev/shm"];
const OPEN_FILES: u64 = 128;

/// The child's setup, prepared beforehand because it may not allocate.
pub struct ChildSetup {
    /// Root only: the worker uid (and gid) the program runs as.
    pub uid: Option<libc::uid_t>,
    /// Not root: `/proc/self/uid_map` and `gid_map` lines mapping our ids onto themselves in a
    /// new user namespace, which lets an unprivileged user make the other namespaces.
    pub user_maps: Option<(CString, CString)>,
    /// With namespaces: tmpfs mount options, and the program to write into the fresh `/tmp`.
    pub scratch: Option<(CString, Vec<u8>)>,
    /// `(resource, soft, hard)` for the program.
    pub limits: [(libc::__rlimit_resource_t, u64, u64); 6],
    /// The harness, which the child must still have as parent once it dies with it.
    pub parent: libc::pid_t,
    /// The write end of the pipe the program's last statement writes its marker to.
    pub marker_fd: RawFd,
    /// Landlock: a ruleset with the static rules, and the ABI; the private `/tmp` is added here.
    pub landlock: Option<(RawFd, u32)>,
    pub seccomp: Option<Arc<Filters>>,
}

impl ChildSetup {
    pub fn limits(memory: u64, cpu: u64, file_size: u64, processes: u64) -> [(libc::__rlimit_resource_t, u64, u64); 6] {
        [
            (libc::RLIMIT_AS, memory, memory),
            (libc::RLIMIT_CPU, cpu, cpu.saturating_add(1)),
            (libc::RLIMIT_FSIZE, file_size, file_size),
            (libc::RLIMIT_NPROC, processes, processes),
            (libc::RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES),
            (libc::RLIMIT_CORE, 0, 0),
        ]
    }

    pub fn apply(&self) -> io::Result<()> {
        // prctl reads its optional arguments as unsigned longs.
        const ONE: libc::c_ulong = 1;
        const ZERO: libc::c_ulong = 0;
        // SAFETY: plain syscalls on valid pointers into `self`, static strings or the stack.
        unsafe {
            // Own session and process group, so the whole group can be killed at once.
            check(libc::setsid())?;
            // Dies with the harness; set before the check so no death slips between them.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong))?;
            if libc::getppid() != self.parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // P and A re-raise the program's signal: no core file from them either.
            set_limit(libc::RLIMIT_CORE, 0, 0)?;
            // The marker's pipe is the one descriptor the program inherits on purpose.
            check(libc::fcntl(self.marker_fd, libc::F_SETFD, 0))?;
            if let Some((options, _)) = &self.scratch {
                if let Some((uid_map, gid_map)) = &self.user_maps {
                    check(libc::unshare(libc::CLONE_NEWUSER))?;
                    write_file(c"/proc/self/setgroups", b"deny")?;
                    write_file(c"/proc/self/uid_map", uid_map.as_bytes())?;
                    write_file(c"/proc/self/gid_map", gid_map.as_bytes())?;
                }
                let flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWPID;
                check(libc::unshare(flags))?;
                // Our mounts must not propagate back to the host.
                check(libc::mount(
                    ptr::null(),
                    c"/".as_ptr(),
                    ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    ptr::null(),
                ))?;
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
                enter_pid_namespace()?;
            }
            for (resource, soft, hard) in self.limits {
                set_limit(resource, soft, hard)?;
            }
            if let Some(uid) = self.uid {
                check(libc::setgroups(0, ptr::null()))?;
                check(libc::setresgid(uid, uid, uid))?;
                check(libc::setresuid(uid, uid, uid))?;
                // Never run the program as root because an id change silently did not happen.
                if libc::getuid() != uid || libc::geteuid() != uid || libc::getgid() != uid || libc::getegid() != uid {
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
                // The uid change cleared it.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong))?;
            }
            if let Some((_, program)) = &self.scratch {
                write_new_file(c"main.py", program)?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, ONE, ZERO, ZERO, ZERO))?;
            if let Some((ruleset, abi)) = self.landlock {
                if self.scratch.is_some() {
                    let tmp = landlock::open_dir(c"/tmp")?;
                    let added = landlock::add_rule(ruleset, tmp, landlock::Access::Full, true, abi);
                    libc::close(tmp);
                    added?;
                }
                landlock::restrict_self(ruleset)?;
            }
            if let Some(filters) = &self.seccomp {
                filters.install()?;
            }
        }
        Ok(())
    }
}

/// Forks A (pid 1 of the new PID namespace) and, from it, B; returns in B only.
///
/// # Safety
/// Between fork and exec, after `unshare(CLONE_NEWPID)`.
unsafe fn enter_pid_namespace() -> io::Result<()> {
    let mut status_pipe = [0; 2];
    check(libc::pipe2(status_pipe.as_mut_ptr(), libc::O_CLOEXEC))?;
    let [status_read, status_write] = status_pipe;
    let a = check_pid(libc::fork())?;
    if a > 0 {
        close_all_but(status_read);
        libc::_exit(relay_exit(a, status_read));
    }
    check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong))?;
    let b = check_pid(libc::fork())?;
    if b > 0 {
        close_all_but(status_write);
        reap_until(b, status_write);
    }
    libc::close(status_read);
    libc::close(status_write);
    Ok(())
}

/// A, pid 1: reaps every orphan until B exits, hands B's wait status to P and exits, which
/// kills the rest of the namespace.
unsafe fn reap_until(b: libc::pid_t, status_write: RawFd) -> ! {
    loop {
        let mut status = 0;
        let pid = libc::waitpid(-1, &mut status, 0);
        if pid == b {
            libc::write(status_write, (&raw const status).cast(), size_of::<libc::c_int>());
            libc::_exit(0);
        }
        if pid == -1 && *libc::__errno_location() != libc::EINTR {
            libc::_exit(1);
        }
    }
}

/// P: waits for A, then ends as B ended. Returns an exit code, or does not return when B was
/// killed by a signal, which P raises on itself.
unsafe fn relay_exit(a: libc::pid_t, status_read: RawFd) -> libc::c_int {
    while libc::waitpid(a, ptr::null_mut(), 0) == -1 && *libc::__errno_location() == libc::EINTR {}
    let mut status: libc::c_int = 0;
    let read = libc::read(status_read, (&raw mut status).cast(), size_of::<libc::c_int>());
    // A was killed before B ended (a timeout): P dies the same way.
    let signal = match read == size_of::<libc::c_int>() as isize {
        true if libc::WIFEXITED(status) => return libc::WEXITSTATUS(status),
        true if libc::WIFSIGNALED(status) => libc::WTERMSIG(status),
        _ => libc::SIGKILL,
    };
    libc::signal(signal, libc::SIG_DFL);
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigaddset(&mut set, signal);
    libc::sigprocmask(libc::SIG_UNBLOCK, &set, ptr::null_mut());
    libc::kill(libc::getpid(), signal);
    128 + signal
}

/// Closes every descriptor above stderr but `keep`: P and A must not hold the harness's
/// exec-status pipe open, or `spawn` would wait for the program to end.
unsafe fn close_all_but(keep: RawFd) {
    let keep = keep as libc::c_uint;
    if keep > 3 {
        libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, keep - 1, 0 as libc::c_uint);
    }
    libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0 as libc::c_uint);
}

fn set_limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    // SAFETY: valid pointers to stack values.
    unsafe {
        // Never above our own hard limit: raising it needs CAP_SYS_RESOURCE, which root may lack.
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        check(libc::getrlimit(resource, &mut current))?;
        let hard = hard.min(current.rlim_max);
        check(libc::setrlimit(resource, &libc::rlimit { rlim_cur: soft.min(hard), rlim_max: hard }))
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

fn check_pid(pid: libc::pid_t) -> io::Result<libc::pid_t> {
    check(pid).map(|()| pid)
}

/// Writes `bytes` to an existing file (a `/proc` control file).
fn write_file(path: &CStr, bytes: &[u8]) -> io::Result<()> {
    write_to(path, libc::O_WRONLY | libc::O_CLOEXEC, bytes)
}

fn write_new_file(path: &CStr, bytes: &[u8]) -> io::Result<()> {
    write_to(path, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC, bytes)
}

fn write_to(path: &CStr, flags: libc::c_int, mut bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and `bytes` is a valid buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), flags, 0o600);
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
