//! Landlock through its three system calls. The rule for a sample's own folder must be added
//! between fork and exec, after its private `/tmp` is mounted, where nothing may allocate; so
//! the ruleset is built here from plain syscalls rather than through the `landlock` crate, whose
//! builder allocates.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

// Access rights, each ABI adding to the last (linux/landlock.h).
const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;
/// Every filesystem right the given ABI knows.
fn fs_rights(abi: u32) -> u64 {
    match abi {
        1 => (1 << 13) - 1,
        2 => (1 << 14) - 1,
        3 | 4 => (1 << 15) - 1,
        _ => (1 << 16) - 1,
    }
}
/// The rights that may be granted on a file rather than a directory.
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;
const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;
const CREATE_RULESET_VERSION: u32 = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;

/// What a path may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read, list and execute: the interpreter, its libraries, a few devices.
    Read,
    /// Everything: the sample's own folder.
    Full,
}

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The kernel's Landlock ABI version, `None` where Landlock is absent or disabled.
pub fn abi() -> Option<u32> {
    // SAFETY: the version query takes no attribute pointer.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(version).ok().filter(|&v| v > 0)
}

/// The rights the ABI handles; anything handled and not granted by a rule is denied.
pub struct Policy {
    abi: u32,
    /// Paths opened once (`O_PATH`) with the access they get.
    paths: Vec<(OwnedFd, Access, bool)>,
}

impl Policy {
    /// Opens each existing path; missing ones are skipped (a system without `/lib64`).
    pub fn new(abi: u32, paths: &[(&Path, Access)]) -> Self {
        let mut opened = Vec::new();
        for &(path, access) in paths {
            let Ok(metadata) = std::fs::metadata(path) else { continue };
            let fd = std::fs::File::options().read(true).custom_flags(libc::O_PATH).open(path).map(OwnedFd::from);
            // A path we cannot open is one the sample could not reach either.
            let Ok(fd) = fd else { continue };
            opened.push((fd, access, metadata.is_dir()));
        }
        Self { abi, paths: opened }
    }

    pub fn abi(&self) -> u32 {
        self.abi
    }

    /// A fresh ruleset holding the static rules; the sample's folder is added to it with
    /// [`add_rule`] (in the child when the folder is its private `/tmp`).
    pub fn ruleset(&self) -> io::Result<OwnedFd> {
        let attr = RulesetAttr {
            handled_access_fs: fs_rights(self.abi),
            handled_access_net: if self.abi >= 4 { NET_BIND_TCP | NET_CONNECT_TCP } else { 0 },
            scoped: if self.abi >= 6 { SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL } else { 0 },
        };
        // Older kernels refuse fields they do not know, even zero ones past their size.
        let size = match self.abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: `attr` is valid for `size` bytes.
        let fd = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, &attr as *const RulesetAttr, size, 0u32) };
        let fd = RawFd::try_from(fd).ok().filter(|&fd| fd >= 0).ok_or_else(io::Error::last_os_error)?;
        // SAFETY: the kernel just returned this descriptor to us.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd) };
        for (path, access, is_dir) in &self.paths {
            add_rule(ruleset.as_raw_fd(), path.as_raw_fd(), *access, *is_dir, self.abi)?;
        }
        Ok(ruleset)
    }
}

/// Grants `access` beneath the open path `parent`. Safe between fork and exec.
pub fn add_rule(ruleset: RawFd, parent: RawFd, access: Access, is_dir: bool, abi: u32) -> io::Result<()> {
    let rights = match access {
        Access::Read => EXECUTE | READ_FILE | READ_DIR,
        Access::Full => fs_rights(abi),
    };
    let rights = if is_dir { rights } else { rights & FILE_RIGHTS } & fs_rights(abi);
    let attr = PathBeneathAttr { allowed_access: rights, parent_fd: parent };
    // SAFETY: `attr` is a valid path-beneath attribute.
    let rc = unsafe {
        libc::syscall(libc::SYS_landlock_add_rule, ruleset, RULE_PATH_BENEATH, &attr as *const PathBeneathAttr, 0u32)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a directory for [`add_rule`] without allocating. Safe between fork and exec.
pub fn open_dir(path: &CStr) -> io::Result<RawFd> {
    // SAFETY: `path` is NUL-terminated.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Confines the calling thread (and what it execs) to the ruleset; needs `no_new_privs`.
/// Safe between fork and exec.
pub fn restrict_self(ruleset: RawFd) -> io::Result<()> {
    // SAFETY: a plain syscall on a descriptor.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
