//! Child processes that cannot outlive the process that started them, and the stop signals
//! (SIGTERM, SIGINT) passed on to them: what `run` (which starts `launch`) and `launch` (which
//! starts the workers) share, so that stopping the top stops the whole tree and killing it leaves
//! nothing running.
//!
//! Each child leads a process group of its own: a terminal's Ctrl-C (sent to the foreground group)
//! reaches only the parent, which passes it on once, and a signal to the group also reaches
//! whatever the child itself started. Each child also asks the kernel for a signal when its parent
//! dies (`PR_SET_PDEATHSIG`), which is what still works when the parent is SIGKILLed and can pass
//! nothing on. The kernel sends it when the *thread* that forked the child ends, so children are
//! started from a thread that lives as long as the process (both callers start them from `main`).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGKILL, SIGTERM};
use signal_hook::iterator::Signals;

/// The signals that ask a training to save a checkpoint and stop.
pub const STOP_SIGNALS: [i32; 2] = [SIGTERM, SIGINT];

/// Catches [`STOP_SIGNALS`] from now on: register before starting a child, so that no signal
/// arriving in between is lost (it then waits in [`Signals::pending`]).
pub fn stop_signals() -> Result<Signals> {
    Signals::new(STOP_SIGNALS).context("installing the SIGTERM/SIGINT handlers")
}

/// Makes the process `cmd` starts lead its own process group and receive `on_parent_death` when
/// this process dies, however it dies. `launch` uses SIGTERM for itself (it then stops its workers
/// gently and they save a checkpoint) and SIGKILL for its workers (a worker that lost its launcher
/// has no one to report to).
pub fn tie_to_parent(cmd: &mut Command, on_parent_death: i32) {
    let parent = std::process::id() as libc::pid_t;
    cmd.process_group(0);
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, on_parent_death as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the request was made: nobody will send the signal.
            if libc::getppid() != parent {
                libc::_exit(128 + on_parent_death);
            }
            Ok(())
        });
    }
}

/// Sends `sig` to the process group `child` leads. Only for a child not yet reaped: a reaped
/// child's id may belong to someone else by now, an unreaped one's cannot.
pub fn signal_group(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a process group we created; failure (already gone) is harmless.
    unsafe { libc::kill(-(child.id() as libc::pid_t), sig) };
}

/// `SIGTERM`, `SIGINT`, … for messages.
pub fn signal_name(sig: i32) -> String {
    signal_hook::low_level::signal_name(sig).map_or_else(|| format!("signal {sig}"), str::to_string)
}

/// How a supervised child ended, and the stop signal passed on to it, if any.
pub struct Ended {
    pub status: ExitStatus,
    pub stopped_by: Option<i32>,
    /// Killed after `grace` because it did not stop.
    pub killed: bool,
}

/// Waits for `child` (started with [`tie_to_parent`]), passing each stop signal this process
/// gets on to its group; SIGKILLs the group when it is still running `grace` after the first.
pub fn wait_forwarding(
    child: &mut Child,
    signals: &mut Signals,
    grace: Duration,
    mut note: impl FnMut(&str),
) -> Result<Ended> {
    let mut stopped_by = None;
    let mut deadline: Option<Instant> = None;
    let mut killed = false;
    loop {
        for sig in signals.pending() {
            note(&format!("got {}, passing it on", signal_name(sig)));
            signal_group(child, sig);
            stopped_by.get_or_insert(sig);
            deadline.get_or_insert(Instant::now() + grace);
        }
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Ended {
                status,
                stopped_by,
                killed,
            });
        }
        if !killed && deadline.is_some_and(|d| Instant::now() >= d) {
            note(&format!(
                "still running {} s after the signal; killing it",
                grace.as_secs()
            ));
            signal_group(child, SIGKILL);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
