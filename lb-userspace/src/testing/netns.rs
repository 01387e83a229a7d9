//! Named network namespaces (`ip netns`), deleted on drop, and running code inside one.
//!
//! A thread can switch its own network namespace (`setns(CLONE_NEWNET)`) without
//! affecting the rest of the process; sockets it opens, interfaces it resolves, XDP
//! programs it attaches and processes it spawns all belong to that namespace. So
//! [`Netns::run`] and [`Netns::spawn`] run a closure on a fresh thread inside it.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    thread::JoinHandle,
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn cmd(program: &str, args: &[&str]) -> Result<Output, NetnsError> {
    let line = format!("{program} {}", args.join(" "));
    let out =
        Command::new(program).args(args).output().map_err(|source| NetnsError::Spawn { cmd: line.clone(), source })?;
    if !out.status.success() {
        return Err(NetnsError::Command { cmd: line, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(out)
}

/// A named network namespace that is deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name`, deleting a leftover namespace of that name first. Loopback is up.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        let _ = cmd("ip", &["netns", "del", name]);
        cmd("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        cmd("ip", &full)
    }

    /// `ip netns exec NAME program args...`
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, NetnsError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        cmd("ip", &full)
    }

    /// A `Command` that runs `program` inside the namespace (via `ip netns exec`). It is
    /// killed if the thread that spawns it dies, so a killed test leaves no server behind.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        die_with_parent(&mut c);
        c
    }

    /// Makes `cmd` start inside the namespace. Unlike `ip netns exec`, the mount
    /// namespace stays the host's, so bpffs pins are shared with the caller.
    pub fn process(&self, cmd: &mut Command) -> Result<(), NetnsError> {
        use std::os::unix::process::CommandExt as _;
        let path = self.path();
        let file = File::open(&path).map_err(|source| NetnsError::Enter { path, source })?;
        die_with_parent(cmd);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // setns(2), which is async-signal-safe. `file` stays open in the parent (moved
        // into the closure, which the Command keeps) until the child is spawned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&path)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Starts `f` on a new thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T, NetnsError>> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path)?;
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = cmd("ip", &["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete network namespace");
        }
    }
}

/// Makes the child get SIGKILL when the spawning thread exits (PR_SET_PDEATHSIG).
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe; runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &std::path::Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Enter { path: path.to_owned(), source })?;
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Enter { path: path.to_owned(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Deletes namespaces named `{prefix}{pid}-...` whose creating process is gone: what a
/// killed test run left behind.
pub fn sweep_stale(prefix: &str) {
    let Ok(out) = cmd("ip", &["netns", "list"]) else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            tracing::info!(netns = name, "deleting a namespace left behind by an earlier run");
            let _ = cmd("ip", &["netns", "del", name]);
        }
    }
}
