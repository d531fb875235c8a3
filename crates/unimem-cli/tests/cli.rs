//! The `unimem` binary as a user runs it.

use std::process::{Command, Stdio};

const UNIMEM: &str = env!("CARGO_BIN_EXE_unimem");

#[test]
fn version_names_the_command() {
    let output = Command::new(UNIMEM).arg("--version").output().expect("run unimem --version");
    assert!(output.status.success(), "unimem --version failed: {output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("unimem "), "unimem --version printed {stdout:?}");
    assert!(stdout.trim_end().ends_with(env!("CARGO_PKG_VERSION")), "unimem --version printed {stdout:?}");
}

/// `unimem devices | head -1`: the reader goes away before the output is written.
#[test]
fn devices_into_a_closed_pipe_is_no_panic() {
    let mut child = Command::new(UNIMEM)
        .arg("devices")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unimem devices");
    drop(child.stdout.take()); // close the read end before the child writes
    let output = child.wait_with_output().expect("wait for unimem devices");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "unimem devices panicked on a closed pipe:\n{stderr}");
    #[cfg(unix)]
    let killed_by_sigpipe = std::os::unix::process::ExitStatusExt::signal(&output.status) == Some(13);
    #[cfg(not(unix))]
    let killed_by_sigpipe = false;
    assert!(
        output.status.success() || killed_by_sigpipe,
        "unimem devices on a closed pipe exited with {}:\n{stderr}",
        output.status
    );
}
