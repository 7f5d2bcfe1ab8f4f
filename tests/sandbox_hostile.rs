//! Hostile completions through `harness eval --completions --bench humaneval`, run as root and
//! as an unprivileged user: each gets the right verdict, nothing outside the sample's folder
//! changes, no process of the user dies and no secret reaches `items.jsonl`.
//!
//! Needs root, to make the unprivileged user (a uid of its own that no account uses) and to
//! watch its processes; the user's run is the path most researchers take.

use serde_json::{json, Value};
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const DATA: &str = "../shared/data/eval";
/// Below the sandbox's automatic uid blocks (60000 onwards) and above ordinary accounts.
const USER: u32 = 59_321;
const EARLY_EXIT: &str = "exited before its tests finished";

struct Case {
    name: &'static str,
    /// Top-level code run after HumanEval/0's canonical body, before its tests.
    code: String,
    /// The verdict that shows the attack failed (`None`: any, the harm is checked afterwards).
    verdict: Option<&'static str>,
    reason: Option<&'static str>,
}

fn case(
    name: &'static str,
    code: impl Into<String>,
    verdict: Option<&'static str>,
    reason: Option<&'static str>,
) -> Case {
    Case { name, code: code.into(), verdict, reason }
}

/// What a test run leaves for the attacks to aim at.
struct Victim {
    home: PathBuf,
    secret: String,
    port: u16,
    tmp_name: String,
}

fn cases(v: &Victim) -> Vec<Case> {
    let token = v.home.join(".token");
    let bashrc = v.home.join(".bashrc");
    let tmp = format!("/tmp/{}", v.tmp_name);
    let pth = "import site, sysconfig\nwrote = []\n\
               for d in set(site.getsitepackages() + [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]):\n    \
               try:\n        open(d + '/grape_hostile.pth', 'w').write('import os\\n')\n        wrote.append(d)\n    \
               except OSError:\n        pass\nassert not wrote, wrote\n";
    vec![
        case("canonical", "", Some("passed"), None),
        case("sys.exit(0)", "import sys\nsys.exit(0)\n", Some("failed"), Some(EARLY_EXIT)),
        case("os._exit(0)", "import os\nos._exit(0)\n", Some("failed"), Some(EARLY_EXIT)),
        case("raise SystemExit", "raise SystemExit\n", Some("failed"), Some(EARLY_EXIT)),
        case("exit()", "exit()\n", Some("failed"), Some(EARLY_EXIT)),
        case("quit()", "quit()\n", Some("failed"), Some(EARLY_EXIT)),
        case("sys.exit(main())", "def main():\n    return 0\nimport sys\nsys.exit(main())\n", Some("failed"), Some(EARLY_EXIT)),
        // Wrong answers, then an exit handler turns the failed run's status into 0.
        case(
            "atexit os._exit(0)",
            "has_close_elements = lambda numbers, threshold: False\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
            Some("failed"),
            Some("a test failed"),
        ),
        case("read a 0600 secret", format!("import sys\nsys.stderr.write(open({token:?}).read())\n"), Some("error"), None),
        case("read /etc/passwd", "import sys\nsys.stderr.write(open('/etc/passwd').read())\n", Some("error"), None),
        case("append to ~/.bashrc", format!("open({bashrc:?}, 'a').write('echo pwned\\n')\n"), Some("error"), None),
        // It may write its own private /tmp; the host's must not change.
        case("write in /tmp", format!("open({tmp:?}, 'w').write('x')\n"), None, None),
        case(
            "connect to 127.0.0.1",
            format!("import socket\nsocket.create_connection(('127.0.0.1', {}), timeout=1).close()\n", v.port),
            Some("error"),
            None,
        ),
        case("kill the harness", "import os\nos.kill(os.getppid(), 9)\n", None, None),
        case("kill every process", "import os\nos.kill(-1, 9)\n", None, None),
        case(
            "threading bomb",
            "import threading, time\nfor _ in range(5000):\n    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n",
            Some("error"),
            None,
        ),
        case("fork bomb", "import os\nwhile True:\n    os.fork()\n", None, None),
        case("huge stdout", "import sys\nfor _ in range(50):\n    sys.stdout.write('x' * 1_000_000)\n", Some("passed"), None),
        case(
            "ignore SIGTERM",
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)\n",
            Some("timeout"),
            None,
        ),
        case("write a .pth into site-packages", pth, Some("passed"), None),
        case(
            "setsid grandchild",
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(20)\n    os._exit(0)\n",
            Some("passed"),
            None,
        ),
    ]
}

