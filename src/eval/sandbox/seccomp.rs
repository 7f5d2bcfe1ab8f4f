//! The system calls a generated program is refused, where Landlock does not reach: sockets other
//! than Unix ones (Landlock governs TCP only, and only from ABI 4), new namespaces, tracing and
//! reading other processes, and kernel interfaces a test never needs. Compiled once; installed
//! between fork and exec, which allocates nothing.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use std::collections::BTreeMap;
use std::io;

/// Refused outright with `EPERM`.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
];

/// `clone` flags that would make a namespace.
const NEW_NAMESPACES: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// The filters, in the order they are installed.
pub struct Filters(Vec<BpfProgram>);

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

impl Filters {
    /// `None` on an architecture seccompiler does not know.
    pub fn new() -> io::Result<Option<Self>> {
        let Ok(arch) = std::env::consts::ARCH.try_into() else { return Ok(None) };
        let build = || -> Result<Vec<BpfProgram>, seccompiler::Error> {
            let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
            // Only Unix sockets: no TCP, UDP, raw, packet or netlink socket can even be made.
            let not_unix = condition(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?;
            denied.insert(libc::SYS_socket, vec![SeccompRule::new(vec![not_unix])?]);
            let mut clone_rules = Vec::new();
            for flag in NEW_NAMESPACES {
                let flag = flag as u64;
                clone_rules.push(SeccompRule::new(vec![condition(0, SeccompCmpOp::MaskedEq(flag), flag)?])?);
            }
            denied.insert(libc::SYS_clone, clone_rules);
            let deny =
                SeccompFilter::new(denied, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)?;
            // clone3 passes its flags in memory a filter cannot read; ENOSYS makes glibc fall
            // back to clone, whose flags the first filter checks.
            let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
            let clone3 =
                SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)?;
            Ok(vec![deny.try_into()?, clone3.try_into()?])
        };
        build().map(|filters| Some(Self(filters))).map_err(io::Error::other)
    }

    /// Installs every filter on the calling thread (and sets `no_new_privs`). Safe between fork
    /// and exec: seccompiler only makes the two system calls.
    pub fn install(&self) -> io::Result<()> {
        for filter in &self.0 {
            seccompiler::apply_filter(filter).map_err(|e| match e {
                seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                _ => io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        }
        Ok(())
    }
}

/// Whether this kernel takes seccomp filters.
pub fn available() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer; it fails with EINVAL without CONFIG_SECCOMP.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP) >= 0 }
}
