//! Exit status to [`ExitInfo`] (contract 3.3.5).

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use super::ExitInfo;

impl ExitInfo {
    /// The End fields for a wait status.
    pub fn from_status(status: ExitStatus) -> Self {
        if let Some(code) = status.code() {
            let text = format!("exit status {code}");
            return ExitInfo {
                exit_code: code,
                exited: true,
                error: (code != 0).then(|| text.clone()),
                status: text,
                oom_killed: false,
            };
        }
        match status.signal() {
            Some(sig) => {
                let text = format!("signal: {}", signal_name(sig));
                let status = if status.core_dumped() {
                    format!("{text} (core dumped)")
                } else {
                    text.clone()
                };
                ExitInfo {
                    exit_code: -1,
                    exited: false,
                    status,
                    error: Some(text),
                    oom_killed: false,
                }
            }
            // Stopped/continued statuses are never delivered for an exit wait; report
            // the raw value rather than inventing a code.
            None => {
                let text = format!("unknown wait status {:#x}", status.into_raw());
                ExitInfo {
                    exit_code: -1,
                    exited: false,
                    status: text.clone(),
                    error: Some(text),
                    oom_killed: false,
                }
            }
        }
    }
}

impl ExitInfo {
    /// Marks the End of a command whose tree lost a process to the OOM killer.
    pub fn with_oom_kill(mut self) -> Self {
        self.oom_killed = true;
        let base = self.error.take().unwrap_or_else(|| self.status.clone());
        self.error = Some(format!(
            "{base} (out of memory: the OOM killer ended a process of this command)"
        ));
        self
    }
}

/// The name the reference agent (Go's `syscall.Signal.String`) gives a signal.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        libc::SIGSTKFLT => "stack fault",
        libc::SIGCHLD => "child exited",
        libc::SIGCONT => "continued",
        libc::SIGSTOP => "stopped (signal)",
        libc::SIGTSTP => "stopped",
        libc::SIGTTIN => "stopped (tty input)",
        libc::SIGTTOU => "stopped (tty output)",
        libc::SIGURG => "urgent I/O condition",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        libc::SIGVTALRM => "virtual timer expired",
        libc::SIGPROF => "profiling timer expired",
        libc::SIGWINCH => "window changed",
        libc::SIGIO => "I/O possible",
        libc::SIGPWR => "power failure",
        libc::SIGSYS => "bad system call",
        other => return format!("signal {other}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: i32) -> ExitInfo {
        ExitInfo::from_status(ExitStatus::from_raw(v))
    }

    #[test]
    fn exit_codes() {
        assert_eq!(
            raw(0),
            ExitInfo {
                exit_code: 0,
                exited: true,
                status: "exit status 0".into(),
                error: None,
                oom_killed: false,
            }
        );
        assert_eq!(
            raw(3 << 8),
            ExitInfo {
                exit_code: 3,
                exited: true,
                status: "exit status 3".into(),
                error: Some("exit status 3".into()),
                oom_killed: false,
            }
        );
    }

    #[test]
    fn signals_and_core_dumps() {
        assert_eq!(
            raw(libc::SIGKILL),
            ExitInfo {
                exit_code: -1,
                exited: false,
                status: "signal: killed".into(),
                error: Some("signal: killed".into()),
                oom_killed: false,
            }
        );
        let segv = raw(libc::SIGSEGV | 0x80);
        assert_eq!(segv.status, "signal: segmentation fault (core dumped)");
        assert_eq!(segv.error.as_deref(), Some("signal: segmentation fault"));
        assert_eq!(raw(libc::SIGTERM).status, "signal: terminated");
        assert_eq!(signal_name(libc::SIGXCPU), "CPU time limit exceeded");
        assert_eq!(signal_name(40), "signal 40");
    }
}