fn humaneval_zero() -> Option<Value> {
    let path = Path::new(DATA).join("HumanEval.jsonl.gz");
    if !path.exists() {
        eprintln!("skipped: {} is not here", path.display());
        return None;
    }
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(fs::File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
    Some(serde_json::from_str(text.lines().next().unwrap()).unwrap())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Every live process (not a zombie) whose real uid is in `uids`.
fn processes_of(uids: std::ops::Range<u32>) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("").trim().to_string();
        let real = field("Uid:").split_whitespace().next().and_then(|u| u.parse::<u32>().ok());
        if real.is_some_and(|u| uids.contains(&u)) && !field("State:").starts_with('Z') {
            found.push(format!("{} {}", entry.file_name().to_string_lossy(), field("Name:")));
        }
    }
    found
}

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap().flatten() {
            chown_tree(&entry.path(), uid);
        }
    }
}

/// Runs every case as `as_user` (None: as root), and checks verdicts and the machine after.
fn run_cases(as_user: Option<u32>) {
    let Some(task) = humaneval_zero() else { return };
    // Everything the run needs sits in one world-traversable folder, wherever the checkout is,
    // and outside the folders each sample gets a private copy of (/tmp, /var/tmp), so the
    // attacks on it meet the sandbox's rules and not an empty directory.
    let root = tempfile::Builder::new().prefix("grape-hostile-").tempdir_in("/var/lib").unwrap();
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bin = root.path().join("harness");
    fs::copy(env!("CARGO_BIN_EXE_harness"), &bin).unwrap();
    let data = root.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::copy(Path::new(DATA).join("HumanEval.jsonl.gz"), data.join("HumanEval.jsonl.gz")).unwrap();
    let bench = root.path().join("humaneval.yaml");
    fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/humaneval.yaml"), &bench).unwrap();
    let home = root.path().join("home");
    fs::create_dir(&home).unwrap();
    let secret = format!("SECRET-{}-{}", std::process::id(), as_user.unwrap_or(0));
    fs::write(home.join(".token"), &secret).unwrap();
    fs::set_permissions(home.join(".token"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(home.join(".bashrc"), "# untouched\n").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let victim = Victim {
        home: home.clone(),
        secret: secret.clone(),
        port: listener.local_addr().unwrap().port(),
        tmp_name: format!("grape-hostile-{}-{}", std::process::id(), as_user.unwrap_or(0)),
    };
    let cases = cases(&victim);
    let body = task["canonical_solution"].as_str().unwrap();
    let completions: String = cases
        .iter()
        .map(|c| json!({"task_id": "HumanEval/0", "completion": format!("{body}\n{}", c.code)}).to_string() + "\n")
        .collect();
    let completions_path = root.path().join("completions.jsonl");
    fs::write(&completions_path, completions).unwrap();
    let out = root.path().join("out");
    fs::create_dir(&out).unwrap();
    if let Some(uid) = as_user {
        chown_tree(&home, uid);
        chown_tree(&out, uid);
    }
    // A process of the user's own that must outlive every attack.
    let mut sentinel = Command::new("sleep");
    sentinel.arg("120");
    if let Some(uid) = as_user {
        sentinel.uid(uid).gid(uid);
    }
    let mut sentinel = sentinel.spawn().unwrap();

    let mut eval = Command::new(&bin);
    eval.args(["eval", "--bench"])
        .arg(&bench)
        .arg("--completions")
        .arg(&completions_path)
        .arg("--out")
        .arg(&out)
        .arg("--data-dir")
        .arg(&data)
        .args(["--workers", "2"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &home)
        .current_dir(root.path());
    if let Some(uid) = as_user {
        eval.uid(uid).gid(uid);
    }
    let output = eval.output().unwrap();
    let sentinel_alive = sentinel.try_wait().unwrap().is_none();
    let _ = sentinel.kill();
    let _ = sentinel.wait();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "harness eval failed ({}): {stderr}", output.status);
    assert!(sentinel_alive, "a process of the user was killed");

    let items_text = fs::read_to_string(out.join("items.jsonl")).unwrap();
    let items: Vec<Value> = items_text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(items.len(), cases.len());
    let mut wrong = Vec::new();
    for (c, item) in cases.iter().zip(&items) {
        assert_eq!(item["sample"], json!(cases.iter().position(|x| x.name == c.name).unwrap()));
        let verdict = item["verdict"].as_str().unwrap();
        let reason = item["reason"].as_str();
        if c.verdict.is_some_and(|v| v != verdict) || (c.reason.is_some() && c.reason != reason) {
            wrong.push(format!(
                "{}: {verdict} ({reason:?}), expected {:?} ({:?}): {}",
                c.name, c.verdict, c.reason, item["stderr_tail"]
            ));
        }
    }
    assert!(wrong.is_empty(), "as {}:\n{}", as_user.map_or("root".into(), |u| format!("uid {u}")), wrong.join("\n"));

    // Nothing leaked, nothing changed, nothing left running.
    assert!(!items_text.contains(&victim.secret), "the secret reached items.jsonl");
    assert!(!items_text.contains("root:x:0:0"), "/etc/passwd reached items.jsonl");
    assert_eq!(fs::read_to_string(home.join(".bashrc")).unwrap(), "# untouched\n");
    assert!(!Path::new("/tmp").join(&victim.tmp_name).exists(), "a file appeared in the host's /tmp");
    let accepted = listener.accept();
    assert!(accepted.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "{accepted:?}");
    let site = Command::new("/usr/bin/python3")
        .args([
            "-I",
            "-c",
            "import site, sysconfig; print('\\n'.join(site.getsitepackages() + [sysconfig.get_paths()['purelib']]))",
        ])
        .output()
        .unwrap();
    for dir in String::from_utf8_lossy(&site.stdout).lines() {
        assert!(!Path::new(dir).join("grape_hostile.pth").exists(), "a .pth file landed in {dir}");
    }
    // As root the programs ran under the sandbox's own uids (only this test uses them now).
    let start = grape_harness::eval::sandbox::AUTO_UID_START;
    let uids = as_user.map_or(start..start + 1024, |uid| uid..uid + 1);
    assert_eq!(processes_of(uids), Vec::<String>::new(), "processes outlived the run");
    let metrics: Value = serde_json::from_str(&fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let sandbox = &metrics["humaneval"]["sandbox"];
    assert_eq!(sandbox["uid_drop"], json!(as_user.is_none()), "{sandbox}");
    assert_eq!(sandbox["unsandboxed"], json!(false), "{sandbox}");
    eprintln!("as {}: protections {sandbox}", as_user.map_or("root".into(), |u| format!("uid {u}")));
}

#[test]
fn hostile_completions_as_root() {
    if !is_root() {
        eprintln!("skipped: hostile_completions_as_root runs only as root");
        return;
    }
    run_cases(None);
}

#[test]
fn hostile_completions_as_an_unprivileged_user() {
    if !is_root() {
        eprintln!("skipped: needs root to run the harness as a fresh unprivileged uid");
        return;
    }
    run_cases(Some(USER));
}
