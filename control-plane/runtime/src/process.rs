//! A child process in its own process group, so that signals reach whatever it started too
//! (`sh -c 'app &'`, a dev server's workers), and nothing of it outlives its pod.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

pub(crate) struct GroupChild {
    child: Child,
    /// The group's id (the leader's pid).
    pgid: Option<Pid>,
    /// The group has been killed after its leader exited; its id may since have been reused,
    /// so it must not be signalled again.
    finished: bool,
}

impl GroupChild {
    /// Starts `cmd` as the leader of a new process group, stdin closed, output piped.
    pub(crate) fn spawn(cmd: &mut Command) -> io::Result<GroupChild> {
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);
        Ok(GroupChild {
            child,
            pgid,
            finished: false,
        })
    }

    pub(crate) fn id(&self) -> Option<u32> {
        self.pgid.map(|p| p.as_raw_nonzero().get().unsigned_abs())
    }

    pub(crate) fn take_output(&mut self) -> (Option<ChildStdout>, Option<ChildStderr>) {
        (self.child.stdout.take(), self.child.stderr.take())
    }

    /// Signals every process of the group.
    pub(crate) fn signal(&self, signal: Signal) {
        if self.finished {
            return;
        }
        if let Some(pgid) = self.pgid {
            // ESRCH: everyone already exited.
            let _ = kill_process_group(pgid, signal);
        }
    }

    /// Waits for the leader to exit. Cancel-safe.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// After the leader exited: kills what is left of its group, once.
    pub(crate) fn finish(&mut self) {
        self.signal(Signal::KILL);
        self.finished = true;
    }

    /// SIGTERM to the group; SIGKILL if the leader has not exited after `grace`; then the rest
    /// of the group is killed.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        self.signal(Signal::TERM);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => self.kill().await,
        };
        self.finish();
        status
    }

    /// SIGKILL to the group, and waits for the leader.
    pub(crate) async fn kill(&mut self) -> io::Result<ExitStatus> {
        self.signal(Signal::KILL);
        let status = self.child.wait().await;
        self.finish();
        status
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        // `kill_on_drop` only reaches the leader.
        self.signal(Signal::KILL);
    }
}
