//! Starting, signalling and reaping a container's process. Each container runs as
//! `<this binary> exec-container LAUNCH.json` in a session of its own (so signals reach its whole
//! process group, as a container's cgroup would), which sets up the sandbox and execs the program
//! (see [`super::sandbox`]). A pipe tells a failed start (the helper writes why) from a started
//! program (exec closes the pipe with nothing written).

use std::fs::File;
use std::io::Read as _;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use tokio::process::{Child, Command};

use super::sandbox::{Launch, MARKER_ENV, STATUS_FD};

pub struct Process {
    child: Child,
    pid: i32,
}

pub enum Started {
    Running(Process),
    /// The sandbox or the exec failed; the message says why.
    Failed(String),
}

/// Starts one container: writes its launch description next to its log and runs the helper.
pub async fn start(
    helper: &Path,
    launch: &Launch,
    launch_file: &Path,
    log: &Path,
    state_dir: &Path,
) -> std::io::Result<Started> {
    std::fs::write(launch_file, serde_json::to_vec_pretty(launch)?)?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let (read_end, write_end) = pipe()?;
    let write_raw = {
        use std::os::fd::AsRawFd as _;
        write_end.as_raw_fd()
    };
    let mut cmd = Command::new(helper);
    cmd.arg("exec-container")
        .arg(launch_file)
        .env(MARKER_ENV, state_dir)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(false);
    // SAFETY: only async-signal-safe calls (setsid, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::dup2(write_raw, STATUS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(write_end);
    let pid = child.id().map(|p| p as i32).unwrap_or(-1);
    // Blocks until exec closes the pipe or the helper writes and exits.
    let message = tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        let _ = File::from(read_end).read_to_string(&mut s);
        s
    })
    .await
    .unwrap_or_default();
    let mut process = Process { child, pid };
    if message.is_empty() {
        Ok(Started::Running(process))
    } else {
        let _ = process.child.wait().await;
        Ok(Started::Failed(message))
    }
}

impl Process {
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// The container's process id, which is also its process group's.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

/// Sends `signal` to a container's whole process group (`pid` from [`Process::pid`]).
pub fn signal_group(pid: i32, signal: i32) {
    if pid > 0 {
        // SAFETY: killpg with the group this runner made for the container.
        unsafe { libc::killpg(pid, signal) };
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fds were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Ends processes left by an earlier runner with the same state directory (one that was killed
/// before it could stop its containers): SIGKILL to each marked process's group.
pub fn kill_leftovers(state_dir: &Path) -> usize {
    let want = format!("{MARKER_ENV}={}", state_dir.display());
    let me = std::process::id();
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) =
            std::fs::read(PathBuf::from("/proc").join(pid.to_string()).join("environ"))
        else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
            // SAFETY: signals to a process (group) that carries this runner's marker.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
                libc::kill(pid as i32, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}
